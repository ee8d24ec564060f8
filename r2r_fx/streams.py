"""Mean channels of a normalised stream: which widths ``D = k*d + r`` are exact, and what fills them.

Maths (docs/design_issue17.md, 1.1-1.2). A stream ``x`` of ``d`` channels (per-token mean ``mu``,
variance ``var``) grows to ``x' = [x, ..., x (k copies), t (r tail channels)]``. Every writer (an
affine map ``A h + b``: a layer's rows and bias, a parameter read as data) gets tail rows equal to the
mean of its old rows, so ``t = mu`` (LayerNorm), or zero rows, so ``t = 0`` (a stream only RMSNorms
read). Then ``mean' = mu`` and ``var' = (kd/D) var`` (the mean square likewise), so with
``s = sqrt(kd/D)`` a norm with ``gamma' = [gamma*s (k times), any]``, ``beta' = [beta (k times), 0]``
and ``eps' = eps*kd/D`` outputs ``[y, ..., y, 0]``: readers of the norm output take free tail columns,
readers of the stream itself (tail ``mu``) tail columns that sum to zero. With ``r = 0`` nothing is
rescaled (``kd/D = 1``).

The tail survives only linear maps that act the same on every channel. This module labels every
tensor of the stream with a *form*, in graph order: ``"mean"`` (copies + mean tail), ``"zero"``
(copies + zero tail) or ``"invalid"``. Writers and data make the stream's own form, norms make
``"zero"``; adds of equal forms, scalar or per-token scaling, dropout and reshapes keep a form; an
activation with ``f(0) = 0`` keeps ``"zero"`` only; a per-channel scale (layer scale), a per-channel
spatial op (depthwise conv), an unknown op, or a LayerNorm reading a norm's output (post-LN) make
it invalid. Fail closed: any invalid form, a norm whose eps or weight cannot be rescaled, or a stream
read by both LayerNorm and RMSNorm makes the group integer-only (``WidthGroup.integer_only`` says
why): ``D = k*d`` stays exact (copies survive any channel-wise op), other widths are refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.fx
from torch import nn

from r2r_fx.graph import param_name, shape_of, target_name
from r2r_fx.rules.common import node_arg
from r2r_fx.rules.norm_idioms import real_users

if TYPE_CHECKING:
    from r2r_fx.analysis import Analysis, Layout, NormSite, WidthGroup

__all__ = ["EpsSite", "StreamForms", "copies_of", "find_streams", "rescaled_eps", "stream_forms", "tail_scale"]

_SAME = {
    "neg",
    "dropout",
    "Dropout",
    "clone",
    "contiguous",
    "to",
    "_to_copy",
    "type",
    "type_as",
    "float",
    "double",
    "half",
    "bfloat16",
    "view",
    "reshape",
    "_unsafe_view",
    "permute",
    "transpose",
    "t",
    "flatten",
    "unflatten",
    "getitem",
    "expand",
    "unsqueeze",
    "squeeze",
    "alias",
    "detach",
    "Identity",
    "select",
    "slice",
    "narrow",
    "cat",
    "concat",
    "concatenate",
    "stack",
}
_LINEAR = {"add", "add_", "iadd", "sub", "sub_", "isub"}
_SCALE = {"mul", "mul_", "imul", "div", "div_", "truediv", "itruediv"}
_ZERO_AT_ZERO = {
    "square",
    "relu",
    "relu_",
    "ReLU",
    "gelu",
    "GELU",
    "silu",
    "silu_",
    "SiLU",
    "tanh",
    "Tanh",
    "hardtanh",
    "ReLU6",
}
_POOL = {"mean", "sum"}
_EPS_ARG = {"layer_norm": (4, 1e-5), "rms_norm": (3, None)}  # functional / ATen: (position of eps, its default)


@dataclass(frozen=True)
class EpsSite:
    """Where a norm's eps lives: a module attribute (``module``: its path) or a call argument
    (``index`` / keyword ``eps``); ``value`` (None: ``finfo(dtype).eps``, with ``dtype`` the input's)."""

    node: str
    module: str | None
    index: int
    value: float | None
    dtype: torch.dtype


@dataclass
class StreamForms:
    """What a normalised stream's growth by ``k`` copies plus ``r`` tail channels needs (see the module
    docstring). ``tail``: what writers put in the tail ("mean" or "zero"); ``reads[(param, axis)]``: the
    form a reader's columns see ("zero": free tail columns; "mean": tail columns summing to zero);
    ``integer_only``: why only ``r = 0`` is exact ("" when any width is)."""

    channel_set: int
    tail: str
    integer_only: str = ""
    reads: dict[tuple[str, int], str] = field(default_factory=dict)
    norm_weights: set[str] = field(default_factory=set)
    norm_offsets: dict[str, float] = field(default_factory=dict)  # Gemma's (1 + w): the weight's offset
    norm_biases: set[str] = field(default_factory=set)
    eps: list[EpsSite] = field(default_factory=list)
    forms: dict[str, str] = field(default_factory=dict)  # tensor (node) name -> form, for inspection


def tail_scale(d: int, k: int, r: int) -> float:
    """``kd/D``: the factor on the variance (and on eps) when ``d`` channels become ``k*d + r``."""
    return k * d / (k * d + r)


def stream_forms(analysis: Analysis, builder: Any, group: WidthGroup) -> StreamForms:
    """The forms of a stream group's tensors and what they imply (a read of the graph; changes nothing)."""
    gm = analysis.gm
    (a,) = group.channel_sets
    widths = analysis.set_width
    sites = [s for s in builder.norms if copies_of(analysis.layout(s.in_slot), widths) == a]
    kinds = {s.kind for s in sites}
    info = StreamForms(a, "zero" if kinds == {"rms"} else "mean")
    reasons: list[str] = []
    if len(kinds) > 1:
        reasons.append("the stream is read by both LayerNorm and RMSNorm (their tails differ)")
    for site in sites:
        if len(analysis.layout(site.in_slot).pieces) > 1:
            reasons.append(f"{site.node} normalises a concatenation of copies of the stream (patch merging)")

    def on_set(param: str, axis: int) -> bool:
        return copies_of(analysis.layout((f"param:{param}", axis)), widths) == a

    binds = [b for (p, axis), bs in builder.bindings.items() if on_set(p, axis) for b in bs]
    writers = {b.node for b in binds if b.role == "out"}
    readers = {b.node for b in binds if b.role == "in"}
    data = {b.node for b in binds if b.role == "data"}
    site_of = {s.node: s for s in sites}
    for site in sites:
        eps = _idiom_eps(site) if site.idiom is not None else _eps_site(gm, site.node)
        if isinstance(eps, str):
            reasons.append(eps)
        elif eps is not None:
            info.eps.append(eps)
        weight, bias = _norm_params(gm, site, builder.canonical)
        if weight is None:
            reasons.append(f"{site.node} has no weight to rescale by sqrt(kd/D)")
        else:
            info.norm_weights.add(weight)
            if site.idiom is not None and site.idiom.offset:
                info.norm_offsets[weight] = site.idiom.offset
            if site.idiom is not None and not _read_by_the_norm_only(site, weight, builder):
                reasons.append(f"the weight {weight} of {site.node} is read elsewhere too (it would be rescaled there)")
        if bias is not None:
            info.norm_biases.add(bias)
    for b in binds:
        if b.role == "channel" and b.node not in site_of and b.node not in writers:
            reasons.append(f"{b.node} scales the stream per channel ({b.param})")
        if b.role == "channel" and b.node in site_of and b.param not in info.norm_weights | info.norm_biases:
            reasons.append(f"{b.node} has a per-channel parameter {b.param} that is not its weight or bias")

    names = {s[0] for s in group.slots}
    nodes = {n.name: n for n in gm.graph.nodes}
    carrying = {n for n in names if n in nodes and (nodes[n].op != "get_attr" or n in data)}
    forms = info.forms
    made_by: dict[str, str] = {}  # a "zero" form's norm, for the post-LN reason

    def inputs(node: torch.fx.Node) -> list[torch.fx.Node]:
        return [m for m in node.all_input_nodes if m.name in carrying]

    stream_axis = dict(group.slots)  # tensor -> the axis the stream is on
    carrying -= {name for site in sites for name in _weight_chain(site) or ()}
    for node in gm.graph.nodes:
        if node.name not in carrying:
            continue
        if _reduces_other_axes(node, gm, inputs(node), stream_axis):
            forms[node.name] = forms.get(node.all_input_nodes[0].name, "invalid")
            continue
        form, why = _form(node, gm, inputs(node), forms, made_by, info.tail, writers, readers, data, site_of)
        forms[node.name] = form
        if node.name in site_of:
            made_by[node.name] = node.name
        elif form == "zero":
            made_by[node.name] = next((made_by[m.name] for m in inputs(node) if m.name in made_by), "")
        if why:
            reasons.append(why)
    for (param, axis), bs in builder.bindings.items():
        if not on_set(param, axis) or bs[0].role != "in":
            continue
        seen = {forms.get(m.name, "invalid") for b in bs for m in inputs(nodes[b.node])}
        info.reads[(param, axis)] = "zero" if seen == {"zero"} else "mean"
        if "invalid" in seen or not seen:
            reasons.append(f"{bs[0].node} reads the stream in no known form")
    info.integer_only = reasons[0] if reasons else ""
    return info


def _reduces_other_axes(node: torch.fx.Node, gm: torch.fx.GraphModule, ins: list, stream_axis: dict) -> bool:
    """A mean or sum over axes other than the stream's (pooling over tokens): the same linear map on
    every channel, so the form is kept."""
    if target_name(node, gm) not in _POOL or len(ins) != 1 or node.args[0] is not ins[0]:
        return False
    rank, axis = len(shape_of(ins[0]) or ()), stream_axis.get(ins[0].name)
    dims = node_arg(node, 1, "dim")
    dims = [dims] if isinstance(dims, int) else dims
    if not rank or axis is None or not isinstance(dims, (list, tuple)) or not dims:
        return False
    return all(isinstance(d, int) for d in dims) and axis not in {d % rank for d in dims}


def _form(node, gm, ins, forms, made_by, tail, writers, readers, data, site_of) -> tuple[str, str]:
    """``(form, reason)`` of one tensor of the stream (reason: why it is invalid, else "")."""
    got = [forms.get(m.name, "invalid") for m in ins]
    if node.name in site_of:
        site = site_of[node.name]
        want = "mean" if site.kind == "layer" else "zero"
        if site.idiom is not None:  # written out as ops: what it normalises is the idiom's x
            got = [forms.get(site.idiom.x.name, "invalid")]
        if got != [want]:
            origin = next((made_by[m.name] for m in ins if made_by.get(m.name)), "")
            if origin:
                return "zero", f"post-LN: {node.name} normalises the output of {origin} (its tail is 0, not the mean)"
            return "zero", f"{node.name} reads the stream in the form {got}, not {want}"
        return "zero", ""
    if node.name in writers or node.name in data:
        if ins and node.name not in readers:
            return "invalid", f"{node.name} ({target_name(node, gm)}) acts on the stream per channel"
        return tail, ""
    op = target_name(node, gm)
    if not ins:
        return "invalid", f"{node.name} ({op}) makes stream channels from nothing known"
    if "invalid" in got:
        return "invalid", ""  # the reason was given where the form broke
    others = [a for a in node.args if not (isinstance(a, torch.fx.Node) and a.name in {m.name for m in ins})]
    if op in _SAME or (op in _LINEAR and not others):
        if len(set(got)) == 1:
            return got[0], ""
        origin = next((made_by[m.name] for m in ins if made_by.get(m.name)), "")
        if origin:
            return (
                "invalid",
                f"post-LN: {node.name} adds the output of {origin} (its tail is 0, not the mean) to the stream",
            )
        return "invalid", f"{node.name} ({op}) combines the stream in forms {sorted(set(got))}"
    if op in _LINEAR:  # x + c with c the same on every channel: mean(x + c) = mean(x) + c
        if got == ["mean"]:
            return "mean", ""
        return "invalid", f"{node.name} ({op}) adds a constant to a zero tail"
    if op in _SCALE:
        is_mul = op in ("mul", "mul_", "imul")
        if is_mul and "zero" in got:
            return "zero", ""  # 0 * c = 0
        if len(got) == 1 and (is_mul or node.args[0] is ins[0]):
            return got[0], ""  # x * c or x / c, with c the same on every channel
        return "invalid", f"{node.name} ({op}) multiplies stream channels by per-channel values"
    if op == "pow" and got == ["zero"] and node.args[0] is ins[0] and len(node.args) > 1:
        exponent = node.args[1]
        if isinstance(exponent, (int, float)) and not isinstance(exponent, bool) and exponent > 0:
            return "zero", ""  # 0 ** p = 0
    if op in _ZERO_AT_ZERO and got == ["zero"]:
        return "zero", ""
    return "invalid", f"{node.name} ({op}) on the mean tail of the stream"


def _norm_params(gm: torch.fx.GraphModule, site: NormSite, canonical: dict[str, str]) -> tuple[str | None, str | None]:
    """The weight and bias parameter names of a LayerNorm/RMSNorm node (None: absent or unknown)."""
    node = next(n for n in gm.graph.nodes if n.name == site.node)
    if site.idiom is not None:
        found = [param_name(site.idiom.weight) if site.idiom.weight is not None else None, None]
    elif node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        found = [f"{node.target}.{p}" if getattr(m, p, None) is not None else None for p in ("weight", "bias")]
    elif node.op == "call_function" and target_name(node) in _EPS_ARG:
        found = [param_name(node_arg(node, 2, "weight"))]
        found.append(param_name(node_arg(node, 3, "bias")) if target_name(node) == "layer_norm" else None)
    else:
        return None, None
    weight, bias = (canonical.get(p, p) if p else None for p in found)
    return weight, bias


def _weight_chain(site: NormSite) -> list[str] | None:
    """The nodes from a decomposed RMSNorm's weight to its output, exclusive (the get_attr, casts,
    Gemma's ``1 + w``): the norm's own parameter, not the stream. None when a node on the way has
    another reader, or the norm has no weight."""
    idiom, chain = site.idiom, []
    node = idiom.weight if idiom is not None else None
    while node is not None and node is not idiom.out:
        users = real_users(node)
        if len(users) != 1:
            return None
        chain.append(node.name)
        node = users[0]
    return chain if node is not None else None


def _read_by_the_norm_only(site: NormSite, weight: str, builder: Any) -> bool:
    """A decomposed RMSNorm's weight is read as data, which another read of it would share: only its own
    get_attr, leading to the norm's output, may read it."""
    readers = {b.node for key, binds in builder.bindings.items() if key[0] == weight for b in binds}
    return readers == {site.idiom.weight.name} and _weight_chain(site) is not None


def _idiom_eps(site: NormSite) -> EpsSite | str | None:
    """The constant of a decomposed RMSNorm's ``ms + eps`` (None: it adds no eps, nothing to rescale)."""
    add, x = site.idiom.eps, site.idiom.x
    if add is None:
        return None
    dtype = getattr(x.meta.get("tensor_meta"), "dtype", None)
    if dtype is None or not dtype.is_floating_point:
        return f"{site.node}: the dtype of its input is unknown"
    index = 0 if not isinstance(add.args[0], torch.fx.Node) else 1
    return EpsSite(add.name, None, index, float(add.args[index]), dtype)


def _eps_site(gm: torch.fx.GraphModule, name: str) -> EpsSite | str:
    """Where the eps of norm node ``name`` lives, or why it cannot be rewritten."""
    node = next(n for n in gm.graph.nodes if n.name == name)
    x = node.args[0] if node.args else None
    meta = x.meta.get("tensor_meta") if isinstance(x, torch.fx.Node) else None
    dtype = getattr(meta, "dtype", None)
    if dtype is None or not dtype.is_floating_point:
        return f"{name}: the dtype of its input is unknown (eps = finfo(dtype).eps)"
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        if isinstance(m, (nn.LayerNorm, nn.RMSNorm)) and isinstance(m.eps, (float, int, type(None))):
            return EpsSite(name, str(node.target), -1, m.eps, dtype)
    elif node.op == "call_function" and target_name(node) in _EPS_ARG:
        index, default = _EPS_ARG[target_name(node)]
        value = node_arg(node, index, "eps", default)
        if isinstance(value, (float, int, type(None))):
            return EpsSite(name, None, index, value, dtype)
    return f"the eps of {name} ({target_name(node, gm)}) cannot be rewritten to eps*kd/D"


def rescaled_eps(site: EpsSite, factor: float) -> float:
    """``eps * kd/D`` (an RMSNorm's default eps, None, is ``finfo(dtype).eps``)."""
    eps = site.value if site.value is not None else torch.finfo(site.dtype).eps
    return float(eps) * factor


def copies_of(layout: Layout, widths: list[int]) -> int | None:
    """The channel set ``a`` when ``layout`` is ``a`` whole, or a concatenation of whole copies of ``a``
    (Swin's patch merging: four strided samples of the stream side by side); else None. Such an axis
    grows piece by piece, each piece as the stream does (whole copies keep every piece's statistics)."""
    if len(layout.segments) != 1 or layout.segments[0][0] != 1:
        return None
    sets = {a for a, _, _ in layout.pieces}
    if len(sets) != 1:
        return None
    (a,) = sets
    return a if all(n == widths[a] and inner == 1 for _, n, inner in layout.pieces) else None


def find_streams(analysis: Analysis, b: Any, slots_of: dict, freeze_layout) -> dict[int, tuple[str, ...]]:
    """The channel sets normalised by a LayerNorm/RMSNorm (-> the norms' node names). Fail closed: a
    norm over anything but one channel set (or a concatenation of whole copies of it), and a stream
    reaching any slot or parameter axis in another layout, freeze what they touch
    (``freeze_layout(layout, reason)``)."""
    found: dict[int, list[str]] = {}
    widths = analysis.set_width
    for site in b.norms:
        layout = analysis.layout(site.in_slot)
        a = copies_of(layout, widths)
        if a is None:
            freeze_layout(layout, f"normalised over by {site.node} across a concatenation or a reshaped axis")
            continue
        found.setdefault(a, []).append(site.node)
    for a, norms in found.items():
        for slot in slots_of.get(a, ()):
            if copies_of(analysis.layout(slot), widths) != a:
                reason = f"the stream normalised by {norms[0]} reaches {slot[0]} concatenated or reshaped"
                freeze_layout(analysis.layout(slot), reason)
    for param, axis in b.bindings:
        layout = analysis.layout((f"param:{param}", axis))
        hit = [a for a in layout.channel_sets() if a in found]
        if hit and copies_of(layout, widths) != hit[0]:
            reason = f"parameter {param} axis {axis} reads the stream normalised by {found[hit[0]][0]} reshaped"
            freeze_layout(layout, reason)
    return {a: tuple(dict.fromkeys(n)) for a, n in found.items()}
