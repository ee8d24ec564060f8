"""Check a module-level graph against its eager model in one forward: each leaf module runs once.

``torch.fx.symbolic_trace`` keeps layers such as ``nn.Conv2d`` as ``call_module`` nodes that call the
very module objects the eager model calls, in the order eager calls them. So the eager forward and
the graph can run side by side. Whenever eager calls a leaf module, the graph is advanced to its next
``call_module`` node; that node must name the same module and its arguments must be the same tensors
as eager's, or equal ones. The module then runs once and both sides go on with its output. Only the
glue between the leaf modules (adds, views, concatenations: the code the tracer recorded, which is
what the comparison is about) runs twice. Shapes are recorded on the graph side as ``ShapeProp``
would record them.

Sharing tensors between the two runs is sound only while neither side changes a shared tensor behind
the other's back:

* ``symbolic_trace`` already records ``out += identity`` as ``out + identity``; the graph side also
  runs explicit ``operator.iadd``-style nodes out of place, and a module output that other graph
  code changes in place (``x.add_(y)``, ``x[i] = y``) is cloned for the graph, so each side changes
  its own copy (eager's ``+=`` then writes to a tensor the graph has finished reading);
* a leaf module that works in place (``ReLU(inplace=True)``) and gets different (equal) tensors on
  the two sides runs on each side's own tensor, unless the graph never reads its own again: then the
  graph takes eager's result;
* every tensor the two sides share (inputs, module outputs) has its version counter checked at each
  leaf call and at the end: a change outside a leaf call means one side wrote where the other reads.

Whenever the two runs fall out of step (another module, different arguments, forward hooks, an error
on the graph side, a shared tensor changed outside a leaf call), ``run_in_step`` returns None and the
caller runs the eager model and the graph separately, from scratch.
"""

from __future__ import annotations

import contextlib
import logging
import operator
import weakref
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.fx.node import map_aggregate, map_arg
from torch.fx.passes.shape_prop import TensorMetadata, _extract_tensor_metadata
from torch.utils._pytree import tree_flatten, tree_map

__all__ = ["eval_mode", "record_meta", "run_in_step"]

logger = logging.getLogger(__name__)

# The graph side runs an explicit ``operator.iadd(a, b)`` node as ``a + b``: the value is the same,
# and a tensor the eager side also holds is not changed under it. (A later reader of the old ``a``
# then sees a difference and the runs fall out of step: conservative, never wrong.)
_OUT_OF_PLACE = {
    operator.iadd: operator.add,
    operator.iand: operator.and_,
    operator.ifloordiv: operator.floordiv,
    operator.ilshift: operator.lshift,
    operator.imatmul: operator.matmul,
    operator.imod: operator.mod,
    operator.imul: operator.mul,
    operator.ior: operator.or_,
    operator.ipow: operator.pow,
    operator.irshift: operator.rshift,
    operator.isub: operator.sub,
    operator.itruediv: operator.truediv,
    operator.ixor: operator.xor,
}


# Glue whose tensor result is always newly allocated (the graph side runs the in-place operators out of
# place too): when only one module call reads such a result, the comparison may overwrite it.
_FRESH = {
    operator.add,
    operator.sub,
    operator.mul,
    operator.truediv,
    operator.iadd,
    operator.isub,
    operator.imul,
    operator.itruediv,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.cat,
    torch.concat,
    "add",
    "sub",
    "mul",
    "div",
}

# Input leaves the joint run can follow: tensors (watched through their version counters) and values
# that cannot change. Anything else (a dataclass, a tokenizer's BatchEncoding) could hide a tensor.
_WATCHABLE = (torch.Tensor, int, float, complex, bool, str, bytes, type(None), torch.dtype, torch.device)


class _OutOfStep(Exception):
    """The eager run and the graph run no longer do the same thing."""


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


def record_meta(node: torch.fx.Node, value: Any) -> None:
    """Store ``tensor_meta`` and ``type`` on ``node`` as ``ShapeProp`` does."""
    if isinstance(value, torch.Tensor):
        node.meta["tensor_meta"] = _tensor_metadata(value)
    else:
        found = False

        def extract(obj: Any) -> Any:
            nonlocal found
            if isinstance(obj, torch.Tensor):
                found = True
                return _tensor_metadata(obj)
            return obj

        meta = map_aggregate(value, extract)
        if found:
            node.meta["tensor_meta"] = meta
    node.meta["type"] = type(value)


