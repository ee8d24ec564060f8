"""R2WiderR (and the other widening methods): grow every chosen width group of a captured model.

Maths (R2R, arXiv 2410.11038, section 4.1): a width group of ``n`` channels gains ``e`` channels
(``e`` even). Every producer of the group gets new rows ``[W; U; U]``, every consumer new columns
``[W', U', -U']``. Channel-wise ops between them (bias, BatchNorm with identical parameters and
statistics, activations, pooling, SE multiplies, residual adds where every summand writes its own
pairs) keep the two copies equal, so each consumer sees ``U' h - U' h = 0``: the output is unchanged
in eval and train mode. Concatenation, split and flatten are handled by the group layouts: new
channels sit right after their own channel set, wherever it appears. Grouped convolutions grow by
whole groups (the group count goes up), GroupNorm likewise.

A normalised stream (a group read by LayerNorm/RMSNorm, ``WidthGroup.norms``) of ``d`` channels
grows to ``D = k*d + r``: ``k`` whole copies and ``r`` mean channels (the mean of every writer's rows,
or zero rows under RMSNorm), with the norms' gamma and eps rescaled by ``kd/D`` so that their outputs'
copies are unchanged and their tails 0 (``r2r_fx.streams``, ``r2r_fx.surgery.grow_stream``). Where
the graph breaks the tail (post-LN, an activation or layer scale on the stream, ...) the group is
``integer_only`` and ``r > 0`` is refused with that reason.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.fx

from r2r_fx.analysis import Analysis, WidthGroup, analyze
from r2r_fx.errors import GrowthError
from r2r_fx.heads import keep_score_scales
from r2r_fx.methods import Method, get_method
from r2r_fx.passbase import Pass, PassResult, copy_graph_module, make_generator
from r2r_fx.record import AxisChange, GroupChange, GrowthRecord, ParamChange, append_record, replace_param
from r2r_fx.surgery import axis_index, channel_sources, fix_widths, get_tensor, grow_stream, update_shapes

__all__ = ["KINDS", "WidenPass", "plan_new_channels", "widen", "wants_head_size"]

KINDS = ("stream", "heads", "head_size", "channels")


def wants_head_size(groups: Iterable[int | str] | None, sizes: Mapping[int | str, int] | None = None) -> bool:
    """Whether a group selection (or the keys of ``sizes``) asks for head sizes (``"kind:head_size"``),
    which a separate analysis finds (``analyze(gm, head_size=True)``: heads and head sizes do not grow
    in one pass)."""
    keys = [*(groups or ()), *(sizes or {})]
    return "kind:head_size" in [g for g in keys if isinstance(g, str)]


def plan_new_channels(
    analysis: Analysis,
    *,
    factor: float | None,
    extra: int | None,
    groups: Iterable[int | str] | None,
    method: Method | None = None,
    sizes: Mapping[int | str, int] | None = None,
) -> tuple[dict[int, int], list[GroupChange]]:
    """Channels to add per channel set, and a report line per width group (widened or skipped, with reason).

    ``sizes`` (instead of ``factor``/``extra``/``groups``) maps group selectors to the width each
    selected group is to have (see :func:`widen`)."""
    if sizes is not None:
        if factor is not None or extra is not None or groups is not None:
            raise GrowthError("sizes= names the groups and their widths: give it without factor=, extra= or groups=")
        targets = _targets(analysis, sizes)
    elif (factor is None) == (extra is None):
        raise GrowthError("give exactly one of factor= or extra=")
    if factor is not None and factor < 1:
        raise GrowthError(f"factor must be >= 1, got {factor}")
    if extra is not None and extra < 0:
        raise GrowthError(f"extra must be >= 0, got {extra}")
    chosen = set(targets) if sizes is not None else _select(analysis, groups)
    new_channels: dict[int, int] = {}
    report: list[GroupChange] = []
    for g in analysis.groups:
        entry = {
            "id": g.id,
            "width_before": g.width,
            "width_after": g.width,
            "producers": g.producers,
            "consumers": g.consumers,
            "status": "skipped",
            "reason": g.reason,
            "kind": g.kind,
            "group_size": g.group_size,
        }
        # this group's growth: the common factor/extra, or with sizes= its own extra
        g_factor, g_extra = (
            (None, targets[g.id] - g.width) if sizes is not None and g.id in targets else (factor, extra)
        )
        if g.id not in chosen:
            entry["reason"] = entry["reason"] or "not selected"
        elif g.widenable and method is not None and method.refuses(g):
            entry["reason"] = method.refuses(g)
        elif g.widenable and g.norms:
            _plan_stream(analysis, g, g_factor, g_extra, method, new_channels, entry)
        elif g.widenable:
            step = g.granularity
            per_set = {}
            own = [a for a in g.channel_sets if a not in analysis.key_sets]  # a key set mirrors its query set
            for a in g.channel_sets:
                if g_factor is not None:
                    want = analysis.set_width[a] * (g_factor - 1)
                else:  # the sets of a head-size group are one head size (q, k and v of a packed projection)
                    want = g_extra if g.head_size else g_extra / len(own)
                per_set[a] = int(math.ceil(round(want, 6) / step)) * step
            if any(per_set.values()):
                new_channels.update(per_set)
                added = per_set[own[0]] if g.head_size else sum(per_set[a] for a in own)
                entry.update(status="widened", reason="", width_after=g.width + added)
            else:
                entry["reason"] = "nothing to add"
        if (
            sizes is not None
            and g.id in targets
            and entry["status"] == "widened"
            and entry["width_after"] != targets[g.id]
        ):
            raise GrowthError(
                f"width group {g.id} ({_wide(g, g.width)}) cannot be {_wide(g, targets[g.id], 'reach')}: it grows"
                f" in steps of {g.granularity} (to {_wide(g, entry['width_after'], 'reach')})"
            )
        report.append(GroupChange(**{**entry, "producers": tuple(g.producers), "consumers": tuple(g.consumers)}))
    return new_channels, report


def _targets(analysis: Analysis, sizes: Mapping[int | str, int]) -> dict[int, int]:
    """Group id -> the width asked for; a width below the group's, or two widths for one group, is an error."""
    targets: dict[int, int] = {}
    for key, width in sizes.items():
        if not isinstance(width, int) or isinstance(width, bool) or width < 1:
            raise GrowthError(f"sizes[{key!r}] must be a width >= 1, got {width!r}")
        for i in sorted(_select(analysis, [key])):
            g = analysis.groups[i]
            own = _channels_for(g, key, width)
            if own < g.width:
                raise GrowthError(f"sizes[{key!r}] = {width} would shrink width group {i} ({_wide(g, g.width)})")
            if targets.get(i, own) != own:
                both = (
                    f"{_wide(g, targets[i], 'reach')} and {_wide(g, own, 'reach')}"
                    if g.heads and g.group_size > 1
                    else f"{targets[i]} and {own} wide"
                )
                raise GrowthError(f"width group {i} is asked to be both {both}")
            targets[i] = own
    return targets


