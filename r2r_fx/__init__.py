"""r2r_fx: function-preserving growth of arbitrary PyTorch models through torch.fx."""

from __future__ import annotations

from r2r_fx.capture import CaptureError, capture

__all__ = ["CaptureError", "capture"]
