"""Capture's check: a graph that does not compute what eager computes is never accepted.

The tampered graphs below are traced from a model and then edited; ``compare_with_eager`` (what
``capture`` runs on every graph: eager and the graph each on their own copy of the inputs) must see the
difference. Faithful graphs must compare equal.
"""

from __future__ import annotations

import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import r2r_fx
from r2r_fx.capture import compare_with_eager


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.relu = nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.conv2(out)
        out += x
        return self.relu(out)


def _tampered(model, edit):
    gm = torch.fx.symbolic_trace(model)
    edit(gm.graph)
    gm.graph.lint()
    gm.recompile()
    return gm


def _node(graph, name):
    return next(n for n in graph.nodes if n.name == name)


class AddInPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        y = self.a(x)
        y.add_(1.0)
        return self.b(y)


def test_faithful_graphs_compare_equal():
    for model, x in ((Block().eval(), torch.randn(2, 4, 6, 6)), (AddInPlace().eval(), torch.randn(2, 6))):
        assert compare_with_eager(model, torch.fx.symbolic_trace(model), (x,)) == 0.0


def test_a_mutation_missing_from_the_graph_is_caught():
    model, x = AddInPlace().eval(), torch.randn(2, 6)

    def drop_add(graph):
        add = _node(graph, "add_")
        add.replace_all_uses_with(add.args[0])
        graph.erase_node(add)

    assert compare_with_eager(model, _tampered(model, drop_add), (x,)) > 1e-3


def test_different_glue_between_layers_is_caught():
    model, x = Block().eval(), torch.randn(2, 4, 6, 6)

    def sub_instead_of_add(graph):
        for node in graph.nodes:
            if node.op == "call_function" and node.target is operator.add:  # the tracer's ``out += ...``
                node.target = operator.sub

    assert compare_with_eager(model, _tampered(model, sub_instead_of_add), (x,)) > 1e-3


def test_different_glue_after_the_last_layer_is_caught():
    class Tail(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x) * 2

    model, x = Tail().eval(), torch.randn(3, 4)

    def times_three(graph):
        for node in graph.nodes:
            if node.op == "call_function":
                node.args = (node.args[0], 3)

    assert compare_with_eager(model, _tampered(model, times_three), (x,)) == pytest.approx(0.5, rel=1e-5)


def test_wrong_wiring_is_caught():
    model, x = Block().eval(), torch.randn(2, 4, 6, 6)

    def feed_conv2_from_x(graph):
        conv2 = _node(graph, "conv2")
        conv2.args = (_node(graph, "x"),)

    assert compare_with_eager(model, _tampered(model, feed_conv2_from_x), (x,)) > 1e-3


@torch.fx.wrap
def _double_in_place(t):
    t.mul_(2.0)


class HiddenInPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        y = self.a(x)
        _double_in_place(y)
        return self.b(y)


def test_in_place_ops_the_graph_keeps_are_captured_exactly():
    model, x = HiddenInPlace().eval(), torch.randn(4, 6)
    captured = r2r_fx.capture(model, (x,))
    with torch.no_grad():
        assert torch.equal(captured(x), model(x))


def test_hooks_are_honoured():
    model, x = Block().eval(), torch.randn(2, 4, 6, 6)
    model.conv2.register_forward_hook(lambda module, args, out: out * 2)
    captured = r2r_fx.capture(model, (x,), via="symbolic_trace")
    with torch.no_grad():
        assert torch.equal(captured(x), model(x))


def test_graph_errors_are_reported_by_capture():
    model, x = nn.Sequential(nn.Linear(4, 4)).eval(), torch.randn(2, 4)

    def break_input(graph):
        fc = _node(graph, "_0")
        with graph.inserting_before(fc):
            bad = graph.call_function(torch.reshape, (fc.args[0], (3, 5)))
        fc.args = (bad,)

    with pytest.raises(RuntimeError):
        compare_with_eager(model, _tampered(model, break_input), (x,))


def test_modes_are_restored():
    model, x = Block(), torch.randn(2, 4, 6, 6)
    model.train()
    model.conv2.eval()
    r2r_fx.capture(model, (x,))
    assert model.training and model.conv1.training and not model.conv2.training
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_eager_errors_propagate():
    model = nn.Sequential(nn.Linear(4, 4)).eval()
    with pytest.raises(r2r_fx.CaptureError, match="eager model fails"):
        r2r_fx.capture(model, (torch.randn(2, 5),))


def test_capture_leaves_running_statistics_alone():
    """The train-mode traces and exports that find mode flags must not update batch statistics."""
    model = Block().train()
    before = [b.clone() for b in model.buffers()]
    for via in ("symbolic_trace", "export"):
        r2r_fx.capture(model, (torch.randn(2, 4, 6, 6),), via=via)
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))


class _ChainedDropouts(nn.Module):
    def forward(self, x):
        return F.dropout(F.dropout(x * x, 0.1, self.training), 0.0, self.training).mean(1)


def test_chained_functional_dropouts_become_layers():
    """The second dropout's input is the first one, which is replaced first (found by the fuzzer)."""
    model, x = _ChainedDropouts(), torch.randn(3, 4)
    gm = r2r_fx.capture(model, (x,), via="symbolic_trace")
    assert "r2r_eval_only" not in gm.meta
    assert sum(isinstance(m, nn.Dropout) for m in gm.modules()) == 2
    assert torch.equal(gm.eval()(x), model.eval()(x))
