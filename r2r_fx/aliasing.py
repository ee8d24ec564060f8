"""Which tensors of a graph share memory, and which are written in place: where a new block may read.

Deepening inserts ``y = x + z(x)`` right after ``x`` and routes *every* user of ``x`` to ``y``, so a
later in-place write through ``x`` or through a view made from it lands on ``y``, as the model's
readers expect. What rerouting cannot follow is memory ``x`` shares with a tensor made *before* it:
when ``x`` is a view of ``h`` (or eval-mode dropout's ``h`` itself, or the result of an in-place op on
``h``), a later write to that memory changes what ``h``'s own readers see but not ``y``, and
invalidates what ``z`` saved for backward. Such an ``x`` is refused as an insertion point.

The block also makes ``x`` require grad. Where nothing before ``x`` does (no trainable parameter
upstream: a frozen stem, the input side), in-place writes after it that autograd never saw in the
original model become writes to tensors that require grad. On an output of ``split`` (a multi-output
view) or on a tensor an earlier op may have saved for backward, autograd refuses them and the grown
model fails in train mode, and so on a tensor whose producer keeps its own output for backward
(``sigmoid``, ``tanh``, ``exp``: an op not known to be free of this is assumed to keep it); such an
``x`` is refused too (other writes, like ``relu_`` on a norm's output, are fine). Views,
in-place ops and eval-mode dropout put their output in their input's alias class; an op whose aliasing
is not known from this table or from its ATen schema is assumed to allocate.
"""

from __future__ import annotations

import functools
import inspect
import operator
from typing import Any

import torch
import torch.fx
from torch import nn

from r2r_fx.compat import DropoutBase, OpOverload
from r2r_fx.graph import attr_at

__all__ = ["unsafe_points", "writes_into", "written_later"]


# Ops that may return (a view of) their first input, by name (tensor methods, torch functions).
_VIEWS = {
    "view", "reshape", "flatten", "unflatten", "squeeze", "unsqueeze", "permute", "transpose", "t",
    "expand", "expand_as", "narrow", "select", "split", "chunk", "unbind", "tensor_split", "detach",
    "contiguous", "to", "type_as", "float", "double", "half", "bfloat16", "view_as", "reshape_as",
    "movedim", "swapaxes", "as_strided", "diagonal", "unfold", "alias", "getitem", "real", "imag",
    "dropout", "dropout1d", "dropout2d", "dropout3d", "feature_dropout", "alpha_dropout",
    "feature_alpha_dropout", "split_with_sizes", "identity",
}  # fmt: skip
_VIEW_MODULES = (nn.Identity, nn.Flatten, nn.Unflatten, DropoutBase)


def _name(node: torch.fx.Node) -> str:
    target = node.target
    if isinstance(target, str):
        return target
    target = getattr(target, "overloadpacket", target)
    return getattr(target, "__name__", str(target)).rpartition(".")[2]


@functools.lru_cache(maxsize=4096)
def _read_signature(target: Any) -> inspect.Signature | None:
    try:
        return inspect.signature(target)
    except (TypeError, ValueError):  # a builtin without a text signature
        return None


def _signature(target: Any) -> inspect.Signature | None:
    """``inspect.signature(target)``, read once per callable (it parses builtins' text signatures: slow)."""
    try:
        hash(target)
    except TypeError:
        return _read_signature.__wrapped__(target)
    return _read_signature(target)


def _writes_first_input(node: torch.fx.Node, gm: torch.fx.GraphModule) -> bool:
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(str(node.target)), "inplace", False))
    if node.op not in ("call_function", "call_method"):
        return False
    if node.target is operator.setitem or node.kwargs.get("inplace") is True:
        return True
    if node.op == "call_function" and callable(node.target) and not isinstance(node.target, OpOverload):
        try:  # ``F.relu(x, True)``: the flag given by position
            signature = _signature(node.target)
            bound = signature.bind(*node.args, **node.kwargs).arguments if signature else {}
        except TypeError:
            bound = {}
        if bound.get("inplace") is True:
            return True
    if isinstance(node.target, OpOverload):
        args = node.target._schema.arguments
        return bool(args and args[0].alias_info is not None and args[0].alias_info.is_write)
    name = _name(node)
    return name.endswith("_") and not name.startswith("_") and name != "requires_grad_"


