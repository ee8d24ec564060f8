"""Normalised residual streams (issue 17, first slice): a stream read by LayerNorm/RMSNorm grows by
whole copies (``d -> k*d``), exactly, in pre-LN and post-LN models; other widths of a post-LN stream
are refused with the reason (mean channels: tests/test_stream_tail.py); readers' columns are split
with R2R's zero-sum noise so every new weight gets a gradient.

The models are defined here. Errors are relative, max|delta| / max|y|, on fresh random inputs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import r2r_fx
from r2r_fx.methods import Method
from r2r_fx.record import growth_history, new_entry_mask

RTOL, ONNX_RTOL = 1e-5, 1e-4


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, causal: bool = False) -> None:
        super().__init__()
        self.heads, self.hd, self.causal = heads, dim // heads, causal  # sizes independent of the stream's
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape[:2]
        q, k, v = (f(x).view(b, t, self.heads, self.hd).transpose(1, 2) for f in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.o(out.transpose(1, 2).reshape(b, t, self.heads * self.hd))


class ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, functional: bool = False) -> None:
        super().__init__()
        self.functional = functional
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        with torch.no_grad():  # non-trivial norm parameters
            for ln in (self.ln1, self.ln2):
                ln.weight.uniform_(0.5, 1.5)
                ln.bias.uniform_(-0.2, 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.functional:
            h = F.layer_norm(x, (16,), self.ln1.weight, self.ln1.bias, 1e-5)  # a constant shape: rewritten
        else:
            h = self.ln1(x)
        x = x + self.attn(h)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ToyViT(nn.Module):
    """Pre-LN ViT: patch conv, class token, position embedding, blocks, final LN, head."""

    def __init__(self, dim: int = 16, heads: int = 2, hidden: int = 32, depth: int = 2) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, 4, stride=4)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))
        self.pos = nn.Parameter(0.1 * torch.randn(1, 17, dim))
        self.blocks = nn.Sequential(*(ViTBlock(dim, heads, hidden, functional=i == 1) for i in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


class DecoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, functional: bool = False) -> None:
        super().__init__()
        self.functional = functional
        self.n1, self.n2 = nn.RMSNorm(dim, eps=1e-6), nn.RMSNorm(dim)
        self.attn = Attention(dim, heads, causal=True)
        self.gate, self.up = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)
        with torch.no_grad():
            self.n1.weight.uniform_(0.5, 1.5)
            self.n2.weight.uniform_(0.5, 1.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.rms_norm(x, (16,), self.n1.weight, 1e-6) if self.functional else self.n1(x)
        x = x + self.attn(h)
        h = self.n2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class ToyDecoder(nn.Module):
    """Pre-norm decoder: nn.Embedding, RMSNorm, causal SDPA, SwiGLU, final RMSNorm, lm head."""

    def __init__(self, vocab: int = 50, dim: int = 16, heads: int = 2, hidden: int = 32, tied: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.Sequential(DecoderBlock(dim, heads, hidden), DecoderBlock(dim, heads, hidden, True))
        self.norm = nn.RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        if tied:
            self.lm_head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(self.blocks(self.embed(ids))))


class PostLN(nn.Module):
    """Post-LN encoder (BERT-style): ``x = LN(x + attn(x)); x = LN(x + mlp(x))``."""

    def __init__(self, dim: int = 16, heads: int = 2, hidden: int = 32) -> None:
        super().__init__()
        self.inp = nn.Linear(8, dim)
        self.attn = Attention(dim, heads)
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln1(self.inp(x))
        x = self.ln1(x + self.attn(x))
        x = self.ln2(x + self.fc2(F.gelu(self.fc1(x))))
        return self.head(x)


def _vit():
    torch.manual_seed(0)
    return ToyViT().eval(), (torch.randn(2, 3, 16, 16),), lambda: (torch.randn(3, 3, 16, 16),)


def _decoder():
    torch.manual_seed(0)
    return ToyDecoder().eval(), (torch.randint(0, 50, (2, 7)),), lambda: (torch.randint(0, 50, (2, 7)),)


def _post_ln():
    torch.manual_seed(0)
    return PostLN().eval(), (torch.randn(2, 5, 8),), lambda: (torch.randn(2, 5, 8),)


MODELS = {"vit": _vit, "decoder": _decoder, "post_ln": _post_ln}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def _stream(gm) -> r2r_fx.WidthGroup:
    (group,) = [g for g in r2r_fx.width_groups(gm) if g.norms]
    return group


def _independent_error(model, grown, fresh, train: bool) -> float:
    torch.manual_seed(1)
    worst = 0.0
    for _ in range(3):
        inputs = fresh()
        model.train(train)
        grown.train(train)
        with torch.no_grad():
            worst = max(worst, _rel(grown(*inputs), model(*inputs)))
    model.eval()
    grown.eval()
    return worst


@pytest.mark.parametrize("via", ["symbolic_trace", "export"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_stream_doubles_exactly(name, via):
    model, inputs, fresh = MODELS[name]()
    gm = r2r_fx.capture(model, inputs, via=via)
    stream = _stream(gm)
    assert stream.widenable, stream.reason
    grown = r2r_fx.widen(gm, factor=2.0, seed=0)
    (change,) = [g for g in growth_history(grown)[-1].groups if g.id == stream.id]
    assert change.status == "widened" and change.width_after == 2 * stream.width
    assert _stream(grown).width == 2 * stream.width  # the grown graph analyses again, shapes consistent
    for train in (False, True):  # dropout 0: train mode is the same function
        err = _independent_error(model, grown, fresh, train)
        assert err <= RTOL, (name, via, train, err)
    report = r2r_fx.verify(model, grown, inputs, onnx=via == "symbolic_trace")
    assert report.ok and report.max_rel_error <= RTOL, report
    if via == "symbolic_trace":
        assert report.onnx_max_rel_error is not None and report.onnx_max_rel_error <= ONNX_RTOL, report


@pytest.mark.parametrize("method", ["net2net", "netmorph"])
@pytest.mark.parametrize("name", ["vit", "decoder"])
def test_stream_doubles_exactly_with_other_methods(name, method):
    model, inputs, fresh = MODELS[name]()
    grown = r2r_fx.widen(r2r_fx.capture(model, inputs), factor=3.0, method=method, seed=0)
    assert [g.status for g in growth_history(grown)[-1].groups if g.width_before == 16][0] == "widened"
    assert _independent_error(model, grown, fresh, False) <= RTOL


@pytest.mark.parametrize("name", ["vit", "decoder"])
def test_new_weights_get_gradients(name):
    """R2R: the copies' writer rows, norm weights/biases, position embedding and class token get nonzero
    gradients, and so do the readers' new columns (their shares differ by the zero-sum noise): every new
    position along a stream axis has a nonzero gradient (an embedding's unused token rows have none)."""
    model, inputs, fresh = MODELS[name]()
    grown = r2r_fx.widen(r2r_fx.capture(model, inputs), factor=2.0, seed=0)
    grown.train()
    out = grown(*fresh())
    (out * torch.randn_like(out)).sum().backward()
    params = dict(grown.named_parameters())
    checked = 0
    for change in growth_history(grown)[-1].params:
        if not any(info.role.startswith("stream_") for info in change.axes.values()):
            continue
        grad = params[change.param].grad
        assert grad is not None, change.param
        assert new_entry_mask(change).any(), change.param
        for axis, info in change.axes.items():
            if info.role.startswith("stream_"):
                d = info.old_runs[0][2]
                per_position = grad.abs().movedim(axis, 0).reshape(grad.shape[axis], -1).amax(1)
                assert (per_position[d:] > 0).all(), (change.param, axis, per_position)
        checked += 1
    assert checked >= 10


def test_copies_separate_under_r2r_not_net2net():
    """Net2Net's W/k shares keep the copies' gradients identical; R2R's noise separates them."""
    model, inputs, fresh = _vit()
    x = fresh()
    gaps = {}
    for method in ("r2r", "net2net"):
        grown = r2r_fx.widen(r2r_fx.capture(model, inputs), factor=2.0, method=method, seed=0)
        out = grown(*x)
        out.pow(2).sum().backward()
        g = dict(grown.named_parameters())["blocks.0.fc2.weight"].grad
        gaps[method] = float((g[:16] - g[16:]).abs().max() / g.abs().max())
    assert gaps["net2net"] < 1e-5 < 0.01 < gaps["r2r"], gaps


def test_non_integer_post_ln_stream_is_refused():
    """Post-LN: the output of a norm (tail 0) becomes the stream the next norm reads, so only whole
    copies are exact; pre-LN streams take mean channels (tests/test_stream_tail.py)."""
    model, inputs, _ = _post_ln()
    gm = r2r_fx.capture(model, inputs)
    stream = _stream(gm)
    assert stream.integer_only.startswith("post-LN"), stream.integer_only
    grown = r2r_fx.widen(gm, factor=1.5, seed=0)
    (change,) = [g for g in growth_history(grown)[-1].groups if g.id == stream.id]
    assert change.status == "skipped" and "whole copies" in change.reason and "16 -> 24" in change.reason
    assert "post-LN" in change.reason and change.width_after == 16
    assert _rel(grown(*inputs), gm(*inputs)) <= RTOL  # the rest (MLP hidden) still grew exactly


def test_tied_embedding_stream_keeps_the_tie():
    """The tied embedding/head grows by copies for both uses, the final norm's weight halves
    (``r2r_fx.stream_ties``; refusals in tests/test_stream_idioms.py)."""
    torch.manual_seed(0)
    model, inputs = ToyDecoder(tied=True).eval(), (torch.randint(0, 50, (2, 7)),)
    gm = r2r_fx.capture(model, inputs)
    stream = _stream(gm)
    assert stream.widenable, stream.reason
    grown = r2r_fx.widen(gm, factor=2.0, seed=0)
    assert grown.embed.weight is grown.lm_head.weight and grown.embed.weight.shape == (50, 32)
    assert _rel(grown(*inputs), model(*inputs)) <= RTOL


def test_post_ln_encoder_layer_stream_grows_by_whole_copies():
    """nn.TransformerEncoderLayer is traced through (r2r_fx.inline): post-LN, its stream grows by
    whole copies (x2) and refuses mean channels (x1.5) with the reason."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=False).eval()
    model = nn.Sequential(nn.Linear(8, 16), layer, nn.Linear(16, 4)).eval()
    inputs = (torch.randn(2, 5, 8),)
    gm = r2r_fx.capture(model, inputs)
    for factor, status in ((2.0, "widened"), (1.5, "skipped")):
        grown = r2r_fx.widen(gm, factor=factor, seed=0)
        (stream,) = [g for g in growth_history(grown)[-1].groups if g.kind == "stream"]
        assert stream.status == status, stream
        assert status == "widened" or "post-LN" in stream.reason, stream
        assert _rel(grown(*inputs), model(*inputs)) <= RTOL


def test_method_without_stream_fill_is_refused():
    class Plain(Method):
        name = "plain"

        def grow(self, tensor, axes, generator):
            raise AssertionError("not reached for the stream")

    model, inputs, _ = _vit()
    gm = r2r_fx.capture(model, inputs)
    stream = _stream(gm)
    grown = r2r_fx.widen(gm, factor=2.0, groups=[stream.id], method=Plain(), seed=0)
    (change,) = [g for g in growth_history(grown)[-1].groups if g.id == stream.id]
    assert change.status == "skipped" and "no fill for a normalised stream" in change.reason


def test_layer_norm_over_two_axes_stays_frozen():
    class TwoAxes(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.ln, self.out = nn.Linear(4, 8), nn.LayerNorm((5, 8)), nn.Linear(8, 3)

        def forward(self, x):
            return self.out(self.ln(self.fc(x)))

    gm = r2r_fx.capture(TwoAxes().eval(), (torch.randn(2, 5, 4),))
    (group,) = [g for g in r2r_fx.width_groups(gm) if g.producers == ["fc"]]
    assert not group.widenable and "normalised over" in group.reason and not group.norms


def trained_adam(gm, fresh, steps: int = 3) -> torch.optim.Adam:
    """An Adam optimizer over ``gm`` after ``steps`` training steps on fresh inputs (``gm`` left in eval)."""
    gm.train()
    optimizer = torch.optim.Adam(gm.parameters(), lr=1e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        gm(*fresh()).square().mean().backward()
        optimizer.step()
    gm.eval()
    return optimizer


def test_optimizer_state_of_a_stream_reader_is_carried_to_every_share():
    """Every share of a reader's column gets the old column's gradient (the copies are equal), so each
    carries the old column's Adam moments; a writer's copy 0 keeps its state, the new copies start at 0."""
    model, inputs, fresh = _vit()
    gm = r2r_fx.capture(model, inputs)
    optimizer = trained_adam(gm, fresh)
    grown = r2r_fx.widen(gm, factor=2.0, seed=0)
    carried = r2r_fx.carry_optimizer(optimizer, gm, grown)
    old_state = {name: optimizer.state[p] for name, p in gm.named_parameters()}
    new_state = {name: carried.state[p] for name, p in grown.named_parameters()}
    readers = [
        (name, axis)
        for change in r2r_fx.growth_history(grown)[-1].params
        for axis, info in change.axes.items()
        if info.role == "stream_in"
        for name in [change.param]
    ]
    writers = [
        (change.param, axis)
        for change in r2r_fx.growth_history(grown)[-1].params
        for axis, info in change.axes.items()
        if info.role == "stream_out"
    ]
    assert readers and writers
    for name, axis in readers:
        for key in ("exp_avg", "exp_avg_sq"):
            old, new = old_state[name][key], new_state[name][key]
            d = old.shape[axis]
            assert new.shape[axis] == 2 * d
            for j in range(2):
                share = new.narrow(axis, j * d, d)
                if share.shape == old.shape:  # the parameter's other axes did not grow
                    assert torch.equal(share, old), (name, key, j)
                else:
                    assert torch.equal(share.narrow(1 - axis, 0, old.shape[1 - axis]), old), (name, key, j)
    for name, axis in writers:
        old, new = old_state[name]["exp_avg"], new_state[name]["exp_avg"]
        d = old.shape[axis]
        assert not new.narrow(axis, d, d).any()
    assert all(torch.equal(new_state[n]["step"], old_state[n]["step"]) for n in old_state if n in new_state)
