"""Attention heads in the width analysis: which classes of slots hold heads.

A reshape that splits a projection's output axis into ``(heads, head_dim)`` is a *merge* in the
analysis; it grows along the member an attention rule named as heads (``Couplings.heads``). This module
follows those marks through reshapes that build a head axis from several axes (``repeat_kv``: kv
heads x group size; ``bmm``: batch x heads) to the member split from a projection's outputs.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from r2r_fx.rules import Slot

if TYPE_CHECKING:
    from r2r_fx.analysis import _Builder

__all__ = ["head_roots"]


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
