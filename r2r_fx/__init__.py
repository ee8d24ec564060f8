"""r2r_fx: function-preserving growth of arbitrary PyTorch models through torch.fx.

The names below load on first use (PEP 562), so ``import r2r_fx`` and the ``r2r-rewrite`` command's
``--help`` and argument errors do not pay for importing torch.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

# public name -> the module that defines it
_WHERE = {
    "WidthGroup": "analysis",
    "analyze": "analysis",
    "width_groups": "analysis",
    "RepeatedBlock": "blocks",
    "repeated_blocks": "blocks",
    "capture": "capture",
    "CaptureError": "errors",
    "GrowthError": "errors",
    "NotPreservedError": "errors",
    "R2RError": "errors",
    "export_onnx": "export",
    "run_onnx": "export",
    "Block": "methods",
    "BlockSite": "methods",
    "Method": "methods",
    "register_method": "methods",
    "carry_optimizer": "optim",
    "carry_scheduler": "optim",
    "DeepenPass": "passes.deepen",
    "InsertionPoint": "passes.deepen",
    "deepen": "passes.deepen",
    "insertion_points": "passes.deepen",
    "GrowKernelPass": "passes.grow_kernel",
    "grow_kernel": "passes.grow_kernel",
    "WidenPass": "passes.widen",
    "widen": "passes.widen",
    "GrowthRecord": "record",
    "growth_history": "record",
    "register_layer": "rules",
    "VerifyReport": "verify",
    "verify": "verify",
}
_SUBMODULES = ("blocks", "tree")

__all__ = [*_WHERE, *_SUBMODULES]


_SHADOWED = frozenset(name for name, module in _WHERE.items() if name == module)  # capture, verify


class _Package(types.ModuleType):
    """Importing the submodule ``r2r_fx.capture`` binds it on the package; ``r2r_fx.capture`` stays the function."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _SHADOWED and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str) -> Any:
    if name not in _WHERE:  # a submodule (``r2r_fx.record``, ``r2r_fx.passes``), as an eager package has them
        try:
            return importlib.import_module(f"r2r_fx.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"r2r_fx.{name}":
                raise
            raise AttributeError(f"module 'r2r_fx' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f"r2r_fx.{_WHERE[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
    from r2r_fx import blocks, tree  # noqa: F401
    from r2r_fx.analysis import WidthGroup, analyze, width_groups  # noqa: F401
    from r2r_fx.blocks import RepeatedBlock, repeated_blocks  # noqa: F401
    from r2r_fx.capture import capture  # noqa: F401
    from r2r_fx.errors import CaptureError, GrowthError, NotPreservedError, R2RError  # noqa: F401
    from r2r_fx.export import export_onnx, run_onnx  # noqa: F401
    from r2r_fx.methods import Block, BlockSite, Method, register_method  # noqa: F401
    from r2r_fx.optim import carry_optimizer, carry_scheduler  # noqa: F401
    from r2r_fx.passes.deepen import DeepenPass, InsertionPoint, deepen, insertion_points  # noqa: F401
    from r2r_fx.passes.grow_kernel import GrowKernelPass, grow_kernel  # noqa: F401
    from r2r_fx.passes.widen import WidenPass, widen  # noqa: F401
    from r2r_fx.record import GrowthRecord, growth_history  # noqa: F401
    from r2r_fx.rules import register_layer  # noqa: F401
    from r2r_fx.verify import VerifyReport, verify  # noqa: F401
