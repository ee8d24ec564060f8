"""The rule registry: one rule per op or layer type, and one width fix-up per layer type.

A rule is ``rule(c, node, gm)``: it looks at one fx node and tells the :class:`Couplings` builder
what the op does to channel axes. A fix-up is ``fix(module, node, width_of)``: it brings a layer's
own width attributes (``in_channels``, ``num_features``, ...) in line after its parameters grew.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch
import torch.fx
from torch import nn

from r2r_fx.compat import OpOverload

__all__ = [
    "FIXES",
    "LAYERS",
    "RULES",
    "Couplings",
    "Fix",
    "Rule",
    "Slot",
    "WidthOf",
    "fix_for",
    "is_stochastic_depth",
    "register_layer",
    "register_rule",
    "rule_for",
]

Slot = tuple[str, int]  # (tensor name, axis): one channel axis of one tensor in the graph


class Couplings(Protocol):
    """What a rule may tell the analysis (implemented by ``r2r_fx.analysis``)."""

    def same(self, a: Slot, b: Slot) -> None: ...
    def concat(self, whole: Slot, parts: Sequence[Slot], *, equal: bool = False) -> None: ...
    def merge(self, whole: Slot, members: Sequence[Slot]) -> None: ...
    def bind(self, param: str, axis: int, slot: Slot, role: str, node: torch.fx.Node) -> None: ...
    def granularity(self, slot: Slot, k: int, node: torch.fx.Node) -> None: ...
    def freeze(self, slot: Slot, reason: str) -> None: ...
    def normalize(
        self, x: Slot, out: Slot, node: torch.fx.Node, kind: str, affine: bool, idiom: Any = None
    ) -> None: ...
    def heads(self, slot: Slot, node: torch.fx.Node) -> None: ...
    def head_size(self, slot: Slot, node: torch.fx.Node) -> None: ...
    def contract(self, a: Slot, b: Slot, node: torch.fx.Node, reason: str) -> None: ...
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
