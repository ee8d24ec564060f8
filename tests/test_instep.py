"""The in-step check: eager and graph run side by side, each layer once, and fall out of step safely.

The tampered graphs below are graphs that do *not* compute what eager computes; the joint run must
never report them equal. The faithful ones must run in step and record the shapes ShapeProp records.
"""

from __future__ import annotations

import logging
import operator

import pytest
import torch
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

import r2r_fx
from r2r_fx.instep import run_in_step
from r2r_fx.tree import max_errors

from zoo import ZOO


def _joint(model, inputs):
    gm = torch.fx.symbolic_trace(model)
    return gm, run_in_step(model, gm, inputs)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_runs_in_step_with_shapeprop_shapes(name):
    model, inputs = ZOO[name]()
    gm, joint = _joint(model, inputs)
    assert joint is not None, "fell out of step on a faithful graph"
    eager, graph = joint
    assert max_errors(eager, graph)[1] == 0.0
    with torch.no_grad():
        expected = model(*inputs)
    assert max_errors(expected, eager)[1] == 0.0  # the eager side is the real eager output
    ours = {n.name: n.meta.get("tensor_meta") for n in gm.graph.nodes}
    with torch.no_grad():  # as capture's record_shapes runs it
        ShapeProp(gm).propagate(*inputs)
    assert ours == {n.name: n.meta.get("tensor_meta") for n in gm.graph.nodes}


class Block(nn.Module):
    """Residual add in place, an in-place ReLU called three times, a shortcut conv."""

    def __init__(self):
        super().__init__()
        self.conv1, self.conv2, self.short = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        out = self.relu(self.conv1(x))
        out = self.conv2(out)
        out += self.short(x)
        return self.relu(self.relu(out))


def test_in_place_glue_and_in_place_layers_stay_in_step():
    model, x = Block().eval(), torch.randn(2, 4, 6, 6)
    gm, joint = _joint(model, (x,))
    assert joint is not None
    with torch.no_grad():
        assert torch.equal(model(x), joint[1])


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


def test_a_mutation_missing_from_the_graph_is_caught():
    """Eager changes a layer output in place, the graph lost that op: sharing y must not hide it."""
    model, x = AddInPlace().eval(), torch.randn(2, 6)

    def drop_add(graph):
        add = _node(graph, "add_")
        add.replace_all_uses_with(add.args[0])
        graph.erase_node(add)

    gm = _tampered(model, drop_add)
    assert run_in_step(model, gm, (x,)) is None
    gm_ok = torch.fx.symbolic_trace(model)
    assert run_in_step(model, gm_ok, (x,)) is not None


def test_different_glue_between_layers_is_caught():
    model, x = Block().eval(), torch.randn(2, 4, 6, 6)

    def sub_instead_of_add(graph):
        for node in graph.nodes:
            if node.op == "call_function" and node.target is operator.add:  # the tracer's ``out += ...``
                node.target = operator.sub

    gm = _tampered(model, sub_instead_of_add)
    assert run_in_step(model, gm, (x,)) is None


def test_different_glue_after_the_last_layer_shows_in_the_outputs():
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

    gm = _tampered(model, times_three)
    eager, graph = run_in_step(model, gm, (x,))
    assert torch.allclose(graph, eager * 1.5)
    with pytest.raises(AssertionError):
        torch.testing.assert_close(graph, eager)


def test_wrong_wiring_is_caught():
    model, x = Block().eval(), torch.randn(2, 4, 6, 6)

    def feed_conv2_from_x(graph):
        conv2 = _node(graph, "conv2")
        conv2.args = (_node(graph, "x"),)

    gm = _tampered(model, feed_conv2_from_x)
    assert run_in_step(model, gm, (x,)) is None


@torch.fx.wrap
def _double_in_place(t):
    """An in-place op the static scan for mutations cannot recognise (no ``_`` suffix, no flag)."""
    t.mul_(2.0)


class HiddenInPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        y = self.a(x)
        _double_in_place(y)
        return self.b(y)


