"""HuggingFace transformers (BERT, GPT-2, Llama) through capture, analysis, widening and verification.

The models are tiny and randomly initialised from configs (nothing is downloaded). They do not survive
``torch.fx.symbolic_trace``, so ``capture`` falls back to non-strict ``torch.export`` ("aten" graphs).

Attention dropout is 0 in every config: HF passes it to ``scaled_dot_product_attention`` as
``dropout_p`` (``0.0`` outside training), and the graph is exported in eval mode, so a captured
model has no attention dropout in train mode. Hidden-state dropout is kept where the config has it
(``nn.Dropout`` modules become ``aten.dropout`` calls that capture turns back into modules).
"""

from __future__ import annotations

import copy
import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import r2r_fx
from r2r_fx.errors import GrowthError
from r2r_fx.record import growth_history


def _torchvision_is_broken() -> bool:
    """Whether torchvision is installed but cannot be imported.

    transformers imports torchvision whenever it is installed (for LlamaConfig too). The torchvision
    wheels this project's machines get are CUDA builds that fail to import on a CPU-only torch
    ("operator torchvision::nms does not exist"); ``tools/torchvision_zoo.py`` first loads a shim from
    ../shared/zoo that fixes that.
    """
    try:
        try:
            from torchvision_zoo import import_torchvision
        except ImportError:
            importlib.import_module("torchvision")
        else:
            import_torchvision()
    except ImportError:
        return False  # not installed: transformers does without it
    except Exception:  # noqa: BLE001 - installed but broken
        return "torchvision" not in sys.modules
    return False


# A broken torchvision is hidden from transformers (importlib.util.find_spec then says "not installed")
# while transformers and the model classes are imported; transformers caches that answer.
_HIDE_TORCHVISION = _torchvision_is_broken()
if _HIDE_TORCHVISION:
    sys.modules["torchvision"] = None
try:
    pytest.importorskip("transformers")
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        BertModel,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )
finally:
    if _HIDE_TORCHVISION:
        del sys.modules["torchvision"]

HIDDEN, LAYERS, HEADS, VOCAB, INTERMEDIATE = 64, 2, 4, 100, 128  # head size 16
RTOL = 1e-5
ONNX_RTOL = 1e-4


def _bert_config(**extra) -> object:
    return BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        intermediate_size=INTERMEDIATE,
        max_position_embeddings=32,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.0,
        **extra,
    )


def _bert() -> nn.Module:
    return BertModel(_bert_config())


def _bert_classifier() -> nn.Module:
    return BertForSequenceClassification(_bert_config(num_labels=3))


def _gpt2() -> nn.Module:
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=HEADS,
        n_inner=INTERMEDIATE,
        n_positions=32,
        resid_pdrop=0.1,
        embd_pdrop=0.1,
        attn_pdrop=0.0,
        use_cache=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(config)


def _llama() -> nn.Module:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        max_position_embeddings=32,
        attention_dropout=0.0,
        use_cache=False,
    )
    return LlamaForCausalLM(config)


@dataclass(frozen=True)
class Case:
    name: str
    build: Callable[[], nn.Module]
    dropout: bool  # the config has non-zero hidden dropout


CASES = {
    c.name: c
    for c in (
        Case("bert", _bert, True),
        Case("bert_classifier", _bert_classifier, True),
        Case("gpt2", _gpt2, True),
        Case("llama", _llama, False),
    )
}


def _ids(batch: int = 2, seq: int = 8) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(0, VOCAB, (batch, seq), generator=generator, dtype=torch.int64)


_captured: dict[str, tuple[nn.Module, torch.fx.GraphModule]] = {}


def _model_and_graph(name: str) -> tuple[nn.Module, torch.fx.GraphModule]:
    """(eager model in eval mode, its capture), built once per module; callers must not modify them."""
    if name not in _captured:
        torch.manual_seed(0)
        model = CASES[name].build().eval()
        _captured[name] = model, r2r_fx.capture(model, (_ids(),))
    return _captured[name]


def _set_dropout(model: nn.Module, p: float) -> int:
    count = 0
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = p
            count += 1
    return count


