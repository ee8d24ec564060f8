"""The memory the command may use: what the machine has, and what growing and checking a model will need.

The estimate is made from the plan alone, before any tensor of the grown model is allocated, so a growth
too big for the machine is refused (exit 2) instead of running out of memory halfway.
"""

from __future__ import annotations

import math
from typing import Any

import torch

__all__ = ["available_memory", "channel_costs", "estimate_growth", "format_bytes"]


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
    deepen: Any,
    points: list[Any],
) -> dict[str, Any]:
    """Parameters and bytes of the grown model, and the memory growing and checking it needs, from the plan alone.

    Widening: every bound parameter axis grows as its layout's channel sets gain channels
    (``plan_new_channels``, which allocates nothing). Deepening (``deepen``: the ``DeepenPass`` to run):
    a copy of a model's block costs that block's parameters after the widening; the method's generic
    block is built on the meta device per chosen point and count at the point's width scaled by the
    widening (points the method refuses add none). Checking holds the reference and the grown model,
    float64 copies for the train-mode fallback, the ONNX export and an onnxruntime session.
    """
    from r2r_fx.blocks import block_params, repeated_blocks
    from r2r_fx.methods import get_method
    from r2r_fx.passes.widen import plan_new_channels
    from r2r_fx.surgery import get_tensor, new_width

    tensors = {id(t): t for t in [*gm.parameters(), *gm.buffers()]}
    params = {id(p) for p in gm.parameters()}
    before_numel = sum(t.numel() for t in gm.parameters())
    before_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    new_channels: dict[int, int] = {}
    report: list[dict[str, Any]] = []
    if widen_kw is not None:
        new_channels, report = plan_new_channels(
            analysis,
            factor=widen_kw.get("factor"),
            extra=widen_kw.get("extra"),
            groups=groups,
            method=get_method(method),
            sizes=widen_kw.get("sizes"),
        )
    numel, nbytes = before_numel, before_bytes
    grown_numel: dict[str, int] = {}
    for name, axes in analysis.bound_params().items():
        t = get_tensor(gm, name)
        shape = list(t.shape)
        for axis, layout, _ in axes:
            shape[axis] = layout.width(new_channels)
        grown = grown_numel[name] = math.prod(shape)
        numel += (grown - t.numel()) if id(t) in params else 0
        nbytes += (grown - t.numel()) * t.element_size()
    ratio = max([g.width_after / g.width_before for g in report if g.width_before] or [1.0])
    blocks = 0
    own = repeated_blocks(gm) if deepen is not None else []
    if deepen is not None and deepen.uses_own_blocks(own):
        for block in deepen.choose(own):
            blocks += 1
            for name, p in block_params(gm, block.path).items():
                size = grown_numel.get(name, p.numel())
                numel, nbytes = numel + size, nbytes + size * p.element_size()
    elif deepen is not None:
        count, at = deepen.count or 1, deepen.at or []
        chosen = [p for p in points if (p.node in at if at else p.default)]
        widths = [new_width(analysis.layout((p.node, p.channel_axis)), new_channels) for p in chosen]
        per_block = _block_sizes(gm, chosen, widths, method, explicit=bool(at))
        numel += sum(per_block) * count
        nbytes += sum(per_block) * count * 4
        blocks += len(per_block) * count
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


def channel_costs(gm: torch.fx.GraphModule, analysis: Any) -> dict[int, int]:
    """Group id -> the parameters one more channel of it adds (one more head for a heads group), the
    other widths as they are: every bound parameter axis gains ``outer * inner`` positions per channel."""
    from r2r_fx.surgery import get_tensor

    params = {id(p) for p in gm.parameters()}
    costs: dict[int, int] = {}
    for name, axes in analysis.bound_params().items():
        t = get_tensor(gm, name)
        if id(t) not in params:
            continue
        for axis, layout, _ in axes:
            per_position = t.numel() // max(t.shape[axis], 1)
            for outer, pieces in layout.segments:
                for a, _, inner in pieces:
                    group = analysis.group_of_set.get(a)
                    if group is not None:
                        costs[group] = costs.get(group, 0) + outer * inner * per_position
    return costs


def _block_sizes(
    gm: torch.fx.GraphModule, points: list[Any], widths: list[int], method: str, *, explicit: bool
) -> list[int]:
    """Parameters of the block ``method`` inserts at each point it accepts, built on the meta device
    (on the CPU for a method whose block reads values). An explicitly chosen point the method refuses
    is an error, as in ``deepen``."""
    from r2r_fx.errors import GrowthError
    from r2r_fx.methods import BlockSite, get_method

    growth = get_method(method)
    nodes = {n.name: n for n in gm.graph.nodes}
    sizes = []
    for p, width in zip(points, widths):
        refusal = growth.refuses_point(gm, nodes[p.node])
        if refusal and explicit:
            raise GrowthError(f"{p.node!r}: {refusal}")
        if refusal:
            continue
        shape = tuple(width if a == p.channel_axis else s for a, s in enumerate(p.shape))
        block = None
        for device in ("meta", "cpu"):
            site = BlockSite(gm, nodes[p.node], shape, width, p.kind, None, torch.empty((), device=device))
            try:
                with torch.device(device):
                    block = growth.block(site, None, torch.Generator())
                break
            except Exception:  # noqa: BLE001 - e.g. a block that reads a value: count it for real
                continue
        if block is None:
            continue  # the real deepen reports why the block cannot be built
        sizes.append(sum(q.numel() for layers in block.branches for m in layers.values() for q in m.parameters()))
        sizes[-1] += 1 if block.parametric else 0  # NetMorph's alpha
    return sizes
