"""Helpers every rule family uses: reading node arguments, and the fail-closed default."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx

from r2r_fx.graph import tensor_shapes
from r2r_fx.rules.registry import Couplings, Slot

__all__ = ["broadcast_into", "freeze_all", "node_arg", "positive_axis", "same_axes", "slots_of"]


def node_arg(node: torch.fx.Node, index: int, name: str, default: Any = None) -> Any:
    """Argument ``index`` of a call, or its keyword ``name``, or ``default``."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def positive_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def slots_of(name: str, rank: int) -> list[Slot]:
    return [(name, a) for a in range(rank)]


def freeze_all(c: Couplings, node: torch.fx.Node, reason: str) -> None:
    """The fail-closed default: every axis of every tensor in and out keeps its width."""
    for arg in node.all_input_nodes:
        for name, shape in tensor_shapes(arg):
            for slot in slots_of(name, len(shape)):
                c.freeze(slot, reason)
    for name, shape in tensor_shapes(node):
        for slot in slots_of(name, len(shape)):
            c.freeze(slot, reason)


def same_axes(c: Couplings, src: torch.fx.Node, dst: str, rank: int, skip: Sequence[int] = ()) -> None:
    """``dst`` has ``src``'s channels on every axis but ``skip``."""
    for a in range(rank):
        if a not in skip:
            c.same((src.name, a), (dst, a))


def broadcast_into(
    c: Couplings, src: torch.fx.Node, shape: Sequence[int], node: torch.fx.Node, out: Sequence[int]
) -> None:
    """``src`` (of ``shape``) broadcast to ``node``'s ``out`` (trailing axes aligned): an axis of the
    same size keeps its channels, a broadcast axis (size 1 to n) keeps its width."""
    offset = len(out) - len(shape)
    for a, size in enumerate(shape):
        if size == out[a + offset]:
            c.same((src.name, a), (node.name, a + offset))
        else:
            c.freeze((src.name, a), f"broadcast by {node.name}")
