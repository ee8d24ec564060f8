"""Small helpers on graphs and modules, one copy each."""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["attr_at"]


def attr_at(root: nn.Module, target: str) -> Any:
    """The attribute at a dotted path (``"layer1.0.conv1.weight"``): a get_attr node's target."""
    owner, _, name = target.rpartition(".")
    return getattr(root.get_submodule(owner) if owner else root, name)
