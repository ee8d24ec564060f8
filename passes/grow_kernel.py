"""NetMorph's kernel-size morph: grow a convolution's kernel (3x3 -> 5x5, ...) without changing its output.

Maths (Wei et al. 2016): pad the kernel with a ring of zeros, ``k -> s`` on every spatial axis
(``s - k`` even so the old taps stay centred), and pad the input by ``dilation * (s - k) / 2`` more on
each side. Every output position then sees the same input taps times the same weights plus taps times
zero, so the output (shape and values) is unchanged; the new taps start at zero and train from there.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from r2r_fx.passbase import Pass, PassResult, append_record, copy_graph_module
from r2r_fx.surgery import get_tensor, set_tensor

__all__ = ["GrowKernelPass", "grow_kernel"]

logger = logging.getLogger(__name__)
aten = torch.ops.aten
_ATEN_CONVS = {aten.conv1d.default: 1, aten.conv2d.default: 2, aten.conv3d.default: 3}


def _pad_kernel(weight: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    pads: list[int] = []
    for k, s in zip(reversed(weight.shape[2:]), reversed(size)):
        pads += [(s - k) // 2, (s - k) // 2]
    return F.pad(weight.detach(), pads)


class GrowKernelPass(Pass):
    """Grow the kernel of one convolution (named by its fx node) to ``size``."""

    name = "grow_kernel"

    def __init__(self, node: str, size: int | Sequence[int], *, check: bool = True) -> None:
        self.node, self.size, self.check = node, size, check

    def transform(self, gm: torch.fx.GraphModule) -> PassResult:
        grown = copy_graph_module(gm)
        nodes = {n.name: n for n in grown.graph.nodes}
        convs = [n.name for n in grown.graph.nodes if _conv_weight(grown, n) is not None]
        if self.node not in nodes or self.node not in convs:
            raise ValueError(f"{self.node!r} is not a convolution node; convolutions: {', '.join(convs) or 'none'}")
        node = nodes[self.node]
        weight_name, dims = _conv_weight(grown, node)
        weight = get_tensor(grown, weight_name)
        old = tuple(weight.shape[2:])
        size = (self.size,) * dims if isinstance(self.size, int) else tuple(self.size)
        if len(size) != dims or any(s < k or (s - k) % 2 for s, k in zip(size, old)):
            raise ValueError(
                f"cannot grow kernel {old} of {self.node} to {size}: each size must be >= the old "
                "one and differ from it by an even number (the old taps stay centred)"
            )
        set_tensor(grown, weight_name, _pad_kernel(weight, size).contiguous())
        extra = [(s - k) // 2 for s, k in zip(size, old)]
        if node.op == "call_module":
            module = grown.get_submodule(str(node.target))
            module.kernel_size = size
            if not isinstance(module.padding, str):
                module.padding = tuple(p + d * e for p, d, e in zip(module.padding, module.dilation, extra))
            elif module.padding == "valid":
                module.padding = tuple(d * e for d, e in zip(module.dilation, extra))
        else:
            args = list(node.args) + [None] * (6 - len(node.args))
            stride = args[3] or [1] * dims
            padding = args[4] if args[4] is not None else [0] * dims
            dilation = args[5] or [1] * dims
            padding = [padding] * dims if isinstance(padding, int) else list(padding)
            dilation = [dilation] * dims if isinstance(dilation, int) else list(dilation)
            args[3], args[4], args[5] = stride, [p + d * e for p, d, e in zip(padding, dilation, extra)], dilation
            node.args = tuple(args)
        grown.recompile()
        record = {
            "op": "grow_kernel",
            "method": "netmorph",
            "exact": True,
            "node": self.node,
            "kernel_before": list(old),
            "kernel_after": list(size),
            "params": [],
        }
        append_record(grown, record)
        return PassResult(grown, size != old, record)


def _conv_weight(gm: torch.fx.GraphModule, node: torch.fx.Node) -> tuple[str, int] | None:
    """(weight name, spatial dims) of a plain (non-transposed) convolution node, else None."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return f"{node.target}.weight", module.weight.dim() - 2
    if node.op == "call_function" and node.target in _ATEN_CONVS and len(node.args) > 1:
        w = node.args[1]
        if isinstance(w, torch.fx.Node) and w.op == "get_attr":
            if len(node.args) > 4 and isinstance(node.args[4], str):
                return None  # string padding in an ATen call: not handled
            return str(w.target), _ATEN_CONVS[node.target]
    return None


def grow_kernel(
    gm: torch.fx.GraphModule, node: str, size: int | Sequence[int], *, check: bool = True
) -> torch.fx.GraphModule:
    """Return a copy of ``gm`` whose convolution ``node`` has a ``size`` kernel, same function.

    ``check`` (default on) runs the result against ``gm`` on the capture's example inputs and raises
    :class:`~r2r_fx.errors.NotPreservedError` if the function changed."""
    return GrowKernelPass(node, size, check=check).call(gm).model
