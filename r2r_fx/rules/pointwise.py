"""Elementwise ops, shape and dtype queries, and broadcasting binary ops: channels pass through."""

from __future__ import annotations

import operator

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from r2r_fx.compat import aten
from r2r_fx.graph import describe, shape_of, tensor_shapes
from r2r_fx.rules.common import broadcast_into, freeze_all, node_arg, positive_axis, same_axes
from r2r_fx.rules.registry import Couplings, register_rule

_DTYPE_ONLY = {"to", "type_as", aten.to, aten._to_copy, aten.type_as}  # another tensor argument gives only dtype/device


def elementwise(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    x = node.args[0] if node.args else next(iter(node.kwargs.values()))
    rest = list(node.args[1:]) + list(node.kwargs.values())
    others = [a for a in rest if isinstance(a, torch.fx.Node) and tensor_shapes(a)]
    if others and getattr(node.target, "overloadpacket", node.target) not in _DTYPE_ONLY:
        _broadcast(c, node, gm)  # ``clamp(x, min=t)``: the other tensors broadcast like a binary op's
        return
    shape, out = shape_of(x), shape_of(node)
    if shape is None or out is None or shape != out:
        freeze_all(c, node, f"{describe(node, gm)} changes the shape")
        return
    same_axes(c, x, node.name, len(shape))


_POINTWISE_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.Softplus,
    nn.Softsign,
    nn.Tanhshrink,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.LogSigmoid,
)
_POINTWISE_FUNCTIONS = (
    torch.relu,
    torch.relu_,
    F.relu,
    F.relu_,
    F.relu6,
    F.gelu,
    F.silu,
    F.mish,
    F.hardswish,
    F.hardsigmoid,
    F.hardtanh,
    F.leaky_relu,
    F.elu,
    F.selu,
    F.celu,
    F.softplus,
    F.sigmoid,
    torch.sigmoid,
    F.tanh,
    torch.tanh,
    F.dropout,
    F.dropout1d,
    F.dropout2d,
    F.dropout3d,
    F.alpha_dropout,
    torch.clamp,
    torch.clip,
    torch.neg,
    operator.neg,
    torch.exp,
    torch.abs,
    torch.sqrt,
    torch.rsqrt,
    F.logsigmoid,
    torch.nn.functional.hardshrink,
    torch.erf,
    torch.square,
)
_POINTWISE_METHODS = (
    "relu",
    "relu_",
    "sigmoid",
    "sigmoid_",
    "tanh",
    "tanh_",
    "clamp",
    "clamp_",
    "clamp_min",
    "clip",
    "contiguous",
    "clone",
    "detach",
    "float",
    "half",
    "double",
    "bfloat16",
    "to",
    "type_as",
    "abs",
    "neg",
    "exp",
    "sqrt",
    "rsqrt",
    "square",
    "hardtanh_",
    "erf",
)
_POINTWISE_ATEN = (
    "relu",
    "relu_",
    "relu6",
    "gelu",
    "gelu_",
    "silu",
    "silu_",
    "mish",
    "hardswish",
    "hardswish_",
    "hardsigmoid",
    "hardsigmoid_",
    "hardtanh",
    "hardtanh_",
    "leaky_relu",
    "leaky_relu_",
    "elu",
    "elu_",
    "selu",
    "celu",
    "softplus",
    "sigmoid",
    "sigmoid_",
    "tanh",
    "tanh_",
    "clamp",
    "clamp_",
    "clamp_min",
    "clamp_max",
    "clip",
    "clone",
    "contiguous",
    "alias",
    "detach",
    "_to_copy",
    "to",
    "type_as",
    "neg",
    "exp",
    "abs",
    "sqrt",
    "rsqrt",
    "erf",
    "square",
    "dropout",
    "feature_dropout",
    "alpha_dropout",
    "log_sigmoid",
    "lift_fresh_copy",
)
register_rule(
    *_POINTWISE_MODULES,
    *_POINTWISE_FUNCTIONS,
    "stochastic_depth",
    *(f"method:{m}" for m in _POINTWISE_METHODS),
    *(getattr(aten, n) for n in _POINTWISE_ATEN if hasattr(aten, n)),
)(elementwise)


