"""Dtypes: the safety net and verify judge float16/bfloat16/float64 models by what their dtype allows,
and an ONNX Runtime without a kernel for a dtype is reported, not raised."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import r2r_fx
from r2r_fx.verify import check_preserved


def _model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )  # fmt: skip
    return model.to(dtype).eval()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_grown_models_keep_their_dtype_and_pass_the_check(dtype):
    model = _model(dtype)
    x = torch.randn(4, 3, 6, 6, dtype=dtype)
    gm = r2r_fx.capture(model, (x,), rtol=1e-2 if dtype != torch.float64 else 1e-5)
    grown = r2r_fx.deepen(r2r_fx.widen(gm, seed=0), seed=0)  # the default safety net runs (float64 re-check)
    assert all(p.dtype == dtype for p in grown.parameters())
    report = r2r_fx.verify(model, grown, (x,), onnx=True)
    assert report.ok, report.notes
    if report.eval_rel_error > 1e-5:  # the decision then rests on float64, the dtype's rounding reported beside
        assert report.eval_rel_error_f64 <= 1e-5 and report.eval_noise_floor is not None
    if report.onnx_max_rel_error is None:  # no ONNX Runtime kernel for this dtype: a note, not a crash
        assert any("ONNX Runtime check not run" in n for n in report.notes)
    else:
        assert report.onnx_max_rel_error <= report.onnx_rtol


def test_a_real_change_is_caught_in_float16():
    """The float64 re-check does not excuse a wrong model: the random-pad baseline fails it."""
    model = _model(torch.float16)
    x = torch.randn(4, 3, 6, 6, dtype=torch.float16)
    gm = r2r_fx.capture(model, (x,), rtol=1e-2)
    grown = r2r_fx.widen(gm, seed=0, method="random")
    report = r2r_fx.verify(model, grown, (x,), onnx=False)
    assert not report.ok
    with pytest.raises(r2r_fx.NotPreservedError, match="widen: .* relative error"):
        check_preserved("widen", gm, grown)


@pytest.mark.parametrize("method", ["r2r", "net2net"])
@pytest.mark.parametrize("factor", [2.0, 3.0])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_streams_split_exactly(dtype, factor, method):
    """A reader's column shares add up to the old column exactly in the model's dtype (bfloat16 would
    round a plain ``W/2 + V`` split at 4e-3): the grown weights, evaluated in float64, give the old
    function to float64 rounding."""
    from zoo import ZOO

    model, inputs = ZOO["vit"]()
    model, inputs = model.to(dtype), tuple(t.to(dtype) for t in inputs)
    grown = r2r_fx.widen(r2r_fx.capture(model, inputs), factor=factor, seed=0, method=method, groups=["kind:stream"])
    assert next(grown.parameters()).dtype == dtype
    wide = tuple(t.double() for t in inputs)
    with torch.no_grad():
        want, got = model.double()(*wide), grown.double()(*wide)
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-12


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_aten_graph_is_rechecked_in_float64(dtype):
    """An ATen graph of a half-precision HF Llama casts to its dtype inside (RMSNorm's ``.to(input_dtype)``):
    the float64 re-check turns those casts to float64 too, instead of crashing on mixed dtypes, and a real
    change is still caught."""
    pytest.importorskip("transformers")
    from cli_models import tiny_llama

    tiny_llama()  # the torchvision shim transformers needs, where it is installed
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=1000, hidden_size=256, intermediate_size=704, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=2, max_position_embeddings=64, use_cache=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config).to(dtype).eval()  # wide enough for rounding to differ after widening
    ids = torch.randint(0, 1000, (1, 16))
    gm = r2r_fx.capture(model, (ids,), rtol=5e-2)
    assert gm.meta["r2r_graph_level"] == "aten"
    mlp = [g.id for g in r2r_fx.analyze(gm).groups if g.kind == "channels" and g.width == 704 and g.widenable]
    assert mlp
    grown = r2r_fx.widen(gm, groups=mlp, factor=2.0, check=False)
    report = r2r_fx.verify(model, grown, (ids,), onnx=False, train=False)
    assert report.ok, report.notes
    assert report.eval_rel_error > report.rtol  # rounding: the decision rests on the float64 re-check
    assert report.eval_rel_error_f64 is not None and report.eval_rel_error_f64 <= 1e-5
    wrong = r2r_fx.widen(gm, groups=mlp, factor=2.0, method="random", check=False)
    report = r2r_fx.verify(model, wrong, (ids,), onnx=False, train=False)
    assert not report.ok and report.eval_rel_error_f64 is not None and report.eval_rel_error_f64 > 1e-3
