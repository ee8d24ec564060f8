"""Capture an arbitrary ``nn.Module`` as a ``torch.fx.GraphModule`` whose function is checked.

Two graph flavours come out of here:

* ``"module"``: ``torch.fx.symbolic_trace``; layers stay ``call_module`` nodes.
* ``"aten"``: non-strict ``torch.export.export(...).module()``; parameters are ``get_attr`` nodes and
  ops are ATen overloads. BatchNorm and dropout calls are turned back into ``nn.BatchNorm*`` /
  ``nn.Dropout`` modules so that ``.train()`` / ``.eval()`` keep working on the captured model.

Every capture is run once on the example inputs (which also records shapes in ``node.meta``) and
compared with the eager model in eval mode; a graph that errors or differs is rejected. For module
graphs the two runs go side by side and each layer computes once (``r2r_fx/instep.py``).
"""

from __future__ import annotations

import contextlib
import logging
import operator
import traceback
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from r2r_fx.errors import CaptureError
from r2r_fx.instep import eval_mode, run_in_step
from r2r_fx.rules import is_stochastic_depth
from r2r_fx.tree import fresh_inputs, max_errors

__all__ = ["CaptureError", "capture", "example_inputs_of", "flavour_of", "from_exported_program", "record_shapes"]

logger = logging.getLogger(__name__)

_CAPTURE_RTOL = 1e-5
_aten = torch.ops.aten


def flavour_of(gm: torch.fx.GraphModule) -> str:
    """``"aten"`` if the graph calls ATen overloads, else ``"module"``."""
    flavour = gm.meta.get("r2r_flavour")
    if flavour:
        return flavour
    for node in gm.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            return "aten"
    return "module"


def example_inputs_of(gm: torch.fx.GraphModule) -> tuple[Any, ...]:
    """The example inputs recorded at capture time (random tensors of the same shapes and dtypes)."""
    specs = gm.meta.get("r2r_input_specs")
    if specs is None:
        raise ValueError("this GraphModule carries no example input shapes; pass example_inputs explicitly")
    return tuple(_make_input(shape, dtype) for shape, dtype in specs)


def _make_input(shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.randn(*shape, dtype=dtype)
    if dtype == torch.bool:
        return torch.ones(*shape, dtype=dtype)
    return torch.zeros(*shape, dtype=dtype)


def record_shapes(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], *, meta: bool = False) -> Any:
    """Run ``gm`` once on the inputs, store ``tensor_meta`` on every node, return the output.

    With ``meta=True`` the run happens on the meta device (parameters and inputs swapped for
    storage-less tensors for the duration): shapes only, no arithmetic, no copy of the weights.
    """
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            if not meta:
                return ShapeProp(gm).propagate(*example_inputs)
            state = {
                k: torch.empty_like(v, device="meta")
                for k, v in list(gm.named_parameters(remove_duplicate=False))
                + list(gm.named_buffers(remove_duplicate=False))
            }
            args = [torch.empty_like(t, device="meta") if isinstance(t, torch.Tensor) else t for t in example_inputs]
            with torch.nn.utils.stateless._reparametrize_module(gm, state):
                return ShapeProp(gm).propagate(*args)
    finally:
        gm.train(was_training)


