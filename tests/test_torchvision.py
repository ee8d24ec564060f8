"""torchvision's classification zoo: a CI subset here; tools/zoo_table.py sweeps all 80 models.

Skipped cleanly when torchvision is not installed. The CPU shim in ../shared/zoo is imported first
when present (see tools/torchvision_zoo.py).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import r2r_fx
from r2r_fx.record import growth_history

from helpers import assert_function_preserved
from torchvision_zoo import build, classification_models, import_torchvision

try:
    import_torchvision()  # the CPU shim first, then torchvision
except ImportError:
    pytest.skip("torchvision is not installed", allow_module_level=True)

CAPTURE_SUBSET = [
    "alexnet",
    "densenet121",
    "efficientnet_b0",
    "googlenet",
    "inception_v3",
    "maxvit_t",
    "mnasnet0_5",
    "mobilenet_v3_small",
    "regnet_x_400mf",
    "resnet18",
    "resnext50_32x4d",
    "shufflenet_v2_x0_5",
    "squeezenet1_1",
    "swin_t",
    "vgg11_bn",
    "vit_b_32",
    "convnext_tiny",
]
WIDEN_SUBSET = [
    "resnet18",
    "mobilenet_v3_small",
    "shufflenet_v2_x0_5",
    "squeezenet1_1",
    "efficientnet_b0",
    "regnet_x_400mf",
    "densenet121",
]
ONNX_SUBSET = ["resnet18", "mobilenet_v3_small"]


def test_the_zoo_has_80_classification_models():
    assert len(classification_models()) == 80


@pytest.mark.parametrize("name", CAPTURE_SUBSET)
def test_capture_and_analyze(name):
    model, inputs = build(name)
    gm = r2r_fx.capture(model, inputs)  # checked against eager inside
    groups = r2r_fx.width_groups(gm)
    assert groups and any(g.widenable for g in groups)
    assert all(g.reason for g in groups if not g.widenable)


@pytest.mark.parametrize("name", WIDEN_SUBSET)
def test_widen_preserves_function(name):
    model, inputs = build(name)
    gm = r2r_fx.capture(model, inputs)
    grown = r2r_fx.widen(gm, factor=2.0, seed=0)
    # Deep BatchNorm nets sit at their own float32 rounding floor in train mode: the float64 re-check
    # (same 1e-5 tolerance) decides; the float32 error must stay within twice the reference's own floor.
    assert_function_preserved(gm, grown, inputs, onnx=name in ONNX_SUBSET, f64_fallback=True)


@pytest.mark.parametrize("method", ["net2net", "netmorph"])
@pytest.mark.parametrize("name", WIDEN_SUBSET)
def test_other_methods_preserve_function(name, method):
    model, inputs = build(name)
    gm = r2r_fx.capture(model, inputs)
    grown = r2r_fx.widen(gm, factor=2.0, seed=0, method=method)
    assert_function_preserved(gm, grown, inputs, onnx=False, f64_fallback=True)
    deeper = r2r_fx.deepen(gm, seed=0, method=method)
    if method == "netmorph":
        assert_function_preserved(gm, deeper, inputs, onnx=False, f64_fallback=True)
    else:  # identity BatchNorm: exact in eval mode only (a stated limit of Net2DeeperNet)
        assert r2r_fx.verify(gm, deeper, inputs, onnx=False, train=False).eval_rel_error <= 1e-5


class _StochasticResidual(nn.Module):
    """conv -> relu -> h + StochasticDepth(conv(h)) -> pool -> linear: torchvision's layer on a residual."""

    def __init__(self, mode: str) -> None:
        from torchvision.ops import StochasticDepth

        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.drop = StochasticDepth(0.5, mode)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = h + self.drop(self.body(h))
        return self.head(h.mean((2, 3)))


@pytest.mark.parametrize("mode", ["row", "batch"])
def test_stochastic_depth_stays_a_layer_that_follows_train_and_eval(mode):
    model, x = _StochasticResidual(mode).eval(), torch.randn(8, 3, 8, 8)
    gm = r2r_fx.capture(model, (x,))
    assert [n.target for n in gm.graph.nodes if n.op == "call_module"] == ["stem", "body", "drop", "head"]
    group = next(g for g in r2r_fx.width_groups(gm) if ("drop", 1) in g.slots)
    assert group.widenable, group.reason
    model.train(), gm.train()
    outputs = []
    for net in (model, gm):
        torch.manual_seed(1)
        outputs.append(net(x))
    assert torch.equal(outputs[0], outputs[1])  # the same masks: stochastic depth runs in the graph too
    assert not torch.allclose(outputs[1], gm.eval()(x))  # and it does drop something at this seed


@pytest.mark.parametrize("mode", ["row", "batch"])
def test_a_grown_model_keeps_stochastic_depth_in_train_mode(mode):
    model, x = _StochasticResidual(mode).eval(), torch.randn(8, 3, 8, 8)
    gm = r2r_fx.capture(model, (x,))
    grown = r2r_fx.deepen(r2r_fx.widen(gm, factor=2, seed=0), count=1, seed=0)
    # train mode compares the eager model (whose StochasticDepth draws its masks) with the grown graph
    report = assert_function_preserved(model, grown, (x,), onnx=True)
    assert report.train_rel_error is not None


