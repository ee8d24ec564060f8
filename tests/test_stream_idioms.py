"""Normalised streams in the forms language models write them: RMSNorm decomposed into ops
(``r2r_fx.rules.norm_idioms``: Llama, Gemma's ``(1 + w)``, ``x / sqrt(mean(x*x) + eps)``) and an input
embedding tied to the output head (``r2r_fx.stream_ties``). Both grow by whole copies, exactly, in
PyTorch (eval and train) and ONNX Runtime; anything off the pattern stays frozen with its reason.

Errors are relative, max|delta| / max|y|, on seeded random inputs (``helpers.assert_function_preserved``).
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F
from test_stream import Attention
from torch import nn

import r2r_fx
from r2r_fx.record import growth_history

from helpers import assert_function_preserved, assert_new_weights_train

DIM, VOCAB = 16, 50


class LlamaRMSNorm(nn.Module):
    """HuggingFace's LlamaRMSNorm, line for line."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim).uniform_(0.5, 1.5))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class GemmaRMSNorm(nn.Module):
    """HuggingFace's GemmaRMSNorm: the effective weight is ``1 + w``."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim).uniform_(-0.5, 0.5))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self._norm(x.float())
        output = output * (1.0 + self.weight.float())
        return output.type_as(x)


class SqrtRMSNorm(nn.Module):
    """Written by hand: ``x / sqrt(mean(x * x) + eps) * w``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim).uniform_(0.5, 1.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-5) * self.weight


NORMS = {"llama": LlamaRMSNorm, "gemma": GemmaRMSNorm, "sqrt": SqrtRMSNorm}


class Block(nn.Module):
    def __init__(self, norm: type[nn.Module]) -> None:
        super().__init__()
        self.n1, self.n2 = norm(DIM), norm(DIM)
        self.attn = Attention(DIM, 2, causal=True)
        self.gate, self.up = nn.Linear(DIM, 32, bias=False), nn.Linear(DIM, 32, bias=False)
        self.down = nn.Linear(32, DIM, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.n1(x))
        h = self.n2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class Decoder(nn.Module):
    """A Llama-like decoder: embedding, two blocks, final norm, lm head (tied to the embedding or not)."""

    def __init__(self, norm: type[nn.Module] = LlamaRMSNorm, tied: bool = False, final: nn.Module | None = None):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.Sequential(Block(norm), Block(norm))
        self.norm = norm(DIM) if final is None else final
        self.lm_head = nn.Linear(DIM, VOCAB, bias=False)
        if tied:
            self.lm_head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(self.blocks(self.embed(ids))))


def _ids(batch: int = 2, seq: int = 7, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))


def _stream(gm: torch.fx.GraphModule) -> r2r_fx.WidthGroup:
    """The residual stream: the group the embedding writes."""
    analysis = r2r_fx.analyze(gm)
    embedding = next(n.name for n in gm.graph.nodes if n.name == "embed" or n.name.startswith("embedding"))
    (group,) = [g for g in analysis.groups if embedding in g.producers]
    return group


def _doubles(model: nn.Module, inputs: tuple, gm: torch.fx.GraphModule, norms: int) -> torch.fx.GraphModule:
    """The stream (``norms`` norm sites) is widenable, grows 2x, the grown model is the same function,
    and its new weights train."""
    stream = _stream(gm)
    assert stream.widenable, stream.reason
    assert len(stream.norms) == norms, stream.norms
    grown = r2r_fx.widen(gm, factor=2.0, seed=0)
    (change,) = [g for g in growth_history(grown)[-1].groups if g.id == stream.id]
    assert change.status == "widened" and change.width_after == 2 * stream.width, change
    again = _stream(grown)  # the grown graph analyses again, and its stream could grow again
    assert again.width == 2 * stream.width and again.widenable, again
    report = assert_function_preserved(model, grown, inputs)
    assert_new_weights_train(grown, inputs)  # copies, shares and tied columns all get gradients
    print(f"eval {report.eval_rel_error:.2e} train {report.train_rel_error:.2e} onnx {report.onnx_max_rel_error:.2e}")
    return grown


@pytest.mark.parametrize("via", ["symbolic_trace", "export"])
@pytest.mark.parametrize("norm", sorted(NORMS))
def test_decomposed_rms_norm_stream_doubles_exactly(norm, via):
    torch.manual_seed(0)
    model, inputs = Decoder(NORMS[norm]).eval(), (_ids(),)
    _doubles(model, inputs, r2r_fx.capture(model, inputs, via=via), norms=5)


