"""Export a (grown) model to ONNX with a dynamic batch axis, and run ONNX files in onnxruntime."""

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
from torch import nn

__all__ = ["export_onnx", "run_onnx"]

logger = logging.getLogger(__name__)


def _batch_dynamic(inputs: Sequence[Any]) -> tuple[Any, ...]:
    return tuple({0: torch.export.Dim.AUTO} if isinstance(t, torch.Tensor) and t.dim() > 0 else None for t in inputs)


def export_onnx(model: nn.Module, example_inputs: Sequence[Any], path: str | os.PathLike[str]) -> str:
    """Write ``model`` to ``path`` as ONNX (dynamic batch size), checked by ``onnx.checker``.

    The file is written to a temporary name next to ``path`` and renamed at the end, so a failure
    leaves no partial file. Exporting happens in eval mode on a copy's mode flag.
    """
    import onnx

    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    was_training = model.training
    model.eval()
    # protobuf caps a file at 2 GiB: big models keep their weights in a side file (``path + ".data"``)
    external = sum(p.numel() * p.element_size() for p in model.parameters()) > 1_800_000_000
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=folder)
    os.close(fd)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            try:
                program = torch.onnx.export(
                    model,
                    inputs,
                    tmp,
                    dynamo=True,
                    dynamic_shapes=_batch_dynamic(inputs),
                    external_data=external,
                    verbose=False,
                    report=False,
                )
            except Exception:  # noqa: BLE001 - retry with a static batch
                logger.info("ONNX export with a dynamic batch failed; exporting with static shapes")
                program = torch.onnx.export(
                    model, inputs, tmp, dynamo=True, external_data=external, verbose=False, report=False
                )
        del program
        onnx.checker.check_model(tmp)
        if external:  # the side file is named after the temporary file: save again under the final name
            proto = onnx.load(tmp)
            onnx.save(proto, path, save_as_external_data=True, location=os.path.basename(path) + ".data")
        else:
            os.replace(tmp, path)
    finally:
        model.train(was_training)
        for leftover in (tmp, tmp + ".data"):
            if os.path.exists(leftover):
                os.remove(leftover)
    return path


def run_onnx(path: str | os.PathLike[str], inputs: Sequence[Any]) -> list[torch.Tensor]:
    """Run an ONNX file on CPU with onnxruntime; returns the flat list of outputs as tensors."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])
    tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
    feeds = {i.name: t.detach().cpu().numpy() for i, t in zip(session.get_inputs(), tensors)}
    return [torch.from_numpy(o) for o in session.run(None, feeds)]
