"""Methods: what a growth method puts into new width (its widen fill) and new depth (its deepen block).

The group analysis, the surgery engine and the insertion of blocks are shared; a method only decides
values, which blocks to insert, and what it refuses (``refuses`` for a width group, ``refuses_point``
for a place to deepen). A method is one class; ``register_method`` makes it known by its name.

Widening.
R2R (Painter, arXiv 2410.11038, section 4.1): along a producer axis (``"out"``) the new entries come
in identical halves ``[U; U]``, along a consumer axis (``"in"``) in opposite halves ``[U', -U']``.
Any channel-wise op maps identical channels to identical channels, so in every consumer the two
halves contribute ``U' h - U' h = 0``: the function is unchanged while every new weight still gets
a gradient. Random values are uniform with the standard deviation of the layer's existing weights
(``init_scale`` multiplies it); per-channel values (biases, norm parameters and statistics,
class tokens) are copied from randomly chosen existing channels, so they keep their range
(running variances stay positive).

Normalised streams (a width group under LayerNorm/RMSNorm, ``WidthGroup.norms``) grow by ``k`` whole
copies plus ``r`` mean channels, filled by ``r2r_fx.surgery.grow_stream``: the constraint fixes the
writers' rows, the per-channel values, the norms' weights and eps; a method chooses only
``split_stream``, how a reader's column ``W`` is shared among the ``k`` copies (the shares must add up
to ``W``), ``stream_tail``, a reader's tail columns (free on a norm's output, summing to zero on the
stream itself; default zeros, as Net2Net and NetMorph keep), and ``tail_gamma`` (R2R: random). A
method without ``supports_streams`` is refused on such groups.

Deepening (``block``; ``r2r_fx.passes.deepen`` finds the places and inserts the blocks): R2R's
block (``R2R.block``) and the random baseline are residual ``x + z(x)``; Net2Net and NetMorph insert
an identity layer, Net2DeeperNet's followed by a copy of the idempotent activation that made ``x``,
NetMorph's ending in ``a*h + (1-a)*relu(h)``.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import nn

from r2r_fx.errors import GrowthError
from r2r_fx.graph import target_name
from r2r_fx.surgery import AxisIndex

__all__ = [
    "METHODS",
    "Block",
    "BlockSite",
    "Method",
    "Net2Net",
    "NetMorph",
    "R2R",
    "RandomPad",
    "get_method",
    "register_method",
]

_CONV = {3: nn.Conv1d, 4: nn.Conv2d, 5: nn.Conv3d}
_BN = {3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}


@dataclass
class Block:
    """What ``deepen`` inserts after a tensor ``x``: ``z(x)``, the sum of ``branches`` (each a chain of
    layers reading ``x``, named within the block); the block computes ``x + z(x)`` when ``residual``,
    else ``z(x)``; ``parametric`` ends ``z`` with NetMorph's ``a*h + (1-a)*relu(h)`` (``a`` starts at 1)."""

    branches: list[dict[str, nn.Module]]
    hidden: int
    residual: bool = True
    parametric: bool = False


@dataclass
class BlockSite:
    """Where a block goes: after ``node`` of ``gm``, an activation of ``shape`` whose channel axis has
    ``width`` channels; ``kind`` is "conv1d"/"conv2d"/"conv3d" (channels first) or "linear" (channels
    last); ``std`` is the weight std of the nearest layer upstream (None: none found); new layers are
    made in ``like``'s dtype and device."""

    gm: torch.fx.GraphModule
    node: torch.fx.Node
    shape: tuple[int, ...]
    width: int
    kind: str
    std: float | None
    like: torch.Tensor


