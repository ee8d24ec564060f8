"""Weight surgery shared by every pass and method: grow parameter axes along symbolic layouts.

For one parameter axis with layout ``outer x [(channel_set, n, inner), ...]`` and ``e`` new channels per
channel_set, the grown axis keeps each channel set's old entries in place and appends that channel set's ``e`` new
channels right after them, in two halves of ``e/2`` channels (R2R's pairs). :class:`AxisIndex`
turns that into index tensors once; a :class:`~r2r_fx.methods.Method` decides the values.

A normalised stream (``WidthGroup.norms``) grows differently, by whole copies plus mean channels
(:func:`grow_stream`, maths in ``r2r_fx.streams``): the group's constraint, not the method, decides
its writers, per-channel values, norm parameters and eps; the method only chooses how each reader's
column is shared among the copies, the readers' tail columns and the norm weights' tail.

After the parameters, width-dependent constants are fixed: module attributes (``in_channels``,
``num_features``, ``groups``, ...) and int shape arguments of view/reshape/expand/split nodes.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.fx
from torch import nn

from r2r_fx.analysis import Analysis, Layout, hidden_weights
from r2r_fx.errors import GrowthError
from r2r_fx.graph import attr_at, shape_of, tensor_shapes
from r2r_fx.rules import expand_ellipsis, fix_for
from r2r_fx.streams import rescaled_eps, tail_scale

__all__ = [
    "channel_sources",
    "AxisIndex",
    "axis_index",
    "fix_widths",
    "get_tensor",
    "grow_stream",
    "new_width",
    "set_tensor",
    "update_shapes",
]


@dataclass
class AxisIndex:
    """Positions on a grown axis: where old entries went, and the two halves of new entries."""

    old_size: int
    new_size: int
    old_pos: torch.Tensor  # [old_size]: new position of each old entry
    first: torch.Tensor  # new positions of the first half of new entries
    second: torch.Tensor  # matching positions of the second half (pairs with ``first``)
    runs: list[tuple[int, int, int]]  # (new_start, old_start, length) runs of old entries
    new_pos: torch.Tensor  # every new position (first and second halves, in axis order)
    new_source: torch.Tensor  # for each ``new_pos``: the old position of the channel it derives from

    @property
    def grows(self) -> bool:
        return self.new_size != self.old_size


def new_width(layout: Layout, new_channels: Mapping[int, int]) -> int:
    return layout.width(new_channels)


def channel_sources(
    new_channels: Mapping[int, int], widths: Sequence[int], generator: torch.Generator
) -> dict[int, torch.Tensor]:
    """For each growing channel set, the old channel each new channel derives from (one draw per channel set, so
    every parameter of a width group agrees: biases, norm statistics and weights copy the same channel)."""
    return {a: torch.randint(0, max(1, widths[a]), (e,), generator=generator) for a, e in new_channels.items() if e}


def axis_index(
    layout: Layout,
    new_channels: Mapping[int, int],
    sources: Mapping[int, torch.Tensor],
    only: Collection[int] | None = None,
) -> AxisIndex:
    """Index tensors for growing one axis (vectorised over each segment's ``outer``; a loop over the few
    pieces).

    ``only``: the new entries listed are those of these channel sets (the axis still grows by all of
    ``new_channels``), so one axis can take two fills (a packed q/k projection: ``k``'s rows take the
    opposite sign of ``q``'s)."""
    old_maps, firsts, seconds, runs, news, news_src = [], [], [], [], [], []
    base_old = base_new = 0  # where the segment starts on the old and the grown axis
    for outer, pieces in layout.segments:
        old_w = sum(n * inner for _, n, inner in pieces)
        new_w = sum((n + new_channels.get(a, 0)) * inner for a, n, inner in pieces)
        rows = torch.arange(outer).unsqueeze(1)
        old_map = torch.empty(outer, old_w, dtype=torch.long)
        off_old = off_new = 0
        for channel_set, n, inner in pieces:
            e = new_channels.get(channel_set, 0)
            span = n * inner
            old_map[:, off_old : off_old + span] = base_new + rows * new_w + off_new + torch.arange(span)
            for o in range(outer):
                runs.append((base_new + o * new_w + off_new, base_old + o * old_w + off_old, span))
            if e and (only is None or channel_set in only):
                half = (e // 2) * inner
                start = base_new + rows * new_w + off_new + span
                firsts.append((start + torch.arange(half)).reshape(-1))
                seconds.append((start + half + torch.arange(half)).reshape(-1))
                news.append((start + torch.arange(e * inner)).reshape(-1))
                chans = sources[channel_set] if n else torch.zeros(e, dtype=torch.long)
                within = (chans.unsqueeze(1) * inner + torch.arange(inner)).reshape(-1)
                news_src.append((base_old + rows * old_w + off_old + within).reshape(-1))
            off_old += span
            off_new += (n + e) * inner
        old_maps.append(old_map.reshape(-1))
        base_old += outer * old_w
        base_new += outer * new_w

    def cat(parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)

    return AxisIndex(
        old_size=base_old,
        new_size=base_new,
        old_pos=cat(old_maps),
        first=cat(firsts),
        second=cat(seconds),
        runs=_merge_runs(runs),
        new_pos=cat(news),
        new_source=cat(news_src),
    )


def grow_stream(
    t: torch.Tensor,
    axis: int,
    k: int,
    role: str,
    method,
    generator: torch.Generator,
    *,
    r: int = 0,
    tail: str = "mean",
    read: str = "zero",
    offset: float = 0.0,
) -> torch.Tensor:
    """``t`` grown along ``axis`` (a normalised stream of ``d`` channels, plain layout) to ``k*d + r``.

    Copy ``j`` of old channel ``i`` sits at ``j*d + i`` (copy 0 is the old channel, in place); the
    ``r`` tail channels come last. With ``s = sqrt(kd/D)`` (1 when ``r = 0``):

    - Writers and per-channel values (roles ``out``, ``channel``, ``data``: embedding and projection
      rows, biases, position embeddings, class tokens): ``k`` exact copies, and a tail of the mean of
      the old entries along ``axis`` (``tail="mean"``) or zeros (``"zero"``, a stream only RMSNorms read).
    - ``norm_weight``: ``gamma*s`` on every copy (a weight ``w`` used as ``offset + w``, Gemma's
      ``1 + w``: ``(offset + w)*s - offset``), ``method.tail_gamma`` on the tail; ``norm_bias``:
      copies, tail 0. The norm's eps becomes ``eps*kd/D`` (``fix_widths``), so its output is
      ``[y, ..., y, 0]`` (see ``r2r_fx.streams``).
    - ``scaled`` (the weights of a norm before a head tied to the embedding, ``r2r_fx.stream_ties``):
      copies of ``t/k``, so the head, whose columns are copies too, reads ``k`` copies of ``y/k``
      (whole copies only: the analysis makes such a stream ``integer_only``).
    - Readers (role ``in``): the old column ``W`` is split into shares ``W_0 .. W_{k-1}`` with
      ``sum_j W_j = W`` (so ``sum_j W_j y = W y``), chosen by ``method.split_stream``
      (R2R: ``W/k + V_j - mean(V)``, for ``k = 2`` the pair ``[W/2 + V, W/2 - V]``); the tail columns
      come from ``method.stream_tail``: free where the reader sees a zero tail (``read="zero"``),
      summing to zero where it sees the mean (``read="mean"``). Both are checked here for an exact
      method: shares that do not add up, or a mean tail read by columns that do not cancel, are an
      error, not a changed model.
    """
    if k == 1 and not r:
        return t
    d = t.shape[axis]
    scale = math.sqrt(k * d / (k * d + r)) if r else 1.0
    if role == "in":
        parts = list(_shares(t, axis, k, method, generator).unbind(0)) if k > 1 else [t]
        if r:
            parts.append(_tail_columns(t, axis, r, read, method, generator))
        return torch.cat(parts, dim=axis)
    if role == "norm_weight" and r:
        copies = (t + offset) * scale - offset
        gamma = method.tail_gamma(copies, axis, r, generator)
        _check_shape(method, "tail_gamma", gamma, _with(t, axis, r))
        return torch.cat([copies] * k + [gamma.to(t.dtype)], dim=axis)
    if role == "scaled":
        if r:
            raise GrowthError("a norm before a tied head grows by whole copies only")
        return torch.cat([t / k] * k, dim=axis)
    parts = [t] * k
    if r:
        if role == "norm_bias" or tail == "zero":
            parts.append(torch.zeros(_with(t, axis, r), dtype=t.dtype, device=t.device))
        else:
            parts.append(t.mean(axis, keepdim=True).expand(_with(t, axis, r)))
    return torch.cat(parts, dim=axis)


def _with(t: torch.Tensor, axis: int, n: int) -> tuple[int, ...]:
    shape = list(t.shape)
    shape[axis] = n
    return tuple(shape)


def _check_shape(method, what: str, value: torch.Tensor, shape: tuple[int, ...]) -> None:
    if tuple(value.shape) != shape:
        raise GrowthError(f"{method.name}.{what} returned shape {tuple(value.shape)}, not {shape}")


def _shares(t: torch.Tensor, axis: int, k: int, method, generator: torch.Generator) -> torch.Tensor:
    shares = method.split_stream(t, axis, k, generator)
    _check_shape(method, "split_stream", shares, (k, *t.shape))
    if method.exact:
        total, scale = shares.sum(0), float(t.abs().max()) if t.numel() else 0.0
        err = float((total - t).abs().max()) if t.numel() else 0.0
        if not err <= 1e-5 * max(scale, float(shares.abs().max()) if shares.numel() else 0.0, 1e-30):
            raise GrowthError(f"{method.name}.split_stream: the shares do not add up to the column (error {err:.3g})")
    return shares


def _tail_columns(t: torch.Tensor, axis: int, r: int, read: str, method, generator: torch.Generator) -> torch.Tensor:
    columns = method.stream_tail(t, axis, r, read == "zero", generator)
    _check_shape(method, "stream_tail", columns, _with(t, axis, r))
    if method.exact and read != "zero" and columns.numel():
        err = float(columns.sum(axis).abs().max())
        if not err <= 1e-5 * max(float(columns.abs().max()), 1e-30):
            raise GrowthError(f"{method.name}.stream_tail: columns reading a mean tail do not sum to 0 ({err:.3g})")
    return columns.to(t.dtype)


def _merge_runs(runs: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    merged: list[tuple[int, int, int]] = []
    for new, old, length in runs:
        if merged and merged[-1][0] + merged[-1][2] == new and merged[-1][1] + merged[-1][2] == old:
            merged[-1] = (merged[-1][0], merged[-1][1], merged[-1][2] + length)
        elif length:
            merged.append((new, old, length))
    return merged


def get_tensor(root: nn.Module, target: str) -> torch.Tensor:
    return attr_at(root, target)


def set_tensor(root: nn.Module, target: str, value: torch.Tensor, aliases: Sequence[str] = ()) -> torch.Tensor:
    """Replace a parameter or buffer (or plain tensor attribute) keeping its kind and requires_grad;
    ``aliases`` (other names of a tied tensor) get the very same new tensor. Returns it."""
    owner, _, name = target.rpartition(".")
    module = root.get_submodule(owner) if owner else root
    old = getattr(module, name)
    if isinstance(old, nn.Parameter) or name in module._parameters:
        value = value if isinstance(value, nn.Parameter) else nn.Parameter(value, requires_grad=old.requires_grad)
        module._parameters[name] = value
    elif name in module._buffers:
        module._buffers[name] = value
    else:
        setattr(module, name, value)
    for alias in aliases:
        if alias != target:
            set_tensor(root, alias, value)
    return value


# ---------------------------------------------------------------- width-dependent constants


def fix_widths(gm: torch.fx.GraphModule, analysis: Analysis, new_channels: Mapping[int, int]) -> None:
    """Update module attributes and int shape arguments that name a grown width."""

    def width(slot: tuple[str, int]) -> int | None:
        if analysis.size(slot) is None:
            return None
        return new_width(analysis.layout(slot), new_channels)

    for node in gm.graph.nodes:
        if node.op == "call_module":
            _fix_module(gm.get_submodule(str(node.target)), node, width)
        elif node.op in ("call_function", "call_method"):
            _fix_args(node, width)
    _fix_stream_eps(gm, analysis, new_channels)
    gm.graph.lint()
    gm.recompile()


def _fix_stream_eps(gm: torch.fx.GraphModule, analysis: Analysis, new_channels: Mapping[int, int]) -> None:
    """``eps * kd/D`` for every norm of a stream that gains ``r > 0`` tail channels (a module's
    attribute once per module, a call's argument by position or keyword; an RMSNorm's default eps,
    None, is written out as ``finfo(dtype).eps * kd/D``)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    done: set[str] = set()
    for a, forms in analysis.stream_forms.items():
        d, e = analysis.set_width[a], new_channels.get(a, 0)
        k, r = divmod(d + e, d)
        if not e or not r:
            continue
        factor = tail_scale(d, k, r)
        for site in forms.eps:
            eps = rescaled_eps(site, factor)
            if site.module is not None:
                if site.module not in done:
                    gm.get_submodule(site.module).eps = eps
                    done.add(site.module)
                continue
            node = nodes[site.node]
            if len(node.args) > site.index:
                node.args = (*node.args[: site.index], eps, *node.args[site.index + 1 :])
            else:
                node.kwargs = {**node.kwargs, "eps": eps}


def _fix_module(m: nn.Module, node: torch.fx.Node, width) -> None:
    """The layer's width attributes, through the fix-up registered with its handler (``register_layer``)."""
    if hidden_weights(m):
        return  # frozen by the analysis; reading its weight would compute it (and step spectral norm)
    fix = fix_for(m)
    if fix is not None:
        fix(m, node, width)


_SHAPE_ARG_OPS = {
    "view",
    "reshape",
    "expand",
    "_unsafe_view",
    "view_copy",
    "new_zeros",
    "new_ones",
    "new_empty",
}


def _fix_args(node: torch.fx.Node, width) -> None:
    target = node.target
    name = (
        target
        if isinstance(target, str)
        else getattr(getattr(target, "overloadpacket", target), "__name__", str(target))
    )
    out = shape_of(node)
    if name in _SHAPE_ARG_OPS or target is torch.reshape:
        dims = node.args[1:]
        packed = len(dims) == 1 and isinstance(dims[0], (list, tuple))
        seq = list(dims[0]) if packed else list(dims)
        if out is None or len(seq) != len(out):
            return
        offset = 0
        changed = False
        for i, d in enumerate(seq):
            if isinstance(d, int) and d != -1:
                new = width((node.name, i + offset))
                if new is not None and new != d:
                    seq[i] = new
                    changed = True
        if changed:
            node.args = (node.args[0], type(dims[0])(seq)) if packed else (node.args[0], *seq)
    elif name in ("unflatten",) and out is not None:
        dim, sizes = node.args[1], node.args[2]
        dim = dim if dim >= 0 else len(out) + dim - len(sizes) + 1
        new = [width((node.name, dim + i)) or s if isinstance(s, int) and s != -1 else s for i, s in enumerate(sizes)]
        node.args = (node.args[0], dim, type(sizes)(new))
    elif name in ("split", "split_with_sizes"):
        outs = tensor_shapes(node)
        size_arg = node.args[1] if len(node.args) > 1 else node.kwargs.get("split_size")
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
        if not outs:
            return
        dim = dim if dim >= 0 else len(outs[0][1]) + dim
        widths = [width((n, dim)) for n, _ in outs]
        if None in widths:
            return
        if not isinstance(size_arg, int) and not (
            isinstance(size_arg, (list, tuple)) and all(isinstance(v, int) for v in size_arg)
        ):
            return  # computed at run time from the grown tensor (its rule froze what that would change)
        new = widths[0] if isinstance(size_arg, int) else type(size_arg)(widths)
        args = list(node.args)
        if len(args) > 1:
            args[1] = new
            node.args = tuple(args)
        else:
            node.kwargs = {**node.kwargs, "split_size": new}
    elif target is operator.getitem and shape_of(node.args[0]) is not None:
        _fix_full_slices(node, width)
    elif name in ("layer_norm", "rms_norm") and out is not None:
        _fix_norm_shape(node, width)
    elif name in ("conv1d", "conv2d", "conv3d", "convolution", "group_norm"):
        _fix_grouped(node, name, width)
    elif name == "slice" and out is not None:
        x = node.args[0]
        dim, end = node.args[1], node.args[3] if len(node.args) > 3 else None
        in_shape = shape_of(x)
        if isinstance(end, int) and in_shape is not None and end == in_shape[dim]:
            new = width((x.name, dim))
            if new is not None and new != end:
                args = list(node.args)
                args[3] = new
                node.args = tuple(args)


def _fix_norm_shape(node: torch.fx.Node, width) -> None:
    """``layer_norm(x, (d,), ...)`` / ``rms_norm``: a constant normalized shape follows the grown last axis
    (eps: ``_fix_stream_eps``)."""
    x = node.args[0]
    in_args = len(node.args) > 1
    ns = node.args[1] if in_args else node.kwargs.get("normalized_shape")
    shape = shape_of(x) if isinstance(x, torch.fx.Node) else None
    single = isinstance(ns, int) or (isinstance(ns, (list, tuple)) and len(ns) == 1 and isinstance(ns[0], int))
    if shape is None or not single:
        return
    new = width((x.name, len(shape) - 1))
    if new is None:
        return
    value = new if isinstance(ns, int) else type(ns)([new])
    if in_args:
        node.args = (node.args[0], value, *node.args[2:])
    else:
        node.kwargs = {**node.kwargs, "normalized_shape": value}


def _fix_full_slices(node: torch.fx.Node, width) -> None:
    """``h[:, :C]`` with ``C`` the whole old width of a growing axis becomes ``h[:, :]``: it keeps every
    channel when ``h`` grows. Axes that keep their width keep their slices (a batch-sized slice cuts
    other batch sizes)."""
    src, index = node.args
    shape = shape_of(src)
    items = expand_ellipsis(list(index) if isinstance(index, tuple) else [index], len(shape))
    axis, changed = 0, False
    for i, item in enumerate(items):
        if item is None:
            continue
        if isinstance(item, slice) and all(
            isinstance(v, (int, type(None))) for v in (item.start, item.stop, item.step)
        ):
            full = slice(*item.indices(shape[axis])) == slice(0, shape[axis], 1)
            if item != slice(None) and full and width((src.name, axis)) not in (None, shape[axis]):
                items[i], changed = slice(None), True
        axis += 1
    if changed:
        node.args = (src, tuple(items) if isinstance(index, tuple) or len(items) > 1 else items[0])


def _fix_grouped(node: torch.fx.Node, name: str, width) -> None:
    """Group counts of functional grouped convolutions and group norms follow the grown channel axis
    (channels per group stay), whether the count is passed by position or by keyword."""
    x = node.args[0]
    in_w = width((x.name, 1)) if isinstance(x, torch.fx.Node) else None
    if in_w is None:
        return
    index, key = {"group_norm": (1, "num_groups"), "convolution": (8, "groups")}.get(name, (6, "groups"))
    in_args = len(node.args) > index
    groups = node.args[index] if in_args else node.kwargs.get(key)
    if not isinstance(groups, int) or (groups == 1 and name != "group_norm"):
        return  # an ungrouped convolution's weight grows along its input axis: still one group
    if name == "group_norm":
        new = in_w // (shape_of(x)[1] // groups)
    else:
        w_shape = shape_of(node.args[1]) if len(node.args) > 1 else shape_of(node.kwargs.get("weight"))
        if w_shape is None or (name == "convolution" and node.args[6]):
            return
        new = max(1, in_w // w_shape[1])
    if in_args:
        node.args = (*node.args[:index], new, *node.args[index + 1 :])
    else:
        node.kwargs = {**node.kwargs, key: new}


def update_shapes(gm: torch.fx.GraphModule, analysis: Analysis, new_channels: Mapping[int, int]) -> None:
    """Refresh ``tensor_meta`` shapes from the layouts (no forward pass of the grown model needed)."""

    def grown(name: str, meta):
        shape = [
            new_width(analysis.layout((name, a)), new_channels) if analysis.size((name, a)) is not None else int(d)
            for a, d in enumerate(meta.shape)
        ]
        return meta._replace(shape=torch.Size(shape))

    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta")
        if meta is None:
            continue
        if node.op == "get_attr" and hasattr(meta, "shape") and isinstance(attr_at(gm, str(node.target)), torch.Tensor):
            # a parameter a layer reads (no slot of its own in the analysis): its shape is the tensor's
            node.meta["tensor_meta"] = meta._replace(shape=attr_at(gm, str(node.target)).shape)
        elif hasattr(meta, "shape") and hasattr(meta, "dtype"):
            node.meta["tensor_meta"] = grown(node.name, meta)
        elif isinstance(meta, (tuple, list)):
            node.meta["tensor_meta"] = type(meta)(
                grown(f"{node.name}#{i}", m) if hasattr(m, "shape") and hasattr(m, "dtype") else m
                for i, m in enumerate(meta)
            )
