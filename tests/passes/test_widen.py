"""R2WiderR on the local zoo, both graph flavours: function preserved, new weights train, composes."""

from __future__ import annotations

import copy
import io
import json
import pickle

import pytest
import torch
from torch import nn

import r2r_fx
from r2r_fx.passes.widen import WidenPass
from r2r_fx.record import GrowthRecord, growth_history, new_entry_mask

from helpers import assert_function_preserved, assert_new_weights_train, captured, parameter_count
from zoo import ZOO

FLAVOURS = ["symbolic_trace", "export"]


@pytest.mark.parametrize("via", FLAVOURS)
@pytest.mark.parametrize("name", sorted(ZOO))
def test_widen_preserves_function(name, via):
    model, inputs, gm = captured(name, via)
    result = WidenPass(factor=2.0, seed=0).call(gm)
    grown = result.model
    widenable = [g for g in r2r_fx.width_groups(gm) if g.widenable]
    widened = [g for g in result.record.groups if g.status == "widened"]
    assert result.modified and result.record.op == "widen" and result.record.method == "r2r"
    assert widened and len(widened) == len(widenable)
    assert growth_history(grown) == [result.record]
    assert_params_recorded(gm, grown, result.record)
    for g in widened:
        assert g.width_after == 2 * g.width_before or g.width_after > 2 * g.width_before - 2
    assert parameter_count(grown) > parameter_count(gm)
    assert_function_preserved(model, grown, inputs)


def assert_params_recorded(before, grown, record) -> None:
    """The record lists exactly the tensors whose shape changed (under each name of a tied tensor), with
    their shapes, and each has new entries."""
    old = {**dict(before.named_parameters(remove_duplicate=False)), **dict(before.named_buffers())}
    new = {**dict(grown.named_parameters(remove_duplicate=False)), **dict(grown.named_buffers())}
    changed = {n for n in old if n in new and new[n].shape != old[n].shape}
    assert changed and {c.param for c in record.params} == changed
    for c in record.params:
        assert c.shape_before == tuple(old[c.param].shape) and c.shape_after == tuple(new[c.param].shape), c
        assert c.axes and new_entry_mask(c).any(), c


@pytest.mark.parametrize("name", sorted(ZOO))
def test_new_weights_receive_gradients(name):
    _, inputs, gm = captured(name)
    assert_new_weights_train(r2r_fx.widen(gm, factor=2.0, seed=1), inputs)


@pytest.mark.parametrize("name", ["resnet", "densenet", "mobilenetv2", "inception", "vit", "grouped"])
def test_widen_twice_composes(name):
    model, inputs, gm = captured(name)
    once = r2r_fx.widen(gm, factor=2.0, seed=0)
    result = WidenPass(extra=6, seed=1).call(once)
    twice = result.model
    assert result.modified and any(g.status == "widened" for g in result.record.groups)
    assert_params_recorded(once, twice, result.record)
    assert parameter_count(twice) > parameter_count(once)
    assert len(twice.meta["r2r_record"]) == 2
    assert_function_preserved(model, twice, inputs, onnx=False)


@pytest.mark.parametrize("name", ["resnet", "densenet", "unet_like", "shufflenet"])
def test_widen_one_group_at_a_time(name):
    model, inputs, gm = captured(name)
    current = gm
    groups = [g for g in r2r_fx.width_groups(gm) if g.widenable]
    assert len(groups) >= 2
    for group in groups:
        result = WidenPass(extra=4, groups=[group.id], seed=group.id).call(current)
        assert result.modified and [g.id for g in result.record.groups if g.status == "widened"] == [group.id]
        assert parameter_count(result.model) > parameter_count(current)
        current = result.model
        assert_function_preserved(model, current, inputs, onnx=False)
    assert parameter_count(current) > parameter_count(gm)


def test_input_graph_module_untouched():
    _, inputs, gm = captured("resnet")
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    code = gm.code
    r2r_fx.widen(gm, factor=2.0, seed=0)
    assert gm.code == code
    after = gm.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_select_groups_by_producer_name_and_extra():
    model, inputs, gm = captured("resnet")
    grown = WidenPass(extra=4, groups=["layer1_conv1"], seed=0).call(gm)
    assert grown.modified
    assert_params_recorded(gm, grown.model, grown.record)
    widened = [g for g in grown.record.groups if g.status == "widened"]
    assert len(widened) == 1 and widened[0].width_after == widened[0].width_before + 4
    assert grown.model.get_submodule("layer1.conv1").out_channels == 12
    by_target = WidenPass(extra=4, groups=["layer1.conv1"], seed=0).call(gm).record
    assert [g.id for g in by_target.groups if g.status == "widened"] == [widened[0].id]
    assert_function_preserved(model, grown.model, inputs, onnx=False)


