"""A user's own layer type, supported from outside the package with ``r2r_fx.register_layer``."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import r2r_fx
from r2r_fx import rules


class MyConv(nn.Module):
    """A user's convolution: its own parameter names and width attributes (``extra_repr`` reads them)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.in_ch, self.out_ch = cin, cout
        self.w = nn.Parameter(torch.randn(cout, cin, 3, 3) * 0.3)
        self.b = nn.Parameter(torch.randn(cout) * 0.1)

    def forward(self, x):
        return F.conv2d(x, self.w, self.b, padding=1)

    def extra_repr(self) -> str:
        return f"{self.in_ch}, {self.out_ch}"


class UnregisteredConv(MyConv):
    """Same code, another class: not registered, so capture traces through it."""


def _model(conv: type) -> nn.Module:
    return nn.Sequential(conv(3, 6), nn.BatchNorm2d(6), nn.ReLU(), conv(6, 5), nn.AdaptiveAvgPool2d(1), nn.Flatten())


@pytest.fixture
def registered():
    saved = dict(rules.RULES), dict(rules.FIXES), set(rules.LAYERS)

    def couple(c, node, gm):
        rules.conv_layer(c, node, weight="w", bias="b")

    def fix(module, node, width_of):
        module.out_ch, module.in_ch = module.w.shape[0], module.w.shape[1]

    r2r_fx.register_layer(MyConv, couple, fix)
    yield
    rules.RULES.clear(), rules.FIXES.clear(), rules.LAYERS.clear()
    rules.RULES.update(saved[0]), rules.FIXES.update(saved[1]), rules.LAYERS.update(saved[2])


def _outputs(model: nn.Module, x: torch.Tensor, train: bool) -> torch.Tensor:
    model = copy.deepcopy(model).train(train)
    with torch.no_grad():
        return model(x)


def test_a_registered_layer_stays_one_call_and_grows(registered):
    torch.manual_seed(0)
    model, x = _model(MyConv), torch.randn(4, 3, 8, 8)
    gm = r2r_fx.capture(model, (x,), via="symbolic_trace")
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"][:1] == ["0"]
    grown = r2r_fx.widen(gm, factor=2.0, seed=0, check=False)
    first = grown.get_submodule("0")
    assert type(first) is MyConv and first.w.shape == (12, 3, 3, 3) and (first.in_ch, first.out_ch) == (3, 12)
    second = grown.get_submodule("3")
    assert second.w.shape == (5, 12, 3, 3) and (second.in_ch, second.out_ch) == (12, 5)
    y = torch.randn(5, 3, 8, 8)
    for train in (False, True):
        ref, got = _outputs(model, y, train), _outputs(grown, y, train)
        assert (ref - got).abs().max() <= 1e-5 * ref.abs().max(), train
    assert r2r_fx.verify(model, grown, (x,), onnx=True).ok
    trained = copy.deepcopy(grown).train()
    trained(y).sum().backward()
    grad = trained.get_submodule("0").w.grad
    assert grad is not None and grad[6:].abs().sum() > 0  # the new filters train


def test_an_unregistered_layer_is_traced_through(registered):
    model, x = _model(UnregisteredConv), torch.randn(4, 3, 8, 8)
    gm = r2r_fx.capture(model, (x,), via="symbolic_trace")
    assert not any(n.op == "call_module" and n.target == "0" for n in gm.graph.nodes)
    assert any(n.op == "call_function" and n.target is F.conv2d for n in gm.graph.nodes)