def capture(
    model: nn.Module, example_inputs: Any, *, via: str = "auto", check: bool = True, rtol: float = _CAPTURE_RTOL
) -> torch.fx.GraphModule:
    """Capture ``model`` as a GraphModule whose eval-mode output matches eager within ``rtol``.

    ``via`` is ``"auto"`` (symbolic tracing, then torch.export), ``"symbolic_trace"`` or ``"export"``.
    ``check=False`` skips the comparison with eager (shapes then come from a meta-device run: no
    arithmetic at all); a graph that cannot even run on meta tensors is still rejected.

    ``model`` is never modified, but like ``torch.fx.symbolic_trace`` and ``torch.export`` the graph
    shares parameters and layers with it (no copy of the weights); the passes copy before they change
    anything. Deep-copy the result if it must be independent of ``model``. Every module keeps the
    train/eval mode it has in ``model``.
    """
    builders = {"symbolic_trace": ("module", _symbolic_trace), "export": ("aten", _export)}
    if via != "auto" and via not in builders:
        raise ValueError(f"via must be 'auto', 'symbolic_trace' or 'export', got {via!r}")
    chain = list(builders.values()) if via == "auto" else [builders[via]]
    if not isinstance(model, nn.Module):
        raise TypeError(f"capture() needs an nn.Module, got {type(model).__name__}")
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    reference = None
    causes: list[str] = []
    for flavour, build in chain:
        try:
            with eval_mode(model, no_grad=False):
                gm = build(model, inputs)
            if not check:
                record_shapes(gm, inputs, meta=True)
                return _finish(gm, model, flavour, inputs)
            if reference is None and flavour == "module":
                # One joint run. Anything short of a match (out of step, an error, a difference) is
                # decided by the plain separate runs below, which report the real cause.
                with contextlib.suppress(Exception):
                    joint = run_in_step(model, gm, fresh_inputs(inputs))
                    if joint is not None and max_errors(*joint)[1] <= rtol:
                        return _finish(gm, model, flavour, inputs)
            if reference is None:
                reference = _eval_output(model, fresh_inputs(inputs))
            output = record_shapes(gm, fresh_inputs(inputs))
        except _EagerFailure:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes a reason for the user
            causes.append(f"{flavour}: {_describe_failure(exc)}")
            logger.info("capture via %s failed: %s", flavour, exc)
            continue
        try:
            _, rel = max_errors(reference, output)
        except ValueError as exc:
            causes.append(f"{flavour}: output structure differs from eager ({exc})")
            continue
        if not rel <= rtol:
            causes.append(f"{flavour}: graph output differs from eager (relative error {rel:.3g})")
            continue
        return _finish(gm, model, flavour, inputs)
    if check and reference is None:
        _eval_output(model, fresh_inputs(inputs))  # a model that fails by itself is reported as such
    raise CaptureError("could not capture the model:\n  " + "\n  ".join(causes))


class _EagerFailure(CaptureError):
    """The eager model itself fails on the example inputs."""


def _finish(gm: torch.fx.GraphModule, model: nn.Module, flavour: str, inputs: tuple[Any, ...]) -> torch.fx.GraphModule:
    gm.meta["r2r_flavour"] = flavour
    gm.meta["r2r_input_specs"] = [(tuple(t.shape), t.dtype) for t in inputs if isinstance(t, torch.Tensor)]
    # Shared layers already have their own mode; containers the GraphModule made and modules the
    # capture added (ATen batch norms, dropouts) take the mode of the model part they stand for.
    modes = {name: m.training for name, m in model.named_modules()}
    sources = gm.meta.get("r2r_param_sources", {})
    for name, module in gm.named_modules():
        source = sources.get(f"{name}.weight", sources.get(f"{name}.bias", name)).rpartition(".")[0]
        mode = modes.get(name, modes.get(source, model.training))
        if module.training != mode:
            module.training = mode
    return gm


def _eval_output(model: nn.Module, inputs: tuple[Any, ...]) -> Any:
    """The model's eval-mode output, leaving every module's mode as it was (no copy of the weights)."""
    try:
        with eval_mode(model):
            return model(*inputs)
    except Exception as exc:
        raise _EagerFailure(f"the eager model fails on the example inputs: {exc}") from exc