def test_graph_changing_a_shared_tensor_falls_back_and_capture_still_checks():
    model, x = HiddenInPlace().eval(), torch.randn(4, 6)
    gm, joint = _joint(model, (x,))
    assert joint is None  # the graph's in-place op would otherwise have hit eager's tensor too
    captured = r2r_fx.capture(model, (x,))
    with torch.no_grad():
        assert torch.equal(captured(x), model(x))


def test_hooks_fall_back_and_are_honoured():
    model, x = Block().eval(), torch.randn(2, 4, 6, 6)
    model.conv2.register_forward_hook(lambda module, args, out: out * 2)
    gm, joint = _joint(model, (x,))
    assert joint is None
    # the graph calls the very layer objects, so their hooks act in the graph as in eager
    captured = r2r_fx.capture(model, (x,), via="symbolic_trace")
    with torch.no_grad():
        assert torch.equal(captured(x), model(x))


def test_graph_errors_only_make_it_fall_back(caplog):
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x)

    model, x = Bad().eval(), torch.randn(2, 4)

    def break_input(graph):
        fc = _node(graph, "fc")
        with graph.inserting_before(fc):
            bad = graph.call_function(torch.reshape, (fc.args[0], (3, 5)))
        fc.args = (bad,)

    gm = _tampered(model, break_input)
    with caplog.at_level(logging.INFO, logger="r2r_fx.instep"):
        assert run_in_step(model, gm, (x,)) is None
    assert "graph fails" in caplog.text


def test_modes_and_forwards_are_restored():
    model, x = Block(), torch.randn(2, 4, 6, 6)
    model.train()
    model.conv2.eval()
    gm, joint = _joint(model, (x,))
    assert joint is not None
    assert model.training and model.conv1.training and not model.conv2.training
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_eager_errors_propagate():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return self.fc(x)

    model = Broken().eval()
    gm = torch.fx.symbolic_trace(model)
    with pytest.raises(RuntimeError):
        run_in_step(model, gm, (torch.randn(2, 5),))
    assert "forward" not in model.fc.__dict__
    with pytest.raises(r2r_fx.CaptureError, match="eager model fails"):
        r2r_fx.capture(model, (torch.randn(2, 5),))


def test_in_place_layer_on_a_tensor_the_graph_reads_again():
    """``relu_`` on equal but distinct tensors whose graph node is read later: each side runs it."""

    class Reuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.relu = nn.Linear(4, 4), nn.ReLU(inplace=True)

        def forward(self, x):
            y = self.fc(x) + 1.0
            z = self.relu(y)
            return z + y

    model, x = Reuse().eval(), torch.randn(3, 4)
    gm, joint = _joint(model, (x,))
    assert joint is not None
    with torch.no_grad():
        assert torch.equal(joint[1], model(x))
        assert torch.equal(joint[1], gm(x))


class MutatesInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = x.add_(2.0)  # the graph reads x here for the last time: fc reads the add_ node
        return self.fc(y)


def test_a_write_just_before_the_graph_lets_go_is_caught():
    """The graph's glue changes the input (held by both sides) by its last read of it.

    Nothing checks that tensor at a later layer call, so only the check right after the graph's
    stretch of glue sees the write. Without it, eager would add its 2.0 on top of the graph's 1.0 and
    both sides would feed the same tensor to ``fc``: equal outputs from an unfaithful graph.
    """
    model = MutatesInput().eval()

    def add_one_instead(graph):
        add = _node(graph, "add_")
        add.args = (add.args[0], 1.0)

    gm = _tampered(model, add_one_instead)
    assert run_in_step(model, gm, (torch.randn(3, 4),)) is None


def _plain(model, gm, x):
    with torch.no_grad():
        return model(x.clone()), gm(x.clone())


class PassThenReLU(nn.Module):
    """A residual-style sum passed through a layer that hands its input back, then an in-place ReLU."""

    def __init__(self, keep):
        super().__init__()
        self.keep, self.relu = keep, nn.ReLU(inplace=True)

    def forward(self, x):
        b = self.keep(x + 1.0)
        return self.relu(b) + b