def test_widths_round_to_what_the_maths_needs():
    _, _, gm = captured("grouped")
    record = WidenPass(extra=1, seed=0).call(gm).record
    by_width = {g.width_before: g for g in record.groups if g.status == "widened"}
    assert by_width[32].width_after == 34  # pairs
    assert by_width[16].width_after == 24  # groups of 4 channels, an even number of them


def test_unknown_group_is_a_clear_error():
    _, _, gm = captured("resnet")
    with pytest.raises(ValueError, match="unknown width group id 99"):
        r2r_fx.widen(gm, extra=2, groups=[99])
    with pytest.raises(ValueError, match="no width group is produced by a node named 'nope'"):
        r2r_fx.widen(gm, extra=2, groups=["nope"])


def test_broken_pairs_are_detected():
    """The verification must fail when the R2R invariant is violated (a test that can fail)."""
    model, inputs, gm = captured("resnet")
    grown = r2r_fx.widen(gm, factor=2.0, seed=0)
    with torch.no_grad():
        w = grown.get_submodule("layer1.conv2").weight
        w[:, -1] += 0.5  # second half no longer cancels the first
    report = r2r_fx.verify(model, grown, inputs, onnx=False)
    assert not report.ok and report.max_rel_error > 1e-3


def test_record_survives_deepcopy_and_pickle():
    _, inputs, gm = captured("vgg")
    grown = r2r_fx.widen(gm, factor=2.0, seed=0)
    record = grown.meta["r2r_record"]
    assert record[0]["op"] == "widen" and record[0]["method"] == "r2r"
    assert copy.deepcopy(grown).meta["r2r_record"] == record
    buffer = io.BytesIO()
    torch.save(grown, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert [r.to_json() for r in growth_history(loaded)] == record  # torch.load empties GraphModule.meta
    assert growth_history(loaded) == growth_history(grown)
    assert json.loads(json.dumps(record)) == record  # plain JSON data
    assert GrowthRecord.from_json(record[0]) == growth_history(grown)[0]
    pickle.dumps(record)
    torch.testing.assert_close(loaded(*inputs), grown(*inputs))


def test_grown_model_is_plain_torch():
    _, inputs, gm = captured("mobilenetv2")
    grown = r2r_fx.widen(gm, factor=2.0, seed=0)
    assert all(type(m).__module__.startswith("torch.") for m in grown.modules())
    grown.train()
    grown(*inputs).sum().backward()
    grown.eval()


class _Block(nn.Module):
    def __init__(self, bias: bool, groups: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=bias)
        self.norm1 = nn.BatchNorm2d(8) if norm == "batch" else nn.GroupNorm(2, 8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=groups, bias=bias)
        self.norm2 = nn.BatchNorm2d(8) if norm == "batch" else nn.GroupNorm(4, 8)
        self.conv3 = nn.Conv2d(8, 8, 1, bias=bias)
        self.head = nn.Linear(8, 5, bias=bias)

    def forward(self, x):
        x = torch.relu(self.norm1(self.conv1(x)))
        x = x + torch.relu(self.norm2(self.conv2(x)))
        x = self.conv3(x) * torch.sigmoid(x.mean((2, 3), keepdim=True))
        return self.head(x.mean((2, 3)))


def _randomize_norms(model: nn.Module) -> None:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("norm", ["batch", "group"])
@pytest.mark.parametrize("groups", [1, 2, 8])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("via", FLAVOURS)
def test_widen_block_variants(bias, groups, norm, dtype, via):
    model = _Block(bias, groups, norm).to(dtype).eval()
    _randomize_norms(model)
    inputs = (torch.randn(2, 3, 8, 8, dtype=dtype),)
    gm = r2r_fx.capture(model, inputs, via=via)
    result = WidenPass(factor=2.0, seed=0).call(gm)
    grown = result.model
    assert result.modified and any(g.status == "widened" for g in result.record.groups)
    assert_params_recorded(gm, grown, result.record)
    assert all(p.dtype == dtype for p in grown.parameters())
    assert all(p.device == torch.device("cpu") for p in grown.parameters())
    assert parameter_count(grown) > parameter_count(gm)
    assert_function_preserved(model, grown, inputs, onnx=dtype == torch.float32 and groups == 2)