def _assert_same_output(expected, got) -> None:
    assert type(got) is type(expected)
    assert list(got.keys()) == list(expected.keys())
    for key in expected.keys():
        _, rel = r2r_fx.tree.max_errors(expected[key], got[key])
        assert rel <= RTOL, f"{key}: relative error {rel:.3g}"


@pytest.mark.parametrize("name", list(CASES))
def test_capture_falls_back_to_export_and_keeps_the_output_structure(name):
    model, gm = _model_and_graph(name)
    assert gm.meta["r2r_graph_level"] == "aten"
    ids = _ids()
    with torch.no_grad():
        expected, got = model(ids), gm(ids)
    _assert_same_output(expected, got)
    # The graph is not bound to the example batch size.
    ids = _ids(batch=3)
    with torch.no_grad():
        _assert_same_output(model(ids), gm(ids))


@pytest.mark.parametrize("name", list(CASES))
def test_train_and_eval_modes(name):
    model, gm = (copy.deepcopy(m) for m in _model_and_graph(name))
    ids = _ids()
    gm.train()
    assert all(m.training for m in gm.modules())
    if CASES[name].dropout:
        # Dropout modules of the captured graph follow the mode: train-mode output is random.
        with torch.no_grad():
            train_out, eval_out = gm(ids), gm.eval()(ids)
        gm.train()
        _, rel = r2r_fx.tree.max_errors(eval_out, train_out)
        assert rel > 1e-3, "dropout is not active in train mode"
    # With dropout at 0 the captured model computes the same train-mode function as eager.
    assert (_set_dropout(gm, 0.0) > 0) == CASES[name].dropout
    _set_dropout(model, 0.0)
    model.train()
    with torch.no_grad():
        _assert_same_output(model(ids), gm(ids))
    gm.eval()
    model.eval()
    assert not any(m.training for m in gm.modules())
    with torch.no_grad():
        _assert_same_output(model(ids), gm(ids))


@pytest.mark.parametrize("name", list(CASES))
def test_width_groups_give_reasons(name):
    _, gm = _model_and_graph(name)
    groups = r2r_fx.width_groups(gm)
    assert groups
    for g in groups:
        assert g.widenable == (not g.reason), g


@pytest.mark.parametrize("name", ["bert", "bert_classifier", "gpt2", "llama"])
def test_mlp_hidden_width_is_widenable(name):
    _, gm = _model_and_graph(name)
    groups = r2r_fx.width_groups(gm)
    mlp = [g for g in groups if g.widenable and g.width == INTERMEDIATE]
    assert len(mlp) == LAYERS, groups
    # Query/key/value projections split into heads: one group of heads per layer (Llama: its 2 kv
    # heads, each with its 2 query heads), widenable.
    heads = [g for g in groups if g.kind == "heads"]
    assert [g.width for g in heads] == [2 if name == "llama" else HEADS] * LAYERS, groups
    assert all(g.widenable for g in heads) and not any("reshape splits" in g.reason for g in groups), groups
    # The residual stream (normalised by LayerNorm, or Llama's decomposed RMSNorm): it grows by whole
    # copies where nothing else holds it (BERT's classifier, GPT-2 with its tied LM head kept tied,
    # Llama); frozen where it is a model output (BERT's last hidden state).
    stream = groups[0]
    expected_stream = {"bert": "model output", "bert_classifier": "", "gpt2": "", "llama": ""}[name]
    assert stream.width == HIDDEN and stream.widenable == (not expected_stream), stream
    assert expected_stream in stream.reason and stream.norms, stream
    if name in ("bert_classifier", "gpt2", "llama"):  # the stream as well (and BERT's pooler -> classifier)
        assert sum(g.widenable for g in groups) == 2 * LAYERS + 1 + (name == "bert_classifier"), groups
    grown = r2r_fx.widen(gm, factor=2.0, seed=0)
    grown_groups = r2r_fx.width_groups(grown)
    assert len([g for g in grown_groups if g.width == 2 * INTERMEDIATE]) == LAYERS
    assert [g.width for g in grown_groups if g.kind == "heads"] == [g.width * 2 for g in heads]