@pytest.mark.parametrize("keep", [nn.Identity(), nn.Dropout(0.5), nn.Flatten(0)], ids=["identity", "dropout", "view"])
def test_a_sum_passed_through_stays_in_step_and_exact(keep):
    """The sum is compared in its own memory and dropped; the graph's value after the pass-through must
    still be its own, or eager's in-place ReLU would reach it."""
    model, x = PassThenReLU(keep).eval(), torch.randn(4, 5)
    gm, joint = _joint(model, (x.clone(),))
    eager, graph = _plain(model, gm, x)
    assert torch.equal(eager, graph)
    if joint is not None:  # a view makes the graph share eager's memory: falling back is fine
        assert torch.equal(joint[0], eager) and torch.equal(joint[1], eager)
    if not isinstance(keep, nn.Flatten):
        assert joint is not None


@pytest.mark.parametrize("keep", [nn.Identity(), nn.Flatten(0)], ids=["identity", "view"])
def test_an_in_place_layer_on_a_copy_the_graph_made_is_caught(keep):
    """Eager's ReLU changes b itself; the tampered graph gives it a copy and reads b unchanged after.

    The copy equals b, so the arguments compare equal; what must not pass is eager's in-place write
    reaching a tensor the graph holds as another node's value (b, or a view of its memory).
    """
    model, x = PassThenReLU(keep).eval(), torch.randn(4, 5)

    def copy_before_relu(graph):
        keep_node = next(n for n in graph.nodes if n.op == "call_module" and n.target == "keep")
        relu = next(n for n in graph.nodes if n.op == "call_module" and n.target == "relu")
        with graph.inserting_before(relu):
            copy = graph.call_method("clone", (keep_node,))
        relu.replace_input_with(keep_node, copy)

    gm = _tampered(model, copy_before_relu)
    eager, graph = _plain(model, gm, x)
    assert not torch.equal(eager, graph)
    joint = run_in_step(model, gm, (x.clone(),))
    assert joint is None or max_errors(*joint)[1] > 0


def test_an_in_place_layer_on_an_input_the_graph_reads_again_is_caught():
    """Eval eager hands the input itself to an in-place ReLU; the traced graph hands it ``x * 1``.

    ``torch.is_grad_enabled()`` is True while tracing and False in capture's check, so the graph
    records the copy. Capture must not return a graph whose output differs from eval-mode eager.
    """

    class GradDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x):
            t = x * 1 if torch.is_grad_enabled() else x
            return self.relu(t) + x

    model, x = GradDependent().eval(), torch.randn(4, 5)
    gm = torch.fx.symbolic_trace(model)
    assert run_in_step(model, gm, (x.clone(),)) is None
    try:
        captured = r2r_fx.capture(model, (x,))
    except r2r_fx.CaptureError:
        return
    eager, graph = _plain(model, captured, x)
    assert torch.equal(eager, graph)


class Accumulate(nn.Module):
    """Changes both its arguments in place."""

    def forward(self, a, b):
        a.add_(1.0)
        b.mul_(2.0)
        return a


class TwoInPlaceArguments(nn.Module):
    def __init__(self):
        super().__init__()
        self.acc = Accumulate()

    def forward(self, x):
        b = x * 3.0
        return self.acc(x + 1.0, b) + b


def test_a_layer_changing_a_dropped_and_a_kept_argument_in_place():
    """``x + 1`` is dropped for eager's equal tensor, ``b`` is read again: running the layer once more
    on the graph's arguments would change eager's tensor twice. The result must still be eager's."""

    class LeafAccumulate(torch.fx.Tracer):
        def is_leaf_module(self, m, name):
            return isinstance(m, Accumulate) or super().is_leaf_module(m, name)

    model, x = TwoInPlaceArguments().eval(), torch.randn(4, 5)
    gm = torch.fx.GraphModule(model, LeafAccumulate().trace(model))
    eager, _ = _plain(model, gm, x)
    joint = run_in_step(model, gm, (x.clone(),))
    assert joint is None or (torch.equal(joint[0], eager) and torch.equal(joint[1], eager))
