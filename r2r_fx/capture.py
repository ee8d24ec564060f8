"""Capture an arbitrary ``nn.Module`` as a ``torch.fx.GraphModule`` whose function is checked.

Two graph levels come out of here (``gm.meta["r2r_graph_level"]``):

* ``"module"``: ``torch.fx.symbolic_trace``; layers stay ``call_module`` nodes.
* ``"aten"``: non-strict ``torch.export.export(...).module()``; parameters are ``get_attr`` nodes and
  ops are ATen overloads. BatchNorm and dropout calls are turned back into ``nn.BatchNorm*`` /
  ``nn.Dropout`` modules so that ``.train()`` / ``.eval()`` keep working on the captured model.

Every capture is run once on the example inputs (which also records shapes in ``node.meta``) and
compared with the eager model in eval mode, each on its own copy of the inputs; a graph that errors or
differs is rejected.

Flags that follow ``self.training`` (``F.dropout(x, p, self.training)``, ``F.batch_norm(...,
self.training)``) are traced as constants of the mode at capture. Both levels find them by a second
trace in train mode (export: only when the graph has such calls outside torch's own layers) and turn
each into the ``nn`` layer that follows ``.train()``/``.eval()``; a flag fixed in the code stays fixed.
A model whose graph differs between the modes in any other way is marked eval-only
(``gm.meta["r2r_eval_only"]`` holds the reason): its graph computes the eval-mode function.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import operator
import traceback
import types
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from r2r_fx.compat import ExceptionSafeTracer, drop_export_guards, is_concrete_int, set_tracer_class, swapped_tensors
from r2r_fx.compat import aten as _aten
from r2r_fx.errors import CaptureError
from r2r_fx.inline import equivalent, inlined_forwards, unsupported
from r2r_fx.rules import LAYERS, is_stochastic_depth, rule_for
from r2r_fx.train_mode import follow_train_flags, modulize_train_flags
from r2r_fx.tree import fresh_inputs, max_errors

__all__ = [
    "CaptureError",
    "capture",
    "compare_with_eager",
    "eval_mode",
    "example_inputs_of",
    "from_exported_program",
    "record_shapes",
]

logger = logging.getLogger(__name__)

_CAPTURE_RTOL = 1e-5


@contextlib.contextmanager
def eval_mode(model: nn.Module, *, no_grad: bool = True) -> Iterator[None]:
    """``model`` in eval mode (and without autograd) for the duration; every module's mode restored after."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        if any(mode for _, mode in modes):  # a model already in eval mode is left untouched
            model.eval()
        with torch.no_grad() if no_grad else contextlib.nullcontext():
            yield
    finally:
        for m, mode in modes:
            if m.training != mode:
                m.training = mode


