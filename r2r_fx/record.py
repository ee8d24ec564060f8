"""The growth record: what each pass changed, as typed data with a JSON round trip.

Every pass appends one :class:`GrowthRecord` to the model's history. The history is stored as plain
JSON data in ``gm.meta["r2r_record"]`` and in the attribute ``gm.r2r_record`` (``torch.save`` of a
GraphModule drops ``meta`` but keeps attributes), so a grown model pickles and loads without r2r_fx;
:func:`growth_history` reads it back as dataclasses.

A :class:`ParamChange` says, per grown axis of a parameter, the runs ``(new_start, old_start,
length)`` where the old entries now sit; every other entry on that axis is new. Passes write it
through :func:`replace_param`, which also swaps the tensor in (under every tied name).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = [
    "AxisChange",
    "BlockInsert",
    "GroupChange",
    "GrowthRecord",
    "ParamChange",
    "SkippedPoint",
    "append_record",
    "growth_history",
    "new_entry_mask",
    "old_positions",
    "param_changes",
    "replace_param",
]


@dataclass(frozen=True)
class AxisChange:
    """One grown axis of a parameter: its role (``out``, ``in``, ``channel``, ``kernel``) and where the
    old entries sit, as runs ``(new_start, old_start, length)``.

    On a normalised stream the role is ``stream_<role>``: the old entries sit at ``0..d-1``, copy ``j``
    at ``j*d..`` and the ``r`` tail channels last. ``old_changed``: the old positions no longer hold the
    old values: for ``stream_in`` (a reader's columns, ``k > 1``) a share of the old column (the ``k``
    shares add up to it), for a norm weight grown with a tail ``gamma * sqrt(kd/D)``, for
    ``stream_scaled`` (the weights of a norm before a head tied to the embedding) the old value over ``k``.

    ``no_grad``: runs ``(start, length)`` of new entries along this axis whose gradient is zero at the
    first step by construction (exactly, or up to rounding where a LayerNorm computes the exact zero),
    ``no_grad_why`` says why: a norm's tail weight and its readers' tail columns (the normalised tail
    is 0), NetMorph's new producer rows (their consumer columns are 0)."""

    role: str
    old_runs: tuple[tuple[int, int, int], ...]
    old_changed: bool = False
    no_grad: tuple[tuple[int, int], ...] = ()
    no_grad_why: str = ""


@dataclass(frozen=True)
class ParamChange:
    """A parameter (or buffer) replaced by a grown one."""

    param: str
    shape_before: tuple[int, ...]
    shape_after: tuple[int, ...]
    axes: dict[int, AxisChange]


@dataclass(frozen=True)
class GroupChange:
    """One width group in a widen pass: widened, or skipped with the reason."""

    id: int
    width_before: int
    width_after: int
    status: str  # "widened" | "skipped"
    reason: str = ""
    producers: tuple[str, ...] = ()
    consumers: tuple[str, ...] = ()
    kind: str = ""  # the group's kind: "stream", "heads" or "channels" (``WidthGroup.kind``)
    k: int = 0  # a normalised stream: whole copies of its old width ...
    r: int = 0  # ... and mean channels after them (width_after = k * width_before + r)
    group_size: int = 1  # heads: query heads per key/value head (widths count key/value heads)


@dataclass(frozen=True)
class BlockInsert:
    """A residual (or identity) block a deepen pass inserted after node ``at``."""

    at: str
    kind: str
    width: int
    hidden: int
    module: str  # the block's submodule path
    output_node: str
    params: int  # parameter count of the block
    no_grad: tuple[str, ...] = ()  # its parameters without a gradient at the first step, by construction
    no_grad_why: str = ""
    reset: tuple[str, ...] = ()  # the model's own parameters it set (post-norm: the norm it follows, to 1 and 0)


@dataclass(frozen=True)
class SkippedPoint:
    at: str
    reason: str


