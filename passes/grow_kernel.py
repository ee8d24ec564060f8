"""NetMorph's kernel-size morph: grow a convolution's kernel (3x3 -> 5x5, ...) without changing its output.

Maths (Wei et al. 2016): pad the kernel with a ring of zeros, ``k -> s`` on every spatial axis
(``s - k`` even so the old taps stay centred), and pad the input by ``dilation * (s - k) / 2`` more on
each side. Every output position then sees the same input taps times the same weights plus taps times
zero, so the output (shape and values) is unchanged; the new taps start at zero and train from there.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from r2r_fx.analysis import hidden_weights
from r2r_fx.compat import aten
from r2r_fx.errors import GrowthError
from r2r_fx.graph import shape_of
from r2r_fx.passbase import Pass, PassResult, copy_graph_module
from r2r_fx.record import AxisChange, GrowthRecord, append_record, replace_param
from r2r_fx.surgery import get_tensor

__all__ = ["GrowKernelPass", "grow_kernel"]

_ATEN_CONVS = {aten.conv1d.default: 1, aten.conv2d.default: 2, aten.conv3d.default: 3}


def _pad_kernel(weight: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    pads: list[int] = []
    for k, s in zip(reversed(weight.shape[2:]), reversed(size)):
        pads += [(s - k) // 2, (s - k) // 2]
    return F.pad(weight.detach(), pads)


class GrowKernelPass(Pass):
    """Grow the kernel of one convolution (named by its fx node) to ``size``.

    The weight grows once, so every call that uses it (a layer called twice, a weight tied between
    layers) gets its padding widened; a use the pass cannot adjust is refused with the reason."""

    name = "grow_kernel"

    def __init__(self, node: str, size: int | Sequence[int], *, check: bool = True) -> None:
        self.node, self.size, self.check = node, size, check

    def transform(self, gm: torch.fx.GraphModule) -> PassResult:
        grown = copy_graph_module(gm)
        nodes = {n.name: n for n in grown.graph.nodes}
        convs = [n.name for n in grown.graph.nodes if _conv_weight(grown, n) is not None]
        if self.node not in nodes or self.node not in convs:
            raise GrowthError(f"{self.node!r} is not a convolution node; convolutions: {', '.join(convs) or 'none'}")
        node = nodes[self.node]
        if node.op == "call_module" and hidden_weights(grown.get_submodule(str(node.target))):
            raise GrowthError(f"{self.node} has {hidden_weights(grown.get_submodule(str(node.target)))}")
        weight_name, dims = _conv_weight(grown, node)
        weight = get_tensor(grown, weight_name)
        old = tuple(weight.shape[2:])
        size = (self.size,) * dims if isinstance(self.size, int) else tuple(self.size)
        if len(size) != dims or any(s < k or (s - k) % 2 for s, k in zip(size, old)):
            raise GrowthError(
                f"cannot grow kernel {old} of {self.node} to {size}: each size must be >= the old "
                "one and differ from it by an even number (the old taps stay centred)"
            )
        extra = [(s - k) // 2 for s, k in zip(size, old)]
        modules, calls = _uses(grown, weight)
        for module in modules:
            _check_module(module, grown, extra)
        names = [n for n, p in grown.named_parameters(remove_duplicate=False) if p is weight]
        axes = {2 + i: AxisChange("kernel", ((e, 0, k),)) for i, (e, k) in enumerate(zip(extra, old))}
        changes = replace_param(grown, weight_name, _pad_kernel(weight, size).contiguous(), names, axes)
        for module in modules:
            _grow_module(module, size, extra)
        for node in calls:
            _grow_call(node, dims, extra)
        grown.recompile()
        record = GrowthRecord(
            "grow_kernel",
            "netmorph",
            True,
            params=tuple(changes),
            options={"node": self.node, "kernel_before": list(old), "kernel_after": list(size)},
        )
        append_record(grown, record)
        return PassResult(grown, size != old, record)


def _uses(gm: torch.fx.GraphModule, weight: torch.Tensor) -> tuple[list[nn.Module], list[torch.fx.Node]]:
    """The layers holding ``weight`` and the ATen convolution calls reading it; any other use is refused."""
    modules: list[nn.Module] = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            if any(t is weight for t in module.parameters()) and module not in modules:
                if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                    raise GrowthError(f"the weight is also used by {type(module).__name__} {node.name}")
                modules.append(module)
    calls: list[torch.fx.Node] = []
    for node in gm.graph.nodes:
        if node.op != "get_attr" or get_tensor(gm, str(node.target)) is not weight:
            continue
        for user in node.users:
            if user.target not in _ATEN_CONVS or len(user.args) < 2 or user.args[1] is not node:
                raise GrowthError(f"the weight {node.target} is also read by {user.name}")
            if len(user.args) > 4 and isinstance(user.args[4], str) or isinstance(user.kwargs.get("padding"), str):
                raise GrowthError(f"{user.name} has string padding")
            calls.append(user)
    return modules, calls


def _check_module(module: nn.Module, gm: torch.fx.GraphModule, extra: Sequence[int]) -> None:
    if hidden_weights(module):
        raise GrowthError(f"{type(module).__name__} has {hidden_weights(module)}")
    if module.padding_mode not in ("reflect", "circular"):
        return
    padding = _reversed_padding(module, [k + 2 * e for k, e in zip(module.kernel_size, extra)], extra)
    for node in gm.graph.nodes:
        if node.op == "call_module" and gm.get_submodule(str(node.target)) is module:
            shape = shape_of(node.args[0])
            spatial = shape[-len(extra) :] if shape is not None else None
            pads = [max(padding[2 * i], padding[2 * i + 1]) for i in range(len(extra))][::-1]
            if spatial is None or any(p >= s for p, s in zip(pads, spatial)):
                raise GrowthError(
                    f"{module.padding_mode} padding of {pads} does not fit the input {list(spatial or [])} "
                    f"of {node.name}"
                )


def _new_padding(module: nn.Module, extra: Sequence[int]) -> Any:
    if isinstance(module.padding, str):
        if module.padding == "same":
            return "same"
        return tuple(d * e for d, e in zip(module.dilation, extra))  # "valid"
    return tuple(p + d * e for p, d, e in zip(module.padding, module.dilation, extra))


def _reversed_padding(module: nn.Module, kernel: Sequence[int], extra: Sequence[int]) -> list[int]:
    """What ``nn.Conv*`` pads with for a non-zeros ``padding_mode``: (left, right) per axis, last axis first."""
    padding = _new_padding(module, extra)
    out: list[int] = []
    for axis in reversed(range(len(kernel))):
        if padding == "same":
            total = module.dilation[axis] * (kernel[axis] - 1)
            out += [total // 2, total - total // 2]
        else:
            out += [padding[axis], padding[axis]]
    return out


def _grow_module(module: nn.Module, size: Sequence[int], extra: Sequence[int]) -> None:
    reversed_padding = _reversed_padding(module, size, extra)
    module.padding = _new_padding(module, extra)
    module.kernel_size = tuple(size)
    module._reversed_padding_repeated_twice = reversed_padding


def _grow_call(node: torch.fx.Node, dims: int, extra: Sequence[int]) -> None:
    """``aten.convNd(input, weight, bias, stride, padding, dilation, groups)`` with wider padding."""
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    defaults = {"stride": 1, "padding": 0, "dilation": 1}
    values = {
        n: (node.args[i] if i < len(node.args) else node.kwargs.get(n, defaults.get(n))) for i, n in enumerate(names)
    }
    padding, dilation = values["padding"], values["dilation"]
    padding = [padding] * dims if isinstance(padding, int) else list(padding)
    dilation = [dilation] * dims if isinstance(dilation, int) else list(dilation)
    if len(padding) == 1:
        padding = padding * dims
    if len(dilation) == 1:
        dilation = dilation * dims
    new = [p + d * e for p, d, e in zip(padding, dilation, extra)]
    if len(node.args) > 4:
        args = list(node.args)
        args[4] = new
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, "padding": new}


def _conv_weight(gm: torch.fx.GraphModule, node: torch.fx.Node) -> tuple[str, int] | None:
    """(weight name, spatial dims) of a plain (non-transposed) convolution node, else None."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return f"{node.target}.weight", module.weight.dim() - 2
    if node.op == "call_function" and node.target in _ATEN_CONVS and len(node.args) > 1:
        w = node.args[1]
        if isinstance(w, torch.fx.Node) and w.op == "get_attr":
            return str(w.target), _ATEN_CONVS[node.target]
    return None


def grow_kernel(
    gm: torch.fx.GraphModule, node: str, size: int | Sequence[int], *, check: bool = True
) -> torch.fx.GraphModule:
    """Return a copy of ``gm`` whose convolution ``node`` has a ``size`` kernel, same function.

    ``check`` (default on) runs the result against ``gm`` on the capture's example inputs and raises
    :class:`~r2r_fx.errors.NotPreservedError` if the function changed."""
    return GrowKernelPass(node, size, check=check).call(gm).model
