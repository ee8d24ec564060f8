"""The library's errors: every refusal r2r_fx makes on purpose is an :class:`R2RError`.

Anything else escaping a public function is a bug (an internal error), which is how the CLI and the
fuzzer tell a clear refusal from a crash.
"""

from __future__ import annotations

__all__ = ["CaptureError", "GrowthError", "NotPreservedError", "R2RError"]


class R2RError(Exception):
    """Base class of every error r2r_fx raises on purpose."""


class CaptureError(R2RError, RuntimeError):
    """Neither symbolic tracing nor torch.export gives a graph that computes what the model computes."""


class GrowthError(R2RError, ValueError):
    """A pass refuses what it was asked (an unknown node, a size it cannot reach, an unsupported layer)."""


class NotPreservedError(R2RError):
    """The safety net: a pass's result does not compute what its input computes.

    ``pass_name``, ``output`` (the worst output leaf), ``mode`` ("eval"/"train") and ``error`` (the
    relative error) say where.
    """

    def __init__(self, pass_name: str, output: str, mode: str, error: float, tolerance: float) -> None:
        self.pass_name, self.output, self.mode, self.error, self.tolerance = pass_name, output, mode, error, tolerance
        super().__init__(
            f"{pass_name}: the grown model is not function-preserving: output {output} in {mode} mode has "
            f"relative error {error:.3g} (tolerance {tolerance:.1g}); this is a bug in r2r_fx, please report it "
            f"(check=False returns the model anyway)"
        )
