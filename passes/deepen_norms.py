"""Post-norm chains: a copy of a post-norm block (BERT's ``LN(h + f(h))``), its branches adding 0, is exactly
the norm it follows (used by ``passes/deepen_blocks.py``).

Once every branch adds 0, a copy of a post-norm block is a chain of its k stream norms N_1..N_k after the
block's own last norm P (input u, per-token variance -- or mean square, for RMSNorm -- s). A norm with
weight 1, bias 0 and eps a maps a vector of variance v to one of variance v / (v + a), so the chain
P(eps a0), N_1..N_k-1 (eps 1), N_k (eps c) gives (u - mean) / sqrt((1 + c k) s + c a0). With c = P's eps
e and a0 = 1 + k e this is (u - mean) / sqrt(1 + k e) / sqrt(s + e): N_k with P's weight times
sqrt(1 + k e) and P's bias is exactly P. (The issue's form for BERT, k = 2: eps 1 + 2e, 1, e.) Only in
float32 and float64: a bfloat16 or float16 chain rounds P's output to the dtype, about 1e-3.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx

from r2r_fx.blocks import params_of
from r2r_fx.errors import GrowthError
from r2r_fx.graph import describe, target_name
from r2r_fx.surgery import get_tensor

__all__ = ["norm_targets", "plan_chain", "set_chain"]

_NORM_ARGS = {  # the functions' arguments after the input, with their defaults
    "layer_norm": {"normalized_shape": None, "weight": None, "bias": None, "eps": 1e-5},
    "rms_norm": {"normalized_shape": None, "weight": None, "eps": None},
}
_CHAIN_DTYPES = (torch.float32, torch.float64)


@dataclass
class _Norm:
    weight: torch.Tensor | None
    bias: torch.Tensor | None
    eps: float
    shape: tuple[int, ...]


def _norm_arg(node: torch.fx.Node, name: str) -> object:
    args = _NORM_ARGS[target_name(node)]
    if name not in args:
        return None
    i = list(args).index(name) + 1
    return node.kwargs[name] if name in node.kwargs else node.args[i] if len(node.args) > i else args[name]


def norm_targets(gm: torch.fx.GraphModule, node: torch.fx.Node) -> tuple[str | None, str | None]:
    """The names of a norm's weight and bias (None where it has none)."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        return tuple(f"{node.target}.{n}" if getattr(module, n, None) is not None else None for n in ("weight", "bias"))
    out = []
    for name in ("weight", "bias"):
        value = _norm_arg(node, name)
        if value is not None and not (isinstance(value, torch.fx.Node) and value.op == "get_attr"):
            raise GrowthError(f"{describe(node, gm)} reads a computed {name}: it cannot be set")
        out.append(str(value.target) if value is not None else None)
    return out[0], out[1]


def _norm(gm: torch.fx.GraphModule, node: torch.fx.Node) -> _Norm:
    """A LayerNorm's or RMSNorm's tensors, eps and normalised shape, as the graph has them now."""
    tensors = [get_tensor(gm, t) if t is not None else None for t in norm_targets(gm, node)]
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        eps, shape = module.eps, module.normalized_shape
    else:
        eps, shape = _norm_arg(node, "eps"), _norm_arg(node, "normalized_shape")
    if eps is None:  # RMSNorm's default: the input dtype's machine epsilon (fixed from here on)
        eps = torch.finfo(node.meta["tensor_meta"].dtype).eps
    if not isinstance(eps, (int, float)):
        raise GrowthError(f"{describe(node, gm)} has a computed eps: its chain of norms cannot be set")
    if not isinstance(shape, (list, tuple, torch.Size)) or not all(isinstance(d, int) for d in shape):
        raise GrowthError(f"{describe(node, gm)} has a computed normalised shape: its chain of norms cannot be set")
    return _Norm(tensors[0], tensors[1], float(eps), tuple(shape))


def plan_chain(gm: torch.fx.GraphModule, norms: list[torch.fx.Node], own: set[int]) -> list[str]:
    """The names of a block's stream ``norms`` if a copy's chain can be set (``own``: ids of the tensors the copy
    gets its own of), [] without norms; GrowthError with the reason if it cannot."""
    if not norms:
        return []
    dtype = norms[-1].meta["tensor_meta"].dtype
    if dtype not in _CHAIN_DTYPES:
        raise GrowthError(f"a post-norm block in {dtype}: its chain of norms would round the stream to it")
    found = [_norm(gm, n) for n in norms]
    if len({n.shape for n in found}) != 1:
        raise GrowthError(f"the norms on the block's stream ({', '.join(n.name for n in norms)}) differ in shape")
    if found[-1].weight is None:
        raise GrowthError(
            f"{describe(norms[-1], gm)} ends a post-norm block without a weight: a copy's last norm could not "
            "take the scale that makes the chain of norms exact"
        )
    for node, norm in zip(norms, found):
        if any(id(t) not in own for t in (norm.weight, norm.bias) if t is not None):
            raise GrowthError(
                f"{describe(node, gm)} on a post-norm block's stream shares its tensors: it cannot be set"
            )
    if _read_elsewhere(gm, norms[-1], found[-1]):
        raise GrowthError(f"{describe(norms[-1], gm)} ends a post-norm block and shares its tensors: it cannot be set")
    return [n.name for n in norms]


def _read_elsewhere(gm: torch.fx.GraphModule, node: torch.fx.Node, norm: _Norm) -> bool:
    """Whether another op than ``node`` reads the tensors of norm ``node``."""
    ids = {id(t) for t in (norm.weight, norm.bias) if t is not None}
    for other in gm.graph.nodes:
        if other is node or (other.op == "get_attr" and set(other.users) == {node}):
            continue
        if ids & {id(p) for p in params_of(gm, [other]).values()}:
            return True
    return False


def _set_eps(gm: torch.fx.GraphModule, node: torch.fx.Node, eps: float) -> None:
    if node.op == "call_module":
        gm.get_submodule(str(node.target)).eps = eps
        return
    i = list(_NORM_ARGS[target_name(node)]).index("eps") + 1
    if "eps" in node.kwargs or len(node.args) < i:
        node.kwargs = {**node.kwargs, "eps": eps}
    else:  # eps given positionally, or the next positional argument
        node.args = (*node.args[:i], eps, *node.args[i + 1 :])


def set_chain(
    gm: torch.fx.GraphModule, norms: list[torch.fx.Node], copies: dict, twin: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, ...]:
    """Set the copy's norms (their tensors: ``twin`` of the block's) and the block's last norm ``P`` to compose
    exactly to ``P`` (see the module docstring). Returns ``P``'s tensors (the model's own, now weight 1 and bias 0)."""
    last = norms[-1]
    p = _norm(gm, last)
    k = len(norms)
    for node in norms[:-1]:
        inner = _norm(gm, node)
        if inner.weight is not None:
            twin(inner.weight).fill_(1.0)
        if inner.bias is not None:
            twin(inner.bias).zero_()
        _set_eps(gm, copies[node], 1.0)
    twin(p.weight).copy_(p.weight * math.sqrt(1 + k * p.eps))
    if p.bias is not None:
        twin(p.bias).copy_(p.bias)
    _set_eps(gm, copies[last], p.eps)
    p.weight.fill_(1.0)
    if p.bias is not None:
        p.bias.zero_()
    _set_eps(gm, last, 1 + k * p.eps)
    return tuple(t for t in (p.weight, p.bias) if t is not None)
