"""Widening methods on the shared machinery: Net2Net and NetMorph exact, random pad not, each as stated."""

from __future__ import annotations

import pytest
import torch

import r2r_fx
from r2r_fx.record import old_positions, param_changes

from helpers import assert_function_preserved, captured, parameter_count, random_batch
from zoo import ZOO

EXACT = ["net2net", "netmorph"]


@pytest.mark.parametrize("method", EXACT)
@pytest.mark.parametrize("name", sorted(ZOO))
def test_exact_methods_preserve_function(name, method):
    model, inputs, gm = captured(name)
    result = r2r_fx.WidenPass(factor=2.0, seed=0, method=method).call(gm)
    assert result.modified and result.record.method == method and result.record.exact is True
    assert any(g.status == "widened" for g in result.record.groups)
    assert result.record.params and all(c.shape_after != c.shape_before for c in result.record.params)
    assert parameter_count(result.model) > parameter_count(gm)
    assert_function_preserved(model, result.model, inputs, onnx=name in ("resnet", "densenet", "vit"))


@pytest.mark.parametrize("method", EXACT)
@pytest.mark.parametrize("name", ["resnet", "mobilenetv2"])
def test_exact_methods_on_the_aten_graph(name, method):
    model, inputs, gm = captured(name, via="export")
    result = r2r_fx.WidenPass(factor=2.0, seed=0, method=method).call(gm)
    assert result.modified and any(g.status == "widened" for g in result.record.groups)
    assert parameter_count(result.model) > parameter_count(gm)
    assert_function_preserved(model, result.model, inputs, onnx=False)


def test_random_pad_is_reported_as_not_preserving():
    model, inputs, gm = captured("resnet")
    result = r2r_fx.WidenPass(factor=2.0, seed=0, method="random").call(gm)
    assert result.modified and result.record.exact is False
    assert parameter_count(result.model) > parameter_count(gm)
    report = r2r_fx.verify(model, result.model, inputs, onnx=False)
    assert not report.ok and report.max_rel_error > 1e-2


def test_net2net_noise_breaks_exactness_and_says_so():
    model, inputs, gm = captured("vgg")
    result = r2r_fx.WidenPass(factor=2.0, seed=0, method="net2net", noise=0.1).call(gm)
    assert result.modified and result.record.exact is False
    assert parameter_count(result.model) > parameter_count(gm)
    assert not r2r_fx.verify(model, result.model, inputs, onnx=False).ok


def test_net2net_refuses_grouped_convolutions_with_a_reason():
    _, _, gm = captured("grouped")
    record = r2r_fx.WidenPass(factor=2.0, seed=0, method="net2net").call(gm).record
    grouped = next(g for g in record.groups if g.width_before == 16)
    assert grouped.status == "skipped" and "whole-group copies" in grouped.reason
    assert any(g.status == "widened" for g in record.groups)  # the other groups still widen


def _new_row_gradients(method: str) -> list[float]:
    _, inputs, gm = captured("mlp")
    grown = r2r_fx.widen(gm, factor=2.0, seed=0, method=method).train()
    out = grown(*random_batch(inputs))
    (out * torch.randn_like(out)).sum().backward()
    weight = grown.get_submodule("fc1").weight
    change = param_changes(grown)["fc1.weight"][-1]
    is_new = torch.ones(weight.shape[0], dtype=torch.bool)
    is_new[old_positions(change.axes[0].old_runs)] = False
    return weight.grad[is_new].abs().sum(dim=1).tolist()


def test_netmorph_new_rows_get_no_gradient_at_step_one():
    """Zero consumer columns: the new producer rows are invisible to the loss at the first step."""
    assert all(g == 0 for g in _new_row_gradients("netmorph"))


def test_r2r_and_net2net_new_rows_get_gradients():
    assert any(g > 0 for g in _new_row_gradients("r2r"))
    assert any(g > 0 for g in _new_row_gradients("net2net"))


def test_unknown_method_is_a_clear_error():
    _, _, gm = captured("mlp")
    with pytest.raises(ValueError, match="unknown method 'bogus'; choose one of"):
        r2r_fx.widen(gm, method="bogus")


def test_net2net_copies_are_symmetric_without_noise():
    """A copied channel and its source get identical gradients: without noise they never diverge."""
    _, inputs, gm = captured("mlp")
    grown = r2r_fx.widen(gm, factor=2.0, seed=0, method="net2net").train()
    out = grown(*random_batch(inputs))
    (out * torch.randn_like(out)).sum().backward()
    weight = grown.get_submodule("fc1").weight
    old = weight.shape[0] // 2
    for row in range(old, weight.shape[0]):
        source = next(r for r in range(old) if torch.equal(weight[r], weight[row]))
        torch.testing.assert_close(weight.grad[row], weight.grad[source])


@pytest.mark.parametrize("via", ["symbolic_trace", "export"])
@pytest.mark.parametrize("name", sorted(ZOO))
def test_netmorph_deepen_is_exact_in_eval_and_train(name, via):
    model, inputs, gm = captured(name, via)
    result = r2r_fx.DeepenPass(block="generic", seed=0, method="netmorph").call(gm)
    assert result.modified and result.record.blocks and not result.record.skipped
    defaults = [p.node for p in r2r_fx.insertion_points(gm) if p.default]
    assert [b.at for b in result.record.blocks] == defaults
    assert_function_preserved(model, result.model, inputs, onnx=name == "resnet")
    alpha = [p for n, p in result.model.named_parameters() if n.endswith("alpha")]
    assert alpha and all(float(a) == 1.0 for a in alpha)


