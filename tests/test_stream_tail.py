"""Mean channels (issue 17): a normalised stream of ``d = 64`` channels grows to any ``D``, ``k = D // d``
whole copies plus ``r = D - k*d`` tail channels (the mean of the old ones under LayerNorm, zero under
RMSNorm), exactly: eps and gamma are rescaled by ``kd/D``. Where the graph breaks the tail (post-LN,
an activation or layer scale on the stream) only whole copies are exact and other widths are refused
with the reason (``WidthGroup.integer_only``).

Errors are relative, max|delta| / max|y|, on fresh random inputs, in eval and train mode.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_stream import ONNX_RTOL, RTOL, Attention, _independent_error, _rel, trained_adam
from torch import nn

import r2r_fx
import r2r_fx.surgery
from r2r_fx.record import growth_history

D = 64
WIDTHS = {96: (1, 32), 160: (2, 32), 200: (3, 8)}  # D -> (k, r)


class FunctionalNorm(nn.Module):
    """``F.layer_norm`` / ``F.rms_norm`` with a constant normalized shape and its own parameters."""

    def __init__(self, dim: int, rms: bool, eps: float) -> None:
        super().__init__()
        self.dim, self.rms, self.eps = dim, rms, eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = None if rms else nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rms:
            return F.rms_norm(x, (64,), self.weight, self.eps)
        return F.layer_norm(x, (64,), self.weight, self.bias, eps=self.eps)


def _norm(kind: str, dim: int, eps: float | None) -> nn.Module:
    if kind == "layer":
        return nn.LayerNorm(dim, eps=eps or 1e-5)
    if kind == "rms":
        return nn.RMSNorm(dim, eps=eps)  # eps None: finfo(dtype).eps
    return FunctionalNorm(dim, kind == "f_rms", eps or 1e-5)


class Block(nn.Module):
    """Pre-norm: ``x + attn(n1 x)``, ``x + fc2(gelu(fc1(n2 x)))``; ``stream_op`` puts a per-channel op on
    the stream before the first norm ("gelu" or "layer_scale")."""

    def __init__(self, dim: int, kind: str, stream_op: str = "") -> None:
        super().__init__()
        self.n1, self.n2 = _norm(kind, dim, 1e-5), _norm(kind, dim, None if kind == "rms" else 1e-6)
        self.attn = Attention(dim, 4)
        self.fc1, self.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
        self.stream_op = stream_op
        self.scale = nn.Parameter(torch.rand(dim) + 0.5) if stream_op == "layer_scale" else None
        with torch.no_grad():
            for n in (self.n1, self.n2):
                n.weight.uniform_(0.5, 1.5)
                if getattr(n, "bias", None) is not None:
                    n.bias.uniform_(-0.2, 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stream_op == "gelu":
            x = F.gelu(x)
        h = self.attn(self.n1(x))
        x = x + (self.scale * h if self.scale is not None else h)
        return x + self.fc2(F.gelu(self.fc1(self.n2(x))))


class PreNorm(nn.Module):
    """Token embedding, class token and position embedding (parameters read as data), pre-norm blocks,
    final norm, a head on the class token; ``probe`` also reads the un-normalised stream directly."""

    def __init__(self, kind: str = "layer", probe: bool = False, stream_op: str = "", scale: float = 1.0) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, D)
        self.cls = nn.Parameter(torch.randn(1, 1, D))
        self.pos = nn.Parameter(0.1 * torch.randn(1, 8, D))
        self.blocks = nn.ModuleList(Block(D, kind, stream_op if i == 1 else "") for i in range(2))
        self.norm = _norm(kind, D, 1e-6)
        self.head = nn.Linear(D, 10)
        self.probe = nn.Linear(D, 10) if probe else None
        with torch.no_grad():  # every writer of the stream scaled: small activations make eps matter
            for p in (self.embed.weight, self.cls, self.pos):
                p.mul_(scale)
            for b in self.blocks:
                for layer in (b.attn.o, b.fc2):
                    layer.weight.mul_(scale)
                    layer.bias.mul_(scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        for block in self.blocks:
            x = block(x)
        out = self.head(self.norm(x)[:, 0])
        return out + self.probe(x[:, 0]) if self.probe is not None else out


def _ids(batch: int = 2) -> tuple[torch.Tensor]:
    return (torch.randint(0, 50, (batch, 7)),)


def _case(dtype=torch.float32, **options):
    torch.manual_seed(0)
    model = PreNorm(**options).to(dtype).eval()
    return model, _ids(), lambda: _ids(3)


def _stream(gm) -> r2r_fx.WidthGroup:
    (group,) = [g for g in r2r_fx.width_groups(gm) if g.norms]
    return group


def _change(grown, stream):
    (change,) = [g for g in growth_history(grown)[-1].groups if g.id == stream.id]
    return change


@pytest.mark.parametrize("width", sorted(WIDTHS))
@pytest.mark.parametrize("via", ["symbolic_trace", "export"])
@pytest.mark.parametrize("kind", ["layer", "rms", "f_layer", "f_rms"])
def test_mean_channels_are_exact(kind, via, width):
    model, inputs, fresh = _case(kind=kind)
    gm = r2r_fx.capture(model, inputs, via=via)
    stream = _stream(gm)
    assert stream.widenable and not stream.integer_only, stream
    grown = r2r_fx.widen(gm, factor=width / D, seed=0)
    change = _change(grown, stream)
    assert change.status == "widened" and (change.width_after, change.k, change.r) == (width, *WIDTHS[width])
    assert _stream(grown).width == width  # the grown graph analyses again, shapes consistent
    for train in (False, True):
        err = _independent_error(model, grown, fresh, train)
        assert err <= RTOL, (kind, via, width, train, err)
    report = r2r_fx.verify(model, grown, inputs, onnx=via == "symbolic_trace")
    assert report.ok and report.max_rel_error <= RTOL, report
    if via == "symbolic_trace":
        assert report.onnx_max_rel_error is not None and report.onnx_max_rel_error <= ONNX_RTOL, report


@pytest.mark.parametrize("kind", ["layer", "rms", "f_layer"])
def test_mean_channels_in_float64(kind):
    model, inputs, _ = _case(torch.float64, kind=kind)
    gm = r2r_fx.capture(model, inputs)
    for width in WIDTHS:
        grown = r2r_fx.widen(gm, factor=width / D, seed=0)
        assert _stream(grown).width == width
        x = _ids(4)
        with torch.no_grad():
            assert _rel(grown(*x), model(*x)) <= 1e-12, (kind, width)


@pytest.mark.parametrize("kind", ["layer", "rms", "f_layer", "f_rms"])
def test_eps_rewrite_is_what_keeps_small_streams_exact(kind, monkeypatch):
    """Activations of ~1e-3 make the variance comparable to eps: without ``eps*kd/D`` the error is large."""
    model, inputs, fresh = _case(kind=kind, scale=1e-3)
    gm = r2r_fx.capture(model, inputs)
    grown = r2r_fx.widen(gm, factor=96 / D, seed=0)
    assert _independent_error(model, grown, fresh, False) <= RTOL
    if kind == "rms":  # RMSNorm(eps=None) gets an explicit eps
        assert grown.get_submodule("blocks.0.n2").eps == pytest.approx(torch.finfo(torch.float32).eps * 64 / 96)
    monkeypatch.setattr(r2r_fx.surgery, "_fix_stream_eps", lambda *args: None)
    unfixed = r2r_fx.widen(gm, factor=96 / D, seed=0, check=False)
    assert _independent_error(model, unfixed, fresh, False) > 1e-3


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_direct_reader_of_the_stream(kind):
    """A reader of the un-normalised stream sees the mean tail (LayerNorm): its tail columns come in
    opposite pairs; under RMSNorm the tail is zero and its columns are free."""
    model, inputs, fresh = _case(kind=kind, probe=True)
    gm = r2r_fx.capture(model, inputs)
    analysis = r2r_fx.analyze(gm)
    forms = analysis.stream_forms[_stream(gm).channel_sets[0]]
    assert forms.reads[("probe.weight", 1)] == ("mean" if kind == "layer" else "zero")
    assert forms.reads[("head.weight", 1)] == "zero"
    grown = r2r_fx.widen(gm, factor=96 / D, seed=0)
    assert _independent_error(model, grown, fresh, False) <= RTOL
    tail = grown.probe.weight[:, D:]
    assert tail.abs().min() > 0
    if kind == "layer":
        assert torch.equal(tail[:, :16], -tail[:, 16:])
    assert grown.head.weight[:, D:].abs().min() > 0  # a norm's output: random tail columns


@pytest.mark.parametrize("method", ["net2net", "netmorph"])
def test_other_methods_fill_zero_tail_columns(method):
    model, inputs, fresh = _case(probe=True)
    gm = r2r_fx.capture(model, inputs)
    for width in (96, 200):
        grown = r2r_fx.widen(gm, factor=width / D, method=method, seed=0)
        assert growth_history(grown)[-1].exact is True and _stream(grown).width == width
        assert _independent_error(model, grown, fresh, False) <= RTOL
        for reader in (grown.head, grown.probe, grown.get_submodule("blocks.0.fc1")):
            assert not reader.weight[:, 3 * D if width == 200 else D :].any()


def test_r2r_tail_gamma_is_random_and_the_rest_forced():
    model, inputs, _ = _case()
    grown = r2r_fx.widen(r2r_fx.capture(model, inputs), factor=160 / D, seed=0)
    s = (128 / 160) ** 0.5
    ln, old = grown.get_submodule("blocks.0.n1"), model.blocks[0].n1
    assert torch.allclose(ln.weight[:D], old.weight * s) and torch.allclose(ln.weight[D : 2 * D], old.weight * s)
    assert ln.weight[2 * D :].std() > 0 and not ln.bias[2 * D :].any()
    assert ln.eps == pytest.approx(1e-5 * 128 / 160) and ln.normalized_shape == (160,)
    rows = grown.get_submodule("blocks.0.fc2").weight  # a writer: copies, then the mean of the old rows
    assert torch.equal(rows[D : 2 * D], rows[:D]) and torch.allclose(rows[2 * D :], rows[:D].mean(0).expand(32, -1))
    assert torch.allclose(grown.pos[..., 2 * D :], model.pos.mean(-1, keepdim=True).expand(1, 8, 32))


def test_record_says_copies_tail_and_changed_entries():
    model, inputs, _ = _case()
    gm = r2r_fx.capture(model, inputs)
    grown = r2r_fx.widen(gm, factor=96 / D, seed=0)
    record = growth_history(grown)[-1]
    assert (_change(grown, _stream(gm)).k, _change(grown, _stream(gm)).r) == (1, 32)
    axes = {c.param: c.axes for c in record.params}
    assert axes["blocks.0.n1.weight"][0].old_changed  # gamma * sqrt(kd/D)
    assert not axes["blocks.0.n1.bias"][0].old_changed and not axes["blocks.0.fc2.weight"][0].old_changed
    assert not axes["head.weight"][1].old_changed  # k = 1: the old columns are whole
    doubled = growth_history(r2r_fx.widen(gm, factor=2.0, seed=0))[-1]
    assert {c.param: c.axes for c in doubled.params}["head.weight"][1].old_changed  # W/2 shares
    assert not {c.param: c.axes for c in doubled.params}["blocks.0.n1.weight"][0].old_changed


def test_optimizer_state_of_rescaled_norm_weights_keeps_its_scale_and_drops_its_momentum():
    model, inputs, fresh = _case()
    gm = r2r_fx.capture(model, inputs)
    optimizer = trained_adam(gm, fresh)
    grown = r2r_fx.widen(gm, factor=96 / D, seed=0)
    carried = r2r_fx.carry_optimizer(optimizer, gm, grown)
    old = {n: optimizer.state[p] for n, p in gm.named_parameters()}
    new = {n: carried.state[p] for n, p in grown.named_parameters()}
    weight = new["blocks.0.n1.weight"]
    assert old["blocks.0.n1.weight"]["exp_avg"].any() and not weight["exp_avg"][:D].any()  # gamma * s: no momentum
    assert torch.equal(weight["exp_avg_sq"][:D], old["blocks.0.n1.weight"]["exp_avg_sq"])  # its scale kept
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.equal(new["blocks.0.n1.bias"][key][:D], old["blocks.0.n1.bias"][key])
        reader, writer = new["blocks.0.fc1.weight"][key], new["blocks.0.fc2.weight"][key]  # the MLP grew too
        assert torch.equal(reader[: 2 * D, :D], old["blocks.0.fc1.weight"][key])  # whole columns: carried
        assert torch.equal(writer[:D, : 2 * D], old["blocks.0.fc2.weight"][key])
    reader, writer = new["blocks.0.fc1.weight"], new["blocks.0.fc2.weight"]
    assert not reader["exp_avg"][:, D:].any() and not writer["exp_avg"][D:].any()  # tail: no momentum ...
    old_reader = reader["exp_avg_sq"][: 2 * D, :D]  # ... and the old columns' mean scale
    torch.testing.assert_close(reader["exp_avg_sq"][: 2 * D, D:], old_reader.mean(1, keepdim=True).expand(-1, 32))


def test_new_writer_rows_get_gradients():
    """The tail rows of writers, the norms' tail bias and direct readers' tail columns get gradients.
    (Readers of a norm's output see a tail of exactly 0, so their tail columns and the norms' tail
    gamma get theirs from the second step on.)"""
    model, inputs, fresh = _case(probe=True)
    grown = r2r_fx.widen(r2r_fx.capture(model, inputs), factor=96 / D, seed=0)
    grown.train()
    out = grown(*fresh())
    (out * torch.randn_like(out)).sum().backward()
    params = dict(grown.named_parameters())
    for name in ("blocks.0.fc2.weight", "blocks.1.attn.o.weight", "blocks.0.n1.bias", "norm.bias"):
        assert (params[name].grad[D:].abs().reshape(32, -1).amax(1) > 0).all(), name
    for name in ("cls", "pos"):
        assert (params[name].grad[..., D:].abs().reshape(-1, 32).amax(0) > 0).all(), name
    assert (params["probe.weight"].grad[:, D:].abs().amax(0) > 0).all()


@pytest.mark.parametrize("stream_op, op", [("gelu", "gelu"), ("layer_scale", "mul")])
def test_per_channel_op_on_the_stream_allows_whole_copies_only(stream_op, op):
    model, inputs, fresh = _case(stream_op=stream_op)
    gm = r2r_fx.capture(model, inputs)
    stream = _stream(gm)
    assert stream.widenable and op in stream.integer_only and "whole copies only" in repr(stream), stream
    grown = r2r_fx.widen(gm, factor=1.5, seed=0)
    change = _change(grown, stream)
    assert change.status == "skipped" and change.width_after == D and "whole copies" in change.reason
    assert stream.integer_only in change.reason and "64 -> 96" in change.reason
    assert _independent_error(model, grown, fresh, False) <= RTOL  # the rest grew, exactly
    doubled = r2r_fx.widen(gm, factor=2.0, seed=0)
    assert _change(doubled, stream).status == "widened"
    assert _independent_error(model, doubled, fresh, False) <= RTOL


def _bert(name: str):
    hf = pytest.importorskip("test_capture_hf")  # transformers, with its torchvision work-around
    config = hf.BertConfig(
        vocab_size=100,
        hidden_size=D,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
    )
    torch.manual_seed(0)
    if name == "classifier":
        return hf.BertForSequenceClassification(config).eval()

    class Pooled(nn.Module):  # the last hidden state is not an output: the stream can grow
        def __init__(self) -> None:
            super().__init__()
            self.bert = hf.BertModel(config)

        def forward(self, ids):
            return self.bert(ids).pooler_output

    return Pooled().eval()


@pytest.mark.parametrize("name", ["classifier", "pooled"])
def test_bert_is_post_ln(name):
    model = _bert(name)
    inputs = (torch.randint(0, 100, (2, 8)),)
    gm = r2r_fx.capture(model, inputs)
    stream = _stream(gm)
    assert stream.widenable and stream.integer_only.startswith("post-LN"), stream
    grown = r2r_fx.widen(gm, factor=1.5, seed=0)
    change = _change(grown, stream)
    assert change.status == "skipped" and "post-LN" in change.reason and change.width_after == D
    doubled = r2r_fx.widen(gm, factor=2.0, seed=0)
    assert _change(doubled, stream).status == "widened"
    report = r2r_fx.verify(model, doubled, inputs)
    assert report.ok and report.max_rel_error <= RTOL, report


def test_norm_without_weight_allows_whole_copies_only():
    """No gamma to rescale by sqrt(kd/D): the copies' statistics would change."""
    model, inputs, fresh = _case()
    model.norm = nn.LayerNorm(D, elementwise_affine=False)
    gm = r2r_fx.capture(model, inputs)
    stream = _stream(gm)
    assert "no weight to rescale" in stream.integer_only, stream
    assert _change(r2r_fx.widen(gm, factor=1.5, seed=0), stream).status == "skipped"
    doubled = r2r_fx.widen(gm, factor=2.0, seed=0)
    assert _independent_error(model, doubled, fresh, False) <= RTOL
