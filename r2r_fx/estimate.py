"""The memory the command may use: what the machine has, and what growing and checking a model will need.

The estimate is made from the plan alone, before any tensor of the grown model is allocated, so a growth
too big for the machine is refused (exit 2) instead of running out of memory halfway.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["available_memory", "estimate_growth", "format_bytes"]


def available_memory() -> int:
    """MemAvailable from /proc/meminfo in bytes (a large number where it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 1 << 50


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def estimate_growth(
    gm: torch.fx.GraphModule,
    analysis: Any,
    widen_kw: dict[str, Any] | None,
    groups: list[int | str] | None,
    method: str,
    deepen: tuple[int, list[str]] | None,
    points: list[Any],
) -> dict[str, Any]:
    """Parameters and bytes of the grown model, and the memory growing and checking it needs, from the plan alone.

    Widening: every bound parameter axis grows as its layout's atoms gain channels (``plan_extras``,
    which allocates nothing). Deepening: one block per chosen point and count (conv-BN-conv or
    linear-linear at the point's width, scaled by the widening). Checking holds the reference and the
    grown model, float64 copies for the train-mode fallback, the ONNX export and an onnxruntime session.
    """
    from r2r_fx.methods import get_method
    from r2r_fx.passes.widen import plan_extras
    from r2r_fx.surgery import get_tensor

    tensors = {id(t): t for t in [*gm.parameters(), *gm.buffers()]}
    params = {id(p) for p in gm.parameters()}
    before_numel = sum(t.numel() for t in gm.parameters())
    before_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    extras: dict[int, int] = {}
    report: list[dict[str, Any]] = []
    if widen_kw is not None:
        extras, report = plan_extras(
            analysis,
            factor=widen_kw.get("factor"),
            extra=widen_kw.get("extra"),
            groups=groups,
            method=get_method(method),
        )
    numel, nbytes = before_numel, before_bytes
    for name, axes in analysis.bound_params().items():
        t = get_tensor(gm, name)
        shape = list(t.shape)
        for axis, layout, _ in axes:
            shape[axis] = layout.outer * sum((n + extras.get(a, 0)) * inner for a, n, inner in layout.pieces)
        grown = math.prod(shape)
        numel += (grown - t.numel()) if id(t) in params else 0
        nbytes += (grown - t.numel()) * t.element_size()
    ratio = max([g.width_after / g.width_before for g in report if g.width_before] or [1.0])
    blocks = 0
    if deepen is not None:
        count, at = deepen
        chosen = [p for p in points if (p.node in at if at else p.default)]
        for p in chosen:
            w = int(p.width * ratio)
            per_block = 2 * w * w + w if p.kind == "linear" else 2 * w * w * 9 + 4 * w
            numel += per_block * count
            nbytes += per_block * count * 4
            blocks += count
    activations = 0
    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta")
        if hasattr(meta, "shape") and hasattr(meta, "dtype"):
            activations += math.prod(meta.shape) * torch.empty((), dtype=meta.dtype).element_size()
    # measured: ~7.5x the grown model's bytes at the peak of verify + ONNX export, on top of the interpreter
    need = (512 << 20) + 3 * before_bytes + 8 * nbytes + 4 * int(activations * ratio) * (1 + blocks)
    return {
        "params_before": before_numel,
        "params_after": numel,
        "bytes_after": nbytes,
        "memory_needed": need,
        "memory_available": available_memory(),
        "groups": report,
        "widened": sum(1 for g in report if g.status == "widened"),
    }
