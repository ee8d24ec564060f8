"""torch's transformer layers traced through plain-op equivalents (r2r_fx.inline): the equivalents
against torch's own forwards, then the stream, heads and MLP of nn.TransformerEncoder models grown
through both capture paths."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import r2r_fx
from r2r_fx.inline import equivalent, inlined_forwards
from r2r_fx.record import growth_history

from helpers import assert_function_preserved

D, HEADS, FF, T = 32, 4, 64, 5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _same_seed(fn, *args, **kwargs):
    torch.manual_seed(0)
    return fn(*args, **kwargs)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_attention_equivalent_matches_torch(batch_first, need_weights, dropout):
    """Eval and train mode, with dropout drawing the same masks (same seed, same memory layout)."""
    torch.manual_seed(0)
    m = nn.MultiheadAttention(D, HEADS, dropout=dropout, batch_first=batch_first)
    x = torch.randn(2, T, D)
    for train in (False, True):
        m.train(train)
        want = _same_seed(m, x, x, x, need_weights=need_weights)
        got = _same_seed(equivalent(m), x, x, x, need_weights=need_weights)
        assert _rel(got[0], want[0]) <= 1e-6
        assert (got[1] is None) == (want[1] is None)
        if want[1] is not None:
            assert _rel(got[1], want[1]) <= 1e-6


@pytest.mark.parametrize("norm_first", [True, False])
@pytest.mark.parametrize("batch_first", [True, False])
def test_encoder_equivalents_match_torch(norm_first, batch_first):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(
        D, HEADS, FF, dropout=0.1, activation="gelu", batch_first=batch_first, norm_first=norm_first
    )
    encoder = nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(D), enable_nested_tensor=False)
    x = torch.randn(2, T, D)
    for train in (False, True):
        encoder.train(train)
        with torch.no_grad():  # eval + no_grad: torch's own fast path, which the equivalents must match too
            assert _rel(_same_seed(equivalent(encoder), x), _same_seed(encoder, x)) <= 1e-5
            assert _rel(_same_seed(equivalent(encoder.layers[0]), x), _same_seed(encoder.layers[0], x)) <= 1e-5


class _Encoder(nn.Module):
    def __init__(self, norm_first: bool, batch_first: bool = True) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embed = nn.Linear(6, D)
        layer = nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, batch_first=batch_first, norm_first=norm_first)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        h = self.embed(x)
        h = self.encoder(h if self.batch_first else h.transpose(0, 1))
        return self.head(h if self.batch_first else h.transpose(0, 1))


def _kinds(gm) -> dict[str, list]:
    out: dict[str, list] = {}
    for g in r2r_fx.width_groups(gm):
        out.setdefault(g.kind, []).append(g)
    return out


@pytest.mark.parametrize("via", ["symbolic_trace", "export"])
@pytest.mark.parametrize("norm_first", [True, False])
def test_encoder_stream_heads_and_mlp_grow(via, norm_first):
    torch.manual_seed(0)
    model = _Encoder(norm_first, batch_first=norm_first).eval()  # post-LN runs sequence first
    inputs = (torch.randn(2, T, 6),)
    gm = r2r_fx.capture(model, inputs, via=via)
    kinds = _kinds(gm)
    (stream,) = kinds["stream"]
    assert stream.widenable and stream.width == D
    assert bool(stream.integer_only) == (not norm_first)  # post-LN: whole copies only
    assert [(g.width, g.widenable) for g in kinds["heads"]] == [(HEADS, True)] * 2
    assert sum(g.width == FF and g.widenable for g in kinds["channels"]) == 2
    for groups in (None, ["kind:heads"], ["kind:stream"]):
        grown = r2r_fx.widen(gm, factor=2.0, seed=0, groups=groups)
        assert_function_preserved(gm, grown, inputs, onnx=groups is None)
        assert not any(isinstance(m, nn.MultiheadAttention) for m in grown.modules())
    grown = r2r_fx.widen(gm, factor=2.0, seed=0)
    assert grown.get_parameter("encoder.layers.1.self_attn.in_proj_weight").shape == (6 * D, 2 * D)
    first = growth_history(grown)[-1].groups
    assert all(g.status == "widened" for g in first if g.kind in ("stream", "heads")), first


def test_post_ln_stream_refuses_a_non_integer_factor():
    torch.manual_seed(0)
    model = _Encoder(norm_first=False).eval()
    inputs = (torch.randn(2, T, 6),)
    gm = r2r_fx.capture(model, inputs)
    grown = r2r_fx.widen(gm, factor=1.5, seed=0, groups=["kind:stream"])
    (change,) = [g for g in growth_history(grown)[-1].groups if g.kind == "stream"]
    assert change.status == "skipped" and "post-LN" in change.reason, change
    assert_function_preserved(gm, grown, inputs, onnx=False)


class _Masked(nn.Module):
    """Attention with a mask and the attention weights returned: kept as one layer / heads frozen."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.attn, self.head = (
            nn.Linear(6, D),
            nn.MultiheadAttention(D, HEADS, batch_first=True),
            nn.Linear(D, 3),
        )
        self.register_buffer("mask", torch.ones(T, T, dtype=torch.bool).triu(1))

    def forward(self, x):
        h = self.embed(x)
        a, _ = self.attn(h, h, h, attn_mask=self.mask)
        b, w = self.attn(a, a, a)
        return self.head(b), w