@dataclass(frozen=True)
class GrowthRecord:
    """What one pass did. ``exact``: True, False, or ``"eval"`` (exact in eval mode only)."""

    op: str  # "widen" | "deepen" | "grow_kernel"
    method: str
    exact: bool | str
    params: tuple[ParamChange, ...] = ()
    groups: tuple[GroupChange, ...] = ()
    blocks: tuple[BlockInsert, ...] = ()
    skipped: tuple[SkippedPoint, ...] = ()
    new_params: tuple[str, ...] = ()
    options: dict[str, Any] = field(default_factory=dict)  # the pass's arguments: factor, extra, node, size, ...
    renamed: dict[str, str] = field(default_factory=dict)  # parameter name after the pass -> before ("": new)

    def to_json(self) -> dict[str, Any]:
        """Plain data (dicts, lists, numbers, strings); ``json.dumps`` takes it as is."""
        data = asdict(self)
        for change in data["params"]:
            change["axes"] = {str(a): info for a, info in change["axes"].items()}
        return _lists(data)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GrowthRecord:
        params = tuple(
            ParamChange(
                p["param"],
                tuple(p["shape_before"]),
                tuple(p["shape_after"]),
                {
                    int(a): AxisChange(
                        info["role"],
                        tuple(tuple(r) for r in info["old_runs"]),
                        bool(info.get("old_changed", False)),
                        tuple(tuple(r) for r in info.get("no_grad", ())),
                        str(info.get("no_grad_why", "")),
                    )
                    for a, info in p["axes"].items()
                },
            )
            for p in data.get("params", ())
        )
        groups = tuple(
            GroupChange(**{**g, "producers": tuple(g.get("producers", ())), "consumers": tuple(g.get("consumers", ()))})
            for g in data.get("groups", ())
        )
        return cls(
            op=data["op"],
            method=data["method"],
            exact=data["exact"],
            params=params,
            groups=groups,
            blocks=tuple(
                BlockInsert(**{**b, "no_grad": tuple(b.get("no_grad", ())), "reset": tuple(b.get("reset", ()))})
                for b in data.get("blocks", ())
            ),
            skipped=tuple(SkippedPoint(**s) for s in data.get("skipped", ())),
            new_params=tuple(data.get("new_params", ())),
            options=dict(data.get("options", {})),
            renamed=dict(data.get("renamed", {})),
        )


def _lists(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    return value


def append_record(gm: torch.nn.Module, record: GrowthRecord) -> None:
    """Add ``record`` to ``gm``'s history (as plain data: the model stays free of r2r_fx classes)."""
    history = _stored(gm) + [record.to_json()]
    gm.meta["r2r_record"] = history
    gm.r2r_record = history


def _stored(gm: torch.nn.Module) -> list[dict[str, Any]]:
    meta = getattr(gm, "meta", None) or {}
    return list(meta.get("r2r_record") or getattr(gm, "r2r_record", None) or [])


def growth_history(gm: torch.nn.Module) -> list[GrowthRecord]:
    """Every pass's record on ``gm``, oldest first (also after a pickle round trip, which empties ``meta``)."""
    return [GrowthRecord.from_json(entry) for entry in _stored(gm)]


def param_changes(gm: torch.nn.Module) -> dict[str, list[ParamChange]]:
    """Parameter name -> the changes recorded for it, oldest first."""
    out: dict[str, list[ParamChange]] = {}
    for record in growth_history(gm):
        for change in record.params:
            out.setdefault(change.param, []).append(change)
    return out


def replace_param(
    gm: torch.nn.Module, name: str, new: torch.Tensor, names: Sequence[str], axes: dict[int, AxisChange]
) -> list[ParamChange]:
    """Put ``new`` in place of the tensor ``name`` under every one of its (tied) ``names``; returns the
    change, recorded once per name. The one way passes replace a parameter."""
    from r2r_fx.surgery import get_tensor, set_tensor

    old = get_tensor(gm, name)
    set_tensor(gm, name, new, list(names) or [name])
    return [ParamChange(n, tuple(old.shape), tuple(new.shape), dict(axes)) for n in (names or [name])]


def old_positions(runs: Sequence[Sequence[int]]) -> torch.Tensor:
    """New positions of the old entries along one axis, in old order."""
    parts = [torch.arange(new, new + length) for new, _, length in sorted(runs, key=lambda r: r[1])]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)


def new_entry_mask(change: ParamChange) -> torch.Tensor:
    """Boolean mask over the grown parameter: True where an entry is new."""
    shape = change.shape_after
    old = torch.ones(shape, dtype=torch.bool)
    for axis, info in change.axes.items():
        keep = torch.zeros(shape[axis], dtype=torch.bool)
        keep[old_positions(info.old_runs)] = True
        view = [1] * len(shape)
        view[axis] = -1
        old &= keep.view(view)
    return ~old
