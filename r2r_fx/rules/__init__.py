"""How each op couples the channel axes of its tensors: one rule per op, in a registry users extend.

A rule looks at one fx node and tells the :class:`Couplings` builder what it knows:

* ``same(a, b)``: two (tensor, axis) slots hold the same channels in the same order;
* ``concat(whole, parts)`` / ``merge(whole, members)``: a slot is the concatenation of other slots
  (cat, split, chunk) or the row-major merge of several axes (flatten, view, reshape);
* ``bind(param, axis, slot, role, node)``: a parameter axis indexes that slot's channels, as a
  producer's rows (``"out"``), a consumer's columns (``"in"``) or a per-channel value (``"channel"``);
* ``tie(a, b)`` (grow equally), ``granularity(slot, k)`` (grow by multiples of k);
* ``heads(slot)``: the axis holds attention heads (a reshape splitting a channel axis into heads and
  head size grows along the heads);
* ``freeze(slot, reason)``: this slot must keep its width.

Ops without a rule freeze every axis of every tensor they touch (fail closed). Rules work on both
graph levels: module-level (``call_module``, torch functions, tensor methods) and ATen-level.
The registry lives in ``registry``; the built-in rules are grouped by op family (``pointwise``,
``layers``, ``attention``, ``spatial``, ``reductions``, ``structure``), each a table of ops and the rule they share;
``norm_idioms`` recognises norms written out as ops (the decomposed RMSNorm, for ``reductions``).
A layer type is supported in one place: ``register_layer(cls, couple, fix)``.
"""

from __future__ import annotations

from r2r_fx.graph import param_name, shape_of, tensor_shapes
from r2r_fx.rules import attention, layers, norm_idioms, pointwise, reductions, registry, spatial, structure
from r2r_fx.rules.common import freeze_all
from r2r_fx.rules.layers import conv_layer, linear_layer
from r2r_fx.rules.registry import *  # noqa: F403 - the registry's public names (its __all__)
from r2r_fx.rules.structure import expand_ellipsis, factor_reshape

__all__ = [
    *registry.__all__,
    "conv_layer",
    "expand_ellipsis",
    "factor_reshape",
    "freeze_all",
    "linear_layer",
    "param_name",
    "shape_of",
    "tensor_shapes",
]

_FAMILIES = (attention, layers, pointwise, reductions, spatial, structure)  # importing them registers the built-ins
_IDIOMS = (norm_idioms,)  # matchers the rules call (no registrations of their own)
