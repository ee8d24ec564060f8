"""Norms written out as ops: the decomposed RMSNorm idiom, recognised by its dataflow.

HuggingFace's LlamaRMSNorm (and Qwen2's, Mistral's, Gemma's ``(1 + w)`` variant, and the same line
written by hand) is traced as ops, not as one norm::

    s = square(x)                      # x.pow(2), x * x, x.square()
    ms = s.mean(-1, keepdim=True)      # over the last axis only
    y = x * rsqrt(ms + eps)            # or x / sqrt(ms + eps); eps optional, a constant
    out = w * y.to(dtype)              # optional casts, then optional w or (1 + w)

Maths: for a stream grown by whole copies, ``x' = [x, ..., x]`` (``k`` copies of ``d`` channels),
``mean(x'^2) = (1/kd) * k * sum x^2 = mean(x^2)``, so ``y' = [y, ..., y]`` with eps unchanged, and a
per-channel ``w`` repeated ``k`` times gives ``out' = [out, ..., out]``: the RMSNorm of the stream, as
``nn.RMSNorm`` grows. The reduction rule calls :func:`decomposed_rms_norm` on every mean; a match
registers the norm (``Couplings.normalize``, kind ``"rms"``) instead of freezing the reduced axis.

Fail closed: anything else keeps the reduction's freeze: a mean over another axis or without
keepdim, a square, mean, shift or root read by another op too, a root multiplied onto a tensor other
than the one squared, a non-constant eps.
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Number

import torch.fx

from r2r_fx.compat import aten
from r2r_fx.graph import shape_of, target_name

__all__ = ["CASTS", "RMSIdiom", "decomposed_rms_norm", "real_users"]

CASTS = frozenset({"to", "_to_copy", "type_as", "float", "double", "half", "bfloat16"})  # dtype/device only


@dataclass(frozen=True)
class RMSIdiom:
    """A matched decomposed RMSNorm: ``x`` the normalised tensor, ``out`` the norm's output (after the
    weight multiply when ``affine``), ``weight`` the get_attr node of ``w`` (None: not a parameter
    read directly), ``offset`` 1.0 for Gemma's ``(1 + w)``, ``eps`` the node adding eps."""

    x: torch.fx.Node
    out: torch.fx.Node
    affine: bool
    weight: torch.fx.Node | None = None
    offset: float = 0.0
    eps: torch.fx.Node | None = None  # the ``ms + eps`` node (None: no eps)


def real_users(node: torch.fx.Node) -> list[torch.fx.Node]:
    """The users that read ``node``'s values (ATen graphs add metadata assertions on casts)."""
    return [u for u in node.users if getattr(u.target, "overloadpacket", None) is not aten._assert_tensor_metadata]


def _op(node: object) -> str | None:
    if not isinstance(node, torch.fx.Node) or node.op not in ("call_function", "call_method"):
        return None
    return target_name(node)


def _only_user(node: torch.fx.Node) -> torch.fx.Node | None:
    users = real_users(node)
    return users[0] if len(users) == 1 else None


def _squared(s: torch.fx.Node) -> torch.fx.Node | None:
    """``x`` when ``s`` is ``x ** 2``, ``x * x`` or ``x.square()``."""
    name, args = _op(s), s.args
    if s.kwargs and name != "pow":
        return None
    if name == "pow" and len(args) >= 1 and isinstance(args[0], torch.fx.Node):
        exponent = args[1] if len(args) > 1 else s.kwargs.get("exponent")
        return args[0] if exponent == 2 and not isinstance(exponent, bool) else None
    if name == "mul" and len(args) == 2 and isinstance(args[0], torch.fx.Node) and args[0] is args[1]:
        return args[0]
    if name == "square" and len(args) == 1 and isinstance(args[0], torch.fx.Node):
        return args[0]
    return None


def _plus_constant(node: torch.fx.Node, operand: torch.fx.Node) -> bool:
    """``node`` is ``operand + c`` (or ``c + operand``) with ``c`` a non-negative number."""
    if _op(node) != "add" or node.kwargs or len(node.args) != 2 or operand not in node.args:
        return False
    other = node.args[1] if node.args[0] is operand else node.args[0]
    return isinstance(other, Number) and not isinstance(other, bool) and other >= 0


def _normalised(root: torch.fx.Node, x: torch.fx.Node) -> torch.fx.Node | None:
    """The node computing ``x * rsqrt(v)`` or ``x / sqrt(v)`` from ``root`` (``v``), or None."""
    name = _op(root)
    final = _only_user(root)
    if final is None or final.kwargs:
        return None
    if name == "rsqrt" and _op(final) == "mul" and len(final.args) == 2 and set(final.args) == {x, root}:
        return final
    if name == "sqrt" and _op(final) in ("div", "truediv") and tuple(final.args) == (x, root):
        return final
    return None


def _weight(node: object) -> tuple[torch.fx.Node, float] | None:
    """``(get_attr, offset)`` when ``node`` is a parameter ``w`` (maybe cast) or ``1 + w``."""
    offset = 0.0
    if _op(node) == "add" and not node.kwargs and len(node.args) == 2:
        ints = [a for a in node.args if isinstance(a, Number) and not isinstance(a, bool)]
        tensors = [a for a in node.args if isinstance(a, torch.fx.Node)]
        if len(ints) != 1 or len(tensors) != 1 or _only_user(tensors[0]) is not node:
            return None
        offset, node = float(ints[0]), tensors[0]
    while _op(node) in CASTS and _only_user(node.args[0]) is node:
        node = node.args[0]
    if isinstance(node, torch.fx.Node) and node.op == "get_attr":
        return node, offset
    return None


def decomposed_rms_norm(mean: torch.fx.Node, axes: list[int], keepdim: bool) -> RMSIdiom | None:
    """The RMSNorm idiom around ``mean`` (a mean over ``axes``, positive), or None (see the module
    docstring for what matches)."""
    s = mean.args[0] if mean.args else None
    x = _squared(s) if isinstance(s, torch.fx.Node) else None
    shape = shape_of(x)
    if x is None or shape is None or axes != [len(shape) - 1] or not keepdim or "dtype" in mean.kwargs:
        return None
    if list(s.users) != [mean]:
        return None
    root, eps = _only_user(mean), None
    if root is not None and _plus_constant(root, mean):
        root, eps = _only_user(root), root
    if root is None:
        return None
    y = _normalised(root, x)
    if y is None or shape_of(y) != shape:
        return None
    # Optional casts, then an optional multiply by a per-channel weight: the norm's output.
    last, cast = y, _only_user(y)
    while cast is not None and _op(cast) in CASTS and cast.args[0] is last:
        last, cast = cast, _only_user(cast)
    if cast is not None and _op(cast) == "mul" and len(cast.args) == 2 and not cast.kwargs and last in cast.args:
        other = cast.args[1] if cast.args[0] is last else cast.args[0]
        found = _weight(other)
        if found is not None and shape_of(found[0]) == (shape[-1],) and shape_of(cast) == shape:
            return RMSIdiom(x, cast, True, found[0], found[1], eps)
    return RMSIdiom(x, y, False, eps=eps)