_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}


def _tensor_metadata(t: torch.Tensor) -> TensorMetadata:
    """``_extract_tensor_metadata`` with a quick memory-format test for plain dense tensors."""
    if t.layout != torch.strided or t.is_quantized:
        return _extract_tensor_metadata(t)
    if t.is_contiguous():
        memory_format = torch.contiguous_format
    else:
        other = _CHANNELS_LAST.get(t.dim())
        memory_format = other if other is not None and t.is_contiguous(memory_format=other) else None
    return TensorMetadata(t.shape, t.dtype, t.requires_grad, t.stride(), memory_format, False, {})


def run_in_step(model: nn.Module, gm: torch.fx.GraphModule, inputs: tuple[Any, ...]) -> tuple[Any, Any] | None:
    """Eval-mode outputs ``(eager, graph)`` from one joint run, shapes recorded on ``gm``; None when out of step.

    ``gm`` must share its ``call_module`` modules with ``model`` (as ``symbolic_trace(model)`` does).
    Exceptions raised by the eager model propagate; graph-side errors only make the result None.
    """
    table = dict(gm.named_modules(remove_duplicate=False))
    leaves = {str(n.target): table[str(n.target)] for n in gm.graph.nodes if n.op == "call_module"}
    own = {id(m) for m in model.modules()}
    if not leaves or any(id(m) not in own or _has_hooks(m) for m in leaves.values()) or _global_hooks():
        return None
    if not all(isinstance(leaf, _WATCHABLE) for leaf in tree_flatten(tuple(inputs))[0]):
        return None  # tensors inside objects pytree cannot open would escape the version checks
    try:
        run = _JointRun(gm, leaves, inputs)
    except _OutOfStep as exc:
        logger.info("the graph fails before its first module call (%s)", exc)
        return None
    patched = {id(m): m for m in leaves.values()}.values()
    saved = [(m, m.__dict__.get("forward")) for m in patched]
    for module in patched:  # an instance attribute shadows the class's forward for this run only
        module.__dict__["forward"] = run.leaf_call(module, module.forward)
    try:
        with eval_mode(model):
            eager = model(*inputs)
            graph = run.finish()
    finally:
        for module, forward in saved:
            if forward is None:
                del module.__dict__["forward"]
            else:
                module.__dict__["forward"] = forward
    if run.out_of_step is not None:
        logger.info("eager and graph fell out of step (%s); running them separately", run.out_of_step)
        return None
    return eager, graph


def _has_hooks(module: nn.Module) -> bool:
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or getattr(module, "_backward_pre_hooks", None)
    )


def _global_hooks() -> bool:
    from torch.nn.modules import module as nn_module

    return bool(
        nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks or nn_module._global_backward_hooks
    )


class _GraphSide(torch.fx.Interpreter):
    """The graph's run as a generator: it stops at every ``call_module`` node and is handed the value."""

    def call_function(self, target: Any, args: Any, kwargs: Any) -> Any:
        return super().call_function(_OUT_OF_PLACE.get(target, target), args, kwargs)

    def steps(self, inputs: tuple[Any, ...], freed: Callable[[torch.fx.Node], None]) -> Generator[Any, Any, Any]:
        """Yields ``(node, args, kwargs)`` per call_module node, expects its value sent back; returns the output."""
        env = self.env  # Interpreter.__init__ made it; the joint run reads it too
        last_uses = self.user_to_last_uses
        load = env.__getitem__  # a missing value is a broken graph: the KeyError makes the run out of step
        self.args_iter = iter(self.graph.process_inputs(*inputs))
        for node in self.graph.nodes:
            args, kwargs = map_arg(node.args, load), map_arg(node.kwargs, load)
            if node.op == "call_module":
                value = yield node, args, kwargs
            else:  # Interpreter.run_node without its per-node context manager
                value = getattr(self, node.op)(node.target, args, kwargs)
            record_meta(node, value)
            env[node] = value
            for dead in last_uses.get(node, ()):
                del env[dead]
                freed(dead)
            if node.op == "output":
                return self.graph.process_outputs(value)
        raise _OutOfStep("the graph has no output node")


