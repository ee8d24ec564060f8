"""Capture: both graph flavours reproduce eager outputs, keep output structure, switch train/eval."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import r2r_fx
from r2r_fx.tree import max_errors

from zoo import ZOO


@pytest.mark.parametrize("via", ["symbolic_trace", "export"])
@pytest.mark.parametrize("name", sorted(ZOO))
def test_capture_matches_eager(name, via):
    model, inputs = ZOO[name]()
    gm = r2r_fx.capture(model, inputs, via=via)
    assert gm.meta["r2r_flavour"] == ("module" if via == "symbolic_trace" else "aten")
    fresh = tuple(torch.randn_like(t) if t.is_floating_point() else t for t in inputs)
    with torch.no_grad():
        _, rel = max_errors(model(*fresh), gm(*fresh))  # also checks the output structure
    assert rel <= 1e-5


def test_output_structure_is_kept():
    model, inputs = ZOO["multi_output"]()
    out = r2r_fx.capture(model, inputs, via="export")(*inputs)
    assert isinstance(out, dict) and set(out) == {"logits", "features"}
    model, inputs = ZOO["tuple_output"]()
    assert isinstance(r2r_fx.capture(model, inputs)(*inputs), tuple)


def test_capture_does_not_share_parameters():
    model, inputs = ZOO["resnet"]()
    gm = r2r_fx.capture(model, inputs)
    with torch.no_grad():
        next(gm.parameters()).add_(1.0)
    assert not torch.equal(next(gm.parameters()), next(model.parameters()))


@pytest.mark.parametrize("name", ["vgg", "resnet", "mobilenetv2"])
def test_exported_graph_switches_train_and_eval(name):
    """torch.export bakes the mode in; capture turns batch_norm/dropout back into modules."""
    model, inputs = ZOO[name]()
    gm = r2r_fx.capture(model, inputs, via="export")
    assert any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in gm.modules())
    for train in (True, False):
        model.train(train)
        gm.train(train)
        torch.manual_seed(3)
        expected = model(*inputs)
        torch.manual_seed(3)
        got = gm(*inputs)
        assert max_errors(expected, got)[1] <= 1e-5
    # running statistics update in train mode exactly as in eager
    bn_eager = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)][0]
    bn_graph = [m for m in gm.modules() if isinstance(m, nn.BatchNorm2d)][0]
    torch.testing.assert_close(bn_eager.running_mean, bn_graph.running_mean)


def test_fallback_to_export_when_tracing_fails():
    class ShapeBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            if x.shape[1] > 2:  # Python control flow on a size: symbolic tracing cannot, export can
                x = self.conv(x)
            return x.relu()

    gm = r2r_fx.capture(ShapeBranch(), (torch.randn(2, 3, 4, 4),))
    assert gm.meta["r2r_flavour"] == "aten"


def test_both_failing_names_both_causes():
    class DataBranch(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent: neither tracer can capture it
                return x * 2
            return x * 3

    with pytest.raises(r2r_fx.CaptureError) as info:
        r2r_fx.capture(DataBranch(), (torch.randn(2, 3),))
    message = str(info.value)
    assert "module:" in message and "aten:" in message
    assert "test_capture.py" in message  # the offending source line


def test_capture_rejects_non_modules():
    with pytest.raises(TypeError, match="needs an nn.Module"):
        r2r_fx.capture(lambda x: x, (torch.randn(1),))


def test_float64_capture_keeps_dtype():
    model, inputs = ZOO["conv1d"]()
    model = model.double()
    gm = r2r_fx.capture(model, tuple(t.double() for t in inputs))
    assert all(p.dtype == torch.float64 for p in gm.parameters())
