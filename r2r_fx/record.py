"""Reading the growth record a pass leaves in ``gm.meta["r2r_record"]``.

Each widen entry lists, per grown parameter and axis, the runs ``(new_start, old_start, length)``
where the old entries now sit; everything else on that axis is new.
"""

from __future__ import annotations

from typing import Any

import torch

from r2r_fx.passbase import records_of

__all__ = ["new_entry_mask", "old_positions", "param_changes"]


def param_changes(gm: torch.nn.Module) -> dict[str, list[dict[str, Any]]]:
    """Parameter name -> the changes recorded for it, oldest first."""
    out: dict[str, list[dict[str, Any]]] = {}
    for entry in records_of(gm):
        for change in entry.get("params", []):
            out.setdefault(change["param"], []).append(change)
    return out


def old_positions(runs: list[list[int]]) -> torch.Tensor:
    """New positions of the old entries along one axis, in old order."""
    parts = [torch.arange(new, new + length) for new, _, length in sorted(runs, key=lambda r: r[1])]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def new_entry_mask(change: dict[str, Any]) -> torch.Tensor:
    """Boolean mask over the grown parameter: True where an entry is new."""
    shape = change["shape_after"]
    old = torch.ones(shape, dtype=torch.bool)
    for axis, info in change["axes"].items():
        keep = torch.zeros(shape[int(axis)], dtype=torch.bool)
        keep[old_positions(info["old_runs"])] = True
        view = [1] * len(shape)
        view[int(axis)] = -1
        old &= keep.view(view)
    return ~old
