"""Spatial ops (pooling, resizing, padding, flips): channels pass through, spatial axes keep their size."""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from r2r_fx.compat import aten
from r2r_fx.graph import describe, shape_of, tensor_shapes
from r2r_fx.rules.common import freeze_all, node_arg
from r2r_fx.rules.registry import Couplings, register_rule


def _spatial(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    x = node.args[0]
    in_shape = shape_of(x)
    outs = tensor_shapes(node)
    if in_shape is None or not outs or len(in_shape) < 2:
        freeze_all(c, node, f"{describe(node, gm)} without a static (N, C, ...) shape")
        return
    for name, shape in outs:
        if len(shape) != len(in_shape) or shape[:2] != in_shape[:2]:
            freeze_all(c, node, f"{describe(node, gm)} changes the batch or channel size")
            return
        c.same((x.name, 0), (name, 0))
        c.same((x.name, 1), (name, 1))
        for a in range(2, len(shape)):
            c.freeze((name, a), "spatial axis")
    for a in range(2, len(in_shape)):
        c.freeze((x.name, a), "spatial axis")


register_rule(
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.Upsample,
    nn.UpsamplingNearest2d,
    nn.UpsamplingBilinear2d,
    nn.LPPool2d,
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    F.adaptive_max_pool3d,
    F.interpolate,
    F.upsample,
    torch.nn.functional.lp_pool2d,
    *(
        getattr(aten, n)
        for n in (
            "max_pool1d",
            "max_pool2d",
            "max_pool3d",
            "max_pool2d_with_indices",
            "max_pool3d_with_indices",
            "avg_pool1d",
            "avg_pool2d",
            "avg_pool3d",
            "adaptive_avg_pool1d",
            "adaptive_avg_pool2d",
            "adaptive_avg_pool3d",
            "_adaptive_avg_pool2d",
            "_adaptive_avg_pool3d",
            "adaptive_max_pool1d",
            "adaptive_max_pool2d",
            "adaptive_max_pool3d",
            "upsample_nearest1d",
            "upsample_nearest2d",
            "upsample_nearest3d",
            "upsample_bilinear2d",
            "upsample_linear1d",
            "upsample_bicubic2d",
            "upsample_trilinear3d",
            "_upsample_nearest_exact2d",
            "_upsample_bilinear2d_aa",
        )
        if hasattr(aten, n)
    ),
)(_spatial)


@register_rule(
    F.pad,
    aten.pad,
    aten.constant_pad_nd,
    aten.reflection_pad2d,
    aten.replication_pad2d,
    nn.ZeroPad2d,
    nn.ConstantPad2d,
    nn.ReflectionPad2d,
    nn.ReplicationPad2d,
    nn.ZeroPad1d,
    nn.ConstantPad1d,
    nn.ReflectionPad1d,
    nn.ReplicationPad1d,
    nn.ConstantPad3d,
    nn.ZeroPad3d,
)
def _pad(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    x = node.args[0]
    shape = shape_of(x)
    if node.op == "call_module":
        pad = c.module(str(node.target)).padding
    else:
        pad = node_arg(node, 1, "pad")
    if shape is None or not isinstance(pad, (list, tuple)):
        freeze_all(c, node, "padding without static sizes")
        return
    rank = len(shape)
    # pads the last axes, last axis first; a (0, 0) pair leaves its axis as it is (Swin pads H and W only)
    padded = {rank - 1 - i for i in range(len(pad) // 2) if not (pad[2 * i] == 0 and pad[2 * i + 1] == 0)}
    out = shape_of(node)
    for a in range(rank):
        if a in padded:
            c.freeze((x.name, a), "padded axis")
            c.freeze((node.name, a), "padded axis")
        elif out is not None and out[a] == shape[a]:
            c.same((x.name, a), (node.name, a))
        else:
            c.freeze((x.name, a), "padded axis")