class Method:
    """A growth method. ``exact`` says whether it preserves the function exactly.

    ``init_scale`` multiplies the scale of new random weights ("match": the standard deviation of the
    existing weights of the layer, or of the layer upstream of a new block)."""

    name = "base"
    exact = True
    takes_hidden = True  # whether ``block`` uses a requested hidden width
    supports_streams = False  # whether ``split_stream`` is implemented (normalised streams)
    # roles whose new entries get no gradient at the first step, by construction -> why (the record's no_grad)
    no_grad_roles: dict[str, str] = {}

    def __init__(self, *, init_scale: float | str = "match") -> None:
        self.scale_factor = 1.0 if init_scale == "match" else float(init_scale)
        if not self.scale_factor > 0:
            raise GrowthError(f"init_scale must be 'match' or a positive number, got {init_scale!r}")

    def refuses(self, group: Any) -> str:
        """A reason this method cannot widen ``group`` (a WidthGroup), or "" when it can."""
        return ""

    def refuses_point(self, gm: torch.fx.GraphModule, x: torch.fx.Node) -> str:
        """A reason this method cannot insert a block after ``x``, or "" when it can."""
        return ""

    def grow(
        self, tensor: torch.Tensor, axes: Sequence[tuple[int, AxisIndex, str]], generator: torch.Generator
    ) -> torch.Tensor:
        """``tensor`` grown along ``axes`` (``(axis, index, role)``: where old and new entries go)."""
        raise NotImplementedError

    def block(self, site: BlockSite, hidden: int | None, generator: torch.Generator) -> Block:
        """The block to insert at ``site``; ``hidden`` is the requested hidden width (None: the method's)."""
        raise NotImplementedError

    def split_stream(self, tensor: torch.Tensor, axis: int, k: int, generator: torch.Generator) -> torch.Tensor:
        """The ``k`` shares of a reader's columns of a normalised stream, stacked on a new first axis:
        ``shares[j]`` is what copy ``j`` of each channel gets (``shares.sum(0) == tensor`` for an exact
        method; ``tensor`` is the parameter, already grown along its other axes)."""
        raise NotImplementedError

    def stream_tail(
        self, tensor: torch.Tensor, axis: int, r: int, free: bool, generator: torch.Generator
    ) -> torch.Tensor:
        """A reader's ``r`` tail columns of a stream grown by mean channels (``tensor``: its old columns).
        ``free``: the reader sees a zero tail (a norm's output), any values are exact; else it sees the
        mean tail and the columns must sum to zero along ``axis``. Default: zeros (exact either way)."""
        shape = list(tensor.shape)
        shape[axis] = r
        return torch.zeros(shape, dtype=tensor.dtype, device=tensor.device)

    def tail_gamma(self, gamma: torch.Tensor, axis: int, r: int, generator: torch.Generator) -> torch.Tensor:
        """The ``r`` tail entries of a norm weight (``gamma``: the copies' rescaled weight); they scale a
        tail that is exactly 0, so any value is exact. Default: the mean of ``gamma``."""
        return gamma.mean(axis, keepdim=True).expand(*gamma.shape[:axis], r, *gamma.shape[axis + 1 :]).clone()

    # -- helpers shared by methods
    def _scale(self, tensor: torch.Tensor) -> float:
        if tensor.numel() > 1:
            std = float(tensor.detach().float().std())
            if std > 0:
                return std * self.scale_factor
        fan_in = max(1, tensor.numel() // max(1, tensor.shape[0])) if tensor.dim() else 1
        return self.scale_factor / math.sqrt(fan_in)

    @staticmethod
    def _uniform(shape: Sequence[int], std: float, like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        bound = std * math.sqrt(3.0)
        values = torch.empty(tuple(shape), dtype=like.dtype).uniform_(-bound, bound, generator=generator)
        return values.to(like.device)

    def _grown(
        self, t: torch.Tensor, axes: Sequence[tuple[int, AxisIndex, str]], std: float, generator: torch.Generator
    ) -> torch.Tensor:
        """The grown tensor, allocated and filled once: random where any axis is a weight axis
        (``"out"``/``"in"``), old entries copied in place, per-channel entries sampled from old ones."""
        shape = list(t.shape)
        for axis, idx, _ in axes:
            shape[axis] = idx.new_size
        if any(role in ("out", "in") for _, _, role in axes):
            grown = self._uniform(shape, std, t, generator)
        else:
            grown = torch.zeros(shape, dtype=t.dtype, device=t.device)
        target = grown
        scattered = []
        for axis, idx in {axis: idx for axis, idx, _ in reversed(axes)}.items():  # one placement per axis
            if len(idx.runs) == 1:
                target = target.narrow(axis, idx.runs[0][0], idx.old_size)
            else:
                scattered.append((axis, idx))
        _place(target, t, scattered)
        for axis, idx, role in axes:
            if role not in ("out", "in") and idx.new_pos.numel():
                values = grown.index_select(axis, idx.old_pos[idx.new_source].to(t.device))
                grown.index_copy_(axis, idx.new_pos.to(t.device), values)
        return grown


def _place(target: torch.Tensor, old: torch.Tensor, scattered: list[tuple[int, AxisIndex]]) -> None:
    """Write ``old`` into ``target`` at the old positions of the axes whose old entries are interleaved."""
    if not scattered:
        target.copy_(old)
        return
    axis, idx = scattered[0]
    pos = idx.old_pos.to(target.device)
    if len(scattered) == 1:
        target.index_copy_(axis, pos, old)
        return
    sub = target.index_select(axis, pos)
    _place(sub, old, scattered[1:])
    target.index_copy_(axis, pos, sub)


class R2R(Method):
    """R2WiderR: identical halves on producer axes, opposite halves on consumer axes."""

    name = "r2r"
    supports_streams = True

    def split_stream(self, tensor, axis, k, generator):
        """``W/k + V_j - mean_j(V)``: zero-sum noise at the layer's scale breaks the copies' symmetry
        (for ``k = 2`` the pair ``[W/2 + V, W/2 - V]``); the shares add up to ``W``."""
        v = self._uniform((k, *tensor.shape), self._scale(tensor), tensor, generator)
        return exact_shares(tensor.unsqueeze(0) / k + (v - v.mean(0, keepdim=True)), tensor)

    def stream_tail(self, tensor, axis, r, free, generator):
        """Random columns at the layer's scale on a zero tail (LEMON's); on a mean tail opposite pairs
        ``[V, -V]`` across the tail channels, which hold equal values (an odd one out is 0)."""
        shape = list(tensor.shape)
        shape[axis] = r if free else r // 2
        v = self._uniform(shape, self._scale(tensor), tensor, generator)
        if free:
            return v
        odd = [*shape[:axis], 1, *shape[axis + 1 :]]  # one channel (r = 1: the whole tail) is 0
        parts = [v, -v] + ([torch.zeros(odd, dtype=v.dtype, device=v.device)] if r % 2 else [])
        return torch.cat(parts, dim=axis)

    def tail_gamma(self, gamma, axis, r, generator):
        """Random at gamma's scale: uniform around its mean, with its spread (at least 10% of the mean)."""
        mean = gamma.mean(axis, keepdim=True)
        spread = max(float(gamma.std()) if gamma.numel() > 1 else 0.0, 0.1 * float(mean.abs().max()))
        shape = list(gamma.shape)
        shape[axis] = r
        return mean + self._uniform(shape, spread, gamma, generator)

    def grow(self, tensor, axes, generator):
        with torch.no_grad():
            t = self._grown(tensor.detach(), [a for a in axes if a[1].grows], self._scale(tensor), generator)
            for axis, idx, role in axes:  # consumers: second half cancels the first
                if role == "in" and idx.first.numel():
                    t.index_copy_(axis, idx.second.to(t.device), -t.index_select(axis, idx.first.to(t.device)))
            for axis, idx, role in axes:  # producers and per-channel values: identical halves
                if role != "in" and idx.first.numel():
                    t.index_copy_(axis, idx.second.to(t.device), t.index_select(axis, idx.first.to(t.device)))
        return t

    def block(self, site, hidden, generator):
        """R2DeeperR: two branches of ``hidden / 2`` channels, the second a copy of the first with its
        last layer negated: first-layer rows ``[U; U]``, last-layer columns ``[V, -V]``, computed as two
        identical partial results of opposite sign, which IEEE arithmetic cancels exactly (``z(x) = 0``
        in any dtype, not just up to rounding) while both layers get gradients."""
        hidden = _even(hidden or site.width)
        layers = _random_chain(site, hidden // 2, self.scale_factor, generator)
        pair = copy.deepcopy(layers)
        with torch.no_grad():
            pair[next(reversed(pair))].weight.neg_()
        return Block([layers, {f"{name}_pair": module for name, module in pair.items()}], hidden)


class NetMorph(Method):
    """Network Morphism (Wei et al. 2016): new producer rows random, new consumer columns zero.

    Exact, but the new producer rows get no gradient at the first step (their consumer columns are 0).
    """

    name = "netmorph"
    takes_hidden = False
    supports_streams = True
    no_grad_roles = {
        "out": "new producer rows: their consumer columns are 0",
        "channel": "per-channel values of new channels: their consumer columns are 0",
    }

    def split_stream(self, tensor, axis, k, generator):
        """The old channel keeps ``W``, the new copies read nothing (columns 0)."""
        zeros = torch.zeros((k - 1, *tensor.shape), dtype=tensor.dtype, device=tensor.device)
        return torch.cat([tensor.unsqueeze(0), zeros])

    def grow(self, tensor, axes, generator):
        with torch.no_grad():
            t = self._grown(tensor.detach(), [a for a in axes if a[1].grows], self._scale(tensor), generator)
            for axis, idx, role in axes:
                if role == "in" and idx.new_pos.numel():
                    t.index_fill_(axis, idx.new_pos.to(t.device), 0)
        return t

    def block(self, site, hidden, generator):
        """An identity layer ending in ``a*h + (1-a)*relu(h)`` with ``a = 1``: the identity at insertion."""
        return Block([_identity_layer(site)], site.width, residual=False, parametric=True)


class RandomPad(Method):
    """The non-preserving baseline: new weights random on both sides (verification reports it)."""

    name = "random"
    exact = False
    supports_streams = True

    def split_stream(self, tensor, axis, k, generator):
        """The old columns as they were, random columns for the copies (not preserving)."""
        new = self._uniform((k - 1, *tensor.shape), self._scale(tensor), tensor, generator)
        return torch.cat([tensor.unsqueeze(0), new])

    def stream_tail(self, tensor, axis, r, free, generator):
        """Random tail columns, whatever the reader sees (not preserving on a mean tail)."""
        shape = list(tensor.shape)
        shape[axis] = r
        return self._uniform(shape, self._scale(tensor), tensor, generator)

    def grow(self, tensor, axes, generator):
        with torch.no_grad():
            return self._grown(tensor.detach(), [a for a in axes if a[1].grows], self._scale(tensor), generator)

    def block(self, site, hidden, generator):
        """R2R's block without the pairing: one branch of ``hidden`` random channels."""
        hidden = _even(hidden or site.width)
        return Block([_random_chain(site, hidden, self.scale_factor, generator)], hidden)


class Net2Net(Method):
    """Net2WiderNet (Chen et al. 2016): each new channel copies an existing one; consumers divide the
    columns of a copied channel by its replica count, so the copies' contributions add up to the old one.

    One channel mapping per width group is applied to every producer, bias and norm parameter of the
    group, which makes it work through residual adds and concatenation. ``noise`` (relative to the
    layer's std) is added to new producer rows to break the symmetry; the function is then no longer
    exactly preserved (``exact`` is False).
    """

    name = "net2net"
    takes_hidden = False
    supports_streams = True

    def split_stream(self, tensor, axis, k, generator):
        """``W/k`` for every copy (Net2WiderNet's division by the replica count; ``noise`` is not applied
        to streams: the copies stay exact and stay symmetric)."""
        return exact_shares((tensor / k).unsqueeze(0).expand(k, *tensor.shape).clone(), tensor)

    def __init__(self, *, init_scale: float | str = "match", noise: float = 0.0) -> None:
        super().__init__(init_scale=init_scale)
        self.noise = float(noise)
        if not 0 <= self.noise < math.inf:
            raise GrowthError(f"noise must be a finite number >= 0, got {noise!r}")

    @property
    def exact(self) -> bool:  # noise breaks the copies' symmetry, and the function
        return self.noise == 0.0

    def refuses(self, group: Any) -> str:
        if group.granularity > 2:
            return "net2net: grouped convolutions would need whole-group copies (not implemented)"
        return ""

    def grow(self, tensor, axes, generator):
        grows = [a for a in axes if a[1].grows]
        with torch.no_grad():
            t = self._grown(tensor.detach(), grows, self._scale(tensor), generator)
            for axis, idx, role in grows:  # consumers first: split each column among its replicas
                if role != "in":
                    continue
                device = t.device
                old_of_new = idx.old_pos[idx.new_source]
                counts = torch.ones(idx.new_size, dtype=t.dtype, device=device)
                counts.index_add_(
                    0, old_of_new.to(device), torch.ones(old_of_new.numel(), dtype=t.dtype, device=device)
                )
                shape = [1] * t.dim()
                shape[axis] = -1
                t.div_(counts.view(shape))
                t.index_copy_(axis, idx.new_pos.to(device), t.index_select(axis, old_of_new.to(device)))
            for axis, idx, role in grows:  # producers and per-channel values: copies of the source channel
                if role == "in":
                    continue
                old_of_new = idx.old_pos[idx.new_source].to(t.device)
                copies = t.index_select(axis, old_of_new)
                if role == "out" and self.noise:
                    copies = copies + self._uniform(copies.shape, self.noise * self._scale(tensor), t, generator)
                t.index_copy_(axis, idx.new_pos.to(t.device), copies)
        return t

    def refuses_point(self, gm, x):
        """Net2DeeperNet's identity layer ends in the activation that made ``x``: it must be idempotent."""
        if x.op == "call_module" and isinstance(gm.get_submodule(str(x.target)), _IDEMPOTENT_MODULES):
            return ""
        if x.op == "call_function" and (x.target in _IDEMPOTENT_FUNCTIONS or target_name(x) in _IDEMPOTENT_NAMES):
            return ""
        if x.op == "call_method" and x.target in _IDEMPOTENT_NAMES:
            return ""
        made_by = type(gm.get_submodule(str(x.target))).__name__ if x.op == "call_module" else target_name(x)
        return f"net2net deepen needs an idempotent activation (ReLU) right before the new layer; {x.name} is {made_by}"

    def block(self, site, hidden, generator):
        """Net2DeeperNet: an identity layer (``noise`` added to its weight) and a copy of the activation."""
        layers = _identity_layer(site)
        if self.noise:
            weight = next(iter(layers.values())).weight
            with torch.no_grad():
                weight.add_(self._uniform(weight.shape, self.noise * (site.std or 1.0), weight, generator))
        layers["act"] = _activation_module(site.gm, site.node)
        return Block([layers], site.width, residual=False)


METHODS: dict[str, type[Method]] = {"r2r": R2R, "net2net": Net2Net, "netmorph": NetMorph, "random": RandomPad}


def register_method(cls: type[Method]) -> type[Method]:
    """Make a Method class available by its ``name`` (``widen(gm, method=name)``, ``--method name``)."""
    if not (isinstance(cls, type) and issubclass(cls, Method)) or cls.name in ("", "base"):
        raise GrowthError(f"register_method needs a Method subclass with its own name, got {cls!r}")
    if METHODS.get(cls.name, cls) is not cls:
        raise GrowthError(f"a method called {cls.name!r} is registered already ({METHODS[cls.name].__name__})")
    METHODS[cls.name] = cls
    return cls


def get_method(method: str | Method, **options: Any) -> Method:
    """The method called ``method`` made with ``options`` (or ``method`` itself, with no options).

    An option the method does not take is an error (``noise`` belongs to Net2Net only)."""
    if isinstance(method, Method):
        if options:
            raise GrowthError(f"options {sorted(options)} go to the constructor of a Method instance, not here")
        return method
    try:
        cls = METHODS[method]
    except (KeyError, TypeError):
        raise GrowthError(f"unknown method {method!r}; choose one of {sorted(METHODS)}") from None
    parameters = inspect.signature(cls).parameters
    takes = set(parameters)
    any_option = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    unused = [] if any_option else sorted(set(options) - takes)
    if unused:
        options_text = ", ".join(sorted(takes))
        raise GrowthError(f"method {method!r} takes no option {', '.join(unused)} (its options: {options_text})")
    return cls(**options)


def _even(n: int) -> int:
    return n + n % 2


def exact_shares(shares: torch.Tensor, tensor: torch.Tensor) -> torch.Tensor:
    """``shares`` (stacked on axis 0) of a half-precision ``tensor`` made to add up to it exactly, as
    real numbers: the last share is what the others leave (worked out in float64); where that is not a
    value of the dtype, the first share takes the whole entry and the others 0 (about a third of the
    entries). Float32 and float64 shares are returned as they are: their sum is off by rounding only
    (1e-7), far inside the check, where bfloat16's 4e-3 is not."""
    if torch.finfo(tensor.dtype).eps <= torch.finfo(torch.float32).eps:
        return shares
    others = shares[:-1].double().sum(0)
    last = (tensor.double() - others).to(tensor.dtype)
    ok = (others + last.double()) == tensor.double()
    out = torch.cat([shares[:-1], last.unsqueeze(0)])
    whole = torch.zeros_like(out)
    whole[0] = tensor
    return torch.where(ok.unsqueeze(0), out, whole)


def _uniform_(tensor: torch.Tensor, std: float, generator: torch.Generator) -> None:
    tensor.copy_(Method._uniform(tensor.shape, std, tensor, generator))


def _random_chain(site: BlockSite, size: int, scale_factor: float, generator: torch.Generator) -> dict[str, nn.Module]:
    """conv -> BatchNorm -> ReLU -> conv (3x3, no biases) or Linear -> ReLU -> Linear (no last bias),
    random at the scale of the weights upstream; the last layer's weight is what pairs negate."""
    width = site.width
    if site.kind == "linear":
        first, last = nn.Linear(width, size), nn.Linear(size, width, bias=False)
        layers = {"fc1": first, "act": nn.ReLU(), "fc2": last}
    else:
        rank = len(site.shape)
        first = _CONV[rank](width, size, 3, padding=1, bias=False)
        last = _CONV[rank](size, width, 3, padding=1, bias=False)
        layers = {"conv1": first, "bn": _BN[rank](size), "act": nn.ReLU(), "conv2": last}
    for module in layers.values():
        module.to(dtype=site.like.dtype, device=site.like.device)
    with torch.no_grad():
        scale = (site.std if site.std else 1.0 / math.sqrt(first.weight[0].numel())) * scale_factor
        _uniform_(first.weight, scale, generator)
        if getattr(first, "bias", None) is not None:
            _uniform_(first.bias, scale, generator)
        _uniform_(last.weight, scale, generator)
    return layers


def _identity_layer(site: BlockSite) -> dict[str, nn.Module]:
    """An identity conv (3x3, centre tap = I) or identity Linear, in the model's dtype and device. No
    BatchNorm: one initialised as the identity on its running statistics would normalise by batch
    statistics in train mode, which is not the identity."""
    width = site.width
    options = {"dtype": site.like.dtype, "device": site.like.device}
    with torch.no_grad():
        if site.kind == "linear":
            layer = nn.Linear(width, width, **options)
            layer.weight.copy_(torch.eye(width, **options))
            layer.bias.zero_()
            return {"fc": layer}
        rank = len(site.shape)
        layer = _CONV[rank](width, width, 3, padding=1, bias=False, **options)
        layer.weight.zero_()
        centre = (slice(None), slice(None)) + (1,) * (rank - 2)
        layer.weight[centre] = torch.eye(width, **options)
        return {"conv": layer}


_IDEMPOTENT_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh)
_IDEMPOTENT_FUNCTIONS = {torch.relu, torch.relu_, nn.functional.relu, nn.functional.relu6, nn.functional.hardtanh}
_IDEMPOTENT_NAMES = {"relu", "relu_", "relu6", "hardtanh", "hardtanh_"}


def _activation_module(gm: torch.fx.GraphModule, x: torch.fx.Node) -> nn.Module:
    """A fresh module computing the idempotent activation that produced ``x``."""
    if x.op == "call_module":
        return copy.deepcopy(gm.get_submodule(str(x.target)))
    name = target_name(x)
    if name == "relu6":
        return nn.ReLU6()
    if name.startswith("hardtanh"):
        return nn.Hardtanh(*[a for a in x.args[1:3] if isinstance(a, (int, float))])
    return nn.ReLU()