def _channels_for(g: WidthGroup, key: int | str, width: int) -> int:
    """The channels of group ``g`` that ``sizes[key] = width`` asks for: for attention heads, ``width``
    counts query heads, and each channel of the group is a key/value head with ``g.group_size`` of them."""
    if not g.heads or g.group_size == 1:
        return width
    if g.group_size == 0:
        raise GrowthError(
            f"sizes[{key!r}]: width group {g.id}'s attention products disagree on how many query heads share a"
            " key/value head, so a number of query heads cannot be reached"
        )
    if width % g.group_size:
        raise GrowthError(
            f"sizes[{key!r}] = {width} query heads: width group {g.id} has {g.group_size} query heads per"
            f" key/value head ({g.query_heads} over {g.width}), so it grows in multiples of {g.group_size}"
        )
    return width // g.group_size


def _wide(g: WidthGroup, channels: int, form: str = "group") -> str:
    """``channels`` of group ``g`` in words, as the group's description (``form="group"``) or as a width
    to reach (``"reach"``); grouped-query heads are counted in query and key/value heads."""
    if g.heads and g.group_size > 1:
        heads = f"{channels * g.group_size} query heads over {channels} key/value heads"
        return f"heads, {heads}" if form == "group" else heads
    return f"{g.kind}, width {channels}" if form == "group" else f"{channels} wide"


