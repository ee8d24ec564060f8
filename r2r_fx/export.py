"""Export a (grown) model to ONNX with a dynamic batch (and token sequence) axis, and run ONNX files in onnxruntime."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["dynamic_axes_candidates", "expand_for_export", "export_onnx", "run_onnx"]

logger = logging.getLogger(__name__)


def dynamic_axes_candidates(inputs: Sequence[Any]) -> list[tuple[tuple[tuple[int, ...] | None, ...], list[str]]]:
    """Dynamic axes to try, most first: (per input the axes or None, their names).

    Every tensor input of rank >= 1 has a batch axis 0; an integer input of rank >= 2 (token ids, an
    attention mask) also a sequence axis 1. Last comes the static export.
    """
    tensors = [isinstance(t, torch.Tensor) and t.dim() > 0 for t in inputs]
    tokens = [ok and not (t.is_floating_point() or t.is_complex()) and t.dim() >= 2 for ok, t in zip(tensors, inputs)]
    batch = tuple((0,) if ok else None for ok in tensors)
    candidates: list[tuple[tuple[tuple[int, ...] | None, ...], list[str]]] = []
    if any(tokens):
        both = tuple((0, 1) if tok else ax for tok, ax in zip(tokens, batch))
        candidates.append((both, ["batch", "sequence"]))
    if any(tensors):
        candidates.append((batch, ["batch"]))
    candidates.append((tuple(None for _ in inputs), []))
    return candidates


def expand_for_export(inputs: Sequence[Any], axes: Sequence[tuple[int, ...] | None]) -> tuple[Any, ...]:
    """Copies of ``inputs`` with every size-1 dynamic axis repeated to 2 (torch.export specialises sizes 0
    and 1). Copies, because torch.export marks the tensors it was given as dynamic, and a failed attempt's
    marks would otherwise carry over to the next, static one."""
    out = []
    for t, ax in zip(inputs, axes):
        if isinstance(t, torch.Tensor):
            t = t.clone()
        for a in ax or ():
            if t.shape[a] == 1:
                t = torch.cat([t, t], dim=a)
        out.append(t)
    return tuple(out)


def _dynamic_shapes(axes: Sequence[tuple[int, ...] | None]) -> tuple[Any, ...]:
    return tuple({a: torch.export.Dim.DYNAMIC for a in ax} if ax else None for ax in axes)


def export_onnx(model: Any, example_inputs: Sequence[Any], path: str | os.PathLike[str]) -> str:
    """Write ``model`` to ``path`` as ONNX (dynamic batch, and token sequence where it can), checked by onnx.checker.

    ``model`` is a module, or an ExportedProgram already in hand (exported as it is, with its own dynamic
    axes, without tracing again). The file is written to a temporary name next to ``path`` and renamed at
    the end, so a failure leaves no partial file. A module is exported in eval mode on a copy's mode flag.
    """
    import onnx

    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    is_program = isinstance(model, torch.export.ExportedProgram)
    was_training = not is_program and model.training
    tensors = list(model.state_dict.values()) if is_program else list(model.parameters())
    if not is_program:
        model.eval()
    # protobuf caps a file at 2 GiB: big models keep their weights in a side file (``path + ".data"``)
    external = sum(t.numel() * t.element_size() for t in tensors) > 1_800_000_000
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=folder)
    os.close(fd)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program, last = None, None
            attempts = [(None, [])] if is_program else dynamic_axes_candidates(inputs)
            for axes, names in attempts:
                try:
                    program = torch.onnx.export(
                        model,
                        inputs if is_program else expand_for_export(inputs, axes),
                        tmp,
                        dynamo=True,
                        dynamic_shapes=_dynamic_shapes(axes) if names else None,
                        external_data=external,
                        verbose=False,
                        report=False,
                    )
                    break
                except Exception as exc:  # noqa: BLE001 - retry with fewer dynamic axes
                    logger.info("ONNX export with dynamic %s failed: %s", names or "nothing", exc)
                    last = exc
            if program is None:
                raise RuntimeError(f"ONNX export failed: {last}") from last
        del program
        onnx.checker.check_model(tmp)
        if external:  # the side file is named after the temporary file: save again under the final name
            proto = onnx.load(tmp)
            onnx.save(proto, path, save_as_external_data=True, location=os.path.basename(path) + ".data")
        else:
            os.replace(tmp, path)
        os.chmod(path, 0o666 & ~_umask())  # mkstemp made it 0600: respect the umask like any other file
    finally:
        if not is_program:
            model.train(was_training)
        for leftover in (tmp, tmp + ".data"):
            if os.path.exists(leftover):
                os.remove(leftover)
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def run_onnx(path: str | os.PathLike[str], inputs: Sequence[Any]) -> list[torch.Tensor]:
    """Run an ONNX file on CPU with onnxruntime; returns the flat list of outputs as tensors."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
    tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
    feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), tensors)}
    return [torch.from_numpy(o) for o in session.run(None, feeds)]
