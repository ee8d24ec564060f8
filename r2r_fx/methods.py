"""Methods: policies that fill the new entries of grown parameters (widening).

The group analysis and the surgery engine are shared; a method only decides values.

R2R (Painter, arXiv 2410.11038, section 4.1): along a producer axis (``"out"``) the new entries come
in identical halves ``[U; U]``, along a consumer axis (``"in"``) in opposite halves ``[U', -U']``.
Any channel-wise op maps identical channels to identical channels, so in every consumer the two
halves contribute ``U' h - U' h = 0``: the function is unchanged while every new weight still gets
a gradient. Random values are uniform with the standard deviation of the layer's existing weights
(``init_scale`` multiplies it); per-channel values (biases, norm parameters and statistics,
class tokens) are copied from randomly chosen existing channels, so they keep their range
(running variances stay positive).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from r2r_fx.errors import GrowthError
from r2r_fx.surgery import AxisIndex

__all__ = ["METHODS", "Method", "Net2Net", "NetMorph", "R2R", "RandomPad", "get_method"]


class Method:
    """Base policy. ``exact`` says whether the method preserves the function exactly."""

    name = "base"
    exact = True

    def __init__(self, init_scale: float | str = "match", noise: float = 0.0) -> None:
        self.scale_factor = 1.0 if init_scale == "match" else float(init_scale)
        self.noise = float(noise)

    def refuses(self, group: Any) -> str:
        """A reason this method cannot widen ``group`` (a WidthGroup), or "" when it can."""
        return ""

    def grow(
        self, tensor: torch.Tensor, axes: Sequence[tuple[int, AxisIndex, str]], generator: torch.Generator
    ) -> torch.Tensor:
        raise NotImplementedError

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
        for axis, idx, _ in axes:
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


class NetMorph(Method):
    """Network Morphism (Wei et al. 2016): new producer rows random, new consumer columns zero.

    Exact, but the new producer rows get no gradient at the first step (their consumer columns are 0).
    """

    name = "netmorph"

    def grow(self, tensor, axes, generator):
        with torch.no_grad():
            t = self._grown(tensor.detach(), [a for a in axes if a[1].grows], self._scale(tensor), generator)
            for axis, idx, role in axes:
                if role == "in" and idx.new_pos.numel():
                    t.index_fill_(axis, idx.new_pos.to(t.device), 0)
        return t


class RandomPad(Method):
    """The non-preserving baseline: new weights random on both sides (verification reports it)."""

    name = "random"
    exact = False

    def grow(self, tensor, axes, generator):
        with torch.no_grad():
            return self._grown(tensor.detach(), [a for a in axes if a[1].grows], self._scale(tensor), generator)


class Net2Net(Method):
    """Net2WiderNet (Chen et al. 2016): each new channel copies an existing one; consumers divide the
    columns of a copied channel by its replica count, so the copies' contributions add up to the old one.

    One channel mapping per width group is applied to every producer, bias and norm parameter of the
    group, which makes it work through residual adds and concatenation. ``noise`` (relative to the
    layer's std) is added to new producer rows to break the symmetry; the function is then no longer
    exactly preserved (``exact`` is False).
    """

    name = "net2net"

    def __init__(self, init_scale: float | str = "match", noise: float = 0.0) -> None:
        super().__init__(init_scale, noise)
        self.exact = self.noise == 0.0

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


METHODS: dict[str, type[Method]] = {"r2r": R2R, "net2net": Net2Net, "netmorph": NetMorph, "random": RandomPad}


def get_method(name: str | Method, init_scale: float | str = "match", noise: float = 0.0) -> Method:
    if isinstance(name, Method):
        return name
    try:
        cls = METHODS[name]
    except KeyError:
        raise GrowthError(f"unknown method {name!r}; choose one of {sorted(METHODS)}") from None
    return cls(init_scale=init_scale, noise=noise)
