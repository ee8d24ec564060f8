"""Carry an optimizer across a growth step: same class and hyper-parameters, state kept for the old
entries of every parameter and started fresh (zeros) for the new ones.

The grown model's growth record (:mod:`r2r_fx.record`) says, per grown parameter and axis, where the old entries
went; per-parameter state tensors of the parameter's shape (SGD momentum, Adam's ``exp_avg`` and
``exp_avg_sq``) are grown the same way, other state (Adam's ``step``) is copied. A reader of a
normalised stream grown by whole copies has each old column split into ``k`` shares that add up to
it; the stream's copies are equal, so every share gets exactly the old column's gradient, and every
share carries the old column's state. Entries a stream rescaled (a norm weight's ``gamma*sqrt(kd/D)``
when mean channels are added, ``AxisChange.old_changed``) start with fresh state, like new ones, and so do
parameters a pass set (``BlockInsert.reset``: the norm a copy of a post-norm block follows). Parameters that did
not exist before (inserted blocks) join the first parameter group with fresh state. Parameters a
pass renamed (the later blocks a copy of a model's block pushes one index up) are found through the
records' ``renamed``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from r2r_fx.record import GrowthRecord, ParamChange, growth_history, old_positions, param_changes

__all__ = ["carry_optimizer", "carry_scheduler"]


def _grow_like(state: torch.Tensor, changes: list[ParamChange]) -> torch.Tensor:
    for change in changes:
        if tuple(state.shape) != change.shape_before:
            raise ValueError(f"state of shape {tuple(state.shape)} does not match the recorded {change.shape_before}")
        target = torch.zeros(change.shape_after, dtype=state.dtype, device=state.device)
        index: list[Any] = [slice(None)] * state.dim()
        for axis, info in sorted(change.axes.items()):
            index[axis] = old_positions(info.old_runs).to(state.device)
        # advanced indexing on several axes at once needs broadcastable index tensors
        tensors = [i for i in index if isinstance(i, torch.Tensor)]
        if len(tensors) == 1:
            target[tuple(index)] = state
        else:
            grids = torch.meshgrid(
                *[i if isinstance(i, torch.Tensor) else torch.arange(state.shape[a]) for a, i in enumerate(index)],
                indexing="ij",
            )
            target[grids] = state
        for axis, info in change.axes.items():
            if info.role == "stream_in":  # every share of a column gets the column's own gradient: its state
                d = change.shape_before[axis]
                for j in range(1, change.shape_after[axis] // d):
                    target.narrow(axis, j * d, d).copy_(target.narrow(axis, 0, d))
            elif info.old_changed:  # rescaled values (a norm weight's gamma*s): their moments start afresh
                target.index_fill_(axis, old_positions(info.old_runs).to(state.device), 0)
        state = target
    return state


def carry_optimizer(
    optimizer: torch.optim.Optimizer, old_model: nn.Module, new_model: nn.Module
) -> torch.optim.Optimizer:
    """A new optimizer of the same class over ``new_model`` (see the module docstring).

    ``old_model`` is the model ``optimizer`` was built on: the eager module or its capture.
    """
    old_names = {id(p): n for n, p in old_model.named_parameters(remove_duplicate=False)}
    new_params = dict(new_model.named_parameters(remove_duplicate=False))
    history = growth_history(new_model)[len(growth_history(old_model)) :]  # the passes since old_model
    by_old_name = _old_names(history, new_model, set(old_names.values()), list(new_params))
    changes = param_changes(new_model)
    reset = {n for record in history for block in record.blocks for n in block.reset}  # set by a pass: afresh
    groups, used = [], set()
    mapping: dict[int, nn.Parameter] = {}
    for group in optimizer.param_groups:
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
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": params})
    fresh = [p for n, p in new_params.items() if n not in used and p.requires_grad]
    if fresh:
        groups[0]["params"] = groups[0]["params"] + fresh
    accepted = inspect.signature(type(optimizer).__init__).parameters
    defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted}
    new_optimizer = type(optimizer)(groups, **defaults)
    new_name_of = {id(p): n for n, p in new_params.items()}
    for old_p, state in optimizer.state.items():
        new_p = mapping.get(id(old_p))
        if new_p is None:
            continue
        name = new_name_of[id(new_p)]
        grown = changes.get(name, [])
        carried = {}
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.shape == old_p.shape and value.dim() > 0 and name in reset:
                carried[key] = torch.zeros_like(value)
            elif isinstance(value, torch.Tensor) and value.shape == old_p.shape and value.dim() > 0:
                carried[key] = _grow_like(value.detach().clone(), grown) if grown else value.detach().clone()
            else:
                carried[key] = value.clone() if isinstance(value, torch.Tensor) else value
        new_optimizer.state[new_p] = carried
    return new_optimizer


def _old_names(history: list[GrowthRecord], new_model: nn.Module, old: set[str], new: list[str]) -> dict[str, str]:
    """{name in ``old_model``: name in ``new_model``} for the parameters that existed: the renamings of the
    passes since ``old_model`` (``history``, their ``GrowthRecord.renamed``, newest first), then the
    capture's own renamings (``r2r_param_sources``: an exported graph's BatchNorm layers) when
    ``old_model`` is the eager model."""
    sources = getattr(new_model, "meta", {}).get("r2r_param_sources", {})
    out = {}
    for name in new:
        was = name
        for record in reversed(history):
            was = record.renamed.get(was, was)
            if not was:
                break  # inserted by that pass
        if was and was not in old:
            was = sources.get(was, was)
        if was in old:
            out[was] = name
    return out


def carry_scheduler(scheduler: Any, new_optimizer: torch.optim.Optimizer) -> Any:
    """Point a learning-rate scheduler at the carried optimizer (its step count and state are kept)."""
    scheduler.optimizer = new_optimizer
    return scheduler