@pytest.mark.parametrize("name", ["bert", "bert_classifier", "gpt2", "llama"])
def test_no_group_is_frozen_by_an_unsupported_op(name):
    _, gm = _model_and_graph(name)
    unsupported = [g for g in r2r_fx.width_groups(gm) if "unsupported op" in g.reason]
    assert not unsupported


@pytest.mark.parametrize("name", list(CASES))
def test_widen_preserves_function(name):
    # ONNX export (dynamo) and onnxruntime handle all four graphs: onnx=True throughout.
    model, gm = _model_and_graph(name)
    grown = r2r_fx.widen(gm, factor=2.0, seed=0)
    report = r2r_fx.verify(model, grown, (_ids(),), onnx=True)
    assert report.eval_rel_error <= RTOL, report
    assert report.train_rel_error is not None and report.train_rel_error <= RTOL, report
    assert report.onnx_max_rel_error is not None and report.onnx_max_rel_error <= ONNX_RTOL, report
    assert report.ok, report


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_heads_to_8_counts_query_heads(name):
    """``sizes={"kind:heads": 8}`` asks for 8 query heads: Llama's 4 query heads over 2 key/value heads
    become 8 over 4 (whole key/value heads, each keeping its 2 query heads); GPT-2's 4 heads become 8."""
    model, gm = _model_and_graph(name)
    heads = [g for g in r2r_fx.width_groups(gm) if g.kind == "heads"]
    assert [(g.query_heads, g.width) for g in heads] == [(HEADS, 2 if name == "llama" else HEADS)] * LAYERS
    grown = r2r_fx.widen(gm, sizes={"kind:heads": 2 * HEADS}, seed=0)
    if name == "llama":
        attn = "model.layers.0.self_attn"
        assert grown.get_parameter(f"{attn}.q_proj.weight").shape == (2 * HEADS * 16, HIDDEN)
        assert grown.get_parameter(f"{attn}.k_proj.weight").shape == (4 * 16, HIDDEN)
        assert grown.get_parameter(f"{attn}.o_proj.weight").shape == (HIDDEN, 2 * HEADS * 16)
    else:
        assert grown.get_parameter("transformer.h.0.attn.c_attn.weight").shape == (HIDDEN, 3 * 2 * HIDDEN)
    after = [g for g in r2r_fx.width_groups(grown) if g.kind == "heads"]
    assert [g.query_heads for g in after] == [2 * HEADS] * LAYERS
    ids = _ids()
    with torch.no_grad():  # independent of verify: the eager original against the grown graph
        expected, got = model(ids), grown(ids)
    _assert_same_output(expected, got)
    if name == "llama":  # 6 query heads would be 3 key/value heads, and R2R adds them in pairs; 5 is no multiple
        with pytest.raises(GrowthError, match="cannot be 6 query heads over 3 key/value heads"):
            r2r_fx.widen(gm, sizes={"kind:heads": 6}, seed=0)
        with pytest.raises(GrowthError, match="2 query heads per key/value head .4 over 2., so it grows in multi"):
            r2r_fx.widen(gm, sizes={"kind:heads": 5}, seed=0)
        with pytest.raises(GrowthError, match="would shrink"):
            r2r_fx.widen(gm, sizes={"kind:heads": 2}, seed=0)


# hidden 64 -> 96: mean channels where exact (Llama's RMSNorm: a zero tail, gamma * sqrt(2/3), eps * 2/3),
# whole copies only where not, with the reason
NOT_EXACT_AT_96 = {"bert_classifier": "post-LN", "gpt2": "the embedding and the head stay one tensor", "llama": ""}


@pytest.mark.parametrize("name", sorted(NOT_EXACT_AT_96))
def test_hidden_64_to_96_grows_where_exact_and_says_why_not(name):
    model, gm = _model_and_graph(name)
    grown = r2r_fx.widen(gm, factor=1.5, seed=0, groups=["kind:stream"])
    (stream,) = [g for g in growth_history(grown)[-1].groups if g.kind == "stream"]
    why = NOT_EXACT_AT_96[name]
    if why:
        assert stream.status == "skipped" and why in stream.reason, stream
        return
    assert (stream.status, stream.width_before, stream.width_after) == ("widened", HIDDEN, 96), stream
    assert grown.get_parameter("model.norm.weight").shape == (96,)
    report = r2r_fx.verify(model, grown, (_ids(),), onnx=True)
    assert report.eval_rel_error <= RTOL and report.train_rel_error <= RTOL, report
    assert report.onnx_max_rel_error <= ONNX_RTOL, report


