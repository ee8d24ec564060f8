"""The local zoo's transformers: exactly which width groups each has, by kind, through both capture
paths, and every one of them grown (factor 2 and 1.5) with the function kept, compared here with the
original model itself (eval, train, and ONNX Runtime through verify)."""

from __future__ import annotations

import pytest
import torch

import r2r_fx
from r2r_fx.record import growth_history

from helpers import assert_function_preserved
from zoo import ZOO

# (kind, width, widenable, whole copies only) per group, in graph order, inputs and outputs left out
# (post-LN and a tied embedding/head make a stream grow by whole copies only)
STREAM, WHOLE = ("stream", 16, True, False), ("stream", 16, True, True)
EXPECTED = {
    "vit": [STREAM] + [("heads", 2, True, False), ("channels", 32, True, False)] * 2,
    "encoder_post_ln": [WHOLE] + [("heads", 2, True, False), ("channels", 32, True, False)] * 2,
    "encoder_pre_ln": [STREAM] + [("heads", 2, True, False), ("channels", 32, True, False)] * 2,
    "mha": [STREAM, ("heads", 4, True, False)],
    # GQA: the heads group counts key/value heads (2), each read by 2 query heads
    "llama_like": [WHOLE] + [("heads", 2, True, False), ("channels", 48, True, False)] * 2,
}


def _groups(gm) -> list[tuple]:
    return [
        (g.kind, g.width, g.widenable, bool(g.integer_only))
        for g in r2r_fx.width_groups(gm)
        if g.widenable or not g.reason.startswith(("model input", "model output"))
    ]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("via", ["symbolic_trace", "export"])
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_transformer_groups_are_exactly_these(name, via):
    model, inputs = ZOO[name]()
    gm = r2r_fx.capture(model, inputs, via=via)
    assert _groups(gm) == EXPECTED[name]
    query_heads = [g.query_heads for g in r2r_fx.width_groups(gm) if g.kind == "heads"]
    assert query_heads == [4 if name in ("mha", "llama_like") else 2] * len(query_heads)


@pytest.mark.parametrize("via", ["symbolic_trace", "export"])
def test_grouped_query_heads_grow_to_the_query_heads_asked_for(via):
    """The Llama-like model's 4 query heads over 2 key/value heads, asked for 8 query heads: 4 key/value
    heads (whole ones, each still read by 2 query heads), compared with the eager model."""
    model, inputs = ZOO["llama_like"]()
    gm = r2r_fx.capture(model, inputs, via=via)
    grown = r2r_fx.widen(gm, sizes={"kind:heads": 8}, seed=0)
    changes = [g for g in growth_history(grown)[-1].groups if g.kind == "heads"]
    assert [(g.width_before, g.width_after, g.group_size) for g in changes] == [(2, 4, 2)] * 2
    assert [g.query_heads for g in r2r_fx.width_groups(grown) if g.kind == "heads"] == [8, 8]
    with torch.no_grad():
        assert _rel(grown(*inputs), model(*inputs)) <= 1e-5


@pytest.mark.parametrize("factor", [2.0, 1.5])
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_transformers_grow_every_group_and_keep_their_function(name, factor):
    model, inputs = ZOO[name]()
    gm = r2r_fx.capture(model, inputs)
    grown = r2r_fx.widen(gm, factor=factor, seed=0)
    changes = [g for g in growth_history(grown)[-1].groups if g.kind != "channels" or g.width_before != 3]
    for change in changes:
        whole_only = change.kind == "stream" and name in ("encoder_post_ln", "llama_like")
        if factor == 1.5 and whole_only:
            assert change.status == "skipped" and change.reason, change
        elif change.reason.startswith(("model input", "model output")):
            assert change.status == "skipped"
        else:
            assert change.status == "widened" and change.width_after > change.width_before, change
    assert sum(p.numel() for p in grown.parameters()) > sum(p.numel() for p in gm.parameters())
    with torch.no_grad():  # against the eager model, not the capture
        assert _rel(grown(*inputs), model(*inputs)) <= 1e-5
    assert_function_preserved(model, grown, inputs, onnx=factor == 2.0)


# (width, widenable) of each head-size group: torch's packed in_proj ties q, k and v to one head size per
# layer; the ViT's separate q/k and v projections are two; Llama's rotary q/k keep theirs (v grows)
HEAD_SIZES = {
    "vit": [(8, True)] * 4,
    "encoder_post_ln": [(8, True)] * 2,
    "encoder_pre_ln": [(8, True)] * 2,
    "mha": [(4, True)],
    "llama_like": [(4, True)] * 2,
}


@pytest.mark.parametrize("via", ["symbolic_trace", "export"])
@pytest.mark.parametrize("name", sorted(HEAD_SIZES))
def test_head_sizes_grow_through_packed_and_separate_projections(name, via):
    model, inputs = ZOO[name]()
    gm = r2r_fx.capture(model, inputs, via=via)
    sized = [g for g in r2r_fx.analyze(gm, head_size=True).groups if g.kind == "head_size"]
    assert [(g.width, g.widenable) for g in sized] == HEAD_SIZES[name], sized
    grown = r2r_fx.widen(gm, factor=2.0, seed=0, groups=["kind:head_size"])
    changes = [g for g in growth_history(grown)[-1].groups if g.kind == "head_size"]
    assert [(g.status, g.width_after) for g in changes] == [("widened", 2 * w) for w, _ in HEAD_SIZES[name]]
    with torch.no_grad():
        assert _rel(grown(*inputs), model(*inputs)) <= 1e-5
    assert_function_preserved(model, grown, inputs, onnx=via == "export")
