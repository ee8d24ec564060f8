"""Verification and ONNX export."""

from __future__ import annotations

import os

import onnx
import pytest
import torch
from torch import nn

import r2r_fx

from zoo import ZOO


def test_export_onnx_has_dynamic_batch(tmp_path):
    model, inputs = ZOO["resnet"]()
    gm = r2r_fx.capture(model, inputs)
    path = r2r_fx.export_onnx(gm, inputs, tmp_path / "m.onnx")
    onnx.checker.check_model(path)
    x = torch.randn(5, *inputs[0].shape[1:])
    (out,) = r2r_fx.run_onnx(path, (x,))
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), rtol=1e-4, atol=1e-5)
    assert os.listdir(tmp_path) == ["m.onnx"]  # no temporary files left behind


def test_export_onnx_from_a_program_keeps_its_dynamic_batch(tmp_path):
    """An ExportedProgram in hand is exported as it is (the CLI's one torch.export of the grown model)."""
    model, inputs = ZOO["resnet"]()
    grown = r2r_fx.widen(r2r_fx.capture(model, inputs), factor=2.0, check=False)
    example = tuple(torch.cat([t, t]) for t in inputs)
    batch = ({0: torch.export.Dim.DYNAMIC},)
    program = torch.export.export(grown, example, dynamic_shapes=batch)
    path = r2r_fx.export_onnx(program, example, tmp_path / "p.onnx")
    x = torch.randn(5, *inputs[0].shape[1:])
    (out,) = r2r_fx.run_onnx(path, (x,))
    with torch.no_grad():
        expected = model(x)
    assert (out - expected).abs().max() <= 1e-4 * expected.abs().max()
    report = r2r_fx.verify(model, grown, inputs, onnx_from=program)
    assert report.ok and report.onnx_max_rel_error is not None and report.onnx_max_rel_error <= 1e-4
    other = r2r_fx.widen(r2r_fx.capture(model, inputs), factor=2.0, method="random", check=False)
    wrong = torch.export.export(other, example, dynamic_shapes=batch)
    report = r2r_fx.verify(model, grown, inputs, onnx_from=wrong)  # the program is what ONNX Runtime runs
    assert not report.ok and report.onnx_max_rel_error > 1e-2 and report.max_rel_error <= 1e-5
    assert sorted(os.listdir(tmp_path)) == ["p.onnx"]


def test_export_failure_leaves_no_file(tmp_path):
    class Unexportable(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        r2r_fx.export_onnx(Unexportable(), (torch.randn(2, 3),), tmp_path / "bad.onnx")
    assert os.listdir(tmp_path) == []


def test_verify_reports_a_different_function():
    model, inputs = ZOO["mlp"]()
    other, _ = ZOO["mlp"]()
    with torch.no_grad():
        other.fc3.bias.add_(1.0)
    report = r2r_fx.verify(model, other, inputs, onnx=True)
    assert not report.ok
    assert report.max_rel_error > 1e-3 and report.onnx_max_rel_error > 1e-3


def test_verify_leaves_models_as_they_were():
    model, inputs = ZOO["vgg"]()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    dropout = [m.p for m in model.modules() if isinstance(m, nn.Dropout)]
    report = r2r_fx.verify(model, model, inputs, onnx=False)
    assert report.ok and report.max_rel_error == 0.0
    assert not model.training
    assert [m.p for m in model.modules() if isinstance(m, nn.Dropout)] == dropout
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
