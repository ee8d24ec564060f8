"""Layers with parameters (convolutions, linear, embeddings, norms, attention) and their width
fix-ups: which parameter axes index which channels."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from r2r_fx.compat import NormBase, OpOverload, aten
from r2r_fx.graph import describe, param_name, shape_of
from r2r_fx.rules.common import freeze_all, node_arg, same_axes
from r2r_fx.rules.pointwise import elementwise
from r2r_fx.rules.registry import Couplings, WidthOf, register_layer, register_rule


def _conv(
    c: Couplings,
    node: torch.fx.Node,
    x: torch.fx.Node,
    weight: str | None,
    bias: str | None,
    groups: int,
    transposed: bool,
    w_shape: tuple[int, ...],
    what: str,
) -> None:
    in_shape, out_shape = shape_of(x), shape_of(node)
    if in_shape is None or out_shape is None or weight is None:
        freeze_all(c, node, f"{what} without a static shape or parameter weight")
        return
    batched = len(in_shape) == len(w_shape)
    ch = 1 if batched else 0
    if batched:
        c.same((x.name, 0), (node.name, 0))
    for a in range(ch + 1, len(in_shape)):  # spatial axes are not widths
        c.freeze((x.name, a), "spatial axis")
    for a in range(ch + 1, len(out_shape)):
        c.freeze((node.name, a), "spatial axis")
    x_slot, out_slot = (x.name, ch), (node.name, ch)
    if transposed:
        if groups != 1:
            freeze_all(c, node, f"grouped transposed convolution {node.name}")
            return
        c.bind(weight, 0, x_slot, "in", node)
        c.bind(weight, 1, out_slot, "out", node)
    elif groups == 1:
        c.bind(weight, 1, x_slot, "in", node)
        c.bind(weight, 0, out_slot, "out", node)
    else:
        per_group_in, per_group_out = w_shape[1], w_shape[0] // groups
        if per_group_in != per_group_out:
            reason = f"grouped convolution {node.name} with {per_group_in} inputs and {per_group_out} outputs a group"
            c.freeze(x_slot, reason)
            c.freeze(out_slot, reason)
            return
        c.same(x_slot, out_slot)
        c.granularity(x_slot, per_group_in, node)
        c.bind(weight, 0, out_slot, "out", node)
    if bias is not None:
        c.bind(bias, 0, out_slot, "channel", node)


def _conv_module(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    m = c.module(str(node.target))
    conv_layer(c, node, groups=m.groups, transposed=isinstance(m, nn.modules.conv._ConvTransposeNd))


def conv_layer(
    c: Couplings, node: torch.fx.Node, *, weight: str = "weight", bias: str | None = "bias", groups: int = 1,
    transposed: bool = False,
) -> None:  # fmt: skip
    """Couplings of a layer that is a convolution of its input with its parameters ``weight`` (``(out,
    in/groups, *kernel)``, or ``(in, out/groups, *kernel)`` when ``transposed``) and ``bias``: for
    handlers of users' layers (:func:`register_layer`). A missing ``bias`` attribute is no bias."""
    m = c.module(str(node.target))
    w = getattr(m, weight)
    b = f"{node.target}.{bias}" if bias is not None and getattr(m, bias, None) is not None else None
    _conv(c, node, node.args[0], f"{node.target}.{weight}", b, groups, transposed, tuple(w.shape), type(m).__name__)


def linear_layer(c: Couplings, node: torch.fx.Node, *, weight: str = "weight", bias: str | None = "bias") -> None:
    """Couplings of a layer that is ``x @ weight.T + bias`` over the input's last axis (``weight``:
    ``(out, in)``): for handlers of users' layers (:func:`register_layer`)."""
    m = c.module(str(node.target))
    b = f"{node.target}.{bias}" if bias is not None and getattr(m, bias, None) is not None else None
    _linear(c, node, node.args[0], f"{node.target}.{weight}", b)


def _input_channels(node: torch.fx.Node, width_of: WidthOf) -> int | None:
    """The grown width of axis 1 of a layer's input (None: not a tracked width)."""
    x = node.args[0] if node.args else None
    return width_of((x.name, 1)) if isinstance(x, torch.fx.Node) and shape_of(x) else None