def _may_alias_first_input(node: torch.fx.Node, gm: torch.fx.GraphModule) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), _VIEW_MODULES)
    if node.op not in ("call_function", "call_method"):
        return False
    if isinstance(node.target, OpOverload):
        returns = node.target._schema.returns
        if any(r.alias_info is not None for r in returns):
            return True
    return _name(node) in _VIEWS


def _first_input(node: torch.fx.Node) -> Any:
    if node.op == "call_module":
        return node.args[0] if node.args else None
    return node.args[0] if node.args else next(iter(node.kwargs.values()), None)


def _aliasing(gm: torch.fx.GraphModule) -> tuple[dict[torch.fx.Node, set[torch.fx.Node]], list[torch.fx.Node]]:
    """(node -> the nodes sharing its memory, the nodes that share memory with a tensor made before them)."""
    classes: dict[torch.fx.Node, set[torch.fx.Node]] = {}
    shares_earlier: list[torch.fx.Node] = []
    for node in gm.graph.nodes:
        first = _first_input(node)
        if isinstance(first, torch.fx.Node) and (_writes_first_input(node, gm) or _may_alias_first_input(node, gm)):
            merged = classes.get(first, {first}) | classes.get(node, {node})
            for member in merged:
                classes[member] = merged
            shares_earlier.append(node)
    return classes, shares_earlier


def writes_into(gm: torch.fx.GraphModule, nodes: list[torch.fx.Node], source: torch.fx.Node) -> torch.fx.Node | None:
    """The first of ``nodes`` that writes in place into memory ``source`` shares (``source`` itself, a view)."""
    classes, _ = _aliasing(gm)
    shared = classes.get(source, {source})
    return next((n for n in nodes if _writes_first_input(n, gm) and _first_input(n) in shared), None)