@contextlib.contextmanager
def _train_mode(model: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.train()
        yield
    finally:
        for m, mode in modes:
            m.training = mode


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
    with eval_mode(gm):
        if not meta:
            return ShapeProp(gm).propagate(*example_inputs)
        state = {
            k: torch.empty_like(v, device="meta")
            for k, v in list(gm.named_parameters(remove_duplicate=False))
            + list(gm.named_buffers(remove_duplicate=False))
        }
        args = [torch.empty_like(t, device="meta") if isinstance(t, torch.Tensor) else t for t in example_inputs]
        with swapped_tensors(gm, state):
            return ShapeProp(gm).propagate(*args)


def capture(
    model: nn.Module, example_inputs: Any, *, via: str = "auto", check: bool = True, rtol: float = _CAPTURE_RTOL
) -> torch.fx.GraphModule:
    """Capture ``model`` as a GraphModule whose eval-mode output matches eager within ``rtol``.

    ``via`` is ``"auto"`` (symbolic tracing, then torch.export), ``"symbolic_trace"`` or ``"export"``.
    ``check=False`` skips the comparison with eager (shapes then come from a meta-device run: no
    arithmetic at all); a graph that cannot even run on meta tensors is still rejected. A model built on
    the meta device (no weights: planning a 70B model's growth) is captured that way, its inputs moved there.

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
    if weights_on_meta(model):  # no values to compare (planning at scale): shapes come from a meta run
        check = False
        inputs = tuple(t.to("meta") if isinstance(t, torch.Tensor) else t for t in inputs)
    reference = None
    causes: list[str] = []
    for level, build in chain:
        try:
            with eval_mode(model, no_grad=False):
                gm = build(model, inputs)
            if not check:
                record_shapes(gm, inputs, meta=True)
                return _finish(gm, model, level, inputs)
            if reference is None:
                reference = _eval_output(model, fresh_inputs(inputs))
            output = record_shapes(gm, fresh_inputs(inputs))
        except _EagerFailure:
            raise
        except Exception as exc:  # noqa: BLE001 - every failure becomes a reason for the user
            causes.append(f"{level}: {_describe_failure(exc)}")
            logger.info("capture via %s failed: %s", level, exc)
            continue
        try:
            _, rel = max_errors(reference, output)
        except ValueError as exc:
            causes.append(f"{level}: output structure differs from eager ({exc})")
            continue
        if not rel <= rtol:
            causes.append(f"{level}: graph output differs from eager (relative error {rel:.3g})")
            continue
        gm = _finish(gm, model, level, inputs)
        if "r2r_eval_only" not in gm.meta:
            _check_train_mode(model, gm, inputs, rtol)
        opaque = _opaque_calls(gm) if via == "auto" and level == "module" else []
        if opaque:  # the ATen graph sees through them, where it can be had as well
            try:
                aten = capture(model, inputs, via="export", check=check, rtol=rtol)
            except CaptureError as exc:
                logger.info("capture via export (for %s) failed: %s", ", ".join(opaque), exc)
            else:
                if "r2r_eval_only" not in aten.meta or "r2r_eval_only" in gm.meta:
                    aten.meta["r2r_capture_note"] = (
                        f"torch.export: the module graph keeps {', '.join(opaque)} as calls no rule describes"
                    )
                    return aten
        return gm
    if check and reference is None:
        _eval_output(model, fresh_inputs(inputs))  # a model that fails by itself is reported as such
    raise CaptureError("could not capture the model:\n  " + "\n  ".join(causes))


def weights_on_meta(model: nn.Module) -> bool:
    """True when ``model`` was built on the meta device (``with torch.device("meta"):``): shapes, no values."""
    return any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers()))


def _opaque_calls(gm: torch.fx.GraphModule) -> list[str]:
    """Python functions outside torch that the module graph keeps as calls (``torch.fx.wrap``: torchvision's
    Swin attention) and that no rule describes: the analysis would freeze everything they touch."""
    names = []
    for node in gm.graph.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, types.FunctionType):
            continue
        module = getattr(target, "__module__", "") or ""
        if module == "torch" or module.startswith(("torch.", "_operator", "operator", "math")):
            continue
        if rule_for(node, gm) is None and target.__name__ not in names:
            names.append(target.__name__)
    return names


class _EagerFailure(CaptureError):
    """The eager model itself fails on the example inputs."""


def _finish(gm: torch.fx.GraphModule, model: nn.Module, level: str, inputs: tuple[Any, ...]) -> torch.fx.GraphModule:
    gm.meta["r2r_graph_level"] = level
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


def compare_with_eager(model: nn.Module, gm: torch.fx.GraphModule, inputs: Sequence[Any]) -> float:
    """The eval-mode relative error of ``gm`` against ``model``, each run on its own copy of ``inputs``
    (what ``capture`` checks; recording shapes on ``gm`` as it goes). ValueError if the outputs differ in
    structure; the graph's own errors propagate."""
    reference = _eval_output(model, fresh_inputs(tuple(inputs)))
    return max_errors(reference, record_shapes(gm, fresh_inputs(tuple(inputs))))[1]


@contextlib.contextmanager
def _kept_as_is(*models: nn.Module) -> Iterator[None]:
    """Every module's mode and every buffer (norm statistics, power-iteration vectors) restored after."""
    modes = [(m, m.training) for model in models for m in model.modules()]
    buffers = [(b, b.clone()) for model in models for b in model.buffers()]
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


def _check_train_mode(model: nn.Module, gm: torch.fx.GraphModule, inputs: tuple[Any, ...], rtol: float) -> None:
    """Run eager and the graph once in train mode from the same state and seed (dropout masks then match);
    a graph that computes something else there (a layer's own train-mode code the trace could not see,
    such as spectral norm's power iteration, or outputs of another structure) is marked eval-only.

    Both run the same ops, so any float32 difference is measured again on float64 copies, where
    rounding stays below 1e-9: a power iteration close to convergence moves a float32 output by less
    than 1e-5 on one input and more on another. A graph that casts to float32 or narrower inside keeps
    that rounding in float64 and is judged in float32 only."""
    try:
        rel = _train_mode_error(model, gm, inputs)
    except ValueError as exc:
        gm.meta["r2r_eval_only"] = f"the model's outputs in train mode differ in structure ({exc})"
        return
    if rel is None or rel == 0:
        return
    float64 = any(p.dtype == torch.float64 for p in model.parameters())
    size = sum(t.numel() for t in [*model.parameters(), *model.buffers()]) * 8
    if not float64 and size <= _F64_CHECK_MAX_BYTES and not _casts_to_low_precision(gm):
        try:
            model64, gm64 = (m.double() for m in copy.deepcopy((model, gm)))
            wide = tuple(t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs)
            rel64 = _train_mode_error(model64, gm64, wide)
            if rel64 is not None:
                rel, float64 = rel64, True
        except Exception as exc:  # noqa: BLE001 - a graph with float32 baked in: judge in float32
            logger.info("float64 train-mode capture check not run: %s", exc)
    if not rel <= (min(rtol, 1e-9) if float64 else rtol):  # float64 rounds at 1e-16: a bigger gap is real
        gm.meta["r2r_eval_only"] = f"the graph differs from the model in train mode (relative error {rel:.3g})"


_F64_CHECK_MAX_BYTES = 4_000_000_000  # float64 copies of the model for the train-mode capture check


def _casts_to_low_precision(gm: torch.fx.GraphModule) -> bool:
    """Whether the graph casts to a floating dtype narrower than float64 (``.float()``, ``.to(torch.float32)``,
    ``type_as`` of such a tensor): a float64 copy then keeps float32 rounding, and 1e-9 would be too strict."""
    for node in gm.graph.nodes:
        if node.op == "call_method" and node.target in ("float", "half", "bfloat16", "type_as"):
            return True
        for arg in [*node.args, *node.kwargs.values()]:
            if isinstance(arg, torch.dtype) and arg.is_floating_point and arg != torch.float64:
                return True
    return False


def _train_mode_error(model: nn.Module, gm: torch.fx.GraphModule, inputs: tuple[Any, ...]) -> float | None:
    """Relative error of the graph against eager in train mode (None: not run; ValueError: structure differs)."""
    outputs = []
    for side in (model, gm):
        with _kept_as_is(model, gm), torch.no_grad():
            side.train()
            torch.manual_seed(0)
            try:
                outputs.append(side(*fresh_inputs(inputs)))
            except Exception as exc:  # noqa: BLE001 - e.g. BatchNorm on one value per channel
                logger.info("train-mode capture check not run: %s", exc)
                return None
    return max_errors(*outputs)[1]


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


class _Tracer(ExceptionSafeTracer):
    """``torch.fx.Tracer`` that keeps registered layers and torchvision's ``StochasticDepth`` as
    layers (``call_module``), as ``nn.Dropout`` is, and traces torch's transformer layers through their
    plain-op equivalents where a call allows (``r2r_fx.inline``; the reason it does not, if any, is kept
    in the node's ``meta["r2r_kept_whole"]``). Traced through, ``StochasticDepth`` would record
    its ``training`` flag as the constant of the mode at capture (eval), and a captured or grown model
    put in train mode would silently skip stochastic depth.
    """

    def __init__(self) -> None:
        super().__init__()
        self.inlined: list[torch.fx.Node] = []  # the nodes the equivalents made
        self._through: nn.Module | None = None  # the layer being traced through (not a leaf)

    def call_module(self, m: nn.Module, forward: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        why = unsupported(m, args, kwargs)
        if why == "":  # traced through its plain-op equivalent (r2r_fx.inline)
            self._through = m
            first = len(self.graph.nodes)
            out = super().call_module(m, equivalent(m), args, kwargs)
            made = list(self.graph.nodes)[first:]
            for node in made:  # projections named after their weights (``layers_0_self_attn_in_proj``)
                weight = node.args[1] if node.target is F.linear and len(node.args) > 1 else None
                if isinstance(weight, torch.fx.Node) and weight.op == "get_attr":
                    node._rename(str(weight.target).removesuffix("weight").rstrip("._").replace(".", "_"))
            self.inlined.extend(made)
            return out
        out = super().call_module(m, forward, args, kwargs)
        if why and isinstance(out, torch.fx.Proxy) and out.node.op == "call_module":
            out.node.meta["r2r_kept_whole"] = why
        return out

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self._through is m:
            self._through = None
            return False
        if is_stochastic_depth(m) or type(m) in LAYERS:  # not subclasses: their forward may differ
            return True
        return super().is_leaf_module(m, module_qualified_name)


def _trace_module(model: nn.Module) -> torch.fx.GraphModule:
    """``torch.fx.symbolic_trace(model)``, with registered layers and StochasticDepth kept as layers."""
    tracer = _Tracer()
    graph = tracer.trace(model)
    for node in tracer.inlined:  # head-averaged attention weights the caller does not read
        if not node.users and node.op == "call_method" and node.target == "mean":
            graph.erase_node(node)
    set_tracer_class(graph, torch.fx.Tracer)  # what reloading a pickled GraphModule re-traces with: torch's own
    return torch.fx.GraphModule(tracer.root, graph, type(model).__name__)


def _symbolic_trace(model: nn.Module, inputs: tuple[Any, ...]) -> torch.fx.GraphModule:
    parked = set(model.__dict__)
    try:
        gm = _trace_module(model)
        try:
            with _train_mode(model):
                train_gm = _trace_module(model)
        except Exception as exc:  # noqa: BLE001 - the eval graph stands; train mode is not known
            gm.meta["r2r_eval_only"] = f"the model cannot be traced in train mode ({_describe_failure(exc)})"
        else:
            follow_train_flags(gm, train_gm, inputs)
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


def _dynamic_axes(t: Any) -> dict[int, Any] | None:
    """The batch axis, and for token ids and masks (integer, rank >= 2) the sequence axis too."""
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        return None
    if t.dim() >= 2 and not (t.is_floating_point() or t.is_complex()):
        return {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO}
    return {0: torch.export.Dim.AUTO}


def _export(model: nn.Module, inputs: tuple[Any, ...]) -> torch.fx.GraphModule:
    from r2r_fx.export import expand_for_export

    dynamic = tuple(_dynamic_axes(t) for t in inputs)
    with inlined_forwards(model):
        try:  # a size-1 axis would be specialised: the dynamic export sees it repeated to 2
            example = expand_for_export(inputs, [tuple(d) if d else None for d in dynamic])
            program = torch.export.export(model, example, strict=False, dynamic_shapes=dynamic)
        except Exception:  # noqa: BLE001 - a dynamic batch is a nicety; retry with static shapes
            program = torch.export.export(model, inputs, strict=False)

    def train_graph() -> torch.fx.Graph | None:
        try:
            with _train_mode(model), inlined_forwards(model):
                return torch.export.export(model, inputs, strict=False).graph
        except Exception:  # noqa: BLE001 - no train-mode graph: the caller marks the model eval-only
            return None

    return from_exported_program(program, train_graph)


def from_exported_program(program: torch.export.ExportedProgram, train_graph: Any = None) -> torch.fx.GraphModule:
    """A plain GraphModule (``.train()``/``.eval()`` work) from an ExportedProgram, e.g. a loaded .pt2."""
    exported = program.module()
    graph = exported.graph
    drop_export_guards(graph)
    _guard_static_input_sizes(graph)
    gm = torch.fx.GraphModule(exported, graph)
    # the export tracer cannot be rebuilt when unpickling; the graph's copy too, or deepcopies bring it back
    set_tracer_class(gm, None), set_tracer_class(graph, None)
    modulize_train_flags(gm, train_graph)
    return gm


def _guard_static_input_sizes(graph: torch.fx.Graph) -> None:
    """Assert, in the graph, every input size the export specialised to a number.

    An exported graph holds only for the input sizes it was traced with, except the ones that stayed
    symbolic (a dynamic batch): ``h / math.sqrt(h.shape[0])`` bakes the batch size in as a constant. The
    ExportedProgram's module checks its inputs with a hook and a guards submodule, neither of which a
    plain GraphModule keeps; these ``_assert_scalar`` nodes (plain ATen, kept by deepcopy, pickling and
    re-export) make a call with other sizes fail with the reason instead of computing something else.
    """
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if not placeholders:
        return
    anchor = placeholders[-1]
    for node in placeholders:
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        for axis, size in enumerate(val.shape):
            if not is_concrete_int(size):
                continue  # symbolic: the graph holds for other sizes
            size = int(size)
            message = (
                f"r2r_fx: this graph was exported for inputs with {node.name}.shape[{axis}] == {size} "
                "(torch.export specialised that size); capture the model again with inputs of the sizes to be used"
            )
            with graph.inserting_after(anchor):
                got = graph.call_function(_aten.sym_size.int, (node, axis))
            with graph.inserting_after(got):
                same = graph.call_function(operator.eq, (got, size))
            with graph.inserting_after(same):
                anchor = graph.call_function(_aten._assert_scalar.default, (same, message))
            got.meta["val"], same.meta["val"] = size, True