def _plan_stream(analysis, g, factor, extra, method, new_channels: dict[int, int], entry: dict) -> None:
    """A normalised stream of ``d`` channels grows to ``D = k*d + r``; ``r > 0`` (mean channels) only
    where the analysis found the tail exact (``g.integer_only`` empty), else refused with its reason."""
    (a,) = g.channel_sets
    d = analysis.set_width[a]
    want = d * (factor - 1) if factor is not None else extra
    e = int(math.ceil(round(want, 6)))
    k, r = divmod(d + e, d)
    norms = ", ".join(g.norms[:3]) + (", ..." if len(g.norms) > 3 else "")
    if method is not None and not method.supports_streams:
        entry["reason"] = f"{method.name} has no fill for a normalised stream (normalised by {norms})"
    elif e == 0:
        entry["reason"] = "nothing to add"
    elif r and g.integer_only:
        entry["reason"] = (
            f"stream normalised by {norms}: {d} -> {d + e} needs mean channels, not exact here ({g.integer_only});"
            f" it grows by whole copies only ({d} -> {2 * d}, {3 * d}, ...)"
        )
    else:
        new_channels[a] = e
        entry.update(status="widened", reason="", width_after=d + e, k=k, r=r)


def _select(analysis: Analysis, groups: Iterable[int | str] | None) -> set[int]:
    if groups is None:
        return {g.id for g in analysis.groups}
    chosen: set[int] = set()
    for key in groups:
        if isinstance(key, int):
            if not 0 <= key < len(analysis.groups):
                raise GrowthError(f"unknown width group id {key}; valid ids are 0..{len(analysis.groups) - 1}")
            chosen.add(key)
            continue
        if key.startswith("kind:"):  # every group of a kind: "kind:stream", "kind:heads", "kind:channels", ...
            kinds = {g.kind for g in analysis.groups}
            if key[5:] not in KINDS:
                raise GrowthError(f"unknown group kind {key[5:]!r}; kinds are {', '.join(KINDS)}")
            chosen.update(g.id for g in analysis.groups if g.kind == key[5:])
            if key[5:] not in kinds:
                raise GrowthError(f"no width group is of kind {key[5:]!r}; this model has {', '.join(sorted(kinds))}")
            continue
        targets = {n.name: str(n.target) for n in analysis.gm.graph.nodes}
        hits = [g.id for g in analysis.groups if key in g.producers or key in {targets[p] for p in g.producers}]
        if not hits:
            names = sorted({p for g in analysis.groups if g.widenable for p in g.producers})
            raise GrowthError(
                f"no width group is produced by a node named {key!r}; producers of widenable groups: {', '.join(names)}"
            )
        chosen.update(hits)
    return chosen