class _JointRun:
    """Drives the graph side from the eager side's leaf-module calls.

    Tensors both sides hold are checked at each leaf call (and at the end): any change since the last
    check that no leaf call made means one side wrote where the other reads, so the run is out of step.
    Tensors the graph lets go of are checked once more right after the graph's stretch of glue code,
    so a write by the graph just before it let go is still seen.
    """

    def __init__(self, gm: torch.fx.GraphModule, modules: dict[str, nn.Module], inputs: tuple[Any, ...]) -> None:
        self.modules = modules
        self.out_of_step: str | None = None
        self.cloned = _changed_in_place_by_glue(gm.graph)
        # tensors both sides hold, with the version each must still have: node -> [(tensor, version)]
        self.shared: dict[torch.fx.Node, list[tuple[torch.Tensor, int]]] = {}
        self.retired: list[tuple[torch.fx.Node, list[tuple[torch.Tensor, int]]]] = []
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        for node, value in zip(placeholders, inputs):
            self._share(node, value)
        interpreter = _GraphSide(gm)
        self.last_read_by = interpreter.user_to_last_uses  # node -> the inputs it is the last reader of
        self.graph_side = interpreter.steps(inputs, self._retire)
        self.values = interpreter.env  # the graph side's live values, node -> value
        # equal tensors the two sides got from one module call (an in-place module run on each side)
        self.equal: dict[int, tuple[weakref.ref[torch.Tensor], weakref.ref[torch.Tensor], int, int]] = {}
        self.pending: tuple[torch.fx.Node, Any, Any] | None = None
        self.result: Any = None
        self._advance(None)

    def leaf_call(self, module: nn.Module, forward: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            if self.out_of_step is not None:
                return forward(*args, **kwargs)
            try:
                return self._step(module, forward, args, kwargs)
            except _OutOfStep as exc:
                self.out_of_step = str(exc)
                return forward(*args, **kwargs)

        return call

    def finish(self) -> Any:
        if self.out_of_step is not None:
            return None
        try:
            self._check_shared()
            if self.pending is not None:
                raise _OutOfStep(f"the graph calls {self.pending[0].target} after eager has returned")
        except _OutOfStep as exc:
            self.out_of_step = str(exc)
        return self.result

    def _step(self, module: nn.Module, forward: Callable[..., Any], args: Any, kwargs: Any) -> Any:
        self._check_shared()
        if self.pending is None:
            raise _OutOfStep("eager calls more modules than the graph")
        node, graph_args, graph_kwargs = self.pending
        if self.modules[node.target] is not module:
            raise _OutOfStep(f"eager calls another module where the graph calls {node.target}")
        eager_leaves, eager_spec = _flatten(args, kwargs)
        graph_leaves, graph_spec = _flatten(graph_args, graph_kwargs)
        if eager_spec != graph_spec:
            raise _OutOfStep(f"{node.target} gets differently structured arguments")
        distinct = [(e, g) for e, g in zip(eager_leaves, graph_leaves) if e is not g]
        dropped: list[tuple[torch.Tensor, torch.Tensor]] = []
        if distinct:
            distinct, dropped = self._compare(node, distinct, flat=isinstance(graph_spec, int))
            if dropped:  # positional tensors only (flat): eager's equal tensor stands in for the graph's
                gone = {id(g) for _, g in dropped}
                graph_args = tuple(e if id(g) in gone else g for e, g in zip(args, graph_args))
        watched = [(e, e._version) for e, _ in distinct + dropped if isinstance(e, torch.Tensor)]
        out = forward(*args, **kwargs)
        changed = [e for e, version in watched if e._version != version]
        if changed:
            self._check_not_held(node, changed)
        if not distinct and not dropped:
            graph_out = out
        elif not changed:
            # An argument passed through (nn.Identity, eval-mode Dropout) stays the graph's own: its own
            # tensor, or for a dropped one an equal copy, so that eager's later writes stay eager's.
            swap = {id(e): g for e, g in distinct}
            own = {id(e) for e, _ in dropped}
            graph_out = _map_tensors(lambda t: t.clone() if id(t) in own else swap.get(id(t), t), out)
        elif all(n in self.last_read_by.get(node, ()) for n in node.all_input_nodes):
            graph_out = out  # it changed eager's arguments in place; the graph's own are dead after it
        elif dropped:
            raise _OutOfStep(f"{node.target} changes in place arguments the graph still reads")
        else:
            graph_out = forward(*graph_args, **graph_kwargs)  # each side's own arguments change in place
        if node in self.cloned:
            graph_out = _map_tensors(torch.Tensor.clone, graph_out)
        self._snapshot_shared()  # what a module changed in place, it changed for both sides
        if graph_out is out and isinstance(out, torch.Tensor):  # the usual case: one tensor, now shared
            self.shared[node] = [(out, out._version)]
        else:
            self._register_outputs(node, out, graph_out)
        self._advance(graph_out)
        return out

    def _compare(
        self, node: torch.fx.Node, distinct: list[tuple[Any, Any]], *, flat: bool
    ) -> tuple[list[tuple[Any, Any]], list[tuple[torch.Tensor, torch.Tensor]]]:
        """Check the graph's arguments against eager's: the pairs that stay distinct, and the dropped ones.

        A tensor that glue has just computed for this call alone (a residual sum, say) is compared in
        its own memory (``g -= e`` rather than a new ``g - e``) and then dropped: eager's equal tensor
        stands in for it from here on.
        """
        kept: list[tuple[Any, Any]] = []
        dropped: list[tuple[torch.Tensor, torch.Tensor]] = []
        for e, g in distinct:
            if self._known_equal(e, g):
                kept.append((e, g))
                continue
            scratch = flat and type(e) is torch.Tensor and self._scratch(node, g)
            if not _same_value(e, g, overwrite=scratch):
                raise _OutOfStep(f"{node.target} gets different arguments")
            (dropped if scratch else kept).append((e, g))
        return kept, dropped

    def _check_not_held(self, node: torch.fx.Node, changed: list[torch.Tensor]) -> None:
        """A module changed eager's argument in place where the graph passed its own equal tensor: the
        graph must not also hold eager's tensor (or a view of its memory) as some node's value, or the
        write would reach a value the graph meant to keep."""
        memory = {_memory(t) for t in changed if t.numel()}  # an empty tensor has nothing to write
        if None in memory:
            raise _OutOfStep(f"{node.target} changed in place a tensor whose memory cannot be told apart")
        for holder, entries in self.shared.items():
            for t, _ in entries:
                if t.numel() and _memory(t) in memory:
                    raise _OutOfStep(f"{node.target} changed in place a tensor the graph holds as {holder.name}")

    def _scratch(self, node: torch.fx.Node, g: Any) -> bool:
        """Whether ``g`` is a fresh graph-only float tensor that only ``node`` reads (free to overwrite)."""
        if type(g) is not torch.Tensor or g._base is not None or not g.is_floating_point():
            return False
        for src in node.args:
            if isinstance(src, torch.fx.Node) and self.values.get(src) is g:
                return (
                    src.target in _FRESH
                    and src.op in ("call_function", "call_method")
                    and "out" not in src.kwargs
                    and len(src.users) == 1
                    and node.args.count(src) == 1
                    and not node.kwargs
                )
        return False

    def _register_outputs(self, node: torch.fx.Node, out: Any, graph_out: Any) -> None:
        """Watch the output tensors both sides hold; remember the equal pairs each side holds its own of."""
        eager_tensors, graph_tensors = _tensor_leaves(out), _tensor_leaves(graph_out)
        held = {id(t) for t in eager_tensors}
        entries = [(t, t._version) for t in graph_tensors if id(t) in held]
        if entries:
            self.shared[node] = entries
        for e, g in zip(eager_tensors, graph_tensors):
            if e is not g:
                self.equal[id(e)] = (weakref.ref(e), weakref.ref(g), e._version, g._version)

    def _known_equal(self, e: Any, g: Any) -> bool:
        """Whether ``e`` and ``g`` are one module's outputs on the two sides, unchanged since."""
        entry = self.equal.get(id(e))
        if entry is None or not isinstance(g, torch.Tensor):
            return False
        e_ref, g_ref, e_version, g_version = entry
        return e_ref() is e and g_ref() is g and e._version == e_version and g._version == g_version

    def _advance(self, value: Any) -> None:
        """Run the graph up to its next call_module node (or to its end)."""
        try:
            self.pending = self.graph_side.send(value)
        except StopIteration as stop:
            self.pending, self.result = None, stop.value
        except _OutOfStep:
            raise
        except Exception as exc:  # noqa: BLE001 - the separate run reports graph errors properly
            raise _OutOfStep(f"the graph fails: {type(exc).__name__}: {exc}") from exc
        # What the graph let go of, it may have written just before: check it now. (Eager writing
        # to it later is no harm: the graph has read it for the last time.)
        if self.retired:
            retired, self.retired = self.retired, []
            self._check_shared(retired)

    def _share(self, node: torch.fx.Node, value: Any) -> None:
        entries = [(t, t._version) for t in _tensor_leaves(value)]
        if entries:
            self.shared[node] = entries

    def _retire(self, node: torch.fx.Node) -> None:
        entries = self.shared.pop(node, None)
        if entries:
            self.retired.append((node, entries))

    def _check_shared(self, watched: Any = None) -> None:
        for node, entries in self.shared.items() if watched is None else watched:
            for tensor, version in entries:
                if tensor._version != version:
                    raise _OutOfStep(f"the value of {node.name}, held by both runs, was changed in place")

    def _snapshot_shared(self) -> None:
        shared = self.shared
        for node, entries in shared.items():
            for t, version in entries:
                if t._version != version:
                    shared[node] = [(t, t._version) for t, _ in entries]
                    break


def _tensor_leaves(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    return [t for t in tree_flatten(value)[0] if isinstance(t, torch.Tensor)]


def _map_tensors(fn: Callable[[torch.Tensor], Any], value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    return tree_map(lambda t: fn(t) if isinstance(t, torch.Tensor) else t, value)


def _flatten(args: Any, kwargs: Any) -> tuple[Sequence[Any], Any]:
    """The leaves of a call's arguments and their structure (quick for the usual tensors-only call)."""
    if not kwargs:
        for a in args:
            if not isinstance(a, torch.Tensor):
                break
        else:
            return args, len(args)
    return tree_flatten((tuple(args), dict(kwargs)))


def _same_value(a: Any, b: Any, *, overwrite: bool = False) -> bool:
    """Whether two arguments hold the same value; ``overwrite`` lets a float ``b`` take ``b - a`` (no new tensor)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if not _same_kind(a, b):
            return False
        if a.is_floating_point():
            # x - y == 0 exactly when x == y (NaN and inf give NaN: "different", which is safe);
            # a subtraction and one min/max pass are about three times as fast as torch.equal on CPU
            return _all_zero(b.sub_(a) if overwrite else a - b)
        return bool(torch.equal(a, b))
    try:
        return type(a) is type(b) and bool(a == b)
    except Exception:  # noqa: BLE001 - values that cannot be compared are not the same
        return False


def _memory(t: torch.Tensor) -> int | None:
    """Where a tensor's storage lives (views share it); None where it cannot be told (sparse, ...)."""
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


def _same_kind(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device


def _all_zero(t: torch.Tensor) -> bool:
    if not t.numel():
        return True
    low, high = torch.aminmax(t)
    return low.item() == 0 and high.item() == 0


def _mutates(node: torch.fx.Node) -> bool:
    """Whether a glue node may change its first argument in place (errs towards yes)."""
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
    elif node.op == "call_method":
        name = str(node.target)
    else:
        return False
    if node.target in _OUT_OF_PLACE:
        return False
    if node.target is operator.setitem or node.kwargs.get("inplace") is True or "out" in node.kwargs:
        return True
    return name.endswith("_") and not name.endswith("__")


def _changed_in_place_by_glue(graph: torch.fx.Graph) -> set[torch.fx.Node]:
    """call_module nodes whose output (or a view of it) graph glue changes in place."""
    changed: set[torch.fx.Node] = set()
    for node in graph.nodes:
        if not _mutates(node) or not node.args or not isinstance(node.args[0], torch.fx.Node):
            continue
        stack, seen = [node.args[0]], set()
        while stack:  # walk back through glue (views among it) to the module outputs it came from
            source = stack.pop()
            if source in seen:
                continue
            seen.add(source)
            if source.op == "call_module":
                changed.add(source)
            elif source.op in ("call_function", "call_method"):
                stack.extend(a for a in source.all_input_nodes)
    return changed
