"""Output trees: tensors nested in tuples, lists, dicts and dataclass-like model outputs."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

from r2r_fx.compat import tree_map_only

__all__ = ["fresh_inputs", "leaves", "max_errors", "worst_leaf"]


def fresh_inputs(inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    """A deep copy of ``inputs``: tensors anywhere in them (dataclasses and other containers too),
    with their strides, ``requires_grad`` and the aliasing between them kept.

    Each run of a model gets its own, so a forward that changes its inputs in place (``x.div_(255)``)
    leaves the caller's tensors alone and the next run sees the same values.
    """
    try:
        return tuple(copy.deepcopy(tuple(inputs)))
    except Exception:  # noqa: BLE001 - e.g. a non-leaf tensor that requires grad: copy the tensors pytree sees
        return tuple(tree_map_only(torch.Tensor, _detached_copy, tuple(inputs)))


def _detached_copy(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(t.requires_grad)


def leaves(tree: Any) -> list[tuple[str, Any]]:
    """(path, leaf) pairs in a deterministic order; tensors and plain Python values are leaves."""
    out: list[tuple[str, Any]] = []
    _walk(tree, "out", out)
    return out


def _walk(tree: Any, path: str, out: list[tuple[str, Any]]) -> None:
    if isinstance(tree, torch.Tensor) or tree is None or isinstance(tree, (int, float, bool, str)):
        out.append((path, tree))
    elif isinstance(tree, Mapping):  # also covers HuggingFace ModelOutput (an OrderedDict)
        for key in tree:
            _walk(tree[key], f"{path}[{key!r}]", out)
    elif isinstance(tree, (tuple, list)):
        for i, item in enumerate(tree):
            _walk(item, f"{path}[{i}]", out)
    elif dataclasses.is_dataclass(tree):
        for field in dataclasses.fields(tree):
            _walk(getattr(tree, field.name), f"{path}.{field.name}", out)
    else:
        out.append((path, tree))


def max_errors(reference: Any, candidate: Any) -> tuple[float, float]:
    """(max |Δ|, max |Δ| / max |y_ref|) over all tensor leaves; ValueError if structures differ."""
    ref_leaves, cand_leaves = leaves(reference), leaves(candidate)
    if [p for p, _ in ref_leaves] != [p for p, _ in cand_leaves]:
        raise ValueError(f"leaves {[p for p, _ in ref_leaves]} vs {[p for p, _ in cand_leaves]}")
    max_abs, max_ref = 0.0, 0.0
    for (path, a), (_, b) in zip(ref_leaves, cand_leaves):
        if isinstance(a, torch.Tensor):
            if not isinstance(b, torch.Tensor) or a.shape != b.shape:
                got = tuple(b.shape) if isinstance(b, torch.Tensor) else type(b).__name__
                raise ValueError(f"{path}: shape {tuple(a.shape)} vs {got}")
            if a.numel() == 0:
                continue
            a64, b64 = a.detach().double(), b.detach().double()
            max_abs = max(max_abs, float((a64 - b64).abs().max()))
            max_ref = max(max_ref, float(a64.abs().max()))
        elif a != b:
            raise ValueError(f"{path}: {a!r} vs {b!r}")
    if max_abs != max_abs:  # NaN
        return float("nan"), float("nan")
    rel = max_abs / max_ref if max_ref > 0 else (0.0 if max_abs == 0 else float("inf"))
    return max_abs, rel


def worst_leaf(reference: Any, candidate: Any) -> tuple[str, float]:
    """(path of the leaf with the largest |Δ|, the overall relative error as in :func:`max_errors`)."""
    _, rel = max_errors(reference, candidate)
    worst, path = -1.0, "out"
    for (p, a), (_, b) in zip(leaves(reference), leaves(candidate)):
        if isinstance(a, torch.Tensor) and a.numel():
            delta = float((a.detach().double() - b.detach().double()).abs().max())
            if delta != delta:  # NaN
                return p, float("nan")
            if delta > worst:
                worst, path = delta, p
    return path, rel