def _fix_conv(m: nn.Module, node: torch.fx.Node, width_of: WidthOf) -> None:
    w = m.weight
    if m.transposed:
        m.in_channels, m.out_channels = w.shape[0], w.shape[1] * m.groups
        return
    m.out_channels = w.shape[0]
    in_w = _input_channels(node, width_of)
    if in_w is not None:
        m.groups = max(1, in_w // w.shape[1])
        m.in_channels = w.shape[1] * m.groups


for _cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    register_layer(_cls, _conv_module, _fix_conv)


def _weight_arg(c: Couplings, node: torch.fx.Node, arg: Any) -> str | None:
    name = param_name(arg)
    if name is not None:
        c.uses_param(arg, node)
    return name


@register_rule(F.conv1d, F.conv2d, F.conv3d, aten.conv1d, aten.conv2d, aten.conv3d)
def _conv_function(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    w = node_arg(node, 1, "weight")
    weight, bias = _weight_arg(c, node, w), _weight_arg(c, node, node_arg(node, 2, "bias"))
    _conv(c, node, node.args[0], weight, bias, node_arg(node, 6, "groups", 1), False, shape_of(w) or (), "convolution")


@register_rule(
    aten.convolution,
    aten.conv_transpose1d,
    aten.conv_transpose2d,
    aten.conv_transpose3d,
    F.conv_transpose1d,
    F.conv_transpose2d,
    F.conv_transpose3d,
)
def _convolution(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    w = node_arg(node, 1, "weight")
    weight, bias = _weight_arg(c, node, w), _weight_arg(c, node, node_arg(node, 2, "bias"))
    if isinstance(node.target, OpOverload) and node.target.overloadpacket == aten.convolution:
        transposed, groups = node.args[6], node.args[8]
    else:
        transposed, groups = True, node_arg(node, 6, "groups", 1)
    _conv(c, node, node.args[0], weight, bias, groups, transposed, shape_of(w) or (), "convolution")


def _linear(c: Couplings, node: torch.fx.Node, x: torch.fx.Node, weight: str | None, bias: str | None) -> None:
    in_shape, out_shape = shape_of(x), shape_of(node)
    if in_shape is None or out_shape is None or weight is None:
        freeze_all(c, node, "linear layer without a static shape or parameter weight")
        return
    last = len(in_shape) - 1
    same_axes(c, x, node.name, last)
    c.bind(weight, 1, (x.name, last), "in", node)
    c.bind(weight, 0, (node.name, last), "out", node)
    if bias is not None:
        c.bind(bias, 0, (node.name, last), "channel", node)


def _linear_module(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    linear_layer(c, node)


def _fix_linear(m: nn.Module, node: torch.fx.Node, width_of: WidthOf) -> None:
    m.in_features, m.out_features = m.weight.shape[1], m.weight.shape[0]


register_layer(nn.Linear, _linear_module, _fix_linear)


@register_rule(F.linear, aten.linear)
def _linear_function(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    weight = _weight_arg(c, node, node_arg(node, 1, "weight"))
    bias = _weight_arg(c, node, node_arg(node, 2, "bias"))
    _linear(c, node, node.args[0], weight, bias)


def _embedding(c: Couplings, node: torch.fx.Node, ids: torch.fx.Node, weight: str | None, max_norm: Any = None) -> None:
    ids_shape, out = shape_of(ids), shape_of(node)
    if ids_shape is None or out is None or weight is None:
        freeze_all(c, node, "embedding without a static shape or parameter weight")
        return
    same_axes(c, ids, node.name, len(ids_shape))
    c.bind(weight, 1, (node.name, len(out) - 1), "out", node)
    if max_norm is not None:
        c.freeze((node.name, len(out) - 1), f"embedding {node.name} renormalises its rows (max_norm)")


def _embedding_module(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    _embedding(c, node, node.args[0], f"{node.target}.weight", c.module(str(node.target)).max_norm)


def _fix_embedding(m: nn.Module, node: torch.fx.Node, width_of: WidthOf) -> None:
    m.embedding_dim = m.weight.shape[1]


register_layer(nn.Embedding, _embedding_module, _fix_embedding)


@register_rule(aten.embedding)
def _embedding_aten(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    _embedding(c, node, node.args[1], _weight_arg(c, node, node.args[0]))


@register_rule(F.embedding)
def _embedding_function(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    _embedding(c, node, node.args[0], _weight_arg(c, node, node_arg(node, 1, "weight")), node_arg(node, 3, "max_norm"))


def _channel_norm(
    c: Couplings, node: torch.fx.Node, x: torch.fx.Node, params: Sequence[str | None], group_size: int = 1
) -> None:
    shape = shape_of(x)
    if shape is None or shape != shape_of(node) or len(shape) < 2:
        freeze_all(c, node, "normalisation without a static (N, C, ...) shape")
        return
    same_axes(c, x, node.name, len(shape))
    for a in range(2, len(shape)):  # statistics are taken over these axes (all norms here, in some mode)
        c.freeze((x.name, a), f"normalised over by {node.name}")
    for p in params:
        if p is not None:
            c.bind(p, 0, (node.name, 1), "channel", node)
    if group_size > 1:
        c.granularity((node.name, 1), group_size, node)


def _norm_module(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    m = c.module(str(node.target))
    shape = shape_of(node.args[0])
    if (
        isinstance(m, nn.modules.instancenorm._InstanceNorm)
        and shape is not None
        and len(shape) == m._get_no_batch_dim()
    ):
        freeze_all(c, node, f"{type(m).__name__} {node.name} on an unbatched input")
        return
    names = ("weight", "bias", "running_mean", "running_var")
    params = [f"{node.target}.{n}" if getattr(m, n, None) is not None else None for n in names]
    group = m.num_channels // m.num_groups if isinstance(m, nn.GroupNorm) else 1
    _channel_norm(c, node, node.args[0], params, group)


def _fix_norm(m: nn.Module, node: torch.fx.Node, width_of: WidthOf) -> None:
    in_w = _input_channels(node, width_of)
    if in_w is None:
        return
    if isinstance(m, nn.GroupNorm):
        per_group = m.num_channels // m.num_groups
        m.num_channels, m.num_groups = in_w, in_w // per_group
    else:
        m.num_features = in_w


register_layer(NormBase, _norm_module, _fix_norm)
register_layer(nn.GroupNorm, _norm_module, _fix_norm)


@register_rule(
    aten.batch_norm, aten._native_batch_norm_legit_no_training, F.batch_norm, F.instance_norm, aten.instance_norm
)
def _batch_norm_function(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    target = getattr(node.target, "overloadpacket", node.target)
    if target in (F.batch_norm,):
        order = [("weight", 3), ("bias", 4), ("running_mean", 1), ("running_var", 2)]
    elif target in (F.instance_norm,):
        order = [("running_mean", 1), ("running_var", 2), ("weight", 3), ("bias", 4)]
    else:
        order = [("weight", 1), ("bias", 2), ("running_mean", 3), ("running_var", 4)]
    args = [node_arg(node, i, n) for n, i in order]
    if any(a is not None and param_name(a) is None for a in args):
        freeze_all(c, node, "normalisation whose statistics are not parameters/buffers")
        return
    if target == aten._native_batch_norm_legit_no_training:
        freeze_all(c, node, "batch norm returning its statistics")
        return
    _channel_norm(c, node, node.args[0], [_weight_arg(c, node, a) for a in args])


@register_rule(F.group_norm, aten.group_norm)
def _group_norm_function(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    shape = shape_of(node.args[0])
    groups = node_arg(node, 1, "num_groups")
    weight, bias = node_arg(node, 2, "weight"), node_arg(node, 3, "bias")
    if shape is None or not isinstance(groups, int):
        freeze_all(c, node, "group norm without static groups")
        return
    _channel_norm(c, node, node.args[0], [_weight_arg(c, node, weight), _weight_arg(c, node, bias)], shape[1] // groups)


def _norm_args(node: torch.fx.Node, module: nn.Module | None) -> tuple[Any, str, list[tuple[str, Any]]]:
    """``(normalized_shape, kind, [(name, weight-or-bias argument)])`` of a layer/RMS norm call."""
    if module is not None:
        kind = "rms" if isinstance(module, nn.RMSNorm) else "layer"
        params = [(n, getattr(module, n, None)) for n in ("weight", "bias")]
        return tuple(module.normalized_shape), kind, [(f"{node.target}.{n}", p) for n, p in params if p is not None]
    packet = getattr(node.target, "overloadpacket", node.target)
    kind = "rms" if packet in (F.rms_norm, aten.rms_norm) else "layer"
    names = ("weight",) if kind == "rms" else ("weight", "bias")
    params = [(n, node_arg(node, 2 + i, n)) for i, n in enumerate(names)]
    return node_arg(node, 1, "normalized_shape"), kind, [(n, a) for n, a in params if a is not None]


@register_rule(nn.LayerNorm, nn.RMSNorm, F.layer_norm, F.rms_norm, aten.layer_norm, aten.rms_norm)
def _layer_norm(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    """LayerNorm / RMSNorm over the last axis: a *stream* (``c.normalize``), its weight and bias one value
    per channel; the analysis makes the stream grow by whole copies only (see ``r2r_fx.analysis``).
    Norms over several axes, or with a normalized shape or weights that are not constants/parameters,
    freeze their axes."""
    x = node.args[0]
    shape = shape_of(x)
    module = c.module(str(node.target)) if node.op == "call_module" else None
    ns, kind, params = _norm_args(node, module)
    layer = type(module).__name__ if module is not None else "layer_norm"
    if shape is None or shape_of(node) != shape:
        freeze_all(c, node, "layer norm without a static shape")
        return
    rank = len(shape)
    ns = (ns,) if isinstance(ns, int) else ns
    # a size computed from the input (``x.shape[-1]``) follows it; torch checks it matches the input
    if not isinstance(ns, (list, tuple)) or not all(isinstance(v, (int, torch.fx.Node)) for v in ns) or not ns:
        freeze_all(c, node, f"{layer} {node.name} with a normalized shape that is not a constant")
        return
    same_axes(c, x, node.name, rank)
    last = rank - 1
    names = [(n if module is not None else param_name(a), a) for n, a in params]
    if len(ns) != 1 or any(n is None for n, _ in names):
        reason = f"normalised over by {layer} {node.name} (mean/variance would change)"
        if len(ns) == 1:
            reason = f"{layer} {node.name} scales by a weight that is not a parameter"
        for a in range(rank - len(ns), rank):
            c.freeze((x.name, a), reason)
        return
    c.normalize((x.name, last), (node.name, last), node, kind, bool(params))
    for name, arg in names:
        if module is None:
            c.uses_param(arg, node)
        c.bind(name, 0, (node.name, last), "channel", node)


def _fix_layer_norm(m: nn.Module, node: torch.fx.Node, width_of: WidthOf) -> None:
    """``normalized_shape`` follows the grown last axis (eps and weights: see ``r2r_fx.surgery.grow_stream``)."""
    x = node.args[0]
    shape = shape_of(x) if isinstance(x, torch.fx.Node) else None
    new = width_of((x.name, len(shape) - 1)) if shape else None
    if new is not None and len(m.normalized_shape) == 1:
        m.normalized_shape = (new,)


register_layer(nn.LayerNorm, _layer_norm, _fix_layer_norm)
register_layer(nn.RMSNorm, _layer_norm, _fix_layer_norm)


@register_rule(aten.addmm)
def _addmm(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    """``bias + x @ W`` with ``W`` an [in, out] parameter (HuggingFace's Conv1D in GPT-2)."""
    bias, x, w = node.args[:3]
    weight, xs, out = param_name(w), shape_of(x), shape_of(node)
    if (
        weight is None
        or param_name(bias) is None
        or xs is None
        or out is None
        or len(xs) != 2
        or shape_of(bias) != out[-1:]
    ):
        _contraction(c, node, gm)
        return
    c.uses_param(w, node)
    c.uses_param(bias, node)
    c.same((x.name, 0), (node.name, 0))
    c.bind(weight, 0, (x.name, 1), "in", node)
    c.bind(weight, 1, (node.name, 1), "out", node)
    c.bind(param_name(bias), 0, (node.name, 1), "channel", node)


@register_rule(aten._assert_tensor_metadata)
def _assert_metadata(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    """dtype/device/layout checks ignore widths; size/stride checks do not."""
    if node_arg(node, 1, "size") is not None or node_arg(node, 2, "stride") is not None:
        freeze_all(c, node, f"{node.name} asserts a tensor's sizes")


@register_rule(nn.MultiheadAttention)
def _attention_module(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    why = node.meta.get("r2r_kept_whole", "it was captured as one layer")
    freeze_all(c, node, f"nn.MultiheadAttention {node.target} keeps its widths: {why}")


@register_rule(aten.mm, torch.einsum, aten.baddbmm, torch.baddbmm)
def _contraction(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    freeze_all(c, node, f"{describe(node, gm)} contracts activations (attention-style products are not widened)")


def _prelu(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    module = c.module(str(node.target))
    elementwise(c, node, gm)
    if module.weight.numel() > 1:
        c.bind(f"{node.target}.weight", 0, (node.name, 1), "channel", node)


def _fix_prelu(m: nn.Module, node: torch.fx.Node, width_of: WidthOf) -> None:
    m.num_parameters = m.weight.numel()


register_layer(nn.PReLU, _prelu, _fix_prelu)


@register_rule(F.prelu, aten.prelu, aten._prelu_kernel)
def _prelu_function(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    """``prelu(x, weight)``: elementwise, with one slope per channel (axis 1) unless the weight is one value."""
    x, weight = node.args[0], node_arg(node, 1, "weight")
    shape, w_shape = shape_of(x), shape_of(weight)
    if shape is None or w_shape is None or shape_of(node) != shape:
        freeze_all(c, node, f"{describe(node, gm)} without static shapes")
        return
    same_axes(c, x, node.name, len(shape))
    if math.prod(w_shape) == 1:
        return
    name = _weight_arg(c, node, weight)
    if name is None or len(shape) < 2 or w_shape != (shape[1],):
        c.freeze(
            (node.name, 1 if len(shape) >= 2 else 0), f"{node.name} has per-channel slopes that are not a parameter"
        )
        return
    c.bind(name, 0, (node.name, 1), "channel", node)