def test_stochastic_depth_survives_saving_and_loading_a_grown_model(tmp_path):
    # torch.load re-traces a GraphModule's generated code: the layer must come back as a layer, not as a
    # call whose training flag is baked in (what withdrew an earlier flag rewrite)
    model, x = _StochasticResidual("row").eval(), torch.randn(8, 3, 8, 8)
    torch.save(r2r_fx.widen(r2r_fx.capture(model, (x,)), factor=2, seed=0), tmp_path / "grown.pt")
    loaded = torch.load(tmp_path / "grown.pt", weights_only=False)
    assert "drop" in [n.target for n in loaded.graph.nodes if n.op == "call_module"]
    outputs = []
    for net in (model.train(), loaded.train()):
        torch.manual_seed(1)
        outputs.append(net(x))
    assert (outputs[0] - outputs[1]).abs().max() <= 1e-5 * outputs[0].abs().max()
    assert not torch.allclose(outputs[1], loaded.eval()(x))


def _small_vit() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """torchvision's VisionTransformer (the class of vit_b_16: nn.MultiheadAttention inside its encoder
    blocks), small: 2 layers, 4 heads, hidden 64."""
    from torchvision.models import VisionTransformer

    from torchvision_zoo import randomize

    torch.manual_seed(0)
    model = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128)
    randomize(model.eval())
    return model, (torch.randn(2, 3, 32, 32),)


@pytest.mark.parametrize("via", ["symbolic_trace", "export"])
@pytest.mark.parametrize("kind", ["stream", "heads"])
def test_vit_stream_and_heads_grow(kind, via):
    model, inputs = _small_vit()
    gm = r2r_fx.capture(model, inputs, via=via)
    groups = [g for g in r2r_fx.width_groups(gm) if g.kind == kind]
    assert groups and all(g.widenable for g in groups), groups
    assert [g.width for g in groups] == ([64] if kind == "stream" else [4, 4])
    factor = 1.5 if kind == "stream" else 2.0  # pre-LN: the stream takes mean channels too
    grown = r2r_fx.widen(gm, factor=factor, seed=0, groups=[f"kind:{kind}"])
    assert [g.width for g in r2r_fx.width_groups(grown) if g.kind == kind] == [int(g.width * factor) for g in groups]
    assert_function_preserved(model, grown, inputs, onnx=via == "export")


def _small_swin() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """torchvision's SwinTransformer (the class of swin_t), small: four stages of one block each, with
    patch merging (four strided samples of the stream concatenated, LayerNorm, reduction) between them."""
    from torchvision.models.swin_transformer import SwinTransformer

    from torchvision_zoo import randomize

    torch.manual_seed(0)
    model = SwinTransformer([4, 4], 16, [1, 1, 1, 1], [1, 2, 2, 4], [4, 4], stochastic_depth_prob=0.0)
    randomize(model.eval())
    return model, (torch.randn(1, 3, 64, 64),)


def test_swin_is_captured_through_its_wrapped_attention_and_deepened_by_its_own_blocks():
    model, inputs = _small_swin()
    gm = r2r_fx.capture(model, inputs)  # the module graph keeps shifted_window_attention as one call
    assert gm.meta["r2r_graph_level"] == "aten" and "shifted_window_attention" in gm.meta["r2r_capture_note"]
    grown = r2r_fx.deepen(gm, count=2, seed=0)
    record = growth_history(grown)[-1]
    assert len(record.blocks) == 2 and all(b.kind.startswith("own:") for b in record.blocks), record
    with torch.no_grad():
        ref = model(*inputs)
        assert (grown(*inputs) - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert_function_preserved(model, grown, inputs, onnx=True)


def test_swin_stream_grows_in_every_stage_and_its_heads_too():
    """Each stage's stream grows by whole copies: patch merging normalises a concatenation of copies of
    the stream, which keeps every piece's statistics (1.5x is refused with that reason)."""
    model, inputs = _small_swin()
    gm = r2r_fx.capture(model, inputs, via="export")
    streams = [g for g in r2r_fx.width_groups(gm) if g.kind == "stream"]
    assert [(g.width, g.widenable) for g in streams] == [(16, True), (32, True), (64, True), (128, True)], streams
    assert all("concatenation of copies" in g.integer_only for g in streams[:3]), streams
    grown = r2r_fx.widen(gm, factor=2.0, seed=0, groups=["kind:stream", "kind:heads"])
    assert [g.width for g in r2r_fx.width_groups(grown) if g.kind == "stream"] == [32, 64, 128, 256]
    assert grown.get_parameter("features.2.norm.weight").shape == (4 * 32,)  # the first patch merging
    assert grown.get_parameter("features.2.reduction.weight").shape == (64, 4 * 32)
    with torch.no_grad():
        ref = model(*inputs)
        assert (grown(*inputs) - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert_function_preserved(model, grown, inputs, onnx=True)
    half = r2r_fx.widen(gm, factor=1.5, seed=0, groups=["kind:stream"], check=False)
    skipped = [g for g in growth_history(half)[-1].groups if g.kind == "stream" and g.status == "skipped"]
    assert len(skipped) >= 3 and all("whole copies" in g.reason for g in skipped), skipped
