"""Torch internals r2r_fx relies on, in one place (each use is covered by the test suite).

* ``aten``: ``torch.ops.aten``, except that an operator this torch build lacks resolves to a
  placeholder that matches no graph node, so rules written for ops of other torch versions do not
  break ``import r2r_fx``.
* ``OpOverload``, ``OpOverloadPacket``, ``HigherOrderOperator``: the classes of operator calls in
  exported graphs (``torch._ops``).
* ``is_concrete_int``: whether a size in an exported graph's metadata is a fixed number.
"""

from __future__ import annotations

from typing import Any

import torch
from torch._ops import HigherOrderOperator, OpOverload, OpOverloadPacket
from torch.fx.experimental.symbolic_shapes import is_concrete_int

__all__ = ["HigherOrderOperator", "OpOverload", "OpOverloadPacket", "aten", "is_concrete_int"]


class _MissingOp:
    """Stands for an ATen operator this torch build does not have: a key no node's target equals."""

    def __init__(self, name: str) -> None:
        self.__name__ = name

    def __getattr__(self, overload: str) -> _MissingOp:  # aten.foo.default of a missing foo
        return _MissingOp(f"{self.__name__}.{overload}")

    def __repr__(self) -> str:
        return f"<missing aten op {self.__name__}>"


class _Aten:
    def __getattr__(self, name: str) -> Any:
        try:
            return getattr(torch.ops.aten, name)
        except (AttributeError, RuntimeError):
            return _MissingOp(name)


aten: Any = _Aten()