def _describe_failure(exc: BaseException) -> str:
    """One line naming the error and the innermost user source line it came from."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = ""
    for frame in reversed(frames):
        if "site-packages/torch/" not in frame.filename and "/r2r_fx/" not in frame.filename:
            where = f" (at {frame.filename}:{frame.lineno}: {frame.line})"
            break
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}{where}"


class _Tracer(torch.fx.Tracer):
    """``torch.fx.Tracer`` with quicker paths for the common cases; it records the same graph.

    * ``create_arg``: proxies, plain tuples and plain constants are converted without the chain of
      parameter/buffer/constant tests the base class runs first (none of them applies to these).
    * ``call_module``: the base class also keeps a ``Scope`` for its own ``node_name_to_scope``
      table, which the graph never sees; the ``nn_module_stack`` of every node is kept as it is
      (except where ``forward`` catches an exception raised inside a submodule: torch then leaves that
      submodule on the stack of every later node, this tracer takes it off).

    One deliberate difference in the graph: torchvision's ``StochasticDepth`` stays a layer
    (``call_module``), as ``nn.Dropout`` does. Traced through, it would record its ``training`` flag
    as the constant of the mode at capture (eval), and a captured or grown model put in train mode
    would silently skip stochastic depth.
    """

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return is_stochastic_depth(m) or super().is_leaf_module(m, module_qualified_name)

    def create_arg(self, a: Any) -> Any:
        kind = type(a)
        if kind is torch.fx.Proxy:
            return a.node
        if kind is tuple:
            return tuple([self.create_arg(x) for x in a])
        if kind in _PLAIN_CONSTANTS:
            return a
        return super().create_arg(a)

    def call_module(self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        path = self.path_of_module(m)
        calls = self.num_calls.get(path, 0)
        self.module_stack[f"{path}@{calls}" if calls else path] = (path, type(m))
        self.num_calls[path] = calls + 1
        try:
            if not self.is_leaf_module(m, path):
                return forward(*args, **kwargs)
            return self.create_proxy("call_module", path, args, kwargs)
        finally:
            self.module_stack.popitem(last=True)


_PLAIN_CONSTANTS = {int, float, bool, str, type(None)}


def _trace_module(model: nn.Module) -> torch.fx.GraphModule:
    """``torch.fx.symbolic_trace(model)``, with the quicker tracer above (StochasticDepth kept as a layer)."""
    tracer = _Tracer()
    graph = tracer.trace(model)
    graph._tracer_cls = torch.fx.Tracer  # what reloading a pickled GraphModule re-traces with: torch's own
    return torch.fx.GraphModule(tracer.root, graph, type(model).__name__)


def _symbolic_trace(model: nn.Module, inputs: tuple[Any, ...]) -> torch.fx.GraphModule:
    parked = set(model.__dict__)
    try:
        gm = _trace_module(model)
        # String annotations (``from __future__ import annotations``) become str globals in the generated
        # code, which breaks pickling the GraphModule: drop them.
        annotated = [node for node in gm.graph.nodes if isinstance(node.type, str)]
        for node in annotated:
            node.type = None
        if annotated:
            gm.recompile()
    finally:
        # The tracer parks the tensors it meets in ``forward`` on the model as ``_tensor_constant0``,
        # ...; the GraphModule holds its own references, so the model gets its attributes back as they were.
        for name in set(model.__dict__) - parked:
            del model.__dict__[name]
    return gm


def _export(model: nn.Module, inputs: tuple[Any, ...]) -> torch.fx.GraphModule:
    dynamic = tuple({0: torch.export.Dim.AUTO} if isinstance(t, torch.Tensor) and t.dim() > 0 else None for t in inputs)
    try:
        program = torch.export.export(model, inputs, strict=False, dynamic_shapes=dynamic)
    except Exception:  # noqa: BLE001 - a dynamic batch is a nicety; retry with static shapes
        program = torch.export.export(model, inputs, strict=False)
    return from_exported_program(program)


def from_exported_program(program: torch.export.ExportedProgram) -> torch.fx.GraphModule:
    """A plain GraphModule (``.train()``/``.eval()`` work) from an ExportedProgram, e.g. a loaded .pt2."""
    exported = program.module()
    graph = exported.graph
    for node in list(graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            graph.erase_node(node)
    gm = torch.fx.GraphModule(exported, graph)
    # the export tracer cannot be rebuilt when unpickling; the graph's copy too, or deepcopies bring it back
    gm._tracer_cls = graph._tracer_cls = None
    _modulize_train_flags(gm)
    return gm


def _modulize_train_flags(gm: torch.fx.GraphModule) -> None:
    """Replace ATen batch_norm/dropout calls by nn modules so ``.train()`` / ``.eval()`` act on them."""
    graph = gm.graph
    count = 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in (_aten.batch_norm.default, _aten._native_batch_norm_legit_no_training.default):
            module = _batch_norm_module(gm, node)
            if module is None:
                continue
            name = f"r2r_bn_{count}"
            # where each parameter came from, so optimizers built on the eager model can be carried over
            renames = gm.meta.setdefault("r2r_param_sources", {})
            for attr, arg in zip(("weight", "bias"), node.args[1:3]):
                if getattr(arg, "op", None) == "get_attr":
                    renames[f"{name}.{attr}"] = str(arg.target)
        elif node.target in (_aten.dropout.default, _aten.dropout_.default, _aten.feature_dropout.default):
            p = node.args[1]
            module = nn.Dropout2d(p) if node.target == _aten.feature_dropout.default else nn.Dropout(p)
            name = f"r2r_dropout_{count}"
        else:
            continue
        count += 1
        gm.add_submodule(name, module)
        with graph.inserting_before(node):
            new = graph.call_module(name, (node.args[0],))
        new.meta = dict(node.meta)
        if node.target == _aten._native_batch_norm_legit_no_training.default:
            for user in list(node.users):  # a tuple (out, mean, invstd): only [0] may be used
                if user.target is operator.getitem and user.args[1] == 0:
                    user.replace_all_uses_with(new)
                    graph.erase_node(user)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    # num_batches_tracked updates left behind by a train-mode export are done by the modules now.
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target == _aten.add_.Tensor and not node.users:
            target = node.args[0]
            if getattr(target, "op", None) == "get_attr" and str(target.target).endswith("num_batches_tracked"):
                graph.erase_node(node)
    graph.eliminate_dead_code()
    _drop_unused_attributes(gm)
    graph.lint()
    gm.recompile()


def _batch_norm_module(gm: torch.fx.GraphModule, node: torch.fx.Node) -> nn.Module | None:
    x, weight, bias, mean, var = node.args[:5]
    if node.target == _aten.batch_norm.default:
        momentum, eps = node.args[6], node.args[7]
    else:
        momentum, eps = node.args[5], node.args[6]
    tensors = [_attr_tensor(gm, a) for a in (weight, bias, mean, var)]
    if any(t is None and a is not None for t, a in zip(tensors, (weight, bias, mean, var))):
        return None
    if tensors[2] is None or tensors[3] is None:
        return None  # no running statistics: the functional form is already mode-independent
    rank = len(node.meta["val"].shape) if "val" in node.meta else None
    cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(rank)
    if cls is None:
        return None
    w, b, rm, rv = tensors
    module = cls(rm.shape[0], eps=eps, momentum=momentum, affine=w is not None)
    module.to(device=rm.device, dtype=rm.dtype)
    with torch.no_grad():
        if w is not None:
            module.weight = nn.Parameter(w.detach().clone(), requires_grad=w.requires_grad)
        if b is not None:
            module.bias = nn.Parameter(b.detach().clone(), requires_grad=b.requires_grad)
        module.running_mean.copy_(rm)
        module.running_var.copy_(rv)
    tracked = _find_num_batches_tracked(gm, mean)
    if tracked is not None:
        module.num_batches_tracked.copy_(tracked)
    return module


def _attr_tensor(gm: torch.fx.GraphModule, node: Any) -> torch.Tensor | None:
    if node is None or getattr(node, "op", None) != "get_attr":
        return None
    return _get_attr(gm, node.target)


def _find_num_batches_tracked(gm: torch.fx.GraphModule, mean_node: torch.fx.Node) -> torch.Tensor | None:
    prefix = str(mean_node.target).rpartition(".")[0]
    name = f"{prefix}.num_batches_tracked" if prefix else "num_batches_tracked"
    try:
        return _get_attr(gm, name)
    except AttributeError:
        return None


def _get_attr(gm: nn.Module, target: str) -> Any:
    owner, _, name = target.rpartition(".")
    module = gm.get_submodule(owner) if owner else gm
    return getattr(module, name)


def _drop_unused_attributes(gm: torch.fx.GraphModule) -> None:
    """Delete parameters/buffers no get_attr node reads any more (they moved into new modules)."""
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    used_modules = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    for name, _ in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers()):
        owner = name.rpartition(".")[0]
        if name in used or any(owner == m or owner.startswith(m + ".") for m in used_modules):
            continue
        module = gm.get_submodule(owner) if owner else gm
        attr = name.rpartition(".")[2]
        if attr in module._parameters:
            del module._parameters[attr]
        elif attr in module._buffers:
            del module._buffers[attr]
