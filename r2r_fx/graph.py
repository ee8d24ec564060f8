"""Small helpers on graphs and modules, one copy each."""

from __future__ import annotations

from typing import Any

import torch.fx
from torch import nn

__all__ = ["attr_at", "param_name", "shape_of", "tensor_shapes"]


def attr_at(root: nn.Module, target: str) -> Any:
    """The attribute at a dotted path (``"layer1.0.conv1.weight"``): a get_attr node's target."""
    owner, _, name = target.rpartition(".")
    return getattr(root.get_submodule(owner) if owner else root, name)


def shape_of(node: Any) -> tuple[int, ...] | None:
    """Static shape of a single-tensor node, from shape propagation."""
    if not isinstance(node, torch.fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    if meta is not None and hasattr(meta, "shape") and hasattr(meta, "dtype"):
        return tuple(map(int, meta.shape))
    return None


def tensor_shapes(node: torch.fx.Node) -> list[tuple[str, tuple[int, ...]]]:
    """(slot name, shape) for every tensor a node outputs; tuple outputs get ``name#i``."""
    meta = node.meta.get("tensor_meta")
    if meta is None:
        return []
    if hasattr(meta, "shape") and hasattr(meta, "dtype"):
        return [(node.name, tuple(map(int, meta.shape)))]
    out = []
    if isinstance(meta, (tuple, list)):
        for i, item in enumerate(meta):
            if hasattr(item, "shape") and hasattr(item, "dtype"):
                out.append((f"{node.name}#{i}", tuple(map(int, item.shape))))
    return out


def param_name(node: Any) -> str | None:
    """The parameter or buffer a get_attr node reads, or None."""
    return str(node.target) if isinstance(node, torch.fx.Node) and node.op == "get_attr" else None