def test_calls_the_equivalent_cannot_follow_keep_their_widths():
    torch.manual_seed(0)
    model = _Masked().eval()
    inputs = (torch.randn(2, T, 6),)
    gm = r2r_fx.capture(model, inputs, via="symbolic_trace")
    reasons = [g.reason for g in r2r_fx.width_groups(gm) if not g.widenable]
    assert any(
        "nn.MultiheadAttention attn keeps its widths: it is called with an attention mask" in r for r in reasons
    ), reasons
    assert any("reduced over by mean" in r for r in reasons), reasons  # head-averaged weights are an output
    grown = r2r_fx.widen(gm, factor=2.0, seed=0)
    assert_function_preserved(gm, grown, inputs, onnx=False)


def test_export_leaves_the_model_as_it_was():
    model = _Encoder(norm_first=True)
    with inlined_forwards(model):
        assert "forward" in model.encoder.layers[0].self_attn.__dict__
    assert not any("forward" in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_layers_stay_whole(dtype):
    """torch's fused kernels round otherwise than the equivalent: such layers keep their own forward
    (a leaf of the module graph), and the capture still matches eager."""
    torch.manual_seed(0)
    model = _Encoder(norm_first=True).to(dtype).eval()
    inputs = (torch.randn(2, T, 6, dtype=dtype),)
    gm = r2r_fx.capture(model, inputs)
    assert gm.meta["r2r_graph_level"] == "module"
    layers = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert "encoder.layers.0" in layers and "encoder.layers.1" in layers, layers
    assert not any(g.kind == "heads" for g in r2r_fx.width_groups(gm))
    wide = _Encoder(norm_first=True).double().eval()  # float64 is traced through, as float32 is
    gm = r2r_fx.capture(wide, (torch.randn(2, T, 6, dtype=torch.float64),), via="symbolic_trace")
    assert [g.kind for g in r2r_fx.width_groups(gm)].count("heads") == 2


class _Hooked(_Masked):
    """The same layers, attention without a mask (traced through unless something else forbids it)."""

    def forward(self, x):
        h = self.embed(x)
        return self.head(h + self.attn(h, h, h, need_weights=False)[0])


@pytest.mark.parametrize("where", ["layer", "out_proj", "global", "instance forward"])
def test_hooks_and_own_forwards_keep_the_layer_whole(where):
    """A hook or an instance forward would be skipped by the equivalent: the layer stays one call."""
    torch.manual_seed(0)
    model = _Hooked().eval()
    clamp = lambda m, i, o: (o[0].clamp(-0.1, 0.1), o[1]) if isinstance(o, tuple) else o.clamp(-0.1, 0.1)  # noqa: E731
    handle = None
    if where == "layer":
        model.attn.register_forward_hook(clamp)
    elif where == "out_proj":
        model.attn.out_proj.register_forward_hook(clamp)
    elif where == "global":
        handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: o)
    else:
        model.attn.forward = lambda *a, **k: nn.MultiheadAttention.forward(model.attn, *a, **k)
    try:
        gm = r2r_fx.capture(model, (0.1 * torch.randn(2, T, 6),), via="symbolic_trace", check=False)
        assert "attn" in [n.target for n in gm.graph.nodes if n.op == "call_module"]
    finally:
        if handle is not None:
            handle.remove()


def test_in_place_ops_of_an_activation_stay_in_the_graph():
    """Only the head average the caller drops is erased from an equivalent's ops."""

    def act(t):
        t.mul_(2)
        return t

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.TransformerEncoderLayer(D, HEADS, FF, dropout=0.0, activation=act, batch_first=True)
    ).eval()
    x = torch.randn(2, T, D)
    gm = r2r_fx.capture(model, (x,), via="symbolic_trace", check=False)
    with torch.no_grad():
        assert _rel(gm(x), model(x)) <= 1e-6


def test_is_causal_without_a_mask_keeps_the_layer_whole():
    """torch refuses ``is_causal`` without the mask (or ignores it in its fast path): not traced through."""
    from r2r_fx.inline import unsupported

    x = torch.randn(2, T, D)
    assert "is_causal" in unsupported(nn.MultiheadAttention(D, HEADS, batch_first=True), (x, x, x), {"is_causal": True})
    layer = nn.TransformerEncoderLayer(D, HEADS, FF, batch_first=True)
    assert "is_causal" in unsupported(layer, (x, None, None, True), {})
