"""Capture: both graph flavours reproduce eager outputs, keep output structure, switch train/eval."""

from __future__ import annotations

import copy
import dataclasses
import os
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.fx._symbolic_trace import is_fx_tracing

import r2r_fx
from r2r_fx.capture import _trace_module
from r2r_fx.inline import INLINED
from r2r_fx.tree import max_errors

from zoo import ZOO


@pytest.mark.parametrize("via", ["symbolic_trace", "export"])
@pytest.mark.parametrize("name", sorted(ZOO))
def test_capture_matches_eager(name, via):
    model, inputs = ZOO[name]()
    gm = r2r_fx.capture(model, inputs, via=via)
    assert gm.meta["r2r_graph_level"] == ("module" if via == "symbolic_trace" else "aten")
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


@pytest.mark.parametrize("via", ["symbolic_trace", "export"])
def test_capture_leaves_the_model_as_it_was(via):
    """No parameter, buffer or mode of the model changes; growing the graph never touches the model."""
    model, inputs = ZOO["resnet"]()
    model.train()
    model.layer2.downsample[1].eval()  # a frozen BatchNorm: mixed modes must survive
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modes = {name: m.training for name, m in model.named_modules()}
    gm = r2r_fx.capture(model, inputs, via=via)
    grown = r2r_fx.widen(gm, factor=2.0, seed=0)
    grown(*inputs).sum().backward()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all("forward" not in m.__dict__ for m in model.modules())
    norms = {name: m.training for name, m in gm.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert len(norms) == 6 and list(norms.values()).count(False) == 1  # the graph keeps the frozen one
    if via == "symbolic_trace":  # shared layers keep their mode; the graph's containers copy theirs
        assert not norms["layer2.downsample.1"] and gm.training and gm.get_submodule("layer2.downsample").training


def test_module_graph_shares_layers_like_symbolic_trace():
    """As with torch.fx.symbolic_trace, the module graph calls the model's own layers (no weight copy)."""
    model, inputs = ZOO["resnet"]()
    gm = r2r_fx.capture(model, inputs)
    assert gm.get_submodule("layer1.conv1") is model.layer1.conv1


def _recorded(gm):
    """Everything the tracer records, node by node (nodes of two graphs compare by name)."""
    return [
        (n.name, n.op, str(n.target), str(n.args), str(n.kwargs), n.type, n.meta.get("nn_module_stack"))
        for n in gm.graph.nodes
    ]


@pytest.mark.parametrize("name", sorted(ZOO))
def test_the_tracer_records_what_symbolic_trace_records(name):
    """Except that torch's transformer layers are traced through (r2r_fx.inline), not kept as layers."""
    model, _ = ZOO[name]()
    ours, torchs = _trace_module(copy.deepcopy(model)), torch.fx.symbolic_trace(copy.deepcopy(model))
    if any(type(m) in INLINED for m in model.modules()):
        layers = [n for n in torchs.graph.nodes if n.op == "call_module"]
        assert any(type(torchs.get_submodule(n.target)) in INLINED for n in layers)
        kept = [n for n in ours.graph.nodes if n.op == "call_module"]
        assert not any(type(ours.get_submodule(n.target)) in INLINED for n in kept)
        assert dict(ours.named_parameters()).keys() == dict(torchs.named_parameters()).keys()
        return
    assert ours.code == torchs.code
    assert _recorded(ours) == _recorded(torchs)
    assert any(n.meta.get("nn_module_stack") for n in ours.graph.nodes)
    assert dict(ours.named_modules()).keys() == dict(torchs.named_modules()).keys()


def test_a_captured_graph_pickles_without_r2r_fx():
    """Reloading a pickled GraphModule re-traces it with the tracer class it records: torch's own."""
    model, inputs = ZOO["resnet"]()
    gm = r2r_fx.capture(model, inputs)
    assert gm._tracer_cls is torch.fx.Tracer
    blob = pickle.dumps(gm)
    assert b"r2r_fx" not in blob
    with torch.no_grad():
        assert torch.equal(pickle.loads(blob)(*inputs), gm(*inputs))


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
    assert gm.meta["r2r_graph_level"] == "aten"


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


class ScalesItsInput(nn.Module):
    """Preprocessing in place, as in ``x.div_(255)``: every run changes the tensor it is given."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        x = x.div_(255.0)
        return self.conv(x)


@pytest.mark.parametrize("via", ["symbolic_trace", "export"])
def test_a_model_that_changes_its_input_captures_and_verifies(via):
    model, x = ScalesItsInput().eval(), torch.randn(2, 3, 8, 8) * 255
    before = x.clone()
    gm = r2r_fx.capture(model, (x,), via=via)
    assert torch.equal(x, before), "capture changed the caller's example input"
    with torch.no_grad():
        expected = model(x.clone())
        assert torch.equal(gm(x.clone()), expected)
    report = r2r_fx.verify(model, gm, (x,), onnx=False)
    assert report.ok and report.max_rel_error == 0.0, report
    assert torch.equal(x, before), "verify changed the caller's example input"


@dataclasses.dataclass
class Batch:
    x: torch.Tensor


class ScalesItsBatch(nn.Module):
    """Changes a tensor held in a dataclass in place; ``graph_factor`` makes the traced graph unfaithful."""

    def __init__(self, graph_factor: float = 2.0):
        super().__init__()
        self.fc, self.graph_factor = nn.Linear(3, 3), graph_factor

    def forward(self, batch):
        batch.x.mul_(self.graph_factor if is_fx_tracing() else 2.0)
        return self.fc(batch.x)


def test_tensors_inside_a_dataclass_input_are_copied_and_checked():
    batch = Batch(torch.ones(2, 3))
    gm = r2r_fx.capture(ScalesItsBatch().eval(), (batch,), via="symbolic_trace")
    assert torch.equal(batch.x, torch.ones(2, 3)), "capture changed the tensor inside the caller's input"
    assert gm.meta["r2r_graph_level"] == "module"
    # The joint run cannot watch a tensor inside a dataclass, so it must not vouch for this graph.
    with pytest.raises(r2r_fx.CaptureError, match="differs from eager"):
        r2r_fx.capture(ScalesItsBatch(graph_factor=1.0).eval(), (batch,), via="symbolic_trace")


class ConstantAndFlag(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(2, 2)

    def forward(self, x):
        x = self.fc(x) + torch.tensor([1.0, 2.0])  # the tracer parks this tensor on the model
        return F.dropout(x, 0.5, training=self.training)


def test_capture_takes_the_tracers_constants_off_the_model():
    model, x = ConstantAndFlag().eval(), torch.randn(4, 2)
    before = dict(model.__dict__)
    gm = r2r_fx.capture(model, (x,), via="symbolic_trace")
    assert model.__dict__ == before
    assert {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"} == {"_tensor_constant0"}
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))


class _Fallback(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        raise NotImplementedError("use the fallback")


class _CatchesFromASubmodule(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = _Fallback(), nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        try:
            y = self.a(x)
        except NotImplementedError:
            y = x
        return self.c(torch.relu(self.b(y)))


@pytest.mark.parametrize("nested", [False, True])
def test_a_forward_that_catches_a_submodules_exception_captures(nested):
    """torch's tracer leaves the raising submodule on its module stack; the enclosing module's exit
    then fails an assertion, and every later node would name that submodule."""
    torch.manual_seed(0)
    model = (nn.Sequential(_CatchesFromASubmodule(), nn.Linear(2, 2)) if nested else _CatchesFromASubmodule()).eval()
    x = torch.randn(3, 4)
    gm = r2r_fx.capture(model, (x,), via="symbolic_trace")
    with torch.no_grad():
        assert torch.equal(gm(x), model(x))
    stacks = [list(n.meta.get("nn_module_stack") or {}) for n in gm.graph.nodes if n.op == "call_module"]
    assert stacks and not any(any(key.endswith("a") for key in stack) for stack in stacks)


def test_the_example_script_runs(tmp_path):
    """examples/quickstart.py is the README's runnable version of the API."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(  # the installed r2r_fx: the script's folder comes first on its path, not the checkout
        [sys.executable, os.path.join(root, "examples", "quickstart.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "function preserved" in done.stdout and len(list(tmp_path.iterdir())) >= 2


def _scaled_gelu(x: torch.Tensor, scale: float) -> torch.Tensor:
    if scale > 0:  # Python control flow: why a library wraps a function for torch.fx
        return F.gelu(x) * scale
    return x


torch.fx.wrap("_scaled_gelu")


class _Wrapped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 12), nn.Linear(12, 3)

    def forward(self, x):
        return self.fc2(_scaled_gelu(self.fc1(x), 2.0))


def test_a_wrapped_function_no_rule_describes_is_seen_through_by_export():
    """``torch.fx.wrap`` keeps a function as one call in the module graph (torchvision's Swin attention);
    no rule describes it, so everything it touches would freeze: ``via="auto"`` takes the ATen graph."""
    model, x = _Wrapped().eval(), torch.randn(4, 6)
    module_graph = r2r_fx.capture(model, (x,), via="symbolic_trace")
    assert not any(g.widenable for g in r2r_fx.width_groups(module_graph))
    gm = r2r_fx.capture(model, (x,))
    assert gm.meta["r2r_graph_level"] == "aten" and "_scaled_gelu" in gm.meta["r2r_capture_note"]
    grown = r2r_fx.widen(gm, factor=2.0, seed=0)
    assert grown.get_parameter("fc1.weight").shape == (24, 6)
    with torch.no_grad():
        assert (grown(x) - model(x)).abs().max() <= 1e-5 * model(x).abs().max()
