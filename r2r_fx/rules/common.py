"""Helpers every rule family uses: reading node arguments, and the fail-closed default."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx

from r2r_fx.graph import describe, tensor_shapes
from r2r_fx.rules.registry import Couplings, Slot

__all__ = ["broadcast_into", "freeze_all", "freeze_hidden_uses", "node_arg", "positive_axis", "same_axes", "slots_of"]


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


def freeze_hidden_uses(b: Any, nodes: list[torch.fx.Node], gm: torch.fx.GraphModule) -> None:
    """After every rule ran (``b``: the analysis's builder): a layer reads its own parameters without a
    binding when its rule froze it whole (a layer captured as one call), so a parameter it shares with
    other nodes (the same attention layer called twice, once traced through) keeps its width there too."""
    bound_by: dict[str, set[tuple[int, str]]] = {}
    for (param, axis), binds in b.bindings.items():
        bound_by.setdefault(param, set()).update((axis, x.node) for x in binds)
    for node in nodes:
        if node.op != "call_module":
            continue
        for name, _ in b.module(str(node.target)).named_parameters(prefix=str(node.target)):
            param = b.canonical.get(name, name)
            uses = bound_by.get(param, set())
            for axis in {a for a, _ in uses} - {a for a, n in uses if n == node.name}:
                b.freeze((f"param:{param}", axis), f"{param} is also read by {describe(node, gm)}, whose widths stay")
