"""R2DeeperR on the local zoo, both graph flavours: identity at insertion, trainable, composes with widen."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import r2r_fx

from helpers import assert_function_preserved, captured, parameter_count, random_batch
from zoo import ZOO

FLAVOURS = ["symbolic_trace", "export"]


@pytest.mark.parametrize("via", FLAVOURS)
@pytest.mark.parametrize("name", sorted(ZOO))
def test_deepen_one_block_per_stage_preserves_function(name, via):
    model, inputs, gm = captured(name, via)
    points = r2r_fx.insertion_points(gm)
    defaults = [p for p in points if p.default]
    result = r2r_fx.DeepenPass(block="generic", seed=0).call(gm)
    blocks = result.record.blocks
    assert result.modified and result.record.op == "deepen" and not result.record.skipped
    assert [b.at for b in blocks] == [p.node for p in defaults] and blocks
    new = {n for n, _ in result.model.named_parameters()} - {n for n, _ in gm.named_parameters()}
    assert new and set(result.record.new_params) == new
    assert all(any(n.startswith(b.module + ".") for n in new) for b in blocks)
    assert all(result.model.get_submodule(b.module) is not None for b in blocks)
    assert parameter_count(result.model) == parameter_count(gm) + sum(b.params for b in blocks)
    assert all(type(m).__module__.startswith("torch.") for m in result.model.modules())
    assert_function_preserved(model, result.model, inputs)


@pytest.mark.parametrize("name", ["resnet", "densenet", "mobilenetv2", "vit", "conv1d", "embedding"])
def test_deepen_then_widen_and_widen_then_deepen(name):
    model, inputs, gm = captured(name)
    deep_wide = r2r_fx.widen(r2r_fx.deepen(gm, block="generic", seed=0), factor=2.0, seed=1)
    wide_deep = r2r_fx.deepen(r2r_fx.widen(gm, factor=2.0, seed=1), block="generic", seed=0)
    for grown in (deep_wide, wide_deep):
        assert [r["op"] for r in grown.meta["r2r_record"]] in (["deepen", "widen"], ["widen", "deepen"])
        assert_function_preserved(model, grown, inputs, onnx=False)
    # the inserted blocks' hidden channels are width groups of their own, and they widen
    record = deep_wide.meta["r2r_record"][1]
    block_groups = [
        g for g in record["groups"] if g["producers"] and all(p.startswith("r2r_blocks") for p in g["producers"])
    ]
    assert block_groups and all(g["status"] == "widened" for g in block_groups)


@pytest.mark.parametrize("name", ["resnet", "vit", "mlp", "conv3d"])
def test_every_new_block_parameter_gets_a_gradient(name):
    _, inputs, gm = captured(name)
    deep = r2r_fx.deepen(gm, block="generic", seed=0).train()
    out = deep(*random_batch(inputs))
    (out * torch.randn_like(out)).sum().backward()
    new = deep.meta["r2r_record"][-1]["new_params"]
    params = dict(deep.named_parameters())
    assert new
    for name_ in new:
        grad = params[name_].grad
        assert grad is not None and grad.ne(0).any(), name_


def test_explicit_point_and_count():
    model, inputs, gm = captured("resnet")
    result = r2r_fx.DeepenPass(block="generic", at="layer1_relu", count=2, hidden=6, seed=0).call(gm)
    deep = result.model
    assert result.modified and not result.record.skipped
    assert parameter_count(deep) == parameter_count(gm) + sum(b.params for b in result.record.blocks)
    blocks = deep.meta["r2r_record"][-1]["blocks"]
    assert [b["at"] for b in blocks] == ["layer1_relu", "layer1_relu"]
    assert all(b["hidden"] == 6 and b["kind"] == "conv2d" for b in blocks)
    assert isinstance(deep.get_submodule("r2r_blocks.b1.conv1"), nn.Conv2d)
    assert_function_preserved(model, deep, inputs, onnx=False)


def test_bad_points_are_clear_errors():
    _, _, gm = captured("resnet")
    with pytest.raises(ValueError, match="'nope' is not a node of this graph; valid insertion points: "):
        r2r_fx.deepen(gm, block="generic", at="nope")
    with pytest.raises(ValueError, match="'x' is not a point where a residual block can be formed"):
        r2r_fx.deepen(gm, block="generic", at="x")  # the model input: its channels are not an internal width
    with pytest.raises(ValueError, match="'fc' is not a point"):
        r2r_fx.deepen(gm, block="generic", at="fc")  # the model output


def test_block_is_exactly_zero_at_insertion_in_train_mode():
    model, inputs, gm = captured("vgg")
    deep = r2r_fx.deepen(gm, block="generic", seed=0)
    block = deep.get_submodule("r2r_blocks.b0")
    x = torch.randn(4, block.conv1.in_channels, 5, 5) * 1e3
    for train in (True, False):
        block.train(train)
        z = block.conv2(block.act(block.bn(block.conv1(x))))
        z = z + block.conv2_pair(block.act_pair(block.bn_pair(block.conv1_pair(x))))
        assert z.abs().max() == 0  # exactly: the two halves are equal partial results of opposite sign