@pytest.mark.parametrize("via", ["symbolic_trace", "export"])
@pytest.mark.parametrize("final", ["llama", "layer_norm", "rms_norm"])
def test_tied_head_stays_tied(final, via):
    """The tied tensor is copied for both uses and the final norm's weights are divided by 2."""
    torch.manual_seed(0)
    norm = {"llama": LlamaRMSNorm(DIM), "layer_norm": nn.LayerNorm(DIM), "rms_norm": nn.RMSNorm(DIM)}[final]
    with torch.no_grad():
        for p in norm.parameters():
            p.uniform_(0.5, 1.5)
    model, inputs = Decoder(tied=True, final=norm).eval(), (_ids(),)
    gm = r2r_fx.capture(model, inputs, via=via)
    grown = _doubles(model, inputs, gm, norms=5)
    embedding, head = _embedding_and_head_weights(grown)
    assert embedding is head, "the tie is broken"
    assert tuple(head.shape) == (VOCAB, 2 * DIM) and torch.equal(head[:, :DIM], head[:, DIM:])
    weight = dict(grown.named_parameters())["norm.weight"]
    assert torch.equal(weight, torch.cat([norm.weight / 2] * 2))
    scaled = [c.param for c in growth_history(grown)[-1].params if "stream_scaled" in {i.role for i in c.axes.values()}]
    assert sorted(scaled) == sorted(f"norm.{n}" for n, _ in norm.named_parameters()), scaled


def _embedding_and_head_weights(gm: torch.fx.GraphModule) -> tuple[torch.Tensor, torch.Tensor]:
    """The tensors the embedding and the last linear (the head) read."""
    nodes = list(gm.graph.nodes)
    if any(n.op == "call_module" for n in nodes):
        return gm.embed.weight, gm.lm_head.weight
    embedding = next(n for n in nodes if n.name == "embedding")
    head = [n for n in nodes if n.name.startswith("linear")][-1]
    return gm.get_parameter(str(embedding.args[0].target)), gm.get_parameter(str(head.args[1].target))


# ---------------------------------------------------------------- fail closed


class MeanUsedElsewhere(nn.Module):
    """The mean square also feeds the output: not a norm, the stream stays frozen."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(VOCAB, DIM), nn.Linear(DIM, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        ms = x.pow(2).mean(-1, keepdim=True)
        return self.head(x * torch.rsqrt(ms + 1e-6)) + ms


class MeanOverTokens(nn.Module):
    """The mean square over the token axis (1), not the channel axis: the token axis keeps its size, the
    channels are no stream (they grow by R2R's pairs)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(VOCAB, DIM), nn.Linear(DIM, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        return self.head(x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-6))


class OtherTensorScaled(nn.Module):
    """The root multiplied onto another tensor than the one squared."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.fc, self.head = nn.Embedding(VOCAB, DIM), nn.Linear(DIM, DIM), nn.Linear(DIM, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        return self.head(self.fc(x) * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class MeanNotSquared(nn.Module):
    """``x * rsqrt(mean(x ** 3))``: a mean of cubes, not a mean square."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(VOCAB, DIM), nn.Linear(DIM, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids).abs()
        return self.head(x * torch.rsqrt(x.pow(3).mean(-1, keepdim=True) + 1e-6))


@pytest.mark.parametrize("via", ["symbolic_trace", "export"])
@pytest.mark.parametrize("model_class", [MeanUsedElsewhere, MeanOverTokens, OtherTensorScaled, MeanNotSquared])
def test_a_mean_off_the_pattern_is_no_norm(model_class, via):
    torch.manual_seed(0)
    model, inputs = model_class().eval(), (_ids(),)
    gm = r2r_fx.capture(model, inputs, via=via)
    stream = _stream(gm)
    assert not stream.norms, stream
    if model_class is MeanOverTokens:
        assert stream.widenable, stream  # the token axis froze (no width), the channels grow in pairs
    else:
        assert not stream.widenable and "reduced over by mean" in stream.reason, stream
    grown = r2r_fx.widen(gm, factor=2.0, seed=0)
    status = "widened" if model_class is MeanOverTokens else "skipped"
    assert [g.status for g in growth_history(grown)[-1].groups if g.id == stream.id] == [status]
    assert_function_preserved(model, grown, inputs, onnx=False)


class SharedFinalNorm(Decoder):
    """The final norm's output is read by the tied head and by a second head."""

    def __init__(self) -> None:
        super().__init__(tied=True)
        self.aux = nn.Linear(DIM, 3)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.norm(self.blocks(self.embed(ids)))
        return self.lm_head(h), self.aux(h)


class NoFinalNorm(Decoder):
    """The tied head reads the residual stream itself."""

    def __init__(self) -> None:
        super().__init__(tied=True)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.blocks(self.embed(ids)))


TIE_REFUSALS = {
    "shared_norm": (SharedFinalNorm, "is read by more than"),
    "no_norm": (NoFinalNorm, "not a norm's output alone"),
    "not_affine": (lambda: Decoder(tied=True, final=nn.LayerNorm(DIM, elementwise_affine=False)), "no weight to scale"),
    "gemma": (lambda: Decoder(GemmaRMSNorm, tied=True), "not a parameter of its own"),
}