@register_rule(
    getattr,
    "method:size",
    "method:dim",
    "method:numel",
    torch.numel,
    aten.sym_size,
    aten.sym_numel,
    aten.sym_stride,
    torch._assert,
    "method:get_device",
    "method:is_floating_point",
)
def _metadata(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    """Shape/dtype queries read a tensor without coupling channels (sizes stay symbolic in the graph).

    A size is evaluated again when the grown model runs, so it may only be passed on as it is to a
    reshape or expand, whose rule keeps the layout consistent; any other use (arithmetic, a new
    tensor of that size, a comparison) would see the grown width, so the axes it was read from freeze.
    """
    if tensor_shapes(node):
        freeze_all(c, node, f"{describe(node, gm)} returns a tensor")
        return
    x = node.args[0] if node.args else None
    shape = shape_of(x)
    if shape is None:
        return
    axes = _queried_axes(node, len(shape))
    if not axes:
        return
    for a, misuse in _misused_axes(node, axes, len(shape)).items():
        c.freeze((x.name, a), f"its size is used as a number by {misuse.name}")


def _misused_axes(node: torch.fx.Node, axes: list[int], rank: int) -> dict[int, torch.fx.Node]:
    """Axis -> the first user treating its size as a number; ``x.shape[i]`` (an int index) reads axis i
    only, any other use of the whole shape reads every queried axis."""
    found: dict[int, torch.fx.Node] = {}
    for user in node.users:
        index = user.args[1] if user.target is operator.getitem and user.args[0] is node else None
        if isinstance(index, int) and len(axes) == rank and -rank <= index < rank:
            misuse, hit = _number_use(user), [positive_axis(index, rank)]
        else:
            misuse, hit = _number_use_of(user, node), axes
        for a in hit if misuse is not None else ():
            found.setdefault(a, misuse)
    return found


def _number_use_of(user: torch.fx.Node, node: torch.fx.Node) -> torch.fx.Node | None:
    """Whether ``user`` (of the size query ``node``) treats a size as a number: ``_number_use`` for one user."""
    if user.target is operator.getitem and user.args[0] is node:
        return _number_use(user)
    if user.target in _SHAPE_ARGUMENT_TARGETS and user.args and user.args[0] is not node:
        return None
    return user


def _queried_axes(node: torch.fx.Node, rank: int) -> list[int]:
    """The axes whose sizes a ``size``/``shape``/``numel`` query reads (``dim()`` reads none)."""
    target = node.target
    if target == "dim" or target == "get_device" or target == "is_floating_point":
        return []
    if target is getattr:
        return list(range(rank)) if node.args[1] == "shape" else []
    if target in ("size", aten.sym_size, aten.sym_size.int):
        dim = node_arg(node, 1, "dim")
        return [positive_axis(dim, rank)] if isinstance(dim, int) else list(range(rank))
    if target == aten.sym_stride:
        return list(range(rank))
    return list(range(rank))  # numel and anything else: every axis


_SHAPE_ARGUMENT_TARGETS = ("view", "reshape", "expand", torch.reshape, aten.view.default, aten.reshape.default)


def _number_use(node: torch.fx.Node) -> torch.fx.Node | None:
    """The first user that treats a size (or an element of a shape) as a number, or None."""
    for user in node.users:
        found = _number_use_of(user, node)
        if found is not None:
            return found
    return None


# ---------------------------------------------------------------- broadcasting binary ops


def _broadcast(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    out = shape_of(node)
    if out is None:
        freeze_all(c, node, f"{describe(node, gm)} has no static output shape")
        return
    for arg in list(node.args) + list(node.kwargs.values()):
        shape = shape_of(arg)
        if shape is None:
            if isinstance(arg, torch.fx.Node) and tensor_shapes(arg):
                freeze_all(c, node, f"{describe(node, gm)} with a tuple operand")
                return
            continue  # scalars and non-tensors
        broadcast_into(c, arg, shape, node, out)


register_rule(
    operator.add,
    operator.iadd,
    operator.sub,
    operator.isub,
    operator.mul,
    operator.imul,
    operator.truediv,
    operator.itruediv,
    torch.add,
    torch.sub,
    torch.mul,
    torch.div,
    torch.maximum,
    torch.minimum,
    torch.where,
    torch.masked_fill,
    torch.pow,
    operator.pow,
    "method:pow",
    *(f"method:{m}" for m in ("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "masked_fill")),
    *(
        getattr(aten, n)
        for n in (
            "add",
            "add_",
            "sub",
            "sub_",
            "mul",
            "mul_",
            "div",
            "div_",
            "maximum",
            "minimum",
            "where",
            "masked_fill",
            "rsub",
            "pow",
        )
    ),
)(_broadcast)