@pytest.mark.parametrize("method", ["r2r", "random", "net2net", "netmorph"])
@pytest.mark.parametrize("name", ["mlp", "resnet"])
def test_deepen_records_block_parameter_counts(name, method):
    _, _, gm = captured(name)
    result = r2r_fx.DeepenPass(block="generic", seed=0, method=method).call(gm)
    assert result.record.blocks
    for block in result.record.blocks:
        assert block.params == sum(p.numel() for p in result.model.get_submodule(block.module).parameters()), block
    assert parameter_count(result.model) == parameter_count(gm) + sum(b.params for b in result.record.blocks)


NET2NET_BLOCKS = {
    "conv1d": 1,
    "conv3d": 1,
    "densenet": 0,
    "embedding": 0,
    "encoder_post_ln": 0,
    "encoder_pre_ln": 0,
    "llama_like": 0,
    "mha": 0,
    "grouped": 1,
    "inception": 1,
    "mlp": 1,
    "mlp_tokens": 0,
    "mobilenetv2": 1,
    "multi_output": 1,
    "resnet": 2,
    "shufflenet": 1,
    "tuple_output": 2,
    "two_inputs": 0,
    "unet_like": 1,
    "vgg": 2,
    "vit": 0,
}  # default points ending in a ReLU, per zoo model


def test_net2net_block_table_covers_the_zoo():
    assert sorted(NET2NET_BLOCKS) == sorted(ZOO)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_net2net_deepen_exact_in_eval_after_relu(name):
    """Wherever a stage ends in a ReLU the identity layer goes in; other points are skipped with the reason."""
    model, inputs, gm = captured(name)
    result = r2r_fx.DeepenPass(block="generic", seed=0, method="net2net").call(gm)
    defaults = [p.node for p in r2r_fx.insertion_points(gm) if p.default]
    assert sorted([b.at for b in result.record.blocks] + [s.at for s in result.record.skipped]) == sorted(defaults)
    assert len(result.record.blocks) == NET2NET_BLOCKS[name]
    assert result.modified == bool(result.record.blocks)
    assert all("idempotent activation" in s.reason for s in result.record.skipped)
    onnx = name in ("resnet", "vgg")
    report = r2r_fx.verify(model, result.model, inputs, onnx=onnx, train=False)
    assert report.eval_rel_error <= 1e-5
    if onnx:
        assert report.onnx_max_rel_error is not None and report.onnx_max_rel_error <= 1e-4


def test_net2net_deepen_is_preserving_in_train_mode_too():
    """The identity layer has no BatchNorm (which would normalise by batch statistics in train mode)."""
    model, inputs, gm = captured("resnet")
    deep = r2r_fx.deepen(gm, block="generic", seed=0, method="net2net")
    assert not any(isinstance(m, torch.nn.modules.batchnorm._NormBase) for m in deep.r2r_blocks.modules())
    assert_function_preserved(model, deep, inputs, onnx=False)


def test_net2net_deepen_refuses_non_idempotent_activations():
    _, _, gm = captured("vit")  # GELU MLPs and LayerNorm outputs: no ReLU point
    result = r2r_fx.DeepenPass(block="generic", seed=0, method="net2net").call(gm)
    assert not result.modified and not result.record.blocks and result.record.skipped
    assert all("idempotent activation" in s.reason for s in result.record.skipped)
    point = result.record.skipped[0].at
    with pytest.raises(ValueError, match="needs an idempotent activation"):
        r2r_fx.deepen(gm, block="generic", at=point, method="net2net")


def test_random_deepen_is_not_preserving():
    model, inputs, gm = captured("resnet")
    result = r2r_fx.DeepenPass(block="generic", seed=0, method="random").call(gm)
    assert result.modified and result.record.blocks and result.record.exact is False
    assert not r2r_fx.verify(model, result.model, inputs, onnx=False).ok


@pytest.mark.parametrize(("via", "node"), [("symbolic_trace", "layer1_conv1"), ("export", "conv2d_1")])
def test_grow_kernel_keeps_function_and_shapes(via, node):
    model, inputs, gm = captured("resnet", via)
    result = r2r_fx.GrowKernelPass(node, 5).call(gm)
    grown = result.model
    assert result.modified and result.record.op == "grow_kernel"
    (change,) = [c for c in result.record.params if len(c.shape_after) == 4]
    assert change.shape_before[-2:] == (3, 3) and change.shape_after[-2:] == (5, 5)
    assert change.shape_after[:2] == change.shape_before[:2] and set(change.axes) == {2, 3}
    record = grown.meta["r2r_record"][-1]
    assert record["options"]["kernel_before"] == [3, 3] and record["options"]["kernel_after"] == [5, 5]
    assert_function_preserved(model, grown, inputs, onnx=True)
    assert_function_preserved(model, r2r_fx.widen(grown, factor=2.0, seed=0), inputs, onnx=False)


def test_grow_kernel_bad_requests():
    _, _, gm = captured("resnet")
    with pytest.raises(ValueError, match="is not a convolution node"):
        r2r_fx.grow_kernel(gm, "fc", 5)
    with pytest.raises(ValueError, match="differ from it by an even number"):
        r2r_fx.grow_kernel(gm, "layer1_conv1", 4)