@pytest.mark.parametrize("via", ["symbolic_trace", "export"])
@pytest.mark.parametrize("case", sorted(TIE_REFUSALS))
def test_a_tie_that_cannot_be_kept_stays_frozen(case, via):
    build, why = TIE_REFUSALS[case]
    torch.manual_seed(0)
    model, inputs = build().eval(), (_ids(),)
    gm = r2r_fx.capture(model, inputs, via=via)
    stream = _stream(gm)
    assert not stream.widenable and stream.norms, stream
    assert "is used as in and out" in stream.reason and why in stream.reason, stream.reason
    grown = r2r_fx.widen(gm, factor=2.0, seed=0)
    assert [g.status for g in growth_history(grown)[-1].groups if g.id == stream.id] == ["skipped"]
    assert_function_preserved(model, grown, inputs, onnx=False)


# ---------------------------------------------------------------- HuggingFace (tiny, from configs)


def _transformers():
    sys.path.insert(0, "/work/shared/zoo")  # a CPU shim for the torchvision that transformers imports
    try:
        import torchvision_cpu_ops  # noqa: F401
    except ImportError:
        pass
    return pytest.importorskip("transformers")


def test_hf_llama_stream_widens():
    transformers = _transformers()
    config = transformers.LlamaConfig(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=32,
        attention_dropout=0.0,
        use_cache=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    inputs = (_ids(vocab=100, seq=8),)
    gm = r2r_fx.capture(model, inputs)
    grown = _doubles(model, inputs, gm, norms=5)  # 2 x (input, post-attention) + the final norm
    assert [g.width_after for g in growth_history(grown)[-1].groups if g.width_before == 64][0] == 128


def test_hf_gpt2_tied_stream_widens():
    transformers = _transformers()
    config = transformers.GPT2Config(
        vocab_size=100,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_inner=128,
        n_positions=32,
        resid_pdrop=0.1,
        embd_pdrop=0.1,
        attn_pdrop=0.0,
        use_cache=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    inputs = (_ids(vocab=100, seq=8),)
    gm = r2r_fx.capture(model, inputs)
    grown = _doubles(model, inputs, gm, norms=5)
    embedding = next(n for n in grown.graph.nodes if n.name == "embedding")
    head = next(n for n in grown.graph.nodes if n.name == "linear")  # the lm head (the blocks use addmm)
    weight = grown.get_parameter(str(embedding.args[0].target))
    assert weight is grown.get_parameter(str(head.args[1].target)) and tuple(weight.shape) == (100, 128)


@pytest.mark.parametrize("via", ["symbolic_trace", "export"])
@pytest.mark.parametrize("norm", sorted(NORMS))
def test_decomposed_rms_norm_stream_takes_mean_channels(norm, via):
    """16 -> 28 (k = 1, r = 12): a zero tail, the ``+ eps`` constant times kd/D and the weight (Gemma:
    ``1 + w``) times sqrt(kd/D), written into the graph's own ops."""
    torch.manual_seed(0)
    model, inputs = Decoder(NORMS[norm]).eval(), (_ids(),)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, NORMS[norm]):
                m.weight.uniform_(-0.5, 0.5)
    gm = r2r_fx.capture(model, inputs, via=via)
    stream = _stream(gm)
    assert stream.widenable and not stream.integer_only, stream
    grown = r2r_fx.widen(gm, sizes={stream.id: DIM + 12}, seed=0)
    (change,) = [g for g in growth_history(grown)[-1].groups if g.id == stream.id]
    assert (change.status, change.k, change.r) == ("widened", 1, 12), change
    assert_function_preserved(model, grown, inputs)  # (readers' tail columns see an exact 0: no gradient yet)


def test_a_decomposed_norm_weight_read_elsewhere_takes_no_mean_channels():
    """The weight is read as data: rescaling it for the norm would change its other reads too."""

    def rms(h, w):
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * w

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb, self.f, self.o = nn.Linear(8, DIM), nn.Linear(DIM, DIM), nn.Linear(DIM, 8)
            self.w, self.w2 = nn.Parameter(torch.rand(DIM) + 0.5), nn.Parameter(torch.rand(DIM) + 0.5)

        def forward(self, x):
            h = self.emb(x)
            h = h + self.f(rms(h, self.w)) * self.w  # w is a layer scale as well
            return self.o(rms(h, self.w2))

    torch.manual_seed(0)
    model, inputs = Scaled().eval(), (torch.randn(2, 3, 8),)
    for via in ("symbolic_trace", "export"):
        (stream,) = [g for g in r2r_fx.width_groups(r2r_fx.capture(model, inputs, via=via)) if g.kind == "stream"]
        assert "is read elsewhere too" in stream.integer_only, stream