def grow_parameters(
    gm: torch.fx.GraphModule,
    analysis: Analysis,
    new_channels: dict[int, int],
    method: Method,
    generator: torch.Generator,
) -> list[ParamChange]:
    """Grow every bound parameter whose layout gains channels; returns what changed per parameter."""
    changes = []
    streams = {a: e for a, e in new_channels.items() if e and a in analysis.stream_sets}
    others = {a: e for a, e in new_channels.items() if a not in streams}
    sources = channel_sources(others, analysis.set_width, generator)
    for q, k in analysis.contracted:  # k's new head-size channels pair with q's (Net2Net: copy j, halve k_j)
        if q in sources:
            sources[k] = sources[q]
    for param, axes in analysis.bound_params().items():
        plan, stream_plan = [], []
        for axis, layout, role in sorted(axes):
            sets = layout.channel_sets()
            if any(a in streams for a in sets):  # the stream, or copies of it side by side (checked by the analysis)
                d, forms = analysis.set_width[sets[0]], analysis.stream_forms[sets[0]]
                k, r = divmod(d + streams[sets[0]], d)
                fill = _stream_fill(param, role, forms)
                read = forms.reads.get((param, axis), "zero")
                offset = forms.norm_offsets.get(param, 0.0)
                stream_plan.append((axis, k, r, role, fill, forms.tail, read, d, offset, len(sets)))
            elif any(others.get(a) for a in sets):
                keys = analysis.key_sets.intersection(sets)  # k's head size: q's fill with the consumer's sign
                if keys:
                    plan.append((axis, axis_index(layout, others, sources, only=keys), "in"))
                if keys != set(sets):
                    plan.append((axis, axis_index(layout, others, sources, only=set(sets) - keys), role))
        if not plan and not stream_plan:
            continue
        old = get_tensor(gm, param)
        with torch.no_grad():
            new = method.grow(old, plan, generator) if plan else old.detach().clone()
            for axis, k, r, _, fill, tail, read, _, offset, pieces in stream_plan:  # the group's constraint
                grown = [  # each copy of the stream on the axis grows as the stream does
                    grow_stream(part, axis, k, fill, method, generator, r=r, tail=tail, read=read, offset=offset)
                    for part in new.chunk(pieces, axis)
                ]
                new = torch.cat(grown, dim=axis)
        axes = {axis: _axis_change(axis, role, idx, plan, method) for axis, idx, role in reversed(plan)}
        for axis, k, r, role, fill, _, read, d, _, pieces in stream_plan:  # old entries at 0..d-1 of each piece
            changed = (fill == "in" and k > 1) or (fill == "norm_weight" and r > 0)  # W/k shares, gamma*s
            why = ""
            if r and fill == "norm_weight":
                why = "the tail weight scales a normalised tail of 0"
            elif r and fill == "in" and read == "zero":
                why = "the tail columns read a norm's output tail, which is 0"
            size = k * d + r
            no_grad = tuple((p * size + k * d, r) for p in range(pieces)) if why else ()
            runs = tuple((p * size, p * d, d) for p in range(pieces))
            axes[axis] = AxisChange(f"stream_{role}", runs, changed, no_grad, why)
        changes += replace_param(gm, param, new, analysis.aliases(param), axes)  # recorded under each tied name
    return changes


def _axis_change(axis: int, role: str, idx, plan, method: Method) -> AxisChange:
    """The record of one grown axis; new entries the method leaves without a first-step gradient (its
    ``no_grad_roles``; a packed axis takes one fill per channel set: only those parts) as runs."""
    runs = tuple(tuple(r) for r in idx.runs)
    parts = [i.new_pos for a, i, r in plan if a == axis and r in method.no_grad_roles]
    if not parts:
        return AxisChange(role, runs)
    pos = torch.cat(parts).unique().tolist()  # sorted
    no_grad: list[tuple[int, int]] = []
    for p in pos:
        if no_grad and no_grad[-1][0] + no_grad[-1][1] == p:
            no_grad[-1] = (no_grad[-1][0], no_grad[-1][1] + 1)
        else:
            no_grad.append((p, 1))
    why = next(method.no_grad_roles[r] for a, _, r in plan if a == axis and r in method.no_grad_roles)
    return AxisChange(role, runs, no_grad=tuple(no_grad), no_grad_why=why)


def _stream_fill(param: str, role: str, forms) -> str:
    """How a stream axis of ``param`` is filled (``grow_stream``): its binding role, or the norm's own
    (a decomposed RMSNorm reads its weight as data)."""
    if role in ("channel", "data") and param in forms.norm_weights:
        return "norm_weight"
    if role == "channel" and param in forms.norm_biases:
        return "norm_bias"
    return role


