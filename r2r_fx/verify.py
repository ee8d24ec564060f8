"""Numerical verification: is the candidate model the same function as the reference?

Relative error is ``max|y_cand - y_ref| / max|y_ref|`` over every tensor leaf of the output.
Checked in eval mode and in train mode (BatchNorm on batch statistics; dropout and stochastic-depth
probabilities set to 0, since random masks differ with width and inserted blocks draw masks of their
own), in PyTorch and, on request, through onnxruntime. Inputs are seeded; the models passed in are left
as they were (modes, dropout rates, norm statistics).

A model can sit at its own rounding floor: deep BatchNorm networks in train mode amplify float32
rounding to ~1e-5 even between the *original* model in float32 and float64, deep random networks in
eval mode can have outputs near 1e-9, and float16/bfloat16 models round at 1e-3/1e-2. When the error in
the model's dtype exceeds ``rtol`` (eval or train), the check is repeated in float64 (same tolerance)
and the reference's own dtype-vs-float64 floor is reported beside it; ``ok`` then rests on the float64
measurement, and the note says so. In float64 each output leaf is judged against the larger of its size and
the reference's own rounding error on it (:func:`noise_judged_error`): a leaf that is rounding noise in
the model's dtype (a norm dividing a constant by ``sqrt(eps)``) is measured against that noise.
The ONNX Runtime tolerance follows the dtype (1e-4 for float32 and
float64, 1e-2 for float16, 5e-2 for bfloat16); a dtype or op ONNX Runtime cannot run is reported in
the notes, not raised.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn

from r2r_fx.compat import DropoutBase, NormBase
from r2r_fx.errors import NotPreservedError
from r2r_fx.export import export_onnx, run_onnx
from r2r_fx.rules import is_stochastic_depth
from r2r_fx.tree import fresh_inputs, leaves, max_errors, worst_leaf

__all__ = ["VerifyReport", "check_preserved", "verify"]

logger = logging.getLogger(__name__)

RTOL = 1e-5
ONNX_RTOL = 1e-4


@dataclass
class VerifyReport:
    max_abs_error: float
    max_rel_error: float
    eval_rel_error: float
    train_rel_error: float | None
    train_rel_error_f64: float | None = None
    train_noise_floor: float | None = None
    eval_rel_error_f64: float | None = None
    eval_noise_floor: float | None = None
    onnx_max_abs_error: float | None = None
    onnx_max_rel_error: float | None = None
    ok: bool = False
    rtol: float = RTOL
    onnx_rtol: float = ONNX_RTOL
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _run(model: nn.Module, inputs: Sequence[Any], train: bool, seed: int) -> Any:
    """Run in the given mode without changing the model: modes, dropout rates and buffers (norm
    statistics, spectral norm's power-iteration vectors) are restored afterwards (no deep copy, so
    giant models fit in memory twice, not four times)."""
    modes = [(m, m.training) for m in model.modules()]
    dropouts = [(m, m.p) for m in model.modules() if isinstance(m, DropoutBase) or is_stochastic_depth(m)]
    stats = [(b, b.clone()) for b in model.buffers()]  # norm statistics, spectral norm's vectors, ...
    try:
        for m, _ in dropouts:
            m.p = 0.0
        model.train(train)
        torch.manual_seed(seed)
        with torch.no_grad():
            return model(*fresh_inputs(inputs))
    finally:
        for m, mode in modes:
            m.training = mode
        for m, p in dropouts:
            m.p = p
        with torch.no_grad():
            for b, saved in stats:
                b.copy_(saved)


_F64_MAX_BYTES = 12_000_000_000  # float64 copies of both models must fit next to the originals


def _in_float64(
    reference: nn.Module, candidate: nn.Module, inputs: tuple[Any, ...], seed: int, report: VerifyReport, train: bool
) -> bool:
    """Repeat one mode's check in float64; record the error and the reference's own rounding floor."""
    mode = "train" if train else "eval"
    error = report.train_rel_error if train else report.eval_rel_error
    size = sum(p.numel() for m in (reference, candidate) for p in m.parameters()) * 8
    if size > _F64_MAX_BYTES:
        report.notes.append(
            f"{mode}-mode error {error:.2e} exceeds rtol; models too large ({size / 1e9:.1f} GB in float64) "
            "for the float64 re-check"
        )
        return False
    wide = tuple(t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs)
    ref64, cand64 = _as_float64(reference), _as_float64(candidate)
    try:
        try:
            out64 = _run(ref64, wide, train, seed)
            cand_out64 = _run(cand64, wide, train, seed)
        except Exception as exc:  # noqa: BLE001 - a graph that cannot run in float64: say why, judge nothing
            report.notes.append(f"{mode}-mode error {error:.2e} exceeds rtol; float64 re-check failed: {exc}"[:400])
            return False
        own = _run(reference, inputs, train, seed)
        _, error64 = max_errors(out64, cand_out64)
        _, floor = max_errors(out64, own)
        judged = noise_judged_error(out64, cand_out64, own)
    finally:
        del ref64, cand64
    if train:
        report.train_rel_error_f64, report.train_noise_floor = error64, floor
    else:
        report.eval_rel_error_f64, report.eval_noise_floor = error64, floor
    report.notes.append(
        f"{mode} mode: error {error:.2e} in the model's dtype, whose own rounding floor is {floor:.2e} "
        f"(reference vs float64); float64 re-check {error64:.2e}"
    )
    return judged <= report.rtol


def _as_float64(model: nn.Module) -> nn.Module:
    """A float64 copy of ``model``. A graph's own floating dtypes (an ATen graph of a bfloat16 model casts
    to bfloat16 in its RMSNorm: ``_to_copy(dtype=torch.bfloat16)``) become float64 too, or the copy would
    mix dtypes."""
    wide = copy.deepcopy(model).double()
    graphs = [m for m in wide.modules() if isinstance(m, torch.fx.GraphModule)]
    for gm in graphs:
        for node in gm.graph.nodes:
            node.args, node.kwargs = torch.fx.node.map_aggregate((node.args, node.kwargs), _float64_dtype)
        gm.recompile()
    return wide


def _float64_dtype(value: Any) -> Any:
    return torch.float64 if isinstance(value, torch.dtype) and value.is_floating_point else value


_ONNX_RTOL_BY_DTYPE = {torch.float16: 1e-2, torch.bfloat16: 5e-2}


def _dtype_of(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def verify(
    reference: nn.Module,
    candidate: nn.Module,
    example_inputs: Any,
    *,
    onnx: bool = True,
    train: bool = True,
    rtol: float = RTOL,
    onnx_rtol: float = ONNX_RTOL,
    seed: int = 0,
    onnx_path: str | os.PathLike[str] | None = None,
    f64_fallback: bool = True,
    onnx_from: torch.export.ExportedProgram | None = None,
) -> VerifyReport:
    """Compare ``candidate`` with ``reference`` on ``example_inputs`` (eval, train, ONNX Runtime).

    The ONNX file (kept at ``onnx_path`` when given) is exported from ``candidate``, or from ``onnx_from``,
    an ExportedProgram of it already in hand (not traced again)."""
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    notes: list[str] = []
    eval_only = (
        getattr(candidate, "meta", {}).get("r2r_eval_only") if isinstance(candidate, torch.fx.GraphModule) else None
    )
    if train and eval_only:
        notes.append(f"the graph computes the eval-mode function only: {eval_only}")
    ref_eval = _run(reference, inputs, False, seed)
    eval_abs, eval_rel = max_errors(ref_eval, _run(candidate, inputs, False, seed))
    train_abs, train_rel = None, None
    if train:
        try:
            train_abs, train_rel = max_errors(_run(reference, inputs, True, seed), _run(candidate, inputs, True, seed))
        except Exception as exc:  # noqa: BLE001 - e.g. BatchNorm with batch size 1 in train mode
            notes.append(f"train-mode check not run: {exc}")
    max_abs = max(eval_abs, train_abs if train_abs is not None else 0.0)
    max_rel = max(eval_rel, train_rel if train_rel is not None else 0.0)
    report = VerifyReport(max_abs, max_rel, eval_rel, train_rel, rtol=rtol, onnx_rtol=onnx_rtol, notes=notes)
    eval_ok = eval_rel <= rtol
    if not eval_ok and f64_fallback:
        eval_ok = _in_float64(reference, candidate, inputs, seed, report, train=False)
    train_ok = train_rel is None or train_rel <= rtol
    if not train_ok and eval_ok and f64_fallback:
        train_ok = _in_float64(reference, candidate, inputs, seed, report, train=True)
    ok = eval_ok and train_ok
    if onnx:
        dtype = _dtype_of(candidate)
        report.onnx_rtol = onnx_rtol = max(onnx_rtol, _ONNX_RTOL_BY_DTYPE.get(dtype, 0.0))
        try:
            with tempfile.TemporaryDirectory() as tmp:
                path = os.fspath(onnx_path) if onnx_path else os.path.join(tmp, "candidate.onnx")
                export_onnx(candidate if onnx_from is None else onnx_from, inputs, path)
                got = run_onnx(path, inputs)
        except Exception as exc:  # noqa: BLE001 - e.g. no ONNX Runtime kernel for a dtype: say so, do not crash
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            notes.append(f"ONNX Runtime check not run ({str(dtype).removeprefix('torch.')} model): {first[:300]}")
        else:
            ref_leaves = [t for _, t in leaves(ref_eval) if isinstance(t, torch.Tensor)]
            if len(got) != len(ref_leaves):
                notes.append(f"ONNX model has {len(got)} outputs, reference {len(ref_leaves)}")
                report.onnx_max_abs_error = report.onnx_max_rel_error = float("inf")
            else:
                report.onnx_max_abs_error, report.onnx_max_rel_error = max_errors(ref_leaves, got)
            ok = ok and report.onnx_max_rel_error <= onnx_rtol
    report.ok = bool(ok)
    return report


def _has_batch_statistics(model: nn.Module) -> bool:
    return any(isinstance(m, NormBase) for m in model.modules())


def check_preserved(
    pass_name: str, before: nn.Module, after: nn.Module, inputs: Sequence[Any] | None = None, *, train: bool = True
) -> None:
    """The passes' safety net: raise :class:`NotPreservedError` unless ``after`` computes ``before``.

    Runs both on the capture's example inputs (seeded random tensors of the recorded shapes) in eval
    mode, and (with ``train``) in train mode where either has batch statistics. An error above ``RTOL`` in the model's
    own dtype is re-measured in float64, which separates rounding (float32 deep networks, float16 and
    bfloat16 models) from a real change; only the float64 error decides.
    """
    if inputs is None:
        from r2r_fx.capture import example_inputs_of

        try:
            inputs = example_inputs_of(before)
        except ValueError:
            logger.warning("%s: no example inputs recorded on the graph; the result was not checked", pass_name)
            return
    inputs = tuple(inputs)
    batch_stats = _has_batch_statistics(before) or _has_batch_statistics(after)
    modes = [False, True] if train and batch_stats else [False]
    for train in modes:
        mode = "train" if train else "eval"
        path, error = _compare(before, after, inputs, train)
        if error <= RTOL:
            continue
        size = sum(p.numel() for m in (before, after) for p in m.parameters()) * 8
        if size > _F64_MAX_BYTES:
            raise NotPreservedError(pass_name, path, mode, error, RTOL)
        wide = tuple(t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in inputs)
        try:
            ref64 = _run(copy.deepcopy(before).double(), wide, train, 0)
        except Exception:  # noqa: BLE001 - float32 baked into the graph: the float32 error stands
            raise NotPreservedError(pass_name, path, mode, error, RTOL) from None
        try:
            cand64 = _run(copy.deepcopy(after).double(), wide, train, 0)
            path64, error64 = worst_leaf(ref64, cand64)
            judged = noise_judged_error(ref64, cand64, _run(before, inputs, train, 0))
        except Exception as exc:  # noqa: BLE001 - fails in float64, or another output structure
            path64, error64, judged = (
                f"(float64 re-check: {type(exc).__name__}: {exc})"[:200],
                float("inf"),
                float("inf"),
            )
        if not judged <= RTOL:  # NaN too
            raise NotPreservedError(pass_name, path64, mode, error64, RTOL)
        logger.info("%s: %s-mode error %.2e is rounding (float64 re-check %.2e)", pass_name, mode, error, error64)


def noise_judged_error(ref64: Any, cand64: Any, own: Any) -> float:
    """The float64 relative error, leaf by leaf, with each leaf's scale the larger of ``max|ref64|`` and
    ``max|own - ref64|`` (``own``: the reference in its own dtype), worst over the leaves.

    A leaf whose float32 output is rounding noise (a norm dividing a constant by ``sqrt(eps)``) is
    judged against the size of that noise, not against its float64 value, which is noise of its own;
    every other leaf keeps its plain relative error. Infinite or NaN differences, and outputs of
    another structure, are never excused (inf)."""
    ref_leaves, cand_leaves, own_leaves = leaves(ref64), leaves(cand64), leaves(own)
    if [p for p, _ in ref_leaves] != [p for p, _ in cand_leaves] or len(own_leaves) != len(ref_leaves):
        return float("inf")
    worst = 0.0
    for (_, r), (_, c), (_, o) in zip(ref_leaves, cand_leaves, own_leaves):
        if not isinstance(r, torch.Tensor):
            if r != c:
                return float("inf")
            continue
        if not isinstance(c, torch.Tensor) or c.shape != r.shape:
            return float("inf")
        if r.numel() == 0:
            continue
        r64, c64 = r.detach().double(), c.detach().double()
        delta = float((c64 - r64).abs().max())
        if not math.isfinite(delta):
            if torch.equal(r64, c64):
                continue  # the same infinities in both
            return float("inf")
        scale = float(r64.abs().max())
        if isinstance(o, torch.Tensor) and o.shape == r.shape:
            noise = float((o.detach().double() - r64).abs().max())
            if math.isfinite(noise):
                scale = max(scale, noise)
        if delta > 0:
            worst = max(worst, delta / scale if scale > 0 else float("inf"))
    return worst


def _compare(before: nn.Module, after: nn.Module, inputs: tuple[Any, ...], train: bool) -> tuple[str, float]:
    """(worst output, relative error); a failing run or a changed output structure is an infinite error."""
    reference = _run(before, inputs, train, 0)
    try:
        candidate = _run(after, inputs, train, 0)
    except Exception as exc:  # noqa: BLE001 - a broken result is reported, not raised as is
        return f"(none: the grown model raises {type(exc).__name__}: {str(exc).strip()[:200]})", float("inf")
    try:
        return worst_leaf(reference, candidate)
    except ValueError as exc:
        return f"(structure differs: {exc})", float("inf")
