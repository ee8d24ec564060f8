"""Carry an optimizer across a growth step so that training goes on smoothly: same class, hyper-parameters
and param groups; the old entries keep their state; new entries start from the statistics of the old ones.

Why: Adam-like optimizers divide by the square root of a running second moment. A new entry whose second
moment starts at zero while the carried step count makes the bias correction vanish takes steps of about
``3 * lr`` (``0.1 g / sqrt(0.001 g^2)``) in the sign of its gradient for its first several updates, whatever
the gradient's size. Measured on a small ResNet (Adam, lr 1e-3, widened 2x by R2R after 300 steps), that
alone multiplied the training loss by 4-5 within ten steps. So, per state tensor:

* **scale statistics** (second moments and the like, ``_SCALE_KEYS``: Adam's ``exp_avg_sq``, RMSprop's
  ``square_avg``, Adagrad's ``sum``, Adamax's ``exp_inf``, Rprop's ``step_size``, ...): new entries take
  the mean of the old entries along each grown axis (a new row the mean over the old rows, column by
  column). Their first updates are then as large as their gradients say, relative to the layer's own.
* **everything else of the parameter's shape** (momentum, Adam's ``exp_avg``, unknown keys): zero for new
  entries. A new pair's gradients are opposite (producer copies) or equal (consumer columns), so no
  momentum is the one value consistent with either.
* other state (Adam's ``step``, Adafactor's factored moments are grown on the axes they share with the
  parameter) is copied.

The growth record (:mod:`r2r_fx.record`) says, per grown parameter and axis, where the old entries went. A
reader of a normalised stream grown by whole copies has each old column split into ``k`` shares; the
stream's copies are equal, so every share gets exactly the old column's gradient and carries the old
column's state. Entries whose value a pass rescaled (``AxisChange.old_changed``) or set
(``BlockInsert.reset``) keep their scale statistics and drop their momentum.

**Warm-up**: for the first ``warmup`` steps (default 100) the gradients of new entries, and of parameters that
did not exist and start from a copied state, are scaled by ``t / warmup`` (under an adaptive optimizer only
entries with seeded scale statistics ramp, since an unseeded second moment would follow the ramp; under SGD
all do; steps a GradScaler skips do not count) (a step pre-hook on the new optimizer, removed when it is done;
``optimizer.state_dict()`` does not hold it, so a reload ends it early). Adam's seeded second moments make
that a ramp of the new entries' steps from 0 to their full size. Measured on a pre-LN ViT widened 2x by
R2R (AdamW, lr 5e-4): the worst loss in the next 100 steps was 1.00 / 1.15 / 1.27 x the loss before
(3 seeds) with seeded moments alone and 1.00 / 1.01 / 1.00 with the warm-up; the ungrown control's own
fluctuation was 1.00 / 1.004 / 1.00. ``warmup=0`` turns it off.

Parameters that did not exist (inserted blocks) join the param group of the parameter they copy (a copy of
the model's own block: the same name in the block it copies), or else the group that holds most of the
model's parameters of their kind (matrices, or vectors: biases and norms), or the group ``group_of``
names. A copy's parameter starts with its source's carried scale statistics and step; others start fresh
(copies made by earlier passes than the latest one since ``old_model`` are grouped by kind, unseeded).
Parameters a pass renamed are found through the records' ``renamed``.
"""

from __future__ import annotations

import inspect
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from r2r_fx.record import GrowthRecord, ParamChange, growth_history, new_entry_mask, old_positions

__all__ = ["carry_optimizer", "carry_scheduler"]

