"""Attention heads and head sizes in the width analysis.

A reshape that splits a projection's output axis into ``(heads, head_dim)`` is a *merge* in the
analysis; it grows along the member an attention rule named as heads (``Couplings.heads``).
``head_roots`` follows those marks through reshapes that build a head axis from several axes
(``repeat_kv``: kv heads x group size; ``bmm``: batch x heads) to the member split from a projection's
outputs. A head-size analysis (``analyze(gm, head_size=True)``) grows the other member instead:
``contract_ties`` ties ``q``'s head size to ``k``'s with the opposite sign on ``k``, and
``keep_score_scales`` keeps SDPA's default score scale at the old head size.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.fx
import torch.nn.functional as F

from r2r_fx.compat import aten
from r2r_fx.graph import shape_of, tensor_shapes
from r2r_fx.rules import Slot

if TYPE_CHECKING:
    from r2r_fx.analysis import _Builder

__all__ = ["contract_ties", "head_roots", "keep_score_scales", "query_group_size"]


def head_roots(find: Callable[[Slot], Slot], b: _Builder, bound_roots: set[Slot]) -> set[Slot]:
    """The classes (union-find roots) holding attention heads: those the rules named, and, through a
    reshape that makes a head axis from several axes, the one of them that is split from a projection's
    outputs (the kv heads of ``repeat_kv``, the heads of ``batch * heads``)."""
    heads = {find(s) for s in b.head_slots}
    merges = [(find(whole), [find(m) for m in ms]) for whole, ms in b.merges]
    # projection outputs: bound classes, and the pieces a split cuts them into (GPT-2's packed qkv)
    projected = set(bound_roots)
    for whole, parts, _ in b.concats:
        if find(whole) in bound_roots:
            projected.update(find(p) for p in parts)
    split_from_projection = {r for whole, roots in merges if whole in projected for r in roots}
    changed = True
    while changed:
        changed = False
        for whole, roots in merges:
            if whole not in heads or any(r in heads or r in bound_roots for r in roots):
                continue
            elsewhere = [r for r in roots if r in split_from_projection]
            if len(elsewhere) == 1:
                heads.add(elsewhere[0])
                changed = True
    return heads


def query_group_size(analysis: Any, head_slots: list[Slot], channel_sets: list[int]) -> int:
    """How many query heads each channel of a heads group stands for, read where the attention products
    meet the heads: 1 without grouped-query attention; with it (``repeat_kv`` expands each key/value head
    over its query heads, or a query projection reshaped to ``(kv heads, group, head size)``) each channel
    spans ``group`` consecutive heads there. 0 when the products disagree."""
    inner = {i for s in head_slots for a, _, i in analysis.layout(s).pieces if a in channel_sets}
    return inner.pop() if len(inner) == 1 else (1 if not inner else 0)


def contract_ties(analysis: Any, b: _Builder, freeze_layout: Callable[..., None]) -> tuple[list, set[int]]:
    """The ties a head-size analysis adds: for each product contracting ``q``'s head size with ``k``'s,
    the two channel sets grow together (``(q_set, k_set)`` edges), ``k``'s set with the opposite sign
    (returned as the *key sets*: its producer's rows and bias take opposite pairs, Net2Net's halves,
    NetMorph's zeros, the fill of a consumer's columns), so ``q'.k' = q.k + a.b - a.b``.

    Fail closed: a head size that is not one whole channel set at the product (split for a rotary
    embedding, reshaped), a set on the ``q`` side of one product and the ``k`` side of another, and any
    parameter on a key set other than its producer's rows and bias (a per-channel scale would get the
    wrong sign), or read as data on either side (rotary tables), freeze the group with the reason."""
    edges, key_sets, query_sets = [], set(), set()
    producers_of = {}  # node name -> it writes a bound parameter axis's rows (a projection)
    for key, binds in b.bindings.items():
        for x in binds:
            if x.role == "out":
                producers_of[x.node] = key
    nodes = {n.name: n for n in analysis.gm.graph.nodes}
    for q, k, node in b.contracts:
        lq, lk = analysis.layout(q), analysis.layout(k)
        if not (lq.plain and lk.plain) or lq.pieces[0][0] == lk.pieces[0][0]:
            if len(lq.pieces) > 1 or len(lk.pieces) > 1:
                reason = (
                    f"the head size of {node} is split in parts, as a rotary embedding does "
                    "(its frequencies depend on the head size): it keeps its width"
                )
            elif not (lq.plain and lk.plain):
                reason = f"the head size of {node} is reshaped: it keeps its width"
            else:
                reason = f"{node} contracts a head size with itself: it keeps its width"
            freeze_layout(lq, reason, primary=True)
            freeze_layout(lk, reason, primary=True)
            continue
        bad = next((why for slot in (q, k) if (why := _off_path(nodes[slot[0]], producers_of, analysis.gm))), "")
        if bad:
            reason = f"{bad} between a projection and the product {node}: the head size keeps its width"
            freeze_layout(lq, reason, primary=True)
            freeze_layout(lk, reason, primary=True)
            continue
        edges.append((lq.pieces[0][0], lk.pieces[0][0]))
        query_sets.add(lq.pieces[0][0])
        key_sets.add(lk.pieces[0][0])
    for a in query_sets & key_sets:
        freeze_layout(
            analysis.layout(analysis.set_roots[a]),
            "a head size on the query side of one product and the key side of another",
        )
    tied = query_sets | key_sets
    layouts = {key: analysis.layout((f"param:{key[0]}", key[1])) for key in b.bindings}
    producers = {  # the layers writing a key set (their biases take the sign too)
        x.node
        for key, binds in b.bindings.items()
        if set(layouts[key].channel_sets()) & key_sets
        for x in binds
        if x.role == "out"
    }
    for (param, axis), binds in b.bindings.items():
        layout = layouts[(param, axis)]
        sets = set(layout.channel_sets())
        if not sets & tied:
            continue
        for x in binds:
            bad = x.role == "data" or (
                sets & key_sets and not (x.role == "out" or (x.role == "channel" and x.node in producers))
            )
            if bad:
                reason = (
                    f"parameter {param} axis {axis} is read on the head size of q/k as {x.role}"
                    " (only a projection's rows and bias take the key side's sign)"
                )
                freeze_layout(layout, reason)
    return edges, key_sets


# Ops that carry a head size from its projection to the q.k product and keep its new positions' pairs:
# linear and homogeneous (so ``f(-u) = -f(u)`` and ``f(u) = f(u)``), with no randomness (dropout draws
# a different mask for each member of a pair)
_CARRY = {
    "view", "reshape", "_unsafe_view", "transpose", "permute", "t", "contiguous", "clone", "expand",
    "unsqueeze", "squeeze", "flatten", "unflatten", "getitem", "split", "split_with_sizes", "chunk",
    "unbind", "select", "slice", "narrow", "alias", "detach", "to", "_to_copy", "type_as", "float",
    "double", "half", "bfloat16", "neg", "mul", "div", "truediv", "Identity",
}  # fmt: skip


def _off_path(start: torch.fx.Node, producers: Mapping[str, Any], gm: torch.fx.GraphModule) -> str:
    """Why the head size reaching a product at ``start`` does not come straight from a projection (the
    first op on the way back that is not a carrying op, or a product with a tensor), or ""."""
    from r2r_fx.graph import target_name

    node, seen = start, 0
    while node.name not in producers and seen < 10_000:
        seen += 1
        op = target_name(node, gm)
        # its tensor inputs (not the symbolic sizes of a view); a parameter counts: x * w is per channel
        tensors = [a for a in node.all_input_nodes if a.op == "get_attr" or tensor_shapes(a)]
        if node.op not in ("call_function", "call_method", "call_module") or op not in _CARRY:
            return f"{node.name} ({op})"
        if len(tensors) != 1:
            return f"{node.name} ({op} of several tensors)"
        node = tensors[0]
    return ""


def keep_score_scales(gm: torch.fx.GraphModule, analysis: Any, new_channels: Mapping[int, int]) -> None:
    """Scaled dot-product attention nodes whose head size grew keep the old score scale: SDPA's default
    ``1 / sqrt(E)`` would follow the new ``E`` and change every score, so ``scale=`` is set to the old
    value (an explicit scale already is the old one)."""
    sdpa = {F.scaled_dot_product_attention, aten.scaled_dot_product_attention.default}
    changed = False
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in sdpa or node.kwargs.get("scale") is not None:
            continue
        q = node.args[0]
        slot = (q.name, len(shape_of(q)) - 1)
        if any(new_channels.get(a) for a in analysis.layout(slot).channel_sets()):
            node.update_kwarg("scale", analysis.size(slot) ** -0.5)
            changed = True
    if changed:
        gm.recompile()