class WidenPass(Pass):
    """Widen width groups of a captured model with a method's fill policy."""

    name = "widen"

    def __init__(
        self,
        *,
        factor: float | None = None,
        extra: int | None = None,
        groups: Iterable[int | str] | None = None,
        method: str | Method = "r2r",
        seed: int | None = None,
        check: bool = True,
        sizes: Mapping[int | str, int] | None = None,
        **method_options: Any,
    ) -> None:
        if factor is None and extra is None and sizes is None:
            factor = 2.0
        self.factor, self.extra, self.groups = factor, extra, None if groups is None else list(groups)
        self.sizes = None if sizes is None else dict(sizes)
        self.method = get_method(method, **method_options)
        self.seed, self.check = seed, check

    def transform(self, gm: torch.fx.GraphModule) -> PassResult:
        analysis = analyze(gm, head_size=wants_head_size(self.groups, self.sizes))
        new_channels, report = plan_new_channels(
            analysis, factor=self.factor, extra=self.extra, groups=self.groups, method=self.method, sizes=self.sizes
        )
        replaced = [
            get_tensor(gm, p)
            for p, axes in analysis.bound_params().items()
            if any(new_channels.get(a) for _, layout, _ in axes for a in layout.channel_sets())
        ]
        grown = copy_graph_module(gm, skip=replaced)
        generator = make_generator(self.seed)
        changes = grow_parameters(grown, analysis, new_channels, self.method, generator)
        fix_widths(grown, analysis, new_channels)
        update_shapes(grown, analysis, new_channels)
        keep_score_scales(grown, analysis, new_channels)
        record = GrowthRecord(
            "widen",
            self.method.name,
            self.method.exact,
            params=tuple(changes),
            groups=tuple(report),
            options={"factor": self.factor, "extra": self.extra, "sizes": self.sizes},
        )
        append_record(grown, record)
        return PassResult(grown, bool(changes), record)


def widen(
    gm: torch.fx.GraphModule,
    *,
    factor: float | None = None,
    extra: int | None = None,
    groups: Iterable[int | str] | None = None,
    method: str | Method = "r2r",
    seed: int | None = None,
    check: bool = True,
    sizes: Mapping[int | str, int] | None = None,
    **method_options: Any,
) -> torch.fx.GraphModule:
    """Return a widened copy of ``gm`` (``factor=2.0`` by default); the input is untouched.

    ``groups`` picks what grows: width group ids, producer node names or module paths, or a kind,
    ``"kind:stream"`` (normalised residual streams), ``"kind:heads"`` (attention heads),
    ``"kind:head_size"`` (positions within each head) or ``"kind:channels"`` (the rest: MLP hidden
    widths, convolution channels). Growing kinds by different factors is one call per kind.

    ``sizes`` says the width to reach instead, per selector (the same keys as ``groups``), e.g.
    ``{"kind:stream": 96, "kind:heads": 8, "kind:channels": 256}``: the hidden size to 96, 8 heads, every
    MLP 256 wide. A group's width is what ``width_groups`` shows, except for attention heads, which
    ``sizes`` counts as query heads: with grouped-query attention a heads group's channels are its
    key/value heads (``WidthGroup.width``), each shared by ``group_size`` query heads, and grows by whole
    key/value heads (4 query heads over 2 key/value heads to 8: 4 key/value heads). A head-size group
    counts the positions in one head. A width the group cannot reach exactly (R2R
    adds channels in pairs, grouped layers in whole groups) or below its width is an error; a frozen
    group is skipped with its reason, as with ``groups``.

    ``method``: a name ("r2r", the default; "net2net", "netmorph", or "random", the non-preserving
    baseline) or a :class:`~r2r_fx.methods.Method`; ``method_options`` go to its constructor
    (``init_scale=``, and ``noise=`` for Net2Net, which breaks its symmetry and makes it inexact); an
    option the method does not take is an error. ``check`` (default on) runs the result against ``gm``
    on the capture's example inputs (two forwards, four with batch statistics) and raises
    :class:`~r2r_fx.errors.NotPreservedError` if an exact method changed the function.
    """
    pass_ = WidenPass(
        factor=factor,
        extra=extra,
        groups=groups,
        method=method,
        seed=seed,
        check=check,
        sizes=sizes,
        **method_options,
    )
    return pass_.call(gm).model