# optimizers that divide by scale statistics (others, such as SGD, are plain in the gradient)
_ADAPTIVE = tuple(
    getattr(torch.optim, name)
    for name in ("Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "Adadelta", "Adafactor", "Rprop")
    if hasattr(torch.optim, name)
)
# per-entry state that measures a gradient's scale: new entries take the old entries' mean
_SCALE_KEYS = frozenset(
    {"exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum", "exp_inf", "acc_delta", "step_size"}
    | {"row_var", "col_var", "variance"}
)


def _grown_axes(value: torch.Tensor, change: ParamChange) -> dict[int, Any] | None:
    """The recorded axes ``value`` shares with the parameter: all of them when it has the parameter's shape;
    those it matches when it is 1 on the others (Adafactor's factored moments); None when it is not shaped
    like the parameter."""
    before = change.shape_before
    if tuple(value.shape) == before:
        return dict(change.axes)
    if value.dim() != len(before) or any(size not in (before[a], 1) for a, size in enumerate(value.shape)):
        return None
    return {a: info for a, info in change.axes.items() if value.shape[a] == before[a]}


def _grow_like(state: torch.Tensor, changes: list[ParamChange], scale: bool) -> torch.Tensor:
    """``state`` of one parameter, grown through ``changes``: old entries where the record put them, new
    entries the mean of the old along the axis (``scale``) or zero."""
    for change in changes:
        axes = _grown_axes(state, change)
        if axes is None:
            raise ValueError(f"state of shape {tuple(state.shape)} does not match the recorded {change.shape_before}")
        for axis, info in sorted(axes.items()):
            old = old_positions(info.old_runs).to(state.device)
            size = change.shape_after[axis]
            shape = list(state.shape)
            shape[axis] = size
            if scale:
                target = state.mean(axis, keepdim=True).expand(shape).clone()
            else:
                target = state.new_zeros(shape)
            target.index_copy_(axis, old, state)
            if info.role == "stream_in":  # every share of a column gets the column's own gradient: its state
                piece = size // len(info.old_runs)  # pieces side by side (a concatenation of streams)
                for new, _, length in info.old_runs:
                    for j in range(1, piece // length):
                        target.narrow(axis, new + j * length, length).copy_(target.narrow(axis, new, length))
            elif info.old_changed and not scale:  # rescaled values (a norm weight's gamma*s): no momentum
                target.index_fill_(axis, old, 0)
            state = target
    return state


def _carry_state(state: dict[str, Any], shape: torch.Size, changes: list[ParamChange], reset: bool) -> dict:
    """One parameter's state carried through ``changes``; {} (fresh) when a tensor in it is shaped in a way
    the record cannot grow."""
    out = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            out[key] = value.clone() if isinstance(value, torch.Tensor) else value
            continue
        value, scale = value.detach().clone(), key in _SCALE_KEYS
        if reset and not scale and value.shape == shape:
            value = torch.zeros_like(value)
        if changes and _grown_axes(value, changes[0]) is None:
            return {}
        out[key] = _grow_like(value, changes, scale) if changes else value
    return out


def _seeded_state(source: dict[str, Any], shape: torch.Size) -> dict[str, Any]:
    """State for a new copy of a parameter whose state is ``source``: scale statistics and scalars kept,
    everything else of the parameter's shape zero; {} (fresh) when there are no scale statistics to seed."""
    if not _SCALE_KEYS & set(source):
        return {}
    out = {}
    for key, value in source.items():
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            if value.shape != shape and key not in _SCALE_KEYS:
                return {}  # not a state this function understands: start fresh
            out[key] = value.detach().clone() if key in _SCALE_KEYS else torch.zeros_like(value)
        else:
            out[key] = value.clone() if isinstance(value, torch.Tensor) else value
    return out


def carry_optimizer(
    optimizer: torch.optim.Optimizer,
    old_model: nn.Module,
    new_model: nn.Module,
    group_of: Callable[[str, nn.Parameter], int] | None = None,
    warmup: int = 100,
) -> torch.optim.Optimizer:
    """A new optimizer of the same class over ``new_model`` (see the module docstring).

    ``old_model`` is the model ``optimizer`` was built on: the eager module or its capture. ``group_of``
    (name, parameter) -> index of the param group a parameter that did not exist joins; by default the
    group of the parameter it copies, or of most of the model's parameters of its kind. ``warmup``: steps
    over which the new entries' gradients ramp up (0: none).
    """
    old_names = {id(p): n for n, p in old_model.named_parameters(remove_duplicate=False)}
    new_params = dict(new_model.named_parameters(remove_duplicate=False))
    history = growth_history(new_model)[len(growth_history(old_model)) :]  # the passes since old_model
    by_old_name = _old_names(history, new_model, set(old_names.values()), list(new_params))
    changes: dict[str, list[ParamChange]] = {}  # the passes since old_model only (names: the final ones)
    for record in history:
        for change in record.params:
            changes.setdefault(change.param, []).append(change)
    reset = {n for record in history for block in record.blocks for n in block.reset}  # set by a pass
    groups, used = [], set()
    mapping: dict[int, nn.Parameter] = {}
    group_of_old: dict[str, int] = {}
    for index, group in enumerate(optimizer.param_groups):
        params = []
        for p in group["params"]:
            name = old_names.get(id(p))
            if name is None:
                raise ValueError("the optimizer holds a parameter that is not in old_model")
            new_name = by_old_name.get(name)
            if new_name is None:
                raise ValueError(f"parameter {name} has no counterpart in the grown model")
            params.append(new_params[new_name])
            used.add(new_name)
            mapping[id(p)] = new_params[new_name]
            group_of_old[name] = index
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": params})
    sources = _copy_sources(history, set(old_names.values()))
    by_kind = _group_by_kind(optimizer)
    fresh: dict[str, nn.Parameter] = {}
    seen = {id(new_params[n]) for n in by_old_name.values()}  # parameters that existed are not new
    for name, p in new_params.items():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        source = sources.get(name)
        if group_of is not None:
            index = group_of(name, p)
        elif source in group_of_old:
            index = group_of_old[source]
        else:
            index = by_kind.get(p.dim() >= 2, 0)
        groups[index]["params"] = groups[index]["params"] + [p]
        fresh[name] = p
    accepted = inspect.signature(type(optimizer).__init__).parameters
    open_ended = any(a.kind is inspect.Parameter.VAR_KEYWORD for a in accepted.values())
    defaults = {k: v for k, v in optimizer.defaults.items() if open_ended or k in accepted}
    new_optimizer = type(optimizer)(groups, **defaults)
    new_name_of = {id(p): n for n, p in new_params.items()}
    for old_p, state in optimizer.state.items():
        new_p = mapping.get(id(old_p))
        if new_p is None:
            continue
        name = new_name_of[id(new_p)]
        new_optimizer.state[new_p] = _carry_state(state, old_p.shape, changes.get(name, []), name in reset)
    seeded = set()
    for name, p in fresh.items():  # a copy starts from its source's carried state
        source = new_params.get(by_old_name.get(sources.get(name, ""), ""))
        state = _seeded_state(new_optimizer.state.get(source, {}), p.shape) if source is not None else {}
        if state:
            new_optimizer.state[p] = state
            seeded.add(p)
    if warmup > 0:
        # an adaptive optimizer's unseeded state would follow the ramp (its steps grow): only seeded ones ramp
        adaptive = isinstance(optimizer, _ADAPTIVE) or any(_SCALE_KEYS & set(st) for st in optimizer.state.values())

        def ramps(p: nn.Parameter) -> bool:
            return not adaptive or bool(_SCALE_KEYS & set(new_optimizer.state.get(p, {})))

        masks = {new_params[n]: _new_entries(changes[n]) for n in used if n in changes and ramps(new_params[n])}
        masks.update({p: None for p in fresh.values() if not adaptive or p in seeded})
        masks = {p: m for p, m in masks.items() if m is None or m.any()}
        if masks:
            _WarmUp(new_optimizer, masks, warmup)
    return new_optimizer


def _new_entries(changes: list[ParamChange]) -> torch.Tensor:
    """True where an entry of the grown parameter did not exist before ``changes`` (oldest first)."""
    new = None
    for change in changes:
        mask = new_entry_mask(change)
        if new is not None and new.any():  # entries new in an earlier change, where this one put them
            for axis, info in sorted(change.axes.items()):
                shape = list(new.shape)
                shape[axis] = change.shape_after[axis]
                new = torch.zeros(shape, dtype=torch.bool).index_copy_(axis, old_positions(info.old_runs), new)
            mask |= new
        new = mask
    return new


class _WarmUp:
    """A step pre-hook: scales the gradients of new entries (a mask per parameter; None: all of it) by
    ``t / steps`` at the ``t``-th step, then removes itself."""

    def __init__(self, optimizer: torch.optim.Optimizer, masks: dict[nn.Parameter, torch.Tensor | None], steps: int):
        self.masks = {p: None if m is None else m.to(p.device) for p, m in masks.items()}
        self.steps, self.t = steps, 0
        self.handle = optimizer.register_step_pre_hook(self)

    def __call__(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        found_inf = kwargs.get("found_inf", getattr(optimizer, "found_inf", None))
        if isinstance(found_inf, torch.Tensor) and bool(found_inf.sum() > 0):
            return  # a step the GradScaler skips (fused optimizers skip inside step): not counted
        self.t += 1
        if self.t >= self.steps:
            self.handle.remove()
            return
        scale = self.t / self.steps
        with torch.no_grad():
            for p, mask in self.masks.items():
                if p.grad is None:
                    continue
                if mask is None:
                    p.grad.mul_(scale)
                else:
                    p.grad.mul_(torch.where(mask, scale, 1.0).to(p.grad.dtype))


def _group_by_kind(optimizer: torch.optim.Optimizer) -> dict[bool, int]:
    """{is a matrix: the param group holding most of the old parameters of that kind}."""
    counts: dict[bool, Counter] = {True: Counter(), False: Counter()}
    for index, group in enumerate(optimizer.param_groups):
        for p in group["params"]:
            counts[p.dim() >= 2][index] += 1
    return {kind: c.most_common(1)[0][0] for kind, c in counts.items() if c}


def _trace_back(name: str, records: list[GrowthRecord]) -> str:
    """``name`` after ``records`` (oldest first) -> its name before them; "" if one of them inserted it."""
    for record in reversed(records):
        name = record.renamed.get(name, name)
        if not name:
            return ""
    return name


def _copy_sources(history: list[GrowthRecord], old: set[str]) -> dict[str, str]:
    """{new parameter: the old_model parameter it is a copy of} for copies of the model's own blocks that the
    latest pass inserted: the same name under the block it copies (``BlockInsert.at``, named as before that
    pass). Copies by earlier passes since old_model (their records renamed by later passes) have none."""
    if not history:
        return {}
    out, record = {}, history[-1]
    for block in record.blocks:
        if not block.kind.startswith("own:"):
            continue
        prefix = block.module + "."
        for name in record.new_params:
            if name.startswith(prefix):
                source = _trace_back(f"{block.at}.{name[len(prefix) :]}", history[:-1])
                if source in old:
                    out[name] = source
    return out


def _old_names(history: list[GrowthRecord], new_model: nn.Module, old: set[str], new: list[str]) -> dict[str, str]:
    """{name in ``old_model``: name in ``new_model``} for the parameters that existed: the renamings of the
    passes since ``old_model`` (``history``, their ``GrowthRecord.renamed``, newest first), then the
    capture's own renamings (``r2r_param_sources``: an exported graph's BatchNorm layers) when
    ``old_model`` is the eager model."""
    sources = getattr(new_model, "meta", {}).get("r2r_param_sources", {})
    out = {}
    for name in new:
        was = _trace_back(name, history)
        if was and was not in old:
            was = sources.get(was, was)
        if was in old:
            out[was] = name
    return out


def carry_scheduler(scheduler: Any, new_optimizer: torch.optim.Optimizer) -> Any:
    """Point a learning-rate scheduler at the carried optimizer; its step count, base and current learning
    rates are kept (the param groups are the same). Schedulers that hold others (SequentialLR,
    ChainedScheduler) are re-pointed with them. A ``torch.amp.GradScaler`` needs nothing: its scale and
    growth tracker belong to it, not to the optimizer (grow after ``scaler.update()``)."""
    for inner in getattr(scheduler, "_schedulers", []):
        carry_scheduler(inner, new_optimizer)
    scheduler.optimizer = new_optimizer
    return scheduler
