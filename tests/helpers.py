"""The one helper every function-preservation test goes through."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import r2r_fx
from r2r_fx.record import new_entry_mask, old_positions, param_changes

__all__ = ["captured", "assert_function_preserved", "assert_new_weights_train", "parameter_count", "random_batch"]

RTOL = 1e-5
ONNX_RTOL = 1e-4


def assert_function_preserved(
    reference: nn.Module,
    candidate: nn.Module,
    inputs: Any,
    *,
    onnx: bool = True,
    train: bool = True,
    f64_fallback: bool = False,
) -> r2r_fx.VerifyReport:
    """Eval and train mode in PyTorch (1e-5 relative) and ONNX Runtime (1e-4 relative).

    By default the float32 train-mode error itself must be within 1e-5. With ``f64_fallback`` a
    float32 train-mode error above that is accepted only if the float64 re-check is within 1e-5 and
    the float32 error is within twice the reference's own float32 rounding floor (two float32 runs of
    the same exact function each sit about one floor away from it)."""
    report = r2r_fx.verify(
        reference, candidate, inputs, onnx=onnx, train=train, rtol=RTOL, onnx_rtol=ONNX_RTOL, f64_fallback=f64_fallback
    )
    assert report.eval_rel_error <= RTOL, f"eval relative error {report.eval_rel_error:.3g}"
    if train:
        assert report.train_rel_error is not None, report.notes
        if report.train_rel_error_f64 is not None:
            assert report.train_rel_error_f64 <= RTOL, report.notes
            assert report.train_rel_error <= 2 * report.train_noise_floor, report.notes
        else:
            assert report.train_rel_error <= RTOL, f"train relative error {report.train_rel_error:.3g}"
    if onnx:
        assert report.onnx_max_rel_error <= ONNX_RTOL, f"ONNX relative error {report.onnx_max_rel_error:.3g}"
    assert report.ok
    return report


def random_batch(inputs: Any, batch: int = 32) -> tuple[Any, ...]:
    """Random inputs like the examples but with a larger batch (ids stay within the examples' range)."""
    out = []
    for t in inputs:
        shape = (batch, *t.shape[1:])
        if t.is_floating_point():
            out.append(torch.randn(shape, dtype=t.dtype))
        else:
            out.append(torch.randint(0, int(t.max()) + 1, shape, dtype=t.dtype))
    return tuple(out)


def assert_new_weights_train(grown: nn.Module, inputs: Any) -> None:
    """One backward pass on a random batch gives every grown parameter non-zero gradients on its new
    entries, and reaches new channels about as often as old ones over the whole model (ReLU units
    dead on the whole batch get no gradient, old or new, so the rate is compared with the old one)."""
    inputs = random_batch(inputs)
    grown = grown.train()
    for m in grown.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = 0.0
    grown.zero_grad()
    out = grown(*inputs)
    leaves = [t for _, t in r2r_fx.tree.leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    loss = sum((t.float() * torch.randn_like(t.float())).sum() for t in leaves)
    loss.backward()
    params = dict(grown.named_parameters())
    changes = param_changes(grown)
    assert changes, "nothing was grown"
    reached = {"new": [0, 0], "old": [0, 0]}  # [channels reached, channels] over the whole model
    for name, history in changes.items():
        if name not in params:
            continue  # a buffer (running statistics)
        change = history[-1]
        grad = params[name].grad
        assert grad is not None, f"{name}: no gradient"
        assert grad[new_entry_mask(change)].ne(0).any(), f"{name}: no new entry gets a gradient"
        for axis, info in change.axes.items():
            is_new = torch.ones(grad.shape[axis], dtype=torch.bool)
            is_new[old_positions(info.old_runs)] = False
            for kind, which in (("new", is_new), ("old", ~is_new)):
                hit = _reached(grad, axis, which)
                reached[kind][0] += int(hit.sum())
                reached[kind][1] += hit.numel()
    new_rate = reached["new"][0] / max(1, reached["new"][1])
    old_rate = reached["old"][0] / max(1, reached["old"][1])
    assert new_rate >= 0.75 * old_rate, f"{new_rate:.0%} of new channels get a gradient, {old_rate:.0%} of old ones"


def _reached(grad: torch.Tensor, axis: int, which: torch.Tensor) -> torch.Tensor:
    """Per selected channel along ``axis``: does any of its entries have a non-zero gradient?"""
    per_channel = grad.index_select(axis, which.nonzero().flatten()).movedim(axis, 0)
    return per_channel.reshape(per_channel.shape[0], -1).ne(0).any(dim=1)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def captured(name: str, via: str = "symbolic_trace"):
    """(eager model, example inputs, captured GraphModule) for a local-zoo model."""
    from zoo import ZOO

    model, inputs = ZOO[name]()
    return model, inputs, r2r_fx.capture(model, inputs, via=via)
