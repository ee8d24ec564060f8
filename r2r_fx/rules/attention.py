"""Attention: the products of two activations (``q @ k^T``, ``a @ v``) and scaled dot-product attention.

Both act independently along their batch axes, so those keep their channels through the op; the
axis just before the two matrix axes is where attention heads live (``(batch, heads, tokens,
head_dim)``), and the rules say so with ``c.heads``. A reshape that splits a projection's outputs into
``(heads, head_dim)`` then grows along the heads: a new head is a whole block of ``head_dim``
positions, R2R pairs give two identical heads whose outputs the next projection's opposite columns
cancel. What the products contract (the head size of ``q`` and ``k``) is named with ``c.contract``:
it grows only when asked for head sizes (``analyze(gm, head_size=True)``, ``r2r_fx.heads``), with
identical pairs on the ``q`` side and opposite pairs on the ``k`` side, so the new terms of every
score cancel; the value side's head size (the output's last axis) is named with ``c.head_size``. The
key axis keeps its width (a new key changes every softmax), and so does anything the op broadcasts.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
import torch.fx
import torch.nn.functional as F

from r2r_fx.compat import aten
from r2r_fx.graph import describe, param_name, shape_of
from r2r_fx.rules.common import broadcast_into, freeze_all, node_arg
from r2r_fx.rules.registry import Couplings, register_rule


def _batch_axes(c: Couplings, node: torch.fx.Node, operands: Sequence[torch.fx.Node], out: Sequence[int]) -> None:
    """The leading (batch) axes of ``operands`` broadcast into ``node``'s; the one before the matrix
    axes holds heads."""
    for x in operands:
        broadcast_into(c, x, shape_of(x)[:-2], node, out[:-2])
    if len(out) > 2:
        c.heads((node.name, len(out) - 3), node)


def _activations(node: torch.fx.Node, operands: Sequence[object]) -> bool:
    """Whether every operand is a computed tensor of rank >= 2 (not a parameter, not a vector)."""
    return (
        all(
            isinstance(x, torch.fx.Node) and param_name(x) is None and shape_of(x) is not None and len(shape_of(x)) >= 2
            for x in operands
        )
        and shape_of(node) is not None
    )


@register_rule(torch.matmul, torch.bmm, aten.matmul, aten.bmm, "method:matmul", "method:bmm", operator.matmul)
def _matmul(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    """``a @ b`` of two activations, ``(..., n, k) @ (..., k, m)``: rows follow ``a``, columns ``b``."""
    a, b = node.args[:2]
    if len(node.args) != 2 or node.kwargs or not _activations(node, (a, b)):
        freeze_all(c, node, f"{describe(node, gm)} contracts with a parameter or a vector (not widened)")
        return
    out = shape_of(node)
    _batch_axes(c, node, (a, b), out)
    c.same((a.name, len(shape_of(a)) - 2), (node.name, len(out) - 2))
    c.same((b.name, len(shape_of(b)) - 1), (node.name, len(out) - 1))
    c.contract((a.name, len(shape_of(a)) - 1), (b.name, len(shape_of(b)) - 2), node, f"contracted by {node.name}")
    c.head_size((node.name, len(out) - 1), node)


@register_rule(F.scaled_dot_product_attention, aten.scaled_dot_product_attention)
def _sdpa(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    """``softmax(q k^T * scale + mask) v`` over ``(..., L, E)``, ``(..., S, E)``, ``(..., S, Ev)``."""
    q, k, v = (node_arg(node, i, name) for i, name in enumerate(("query", "key", "value")))
    mask = node_arg(node, 3, "attn_mask")
    gqa = node_arg(node, 7, "enable_gqa", False)
    out = shape_of(node)
    if not _activations(node, (q, k, v)) or (mask is not None and not isinstance(mask, torch.fx.Node)):
        freeze_all(c, node, f"{describe(node, gm)} without static shapes")
        return
    if gqa is not False and shape_of(k)[-3:-2] != shape_of(q)[-3:-2]:
        freeze_all(c, node, f"{describe(node, gm)} repeats key/value heads itself (enable_gqa)")
        return
    _batch_axes(c, node, (q, k, v), out)
    last = len(out) - 1
    c.same((q.name, len(shape_of(q)) - 2), (node.name, last - 1))
    c.same((k.name, len(shape_of(k)) - 2), (v.name, len(shape_of(v)) - 2))
    c.same((v.name, len(shape_of(v)) - 1), (node.name, last))
    c.freeze((k.name, len(shape_of(k)) - 2), f"key axis of {node.name} (a new key changes every softmax)")
    c.contract(
        (q.name, len(shape_of(q)) - 1), (k.name, len(shape_of(k)) - 1), node, f"head size of q and k in {node.name}"
    )
    c.head_size((node.name, last), node)
    if mask is not None:
        shape = shape_of(mask)
        scores = (*out[:-1], shape_of(k)[-2])
        offset = len(scores) - len(shape)
        for a, size in enumerate(shape):
            target = a + offset
            if size != scores[target] or target == len(scores) - 1:
                c.freeze((mask.name, a), f"attention mask of {node.name} (broadcast, or along the keys)")
            else:
                c.same((mask.name, a), (node.name, target))
