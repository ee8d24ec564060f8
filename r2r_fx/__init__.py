"""r2r_fx: function-preserving growth of arbitrary PyTorch models through torch.fx."""

from __future__ import annotations

from r2r_fx import blocks, tree
from r2r_fx.analysis import WidthGroup, analyze, width_groups
from r2r_fx.blocks import RepeatedBlock, repeated_blocks
from r2r_fx.capture import capture
from r2r_fx.errors import CaptureError, GrowthError, NotPreservedError, R2RError
from r2r_fx.export import export_onnx, run_onnx
from r2r_fx.methods import Block, BlockSite, Method, register_method
from r2r_fx.optim import carry_optimizer, carry_scheduler
from r2r_fx.passes.deepen import DeepenPass, InsertionPoint, deepen, insertion_points
from r2r_fx.passes.grow_kernel import GrowKernelPass, grow_kernel
from r2r_fx.passes.widen import WidenPass, widen
from r2r_fx.record import GrowthRecord, growth_history
from r2r_fx.rules import register_layer
from r2r_fx.verify import VerifyReport, verify

__all__ = [
    "CaptureError",
    "GrowthError",
    "NotPreservedError",
    "R2RError",
    "Block",
    "BlockSite",
    "DeepenPass",
    "GrowKernelPass",
    "GrowthRecord",
    "InsertionPoint",
    "RepeatedBlock",
    "Method",
    "VerifyReport",
    "WidenPass",
    "WidthGroup",
    "analyze",
    "capture",
    "carry_optimizer",
    "carry_scheduler",
    "deepen",
    "export_onnx",
    "grow_kernel",
    "growth_history",
    "insertion_points",
    "register_layer",
    "register_method",
    "repeated_blocks",
    "run_onnx",
    "verify",
    "widen",
    "blocks",
    "tree",
    "width_groups",
]
