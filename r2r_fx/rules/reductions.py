"""Reductions and softmax: reduced axes keep their width (the reduction would see new channels).

One exception: the mean of a decomposed RMSNorm (``r2r_fx.rules.norm_idioms``) registers a norm, so the
reduced axis becomes a normalised stream (it grows by whole copies, which leave the mean square as it is).
"""

from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from r2r_fx.compat import aten
from r2r_fx.graph import describe, shape_of, target_name
from r2r_fx.rules.common import freeze_all, node_arg, positive_axis, same_axes
from r2r_fx.rules.norm_idioms import decomposed_rms_norm
from r2r_fx.rules.registry import Couplings, register_rule


def _reduce_axes(node: torch.fx.Node, rank: int) -> tuple[list[int], bool] | None:
    dims = node_arg(node, 1, "dim")
    if dims is None and len(node.args) < 2 and "dim" not in node.kwargs:
        return list(range(rank)), bool(node.kwargs.get("keepdim", False))
    if isinstance(dims, int):
        dims = [dims]
    if not isinstance(dims, (list, tuple)) or not all(isinstance(d, int) for d in dims):
        return None
    keepdim = node_arg(node, 2, "keepdim", False)
    return sorted(positive_axis(d, rank) for d in dims), bool(keepdim)


def _reduction(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    x = node.args[0]
    shape = shape_of(x)
    parsed = _reduce_axes(node, len(shape)) if shape is not None else None
    if parsed is None or shape_of(node) is None:
        freeze_all(c, node, f"{describe(node, gm)} over dynamic axes")
        return
    axes, keepdim = parsed
    idiom = decomposed_rms_norm(node, axes, keepdim) if target_name(node) == "mean" else None
    if idiom is not None:
        last = len(shape) - 1
        c.normalize((idiom.x.name, last), (idiom.out.name, last), idiom.out, "rms", idiom.affine, idiom)
        same_axes(c, x, node.name, last)
        c.freeze((node.name, last), f"reduced by {node.name}")  # the size-1 mean square
        return
    out_axis = 0
    for a in range(len(shape)):
        if a in axes:
            c.freeze((x.name, a), f"reduced over by {node.name}")
            if keepdim:
                c.freeze((node.name, out_axis), f"reduced by {node.name}")
                out_axis += 1
        else:
            c.same((x.name, a), (node.name, out_axis))
            out_axis += 1


register_rule(
    torch.mean,
    torch.sum,
    torch.amax,
    torch.amin,
    *(f"method:{m}" for m in ("mean", "sum", "amax", "amin")),
    aten.mean,
    aten.sum,
    aten.amax,
    aten.amin,
)(_reduction)


@register_rule(
    F.softmax,
    F.log_softmax,
    torch.softmax,
    torch.log_softmax,
    "method:softmax",
    "method:log_softmax",
    aten.softmax,
    aten._softmax,
    aten.log_softmax,
    aten._log_softmax,
    nn.Softmax,
    nn.LogSoftmax,
)
def _softmax(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    x = node.args[0]
    shape = shape_of(x)
    dim = c.module(str(node.target)).dim if node.op == "call_module" else node_arg(node, 1, "dim")
    if shape is None or not isinstance(dim, int):
        freeze_all(c, node, "softmax over a dynamic axis")
        return
    dim = positive_axis(dim, len(shape))
    same_axes(c, x, node.name, len(shape), skip=[dim])
    c.freeze((x.name, dim), f"softmax axis of {node.name}")
    c.freeze((node.name, dim), f"softmax axis of {node.name}")