# head size 16 -> 32: BERT's q/k/v (SDPA's scale kept); GPT-2's packed c_attn, split in thirds and each
# third into (heads, head size), grows per third (q, k and v one head size); Llama's q/k carry the rotary
# embedding (refused), its value side grows
HEAD_SIZE = {"bert": 2 * LAYERS, "gpt2": LAYERS, "llama": LAYERS}


@pytest.mark.parametrize("name", sorted(HEAD_SIZE))
def test_head_size_16_to_32(name):
    model, gm = _model_and_graph(name)
    grown = r2r_fx.widen(gm, factor=2.0, seed=0, groups=["kind:head_size"])
    changes = [g for g in growth_history(grown)[-1].groups if g.kind == "head_size"]
    widened = [g for g in changes if g.status == "widened"]
    assert len(widened) == HEAD_SIZE[name] and all(g.width_after == 32 for g in widened), changes
    assert all(g.reason for g in changes if g.status != "widened")
    if name == "gpt2":  # Conv1D weights are (in, out): q, k and v each 4 heads of 32
        assert grown.get_parameter("transformer.h.0.attn.c_attn.weight").shape == (HIDDEN, 3 * HEADS * 32)
        assert grown.get_parameter("transformer.h.0.attn.c_proj.weight").shape == (HEADS * 32, HIDDEN)
    if name == "llama":
        groups = r2r_fx.analyze(gm, head_size=True).groups
        assert sum("as a rotary embedding does" in g.reason for g in groups) == 2, groups
    report = r2r_fx.verify(model, grown, (_ids(),), onnx=True)
    assert report.eval_rel_error <= RTOL and report.train_rel_error <= RTOL, report
    assert report.onnx_max_rel_error <= ONNX_RTOL, report


LAYER_PATHS = {"bert": "encoder.layer", "gpt2": "transformer.h", "llama": "model.layers"}


@pytest.mark.parametrize("name", sorted(LAYER_PATHS))
def test_deepen_with_the_models_own_layers(name):
    """+1 and +2 layers (count= and after=), named like the others, preserved, and growable again (BERT's
    post-LN layers by the chain of norms, ``passes/deepen_blocks.py``)."""
    model, gm = _model_and_graph(name)
    prefix = LAYER_PATHS[name]
    blocks = r2r_fx.blocks.repeated_blocks(gm)
    assert [b.path for b in blocks] == [f"{prefix}.{i}" for i in range(LAYERS)] and not any(b.refusal for b in blocks)
    one = r2r_fx.deepen(gm, block="own", count=1, seed=0)
    two = r2r_fx.deepen(gm, block="own", after=f"{prefix}.0", count=2, seed=0)
    for grown, extra in ((one, 1), (two, 2)):
        shapes = {n: tuple(p.shape) for n, p in grown.named_parameters()}
        for n, p in gm.named_parameters():  # every layer has its twin's names and shapes
            if n.startswith(f"{prefix}.0."):
                rest = n[len(prefix) + 3 :]
                assert all(shapes[f"{prefix}.{i}.{rest}"] == tuple(p.shape) for i in range(LAYERS + extra)), n
        assert not any(n.startswith(f"{prefix}.{LAYERS + extra}.") for n in shapes)
        record = growth_history(grown)[-1]
        assert all(b.hidden > 0 and not b.no_grad for b in record.blocks), record.blocks  # paired, all train
        report = r2r_fx.verify(model, grown, (_ids(),), onnx=True)
        assert report.eval_rel_error <= RTOL and report.train_rel_error <= RTOL, report
        assert report.onnx_max_rel_error <= ONNX_RTOL, report
    again = r2r_fx.widen(r2r_fx.deepen(two, block="own", count=1, seed=1), factor=2.0, seed=2)
    report = r2r_fx.verify(model, again, (_ids(),), onnx=False)
    assert report.eval_rel_error <= RTOL and report.train_rel_error <= RTOL, report
