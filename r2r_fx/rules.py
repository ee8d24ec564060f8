"""How each op couples the channel axes of its tensors: one rule per op, in a registry users extend.

A rule looks at one fx node and tells the :class:`Couplings` builder what it knows:

* ``same(a, b)``: two (tensor, axis) slots hold the same channels in the same order;
* ``concat(whole, parts)`` / ``merge(whole, members)``: a slot is the concatenation of other slots
  (cat, split, chunk) or the row-major merge of several axes (flatten, view, reshape);
* ``bind(param, axis, slot, role, node)``: a parameter axis indexes that slot's channels, as a
  producer's rows (``"out"``), a consumer's columns (``"in"``) or a per-channel value (``"channel"``);
* ``tie(a, b)`` (grow equally), ``granularity(slot, k)`` (grow by multiples of k);
* ``freeze(slot, reason)``: this slot must keep its width.

Ops without a rule freeze every axis of every tensor they touch (fail closed). Rules work on both
graph flavours: module-level (``call_module``, torch functions, tensor methods) and ATen-level.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from r2r_fx.compat import OpOverload, aten

__all__ = [
    "RULES",
    "Couplings",
    "conv_layer",
    "fix_for",
    "linear_layer",
    "param_name",
    "register_layer",
    "register_rule",
    "rule_for",
    "shape_of",
    "tensor_shapes",
]


Slot = tuple[str, int]


class Couplings(Protocol):
    """What a rule may tell the analysis (implemented by ``r2r_fx.analysis``)."""

    def same(self, a: Slot, b: Slot) -> None: ...
    def concat(self, whole: Slot, parts: Sequence[Slot], *, equal: bool = False) -> None: ...
    def merge(self, whole: Slot, members: Sequence[Slot]) -> None: ...
    def bind(self, param: str, axis: int, slot: Slot, role: str, node: torch.fx.Node) -> None: ...
    def granularity(self, slot: Slot, k: int, node: torch.fx.Node) -> None: ...
    def freeze(self, slot: Slot, reason: str) -> None: ...
    def uses_param(self, get_attr: torch.fx.Node, user: torch.fx.Node) -> None: ...
    def module(self, target: str) -> nn.Module: ...


Rule = Callable[[Couplings, torch.fx.Node, torch.fx.GraphModule], None]
RULES: dict[Any, Rule] = {}


def register_rule(*keys: Any) -> Callable[[Rule], Rule]:
    """Register a rule for module classes, callables, ``"method:<name>"`` strings or ATen packets."""

    def wrap(rule: Rule) -> Rule:
        for key in keys:
            RULES[key] = rule
        return rule

    return wrap


WidthOf = Callable[[Slot], "int | None"]  # the grown width of a slot (None: not a tracked width)
Fix = Callable[[nn.Module, torch.fx.Node, WidthOf], None]
FIXES: dict[type, Fix] = {}
LAYERS: set[type] = set()  # layer classes capture keeps as one call (registered with register_layer)


def register_layer(cls: type, couple: Rule, fix: Fix | None = None, *, keep_as_call: bool = True) -> type:
    """One layer type, in one place: ``couple(c, node, gm)`` tells the analysis which channel axes the
    layer couples and which of its parameter axes index them (a rule, as for ops: ``c.bind``,
    ``c.same``, ``c.freeze``); ``fix(module, node, width_of)`` brings the layer's own width attributes
    in line after its parameters grew (``width_of((node_name, axis))`` is a slot's new width).

    With ``keep_as_call`` (the default) ``capture`` records the layer as one ``call_module`` instead
    of tracing through its ``forward``, so the rule sees the layer itself; subclasses are traced
    through unless registered themselves (their ``forward`` may do more). A layer whose weights are
    computed (parametrizations, hooks) is still frozen.
    """
    RULES[cls] = couple
    if fix is not None:
        FIXES[cls] = fix
    if keep_as_call:
        LAYERS.add(cls)
    return cls


def fix_for(module: nn.Module) -> Fix | None:
    """The width-attribute fix-up registered for ``module``'s class (or a base class), or None."""
    for cls in type(module).__mro__:
        if cls in FIXES:
            return FIXES[cls]
    return None


def rule_for(
    node: torch.fx.Node, gm: torch.fx.GraphModule, modules: Mapping[str, nn.Module] | None = None
) -> Rule | None:
    """The rule registered for ``node``'s op, or None.

    ``modules`` (``dict(gm.named_modules())``) spares a ``get_submodule`` walk per ``call_module`` node
    when rules are looked up for a whole graph.
    """
    if node.op == "call_module":
        target = str(node.target)
        module = modules[target] if modules is not None and target in modules else gm.get_submodule(target)
        for cls in type(module).__mro__:
            if cls in RULES:
                return RULES[cls]
        if is_stochastic_depth(module):
            return RULES.get("stochastic_depth")
        return None
    if node.op == "call_method":
        return RULES.get(f"method:{node.target}")
    if node.op == "call_function":
        target = node.target
        if isinstance(target, OpOverload):
            return RULES.get(target.overloadpacket)
        rule = RULES.get(target)
        if rule is None and getattr(target, "__name__", None) == "stochastic_depth":
            return RULES.get("stochastic_depth")
        return rule
    return None


def is_stochastic_depth(module: torch.nn.Module) -> bool:
    """torchvision's ``StochasticDepth`` layer (known by name: torchvision is optional here)."""
    kind = type(module)
    return kind.__name__ == "StochasticDepth" and kind.__module__.startswith("torchvision.")


# ---------------------------------------------------------------- helpers


def shape_of(node: Any) -> tuple[int, ...] | None:
    """Static shape of a single-tensor node, from shape propagation."""
    if not isinstance(node, torch.fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    if meta is not None and hasattr(meta, "shape") and hasattr(meta, "dtype"):
        return tuple(map(int, meta.shape))
    return None


def tensor_shapes(node: torch.fx.Node) -> list[tuple[str, tuple[int, ...]]]:
    """(slot name, shape) for every tensor a node outputs; tuple outputs get ``name#i``."""
    meta = node.meta.get("tensor_meta")
    if meta is None:
        return []
    if hasattr(meta, "shape") and hasattr(meta, "dtype"):
        return [(node.name, tuple(map(int, meta.shape)))]
    out = []
    if isinstance(meta, (tuple, list)):
        for i, item in enumerate(meta):
            if hasattr(item, "shape") and hasattr(item, "dtype"):
                out.append((f"{node.name}#{i}", tuple(map(int, item.shape))))
    return out


def param_name(node: Any) -> str | None:
    return str(node.target) if isinstance(node, torch.fx.Node) and node.op == "get_attr" else None


def _arg(node: torch.fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _norm_axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def _slots(name: str, rank: int) -> list[Slot]:
    return [(name, a) for a in range(rank)]


def freeze_all(c: Couplings, node: torch.fx.Node, reason: str) -> None:
    """The fail-closed default: every axis of every tensor in and out keeps its width."""
    for arg in node.all_input_nodes:
        for name, shape in tensor_shapes(arg):
            for slot in _slots(name, len(shape)):
                c.freeze(slot, reason)
    for name, shape in tensor_shapes(node):
        for slot in _slots(name, len(shape)):
            c.freeze(slot, reason)


def _identity(c: Couplings, src: torch.fx.Node, dst: str, rank: int, skip: Sequence[int] = ()) -> None:
    for a in range(rank):
        if a not in skip:
            c.same((src.name, a), (dst, a))


# ---------------------------------------------------------------- pointwise


_DTYPE_ONLY = {"to", "type_as", aten.to, aten._to_copy}  # another tensor argument gives only dtype/device


def _pointwise(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    x = node.args[0] if node.args else next(iter(node.kwargs.values()))
    rest = list(node.args[1:]) + list(node.kwargs.values())
    others = [a for a in rest if isinstance(a, torch.fx.Node) and tensor_shapes(a)]
    if others and getattr(node.target, "overloadpacket", node.target) not in _DTYPE_ONLY:
        _broadcast(c, node, gm)  # ``clamp(x, min=t)``: the other tensors broadcast like a binary op's
        return
    shape, out = shape_of(x), shape_of(node)
    if shape is None or out is None or shape != out:
        freeze_all(c, node, f"{_op_name(node, gm)} changes the shape")
        return
    _identity(c, x, node.name, len(shape))


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
)(_pointwise)


def _prelu(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    module = c.module(str(node.target))
    _pointwise(c, node, gm)
    if module.weight.numel() > 1:
        c.bind(f"{node.target}.weight", 0, (node.name, 1), "channel", node)


def _fix_prelu(m: nn.Module, node: torch.fx.Node, width_of: WidthOf) -> None:
    m.num_parameters = m.weight.numel()


register_layer(nn.PReLU, _prelu, _fix_prelu)


@register_rule(F.prelu, aten.prelu, aten._prelu_kernel)
def _prelu_function(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    """``prelu(x, weight)``: elementwise, with one slope per channel (axis 1) unless the weight is one value."""
    x, weight = node.args[0], _arg(node, 1, "weight")
    shape, w_shape = shape_of(x), shape_of(weight)
    if shape is None or w_shape is None or shape_of(node) != shape:
        freeze_all(c, node, f"{_op_name(node, gm)} without static shapes")
        return
    _identity(c, x, node.name, len(shape))
    if math.prod(w_shape) == 1:
        return
    name = _weight_arg(c, node, weight)
    if name is None or len(shape) < 2 or w_shape != (shape[1],):
        c.freeze(
            (node.name, 1 if len(shape) >= 2 else 0), f"{node.name} has per-channel slopes that are not a parameter"
        )
        return
    c.bind(name, 0, (node.name, 1), "channel", node)


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
        freeze_all(c, node, f"{_op_name(node, gm)} returns a tensor")
        return
    x = node.args[0] if node.args else None
    shape = shape_of(x)
    if shape is None:
        return
    axes = _queried_axes(node, len(shape))
    if not axes:
        return
    misuse = _number_use(node)
    if misuse is not None:
        for a in axes:
            c.freeze((x.name, a), f"its size is used as a number by {misuse.name}")


def _queried_axes(node: torch.fx.Node, rank: int) -> list[int]:
    """The axes whose sizes a ``size``/``shape``/``numel`` query reads (``dim()`` reads none)."""
    target = node.target
    if target == "dim" or target == "get_device" or target == "is_floating_point":
        return []
    if target is getattr:
        return list(range(rank)) if node.args[1] == "shape" else []
    if target in ("size", aten.sym_size, aten.sym_size.int):
        dim = _arg(node, 1, "dim")
        return [_norm_axis(dim, rank)] if isinstance(dim, int) else list(range(rank))
    if target == aten.sym_stride:
        return list(range(rank))
    return list(range(rank))  # numel and anything else: every axis


_SHAPE_ARGUMENT_TARGETS = ("view", "reshape", "expand", torch.reshape, aten.view.default, aten.reshape.default)


def _number_use(node: torch.fx.Node) -> torch.fx.Node | None:
    """The first user that treats a size (or an element of a shape) as a number, or None."""
    for user in node.users:
        if user.target is operator.getitem and user.args[0] is node:
            found = _number_use(user)
            if found is not None:
                return found
            continue
        if user.target in _SHAPE_ARGUMENT_TARGETS and user.args and user.args[0] is not node:
            continue
        return user
    return None


# ---------------------------------------------------------------- broadcasting binary ops


def _broadcast(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    out = shape_of(node)
    if out is None:
        freeze_all(c, node, f"{_op_name(node, gm)} has no static output shape")
        return
    for arg in list(node.args) + list(node.kwargs.values()):
        shape = shape_of(arg)
        if shape is None:
            if isinstance(arg, torch.fx.Node) and tensor_shapes(arg):
                freeze_all(c, node, f"{_op_name(node, gm)} with a tuple operand")
                return
            continue  # scalars and non-tensors
        offset = len(out) - len(shape)
        for a, size in enumerate(shape):
            if size == out[a + offset]:
                c.same((arg.name, a), (node.name, a + offset))
            else:
                c.freeze((arg.name, a), f"broadcast against a wider tensor in {node.name}")


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


# ---------------------------------------------------------------- parameterised layers


def _conv(
    c: Couplings,
    node: torch.fx.Node,
    x: torch.fx.Node,
    weight: str | None,
    bias: str | None,
    groups: int,
    transposed: bool,
    w_shape: tuple[int, ...],
    what: str,
) -> None:
    in_shape, out_shape = shape_of(x), shape_of(node)
    if in_shape is None or out_shape is None or weight is None:
        freeze_all(c, node, f"{what} without a static shape or parameter weight")
        return
    batched = len(in_shape) == len(w_shape)
    ch = 1 if batched else 0
    if batched:
        c.same((x.name, 0), (node.name, 0))
    for a in range(ch + 1, len(in_shape)):  # spatial axes are not widths
        c.freeze((x.name, a), "spatial axis")
    for a in range(ch + 1, len(out_shape)):
        c.freeze((node.name, a), "spatial axis")
    x_slot, out_slot = (x.name, ch), (node.name, ch)
    if transposed:
        if groups != 1:
            freeze_all(c, node, f"grouped transposed convolution {node.name}")
            return
        c.bind(weight, 0, x_slot, "in", node)
        c.bind(weight, 1, out_slot, "out", node)
    elif groups == 1:
        c.bind(weight, 1, x_slot, "in", node)
        c.bind(weight, 0, out_slot, "out", node)
    else:
        per_group_in, per_group_out = w_shape[1], w_shape[0] // groups
        if per_group_in != per_group_out:
            reason = f"grouped convolution {node.name} with {per_group_in} inputs and {per_group_out} outputs a group"
            c.freeze(x_slot, reason)
            c.freeze(out_slot, reason)
            return
        c.same(x_slot, out_slot)
        c.granularity(x_slot, per_group_in, node)
        c.bind(weight, 0, out_slot, "out", node)
    if bias is not None:
        c.bind(bias, 0, out_slot, "channel", node)


def _conv_module(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    m = c.module(str(node.target))
    conv_layer(c, node, groups=m.groups, transposed=isinstance(m, nn.modules.conv._ConvTransposeNd))


def conv_layer(
    c: Couplings, node: torch.fx.Node, *, weight: str = "weight", bias: str | None = "bias", groups: int = 1,
    transposed: bool = False,
) -> None:  # fmt: skip
    """Couplings of a layer that is a convolution of its input with its parameters ``weight`` (``(out,
    in/groups, *kernel)``, or ``(in, out/groups, *kernel)`` when ``transposed``) and ``bias``: for
    handlers of users' layers (:func:`register_layer`). A missing ``bias`` attribute is no bias."""
    m = c.module(str(node.target))
    w = getattr(m, weight)
    b = f"{node.target}.{bias}" if bias is not None and getattr(m, bias, None) is not None else None
    _conv(c, node, node.args[0], f"{node.target}.{weight}", b, groups, transposed, tuple(w.shape), type(m).__name__)


def linear_layer(c: Couplings, node: torch.fx.Node, *, weight: str = "weight", bias: str | None = "bias") -> None:
    """Couplings of a layer that is ``x @ weight.T + bias`` over the input's last axis (``weight``:
    ``(out, in)``): for handlers of users' layers (:func:`register_layer`)."""
    m = c.module(str(node.target))
    b = f"{node.target}.{bias}" if bias is not None and getattr(m, bias, None) is not None else None
    _linear(c, node, node.args[0], f"{node.target}.{weight}", b)


def _input_channels(node: torch.fx.Node, width_of: WidthOf) -> int | None:
    """The grown width of axis 1 of a layer's input (None: not a tracked width)."""
    x = node.args[0] if node.args else None
    return width_of((x.name, 1)) if isinstance(x, torch.fx.Node) and shape_of(x) else None


def _fix_conv(m: nn.Module, node: torch.fx.Node, width_of: WidthOf) -> None:
    w = m.weight
    if m.transposed:
        m.in_channels, m.out_channels = w.shape[0], w.shape[1] * m.groups
        return
    m.out_channels = w.shape[0]
    in_w = _input_channels(node, width_of)
    if in_w is not None:
        m.groups = max(1, in_w // w.shape[1])
        m.in_channels = w.shape[1] * m.groups


for _cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    register_layer(_cls, _conv_module, _fix_conv)


def _weight_arg(c: Couplings, node: torch.fx.Node, arg: Any) -> str | None:
    name = param_name(arg)
    if name is not None:
        c.uses_param(arg, node)
    return name


@register_rule(F.conv1d, F.conv2d, F.conv3d, aten.conv1d, aten.conv2d, aten.conv3d)
def _conv_function(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    w = _arg(node, 1, "weight")
    weight, bias = _weight_arg(c, node, w), _weight_arg(c, node, _arg(node, 2, "bias"))
    _conv(c, node, node.args[0], weight, bias, _arg(node, 6, "groups", 1), False, shape_of(w) or (), "convolution")


@register_rule(
    aten.convolution,
    aten.conv_transpose1d,
    aten.conv_transpose2d,
    aten.conv_transpose3d,
    F.conv_transpose1d,
    F.conv_transpose2d,
    F.conv_transpose3d,
)
def _convolution(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    w = _arg(node, 1, "weight")
    weight, bias = _weight_arg(c, node, w), _weight_arg(c, node, _arg(node, 2, "bias"))
    if isinstance(node.target, OpOverload) and node.target.overloadpacket == aten.convolution:
        transposed, groups = node.args[6], node.args[8]
    else:
        transposed, groups = True, _arg(node, 6, "groups", 1)
    _conv(c, node, node.args[0], weight, bias, groups, transposed, shape_of(w) or (), "convolution")


def _linear(c: Couplings, node: torch.fx.Node, x: torch.fx.Node, weight: str | None, bias: str | None) -> None:
    in_shape, out_shape = shape_of(x), shape_of(node)
    if in_shape is None or out_shape is None or weight is None:
        freeze_all(c, node, "linear layer without a static shape or parameter weight")
        return
    last = len(in_shape) - 1
    _identity(c, x, node.name, last)
    c.bind(weight, 1, (x.name, last), "in", node)
    c.bind(weight, 0, (node.name, last), "out", node)
    if bias is not None:
        c.bind(bias, 0, (node.name, last), "channel", node)


def _linear_module(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    linear_layer(c, node)


def _fix_linear(m: nn.Module, node: torch.fx.Node, width_of: WidthOf) -> None:
    m.in_features, m.out_features = m.weight.shape[1], m.weight.shape[0]


register_layer(nn.Linear, _linear_module, _fix_linear)


@register_rule(F.linear, aten.linear)
def _linear_function(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    weight = _weight_arg(c, node, _arg(node, 1, "weight"))
    bias = _weight_arg(c, node, _arg(node, 2, "bias"))
    _linear(c, node, node.args[0], weight, bias)


def _embedding(c: Couplings, node: torch.fx.Node, ids: torch.fx.Node, weight: str | None, max_norm: Any = None) -> None:
    ids_shape, out = shape_of(ids), shape_of(node)
    if ids_shape is None or out is None or weight is None:
        freeze_all(c, node, "embedding without a static shape or parameter weight")
        return
    _identity(c, ids, node.name, len(ids_shape))
    c.bind(weight, 1, (node.name, len(out) - 1), "out", node)
    if max_norm is not None:
        c.freeze((node.name, len(out) - 1), f"embedding {node.name} renormalises its rows (max_norm)")


def _embedding_module(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    _embedding(c, node, node.args[0], f"{node.target}.weight", c.module(str(node.target)).max_norm)


def _fix_embedding(m: nn.Module, node: torch.fx.Node, width_of: WidthOf) -> None:
    m.embedding_dim = m.weight.shape[1]


register_layer(nn.Embedding, _embedding_module, _fix_embedding)


@register_rule(aten.embedding)
def _embedding_aten(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    _embedding(c, node, node.args[1], _weight_arg(c, node, node.args[0]))


@register_rule(F.embedding)
def _embedding_function(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    _embedding(c, node, node.args[0], _weight_arg(c, node, _arg(node, 1, "weight")), _arg(node, 3, "max_norm"))


def _channel_norm(
    c: Couplings, node: torch.fx.Node, x: torch.fx.Node, params: Sequence[str | None], group_size: int = 1
) -> None:
    shape = shape_of(x)
    if shape is None or shape != shape_of(node) or len(shape) < 2:
        freeze_all(c, node, "normalisation without a static (N, C, ...) shape")
        return
    _identity(c, x, node.name, len(shape))
    for a in range(2, len(shape)):  # statistics are taken over these axes (all norms here, in some mode)
        c.freeze((x.name, a), f"normalised over by {node.name}")
    for p in params:
        if p is not None:
            c.bind(p, 0, (node.name, 1), "channel", node)
    if group_size > 1:
        c.granularity((node.name, 1), group_size, node)


def _norm_module(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    m = c.module(str(node.target))
    shape = shape_of(node.args[0])
    if (
        isinstance(m, nn.modules.instancenorm._InstanceNorm)
        and shape is not None
        and len(shape) == m._get_no_batch_dim()
    ):
        freeze_all(c, node, f"{type(m).__name__} {node.name} on an unbatched input")
        return
    names = ("weight", "bias", "running_mean", "running_var")
    params = [f"{node.target}.{n}" if getattr(m, n, None) is not None else None for n in names]
    group = m.num_channels // m.num_groups if isinstance(m, nn.GroupNorm) else 1
    _channel_norm(c, node, node.args[0], params, group)


def _fix_norm(m: nn.Module, node: torch.fx.Node, width_of: WidthOf) -> None:
    in_w = _input_channels(node, width_of)
    if in_w is None:
        return
    if isinstance(m, nn.GroupNorm):
        per_group = m.num_channels // m.num_groups
        m.num_channels, m.num_groups = in_w, in_w // per_group
    else:
        m.num_features = in_w


register_layer(nn.modules.batchnorm._NormBase, _norm_module, _fix_norm)
register_layer(nn.GroupNorm, _norm_module, _fix_norm)


@register_rule(
    aten.batch_norm, aten._native_batch_norm_legit_no_training, F.batch_norm, F.instance_norm, aten.instance_norm
)
def _batch_norm_function(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    target = getattr(node.target, "overloadpacket", node.target)
    if target in (F.batch_norm,):
        order = [("weight", 3), ("bias", 4), ("running_mean", 1), ("running_var", 2)]
    elif target in (F.instance_norm,):
        order = [("running_mean", 1), ("running_var", 2), ("weight", 3), ("bias", 4)]
    else:
        order = [("weight", 1), ("bias", 2), ("running_mean", 3), ("running_var", 4)]
    args = [_arg(node, i, n) for n, i in order]
    if any(a is not None and param_name(a) is None for a in args):
        freeze_all(c, node, "normalisation whose statistics are not parameters/buffers")
        return
    if target == aten._native_batch_norm_legit_no_training:
        freeze_all(c, node, "batch norm returning its statistics")
        return
    _channel_norm(c, node, node.args[0], [_weight_arg(c, node, a) for a in args])


@register_rule(F.group_norm, aten.group_norm)
def _group_norm_function(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    shape = shape_of(node.args[0])
    groups = _arg(node, 1, "num_groups")
    weight, bias = _arg(node, 2, "weight"), _arg(node, 3, "bias")
    if shape is None or not isinstance(groups, int):
        freeze_all(c, node, "group norm without static groups")
        return
    _channel_norm(c, node, node.args[0], [_weight_arg(c, node, weight), _weight_arg(c, node, bias)], shape[1] // groups)


@register_rule(nn.LayerNorm, nn.RMSNorm, F.layer_norm, F.rms_norm, aten.layer_norm, aten.rms_norm)
def _layer_norm(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    x = node.args[0]
    shape = shape_of(x)
    if node.op == "call_module":
        normalized = len(c.module(str(node.target)).normalized_shape)
    else:
        ns = node.args[1]
        normalized = len(ns) if isinstance(ns, (list, tuple)) else 1
    if shape is None or shape_of(node) != shape:
        freeze_all(c, node, "layer norm without a static shape")
        return
    rank = len(shape)
    layer = type(c.module(str(node.target))).__name__ if node.op == "call_module" else "layer_norm"
    reason = f"normalised over by {layer} {node.name} (mean/variance would change)"
    for a in range(rank - normalized, rank):
        c.freeze((x.name, a), reason)
    _identity(c, x, node.name, rank)


@register_rule(aten.addmm)
def _addmm(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    """``bias + x @ W`` with ``W`` an [in, out] parameter (HuggingFace's Conv1D in GPT-2)."""
    bias, x, w = node.args[:3]
    weight, xs, out = param_name(w), shape_of(x), shape_of(node)
    if (
        weight is None
        or param_name(bias) is None
        or xs is None
        or out is None
        or len(xs) != 2
        or shape_of(bias) != out[-1:]
    ):
        _contraction(c, node, gm)
        return
    c.uses_param(w, node)
    c.uses_param(bias, node)
    c.same((x.name, 0), (node.name, 0))
    c.bind(weight, 0, (x.name, 1), "in", node)
    c.bind(weight, 1, (node.name, 1), "out", node)
    c.bind(param_name(bias), 0, (node.name, 1), "channel", node)


@register_rule(aten._assert_tensor_metadata)
def _assert_metadata(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    """dtype/device/layout checks ignore widths; size/stride checks do not."""
    if _arg(node, 1, "size") is not None or _arg(node, 2, "stride") is not None:
        freeze_all(c, node, f"{node.name} asserts a tensor's sizes")


@register_rule(nn.MultiheadAttention)
def _attention_module(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    freeze_all(c, node, f"attention {node.name}: widening attention heads is not supported yet")


@register_rule(
    F.scaled_dot_product_attention,
    aten.scaled_dot_product_attention,
    torch.matmul,
    torch.bmm,
    aten.matmul,
    aten.bmm,
    aten.mm,
    "method:matmul",
    operator.matmul,
    torch.einsum,
    aten.baddbmm,
    torch.baddbmm,
)
def _contraction(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    freeze_all(c, node, f"{_op_name(node, gm)} contracts activations (attention-style products are not widened)")


# ---------------------------------------------------------------- spatial ops: channels pass through


def _spatial(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    x = node.args[0]
    in_shape = shape_of(x)
    outs = tensor_shapes(node)
    if in_shape is None or not outs or len(in_shape) < 2:
        freeze_all(c, node, f"{_op_name(node, gm)} without a static (N, C, ...) shape")
        return
    for name, shape in outs:
        if len(shape) != len(in_shape) or shape[:2] != in_shape[:2]:
            freeze_all(c, node, f"{_op_name(node, gm)} changes the batch or channel size")
            return
        c.same((x.name, 0), (name, 0))
        c.same((x.name, 1), (name, 1))
        for a in range(2, len(shape)):
            c.freeze((name, a), "spatial axis")
    for a in range(2, len(in_shape)):
        c.freeze((x.name, a), "spatial axis")


register_rule(
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.Upsample,
    nn.UpsamplingNearest2d,
    nn.UpsamplingBilinear2d,
    nn.LPPool2d,
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d,
    F.adaptive_max_pool2d,
    F.adaptive_max_pool3d,
    F.interpolate,
    F.upsample,
    torch.nn.functional.lp_pool2d,
    *(
        getattr(aten, n)
        for n in (
            "max_pool1d",
            "max_pool2d",
            "max_pool3d",
            "max_pool2d_with_indices",
            "max_pool3d_with_indices",
            "avg_pool1d",
            "avg_pool2d",
            "avg_pool3d",
            "adaptive_avg_pool1d",
            "adaptive_avg_pool2d",
            "adaptive_avg_pool3d",
            "_adaptive_avg_pool2d",
            "_adaptive_avg_pool3d",
            "adaptive_max_pool1d",
            "adaptive_max_pool2d",
            "adaptive_max_pool3d",
            "upsample_nearest1d",
            "upsample_nearest2d",
            "upsample_nearest3d",
            "upsample_bilinear2d",
            "upsample_linear1d",
            "upsample_bicubic2d",
            "upsample_trilinear3d",
            "_upsample_nearest_exact2d",
            "_upsample_bilinear2d_aa",
        )
        if hasattr(aten, n)
    ),
)(_spatial)


@register_rule(
    F.pad,
    aten.pad,
    aten.constant_pad_nd,
    aten.reflection_pad2d,
    aten.replication_pad2d,
    nn.ZeroPad2d,
    nn.ConstantPad2d,
    nn.ReflectionPad2d,
    nn.ReplicationPad2d,
    nn.ZeroPad1d,
    nn.ConstantPad1d,
    nn.ReflectionPad1d,
    nn.ReplicationPad1d,
    nn.ConstantPad3d,
    nn.ZeroPad3d,
)
def _pad(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    x = node.args[0]
    shape = shape_of(x)
    if node.op == "call_module":
        pad = c.module(str(node.target)).padding
    else:
        pad = _arg(node, 1, "pad")
    if shape is None or not isinstance(pad, (list, tuple)):
        freeze_all(c, node, "padding without static sizes")
        return
    padded_axes = len(pad) // 2  # pads the last axes, last axis first
    rank = len(shape)
    out = shape_of(node)
    for a in range(rank):
        if a >= rank - padded_axes:
            c.freeze((x.name, a), "padded axis")
            c.freeze((node.name, a), "padded axis")
        elif out is not None and out[a] == shape[a]:
            c.same((x.name, a), (node.name, a))
        else:
            c.freeze((x.name, a), "padded axis")


# ---------------------------------------------------------------- reductions and softmax


def _reduce_axes(node: torch.fx.Node, rank: int) -> tuple[list[int], bool] | None:
    dims = _arg(node, 1, "dim")
    if dims is None and len(node.args) < 2 and "dim" not in node.kwargs:
        return list(range(rank)), bool(node.kwargs.get("keepdim", False))
    if isinstance(dims, int):
        dims = [dims]
    if not isinstance(dims, (list, tuple)) or not all(isinstance(d, int) for d in dims):
        return None
    keepdim = _arg(node, 2, "keepdim", False)
    return sorted(_norm_axis(d, rank) for d in dims), bool(keepdim)


def _reduction(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    x = node.args[0]
    shape = shape_of(x)
    parsed = _reduce_axes(node, len(shape)) if shape is not None else None
    if parsed is None or shape_of(node) is None:
        freeze_all(c, node, f"{_op_name(node, gm)} over dynamic axes")
        return
    axes, keepdim = parsed
    out_axis = 0
    for a in range(len(shape)):
        if a in axes:
            c.freeze((x.name, a), f"reduced over by {node.name}")
            if keepdim:
                c.freeze((node.name, out_axis), f"reduced by {node.name}")
                out_axis += 1
        else:
            c.same((x.name, a), (node.name, out_axis))
            out_axis += 1


register_rule(
    torch.mean,
    torch.sum,
    torch.amax,
    torch.amin,
    *(f"method:{m}" for m in ("mean", "sum", "amax", "amin")),
    aten.mean,
    aten.sum,
    aten.amax,
    aten.amin,
)(_reduction)


@register_rule(
    F.softmax,
    F.log_softmax,
    torch.softmax,
    torch.log_softmax,
    "method:softmax",
    "method:log_softmax",
    aten.softmax,
    aten._softmax,
    aten.log_softmax,
    aten._log_softmax,
    nn.Softmax,
    nn.LogSoftmax,
)
def _softmax(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    x = node.args[0]
    shape = shape_of(x)
    dim = c.module(str(node.target)).dim if node.op == "call_module" else _arg(node, 1, "dim")
    if shape is None or not isinstance(dim, int):
        freeze_all(c, node, "softmax over a dynamic axis")
        return
    dim = _norm_axis(dim, len(shape))
    _identity(c, x, node.name, len(shape), skip=[dim])
    c.freeze((x.name, dim), f"softmax axis of {node.name}")
    c.freeze((node.name, dim), f"softmax axis of {node.name}")


# ---------------------------------------------------------------- structure: cat, split, views


@register_rule(torch.cat, torch.concat, aten.cat, aten.concat)
def _cat(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    tensors = _arg(node, 0, "tensors")
    dim = _arg(node, 1, "dim", 0)
    out = shape_of(node)
    if out is None or not isinstance(tensors, (list, tuple)) or not isinstance(dim, int):
        freeze_all(c, node, "concatenation without static shapes")
        return
    dim = _norm_axis(dim, len(out))
    parts = []
    for t in tensors:
        shape = shape_of(t)
        if shape is None or len(shape) != len(out):
            freeze_all(c, node, "concatenation of tensors of other ranks")
            return
        _identity(c, t, node.name, len(out), skip=[dim])
        parts.append((t.name, dim))
    c.concat((node.name, dim), parts)


def _split(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule, chunked: bool) -> None:
    """split / chunk: the pieces are a concatenation along ``dim``; every other axis is shared."""
    x = node.args[0]
    shape = shape_of(x)
    outs = tensor_shapes(node)
    if shape is None or not outs:
        freeze_all(c, node, f"{_op_name(node, gm)} without static shapes")
        return
    dim = _arg(node, 2, "dim", 0)
    if not isinstance(dim, int):
        freeze_all(c, node, "split along a dynamic axis")
        return
    dim = _norm_axis(dim, len(shape))
    sizes = [s[dim] for _, s in outs]
    chunks = _arg(node, 1, "chunks") if chunked else None
    equal = chunked or isinstance(_arg(node, 1, "split_size"), int)
    if equal and len(set(sizes)) != 1:
        freeze_all(c, node, f"{node.name} splits into unequal parts")
        return
    if chunks is not None and len(outs) != chunks:  # chunk(3) of 1 channel is one piece; of 3 it is three
        freeze_all(c, node, f"{node.name} makes {len(outs)} pieces, not {chunks}")
        return
    for out_name, _out_shape in outs:
        for a in range(len(shape)):
            if a != dim:
                c.same((x.name, a), (out_name, a))
    c.concat((x.name, dim), [(n, dim) for n, _ in outs], equal=equal)


register_rule(torch.split, "method:split", aten.split, aten.split_with_sizes)(
    lambda c, node, gm: _split(c, node, gm, chunked=False)
)
register_rule(torch.chunk, "method:chunk", aten.chunk)(lambda c, node, gm: _split(c, node, gm, chunked=True))


@register_rule(torch.tensor_split, torch.unbind, "method:unbind", "method:tensor_split", aten.unbind)
def _unsupported_split(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    freeze_all(c, node, f"{_op_name(node, gm)} is not supported")


@register_rule(operator.getitem)
def _getitem(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    src, index = node.args
    if not isinstance(src, torch.fx.Node):
        return
    if shape_of(src) is None:  # element of a tuple output
        if isinstance(index, int) and tensor_shapes(node):
            slots = dict(tensor_shapes(src))
            key = f"{src.name}#{index if index >= 0 else len(slots) + index}"
            if key in slots:
                _identity_named(c, key, node.name, len(slots[key]))
        return
    _index_tensor(c, node, src, index)


def _identity_named(c: Couplings, src: str, dst: str, rank: int) -> None:
    for a in range(rank):
        c.same((src, a), (dst, a))


def expand_ellipsis(items: list[Any], rank: int) -> list[Any]:
    """Index items with ``...`` replaced by the full slices it stands for."""
    if Ellipsis not in items:
        return items
    at = items.index(Ellipsis)
    fill = rank - (len(items) - 1 - sum(1 for i in items if i is None))
    return items[:at] + [slice(None)] * fill + items[at + 1 :]


def _index_tensor(c: Couplings, node: torch.fx.Node, src: torch.fx.Node, index: Any) -> None:
    shape, out = shape_of(src), shape_of(node)
    items = list(index) if isinstance(index, tuple) else [index]
    if out is None or any(isinstance(i, torch.fx.Node) for i in items):
        freeze_all(c, node, f"tensor indexing in {node.name}")
        return
    items = expand_ellipsis(items, len(shape))
    in_axis, out_axis = 0, 0
    for item in items:
        if item is None:  # a new size-1 axis: nothing could give it more channels
            c.freeze((node.name, out_axis), f"size-1 axis made by {node.name}")
            out_axis += 1
            continue
        if isinstance(item, int):
            c.freeze((src.name, in_axis), f"indexed by {node.name}")
            in_axis += 1
            continue
        if isinstance(item, slice) and any(isinstance(v, torch.fx.Node) for v in (item.start, item.stop, item.step)):
            c.freeze((src.name, in_axis), f"sliced by {node.name} at a computed position")
            c.freeze((node.name, out_axis), f"sliced by {node.name} at a computed position")
            in_axis += 1
            out_axis += 1
            continue
        if isinstance(item, slice):
            full = slice(*item.indices(shape[in_axis])) == slice(0, shape[in_axis], 1)
            if full:
                c.same((src.name, in_axis), (node.name, out_axis))
            else:
                c.freeze((src.name, in_axis), f"sliced by {node.name}")
                c.freeze((node.name, out_axis), f"sliced by {node.name}")
            in_axis += 1
            out_axis += 1
            continue
        freeze_all(c, node, f"unsupported index {item!r} in {node.name}")
        return
    while in_axis < len(shape):
        c.same((src.name, in_axis), (node.name, out_axis))
        in_axis += 1
        out_axis += 1


@register_rule(aten.slice)
def _slice(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    x = node.args[0]
    shape = shape_of(x)
    dim = _arg(node, 1, "dim", 0)
    start, end, step = _arg(node, 2, "start", None), _arg(node, 3, "end", None), _arg(node, 4, "step", 1)
    if shape is None or not isinstance(dim, int):
        freeze_all(c, node, "slice along a dynamic axis")
        return
    items = [slice(None)] * len(shape)
    items[_norm_axis(dim, len(shape))] = slice(start, end, step)
    if any(isinstance(v, torch.fx.Node) for v in (start, end, step)):
        freeze_all(c, node, f"dynamic slice in {node.name}")
        return
    _index_tensor(c, node, x, tuple(items))


@register_rule(aten.select)
def _select(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    x, dim, index = node.args[:3]
    shape = shape_of(x)
    if shape is None or not isinstance(index, int):
        freeze_all(c, node, "dynamic select")
        return
    items = [slice(None)] * len(shape)
    items[_norm_axis(dim, len(shape))] = index
    _index_tensor(c, node, x, tuple(items))


def _permutation(order_of: Callable[[torch.fx.Node, int], list[int]]) -> Rule:
    """A rule for an op that reorders axes: output axis ``i`` is input axis ``order_of(node, rank)[i]``."""

    def rule(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
        x = node.args[0]
        shape = shape_of(x)
        if shape is None:
            freeze_all(c, node, "permutation without a static shape")
            return
        for out_axis, in_axis in enumerate(order_of(node, len(shape))):
            c.same((x.name, in_axis), (node.name, out_axis))

    return rule


def _permute_order(node: torch.fx.Node, rank: int) -> list[int]:
    first = _arg(node, 1, "dims")
    dims = first if isinstance(first, (list, tuple)) else node.args[1:]
    return [_norm_axis(d, rank) for d in dims]


def _swap_order(node: torch.fx.Node, rank: int) -> list[int]:
    order = list(range(rank))
    a, b = _norm_axis(_arg(node, 1, "dim0"), rank), _norm_axis(_arg(node, 2, "dim1"), rank)
    order[a], order[b] = order[b], order[a]
    return order


def _movedim_order(node: torch.fx.Node, rank: int) -> list[int]:
    src, dst = _arg(node, 1, "source"), _arg(node, 2, "destination")
    src = [_norm_axis(d, rank) for d in (src if isinstance(src, (list, tuple)) else [src])]
    dst = [_norm_axis(d, rank) for d in (dst if isinstance(dst, (list, tuple)) else [dst])]
    order: list[int | None] = [None] * rank
    for s_axis, d_axis in zip(src, dst):
        order[d_axis] = s_axis
    rest = iter(a for a in range(rank) if a not in src)
    return [a if a is not None else next(rest) for a in order]


register_rule(torch.permute, "method:permute", aten.permute)(_permutation(_permute_order))
register_rule(torch.transpose, "method:transpose", aten.transpose, torch.swapaxes, "method:swapaxes")(
    _permutation(_swap_order)
)
register_rule(torch.movedim, "method:movedim", aten.movedim)(_permutation(_movedim_order))
register_rule("method:t", aten.t, torch.t)(_permutation(lambda node, rank: list(range(rank))[::-1]))


def _same_as_template(c: Couplings, node: torch.fx.Node) -> None:
    """``x.view_as(y)`` / ``expand_as(y)`` take their shape from ``y`` at run time: couple the two."""
    if node.target in ("view_as", "reshape_as", "expand_as") and len(node.args) > 1:
        template = node.args[1]
        if shape_of(template) is not None and shape_of(template) == shape_of(node):
            _identity(c, template, node.name, len(shape_of(node)))
        else:
            freeze_all(c, node, f"{node.name} takes its shape from a tensor of another shape")


def _reshape(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    x = node.args[0]
    shape, out = shape_of(x), shape_of(node)
    if shape is None or out is None:
        freeze_all(c, node, "reshape without static shapes")
        return
    _same_as_template(c, node)
    blocks = factor_reshape(shape, out)
    if blocks is None:
        freeze_all(c, node, f"{node.name} reshapes across several axes at once")
        return
    for ins, outs in blocks:
        if len(ins) == 1 and len(outs) == 1:
            c.same((x.name, ins[0]), (node.name, outs[0]))
        elif len(outs) == 1:
            c.merge((node.name, outs[0]), [(x.name, a) for a in ins])
        elif len(ins) == 1:
            c.merge((x.name, ins[0]), [(node.name, a) for a in outs])
        else:
            for a in ins:
                c.freeze((x.name, a), f"{node.name} mixes several axes")
            for a in outs:
                c.freeze((node.name, a), f"{node.name} mixes several axes")
    mapped_in = {a for ins, _ in blocks for a in ins}
    for a, _size in enumerate(shape):
        if a not in mapped_in:
            c.freeze((x.name, a), f"size-1 axis dropped by {node.name}")
    mapped_out = {a for _, outs in blocks for a in outs}
    for a in range(len(out)):
        if a not in mapped_out:  # nothing can give a new size-1 axis more channels
            c.freeze((node.name, a), f"size-1 axis made by {node.name}")


def factor_reshape(src: Sequence[int], dst: Sequence[int]) -> list[tuple[list[int], list[int]]] | None:
    """Pair runs of source axes with runs of destination axes of equal product (size-1 axes skipped)."""
    i_axes = [a for a, s in enumerate(src) if s != 1]
    o_axes = [a for a, s in enumerate(dst) if s != 1]
    if math.prod(src) != math.prod(dst):
        return None
    blocks: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(i_axes) and j < len(o_axes):
        ins, outs = [i_axes[i]], [o_axes[j]]
        pi, po = src[i_axes[i]], dst[o_axes[j]]
        i, j = i + 1, j + 1
        while pi != po:
            if pi < po:
                if i >= len(i_axes):
                    return None
                ins.append(i_axes[i])
                pi *= src[i_axes[i]]
                i += 1
            else:
                if j >= len(o_axes):
                    return None
                outs.append(o_axes[j])
                po *= dst[o_axes[j]]
                j += 1
        blocks.append((ins, outs))
    return blocks


register_rule(
    torch.flatten,
    torch.reshape,
    "method:view",
    "method:reshape",
    "method:flatten",
    "method:squeeze",
    "method:unsqueeze",
    "method:unflatten",
    torch.squeeze,
    torch.unsqueeze,
    torch.unflatten,
    nn.Flatten,
    "method:view_as",
    "method:reshape_as",
    *(
        getattr(aten, n)
        for n in (
            "view",
            "reshape",
            "_unsafe_view",
            "flatten",
            "unflatten",
            "squeeze",
            "unsqueeze",
            "squeeze_copy",
            "view_copy",
        )
    ),
)(_reshape)


def _fix_unflatten(m: nn.Module, node: torch.fx.Node, width_of: WidthOf) -> None:
    out = shape_of(node)
    if out is not None:
        dim = m.dim if m.dim >= 0 else len(out) + m.dim
        m.unflattened_size = tuple(width_of((node.name, dim + i)) or s for i, s in enumerate(m.unflattened_size))


register_layer(nn.Unflatten, _reshape, _fix_unflatten)


@register_rule("method:expand", aten.expand, "method:expand_as")
def _expand(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    x = node.args[0]
    shape, out = shape_of(x), shape_of(node)
    if shape is None or out is None:
        freeze_all(c, node, "expand without static shapes")
        return
    _same_as_template(c, node)
    offset = len(out) - len(shape)
    for a, size in enumerate(shape):
        if size == out[a + offset]:
            c.same((x.name, a), (node.name, a + offset))
        else:
            c.freeze((x.name, a), f"broadcast by {node.name}")


@register_rule(torch.stack, aten.stack)
def _stack(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    tensors, dim = _arg(node, 0, "tensors"), _arg(node, 1, "dim", 0)
    out = shape_of(node)
    if out is None or not isinstance(dim, int) or not isinstance(tensors, (list, tuple)):
        freeze_all(c, node, "stack without static shapes")
        return
    dim = _norm_axis(dim, len(out))
    for t in tensors:
        for a in range(len(out) - 1):
            c.same((t.name, a), (node.name, a if a < dim else a + 1))
    c.freeze((node.name, dim), f"stacked axis of {node.name}")


def _op_name(node: torch.fx.Node, gm: torch.fx.GraphModule) -> str:
    if node.op == "call_module":
        return f"{type(gm.get_submodule(str(node.target))).__name__} {node.name}"
    target = node.target
    return f"{getattr(target, '__name__', target)} {node.name}"