def written_later(gm: torch.fx.GraphModule) -> dict[str, str]:
    """Node name -> why a block may not read it: its memory is written in place by a later node."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    classes, shares_earlier = _aliasing(gm)
    writes = [(n, _first_input(n)) for n in gm.graph.nodes if _writes_first_input(n, gm)]
    unsafe: dict[str, str] = {}
    for node in shares_earlier:  # writes through others or their views land on the block's output
        for writer, target in writes:
            if order[writer] > order[node] and target in classes[node]:
                unsafe[node.name] = f"{node.name} shares memory with a tensor {writer.name} writes in place later"
                break
    return unsafe


def _trainable(gm: torch.fx.GraphModule) -> set[torch.fx.Node]:
    """The nodes whose value depends on a parameter that requires grad."""
    out: set[torch.fx.Node] = set()
    for node in gm.graph.nodes:
        if any(n in out for n in node.all_input_nodes):
            out.add(node)
        elif node.op == "get_attr":
            value = attr_at(gm, str(node.target))
            if isinstance(value, torch.Tensor) and value.requires_grad:
                out.add(node)
        elif node.op == "call_module":
            if any(p.requires_grad for p in gm.get_submodule(str(node.target)).parameters()):
                out.add(node)
    return out


def grad_starts_before_a_write(gm: torch.fx.GraphModule) -> dict[str, str]:
    """Node name -> why a block may not follow it: a later in-place write that autograd did not track
    in the original would then write a tensor that requires grad."""
    trainable = _trainable(gm)
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    classes, _ = _aliasing(gm)
    unsafe: dict[str, str] = {}
    for writer in nodes:
        first = writer.args[0] if writer.args else None
        if not isinstance(first, torch.fx.Node) or first in trainable or not _writes_first_input(writer, gm):
            continue
        if not _tracked_write_fails(writer, classes.get(first, {first}), order, gm):
            continue  # e.g. relu_ on a norm's output: autograd tracks that write without complaint
        # the written tensor, and every value written into it (``v += w``: w requiring grad makes v's
        # write a tracked one too)
        stack = [n for n in writer.all_input_nodes if n not in trainable]
        seen = set(stack)
        while stack:
            node = stack.pop()
            unsafe.setdefault(
                node.name,
                f"nothing before {node.name} requires grad, and {writer.name} writes {first.name} in place: "
                "a block there would make that write one autograd must track",
            )
            for n in node.all_input_nodes:
                if n not in seen and n not in trainable:
                    seen.add(n)
                    stack.append(n)
    return unsafe


_MULTI_VIEW = {"split", "chunk", "unbind", "tensor_split", "split_with_sizes"}
# readers that keep nothing of their input for backward (or only its size)
_NOT_SAVING = {"add", "sub", "neg", "cat", "concat", "clone", "contiguous", "size", "dim", "numel", "sym_size"}
# producers whose backward does not keep their own output (relu, sigmoid, tanh, exp, softmax, ... do;
# an op not listed here is assumed to keep it)
_OUTPUT_NOT_SAVED = _NOT_SAVING | {
    "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "convolution",
    "_convolution", "linear", "addmm", "mm", "bmm", "matmul", "baddbmm", "mul", "div", "batch_norm",
    "_native_batch_norm_legit", "_native_batch_norm_legit_no_training", "native_batch_norm",
    "_native_batch_norm_legit_functional", "layer_norm", "native_layer_norm", "group_norm",
    "native_group_norm", "instance_norm", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
    "adaptive_avg_pool2d", "adaptive_avg_pool3d", "_adaptive_avg_pool2d", "mean", "sum", "embedding",
    "gelu", "silu", "hardswish", "pad", "constant_pad_nd", "interpolate", "upsample_nearest2d",
    "upsample_bilinear2d", "_to_copy", "zeros", "ones", "full", "zeros_like", "ones_like", "full_like",
}  # fmt: skip
_OUTPUT_NOT_SAVED_MODULES = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear,
    nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d, nn.Embedding, nn.GELU, nn.SiLU, nn.Hardswish, nn.Upsample,
)  # fmt: skip


def _keeps_its_output(node: torch.fx.Node, gm: torch.fx.GraphModule) -> bool:
    """Whether ``node``'s backward may keep the tensor it returns (then writing it in place breaks it)."""
    if node.op in ("placeholder", "get_attr"):
        return False
    if node.op == "call_module":
        return not isinstance(gm.get_submodule(str(node.target)), _OUTPUT_NOT_SAVED_MODULES + _VIEW_MODULES)
    return _name(node) not in _OUTPUT_NOT_SAVED and not _may_alias_first_input(node, gm)


def _tracked_write_fails(
    writer: torch.fx.Node, aliases: set[torch.fx.Node], order: dict[torch.fx.Node, int], gm: torch.fx.GraphModule
) -> bool:
    """Whether autograd would refuse ``writer``'s in-place write once the tensor requires grad: the memory
    is an output of a multi-output view op (split, chunk, unbind), its producer keeps its output for
    backward (sigmoid, tanh, exp, ...), or an op read it earlier and may have saved it."""
    for member in aliases:
        if not _writes_first_input(member, gm) and _keeps_its_output(member, gm):
            return True
        if member.target is operator.getitem and isinstance(member.args[0], torch.fx.Node):
            if _name(member.args[0]) in _MULTI_VIEW:
                return True
        for user in member.users:
            if user is writer or user in aliases or order[user] > order[writer]:
                continue
            if user.op == "call_module" or _name(user) not in _NOT_SAVING:
                return True
    return False


def unsafe_points(gm: torch.fx.GraphModule) -> dict[str, str]:
    """Node name -> why a residual block may not be inserted after it (see the module docstring)."""
    return {**grad_starts_before_a_write(gm), **written_later(gm)}
