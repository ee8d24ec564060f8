"""Attention heads (issue 17): a reshape that splits q/k/v projections into ``(heads, head_dim)``
grows along the heads, for scaled_dot_product_attention and hand-written ``q @ k^T`` attention,
grouped-query attention (kv heads repeated: whole kv groups grow), rotary embeddings and a
``(batch * heads)`` layout for ``bmm``. New heads come in R2R pairs: identical q/k/v rows, opposite
output columns. The head size keeps its width (with the reason).

Every check compares the eager model with the grown graph on fresh random inputs (relative error
max|delta| / max|y|), in eval and train mode, plus ONNX Runtime through ``verify``.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import r2r_fx

from helpers import assert_function_preserved, assert_new_weights_train

RTOL = 1e-5
D, HEADS, T = 32, 4, 6


class Attention(nn.Module):
    def __init__(self, heads=HEADS, kv_heads=HEADS, style="sdpa", rope=False, bias=True, packed=False) -> None:
        super().__init__()
        self.h, self.kv, self.hd, self.style, self.rope = heads, kv_heads, D // heads, style, rope
        if packed:  # one projection for q, k and v (GPT-2's c_attn, timm's qkv), split on the way out
            self.qkv = nn.Linear(D, (heads + 2 * kv_heads) * self.hd, bias=bias)
        else:
            self.q = nn.Linear(D, heads * self.hd, bias=bias)
            self.k = nn.Linear(D, kv_heads * self.hd, bias=bias)
            self.v = nn.Linear(D, kv_heads * self.hd, bias=bias)
        self.packed = packed
        self.o = nn.Linear(heads * self.hd, D)

    def _rotate(self, t: torch.Tensor) -> torch.Tensor:
        n = t.shape[-2]
        freqs = torch.outer(torch.arange(n, dtype=t.dtype), 1.0 / 100 ** (torch.arange(0, self.hd, 2) / self.hd))
        emb = torch.cat([freqs, freqs], -1)
        half = self.hd // 2
        return t * emb.cos() + torch.cat([-t[..., half:], t[..., :half]], -1) * emb.sin()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t = x.shape[0], x.shape[1]
        if self.packed == "chunk":
            q, k, v = self.qkv(x).chunk(3, dim=-1)
        elif self.packed:
            q, k, v = self.qkv(x).split([self.h * self.hd, self.kv * self.hd, self.kv * self.hd], dim=-1)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        q = q.view(b, t, -1, self.hd).transpose(1, 2)
        k = k.view(b, t, -1, self.hd).transpose(1, 2)
        v = v.view(b, t, -1, self.hd).transpose(1, 2)
        if self.rope:
            q, k = self._rotate(q), self._rotate(k)
        if self.kv != self.h:  # repeat_kv: kv head i serves query heads i*g .. i*g+g-1
            g = self.h // self.kv
            k = k[:, :, None].expand(b, self.kv, g, t, self.hd).reshape(b, self.h, t, self.hd)
            v = v[:, :, None].expand(b, self.kv, g, t, self.hd).reshape(b, self.h, t, self.hd)
        if self.style == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif self.style == "manual":
            scores = (q @ k.transpose(-2, -1)) / math.sqrt(self.hd)
            y = torch.softmax(scores, dim=-1) @ v
        else:  # bmm over (batch * heads); "bmm_computed" gives that size as b * heads (kept: not rewritten)
            rows = b * self.h if self.style == "bmm_computed" else -1
            q, k, v = (z.reshape(rows, t, self.hd) for z in (q, k, v))
            y = torch.bmm(torch.softmax(torch.bmm(q, k.transpose(1, 2)) * self.hd**-0.5, -1), v)
            y = y.view(b, self.h, t, self.hd)
        return self.o(y.transpose(1, 2).reshape(b, t, -1))


class Net(nn.Module):
    """Pre-LN blocks (attention + MLP) between an input projection and a head."""

    def __init__(self, depth=2, **attn) -> None:
        super().__init__()
        self.inp, self.head, self.norm = nn.Linear(8, D), nn.Linear(D, 5), nn.LayerNorm(D)
        self.ln1 = nn.ModuleList(nn.LayerNorm(D) for _ in range(depth))
        self.attn = nn.ModuleList(Attention(**attn) for _ in range(depth))
        self.ln2 = nn.ModuleList(nn.LayerNorm(D) for _ in range(depth))
        mlp = [nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D)) for _ in range(depth)]
        self.mlp = nn.ModuleList(mlp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for ln1, attn, ln2, mlp in zip(self.ln1, self.attn, self.ln2, self.mlp):
            x = x + attn(ln1(x))
            x = x + mlp(ln2(x))
        return self.head(self.norm(x))


def _rel(model: nn.Module, grown: nn.Module, train: bool) -> float:
    x = torch.randn(3, T, 8)
    with torch.no_grad():
        ref, got = model.train(train)(x), grown.train(train)(x)
    return float((ref - got).abs().max() / ref.abs().max())


def _heads_groups(gm) -> list:
    return [g for g in r2r_fx.width_groups(gm) if g.kind == "heads"]


CASES = {
    "sdpa": {},
    "manual": {"style": "manual"},
    "bmm": {"style": "bmm"},
    "gqa": {"kv_heads": 2},
    "gqa_rope_manual": {"kv_heads": 2, "rope": True, "style": "manual"},
    "gqa_no_bias": {"kv_heads": 2, "bias": False},
    "packed": {"packed": "chunk"},
    "packed_gqa_manual": {"packed": "split", "kv_heads": 2, "style": "manual"},
}


@pytest.mark.parametrize("via", ["symbolic_trace", "export"])
@pytest.mark.parametrize("case", list(CASES))
def test_heads_grow_exactly(case, via):
    torch.manual_seed(0)
    model = Net(**CASES[case]).eval()
    gm = r2r_fx.capture(model, (torch.randn(2, T, 8),), via=via)
    kv = CASES[case].get("kv_heads", HEADS)
    heads = _heads_groups(gm)
    # one group per layer: the kv heads (each bringing its query heads) or the heads
    assert [g.width for g in heads] == [kv, kv] and all(g.widenable for g in heads), heads
    grown = r2r_fx.widen(gm, factor=2.0, seed=0, check=False)
    record = grown.meta["r2r_record"][-1]["groups"]
    assert {g["kind"] for g in record if g["status"] == "widened"} >= {"heads"}, record
    if CASES[case].get("packed"):  # q, k and v thirds each twice the heads
        assert grown.get_submodule("attn.0.qkv").weight.shape[0] == 2 * (HEADS + 2 * kv) * (D // HEADS)
    else:
        assert grown.get_submodule("attn.0.q").weight.shape[0] == 2 * HEADS * (D // HEADS)
    for train in (False, True):
        assert _rel(model, grown, train) <= RTOL, (case, via, train)
    assert_function_preserved(model, grown, (torch.randn(2, T, 8),))


def test_new_heads_are_pairs_and_train():
    """The new heads' q/k/v rows come in identical pairs and their output columns in opposite pairs:
    both are non-zero, so every new weight gets a gradient."""
    torch.manual_seed(0)
    model = Net(depth=1).eval()
    gm = r2r_fx.capture(model, (torch.randn(2, T, 8),))
    (group,) = _heads_groups(gm)
    grown = r2r_fx.widen(gm, groups=[group.id], factor=2.0, seed=0)
    hd = D // HEADS
    q, o = grown.get_submodule("attn.0.q").weight, grown.get_submodule("attn.0.o").weight
    new_q = q[HEADS * hd :].reshape(HEADS, hd, D)  # new heads 4..7: pairs (4, 6), (5, 7)
    new_o = o[:, HEADS * hd :].reshape(D, HEADS, hd)
    assert torch.equal(new_q[:2], new_q[2:]) and new_q.abs().min() > 0
    assert torch.equal(new_o[:, :2], -new_o[:, 2:]) and new_o.abs().max() > 0
    assert torch.equal(q[: HEADS * hd], model.attn[0].q.weight)
    assert_new_weights_train(grown, (torch.randn(2, T, 8),))


def test_grouped_query_heads_grow_by_whole_kv_groups():
    """With 2 kv heads for 4 query heads, a new kv head brings 2 new query heads: the query rows of a
    kv group stay next to each other (appending query heads at the end would be wrong)."""
    torch.manual_seed(0)
    model = Net(depth=1, kv_heads=2).eval()
    gm = r2r_fx.capture(model, (torch.randn(2, T, 8),), via="export")
    grown = r2r_fx.widen(gm, factor=2.0, seed=0, check=False)
    shapes = {n: tuple(p.shape) for n, p in grown.named_parameters() if "attn" in n and n.endswith("weight")}
    hd = D // HEADS
    assert (
        shapes
        == {
            "attn.0.q.weight": (8 * hd, D),
            "attn.0.k.weight": (4 * hd, D),
            "attn.0.v.weight": (4 * hd, D),
            "attn.0.o.weight": (D * 2, 8 * hd),
        }
        or shapes["attn.0.k.weight"][0] == 4 * hd
    ), shapes
    for train in (False, True):
        assert _rel(model, grown, train) <= RTOL


@pytest.mark.parametrize("method", ["net2net", "netmorph"])
def test_other_methods_grow_heads(method):
    torch.manual_seed(0)
    model = Net(depth=1, kv_heads=2).eval()
    gm = r2r_fx.capture(model, (torch.randn(2, T, 8),))
    (group,) = _heads_groups(gm)
    grown = r2r_fx.widen(gm, groups=[group.id], factor=2.0, method=method, seed=0, check=False)
    for train in (False, True):
        assert _rel(model, grown, train) <= RTOL


class _HeadMixing(nn.Module):
    """Softmax across the heads: growing them would change every weight of it."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.o = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x):
        b, t = x.shape[:2]
        q = self.q(x).view(b, t, HEADS, D // HEADS).transpose(1, 2)
        y = (q @ q.transpose(-2, -1)).softmax(dim=1) @ q
        return self.o(y.transpose(1, 2).reshape(b, t, D))


class _OneKeyValueHead(nn.Module):
    """Multi-query attention: one kv head (a size-1 head axis the queries' heads broadcast over), k and
    v cut from one projection."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.kv, self.o = nn.Linear(D, D), nn.Linear(D, 2 * (D // HEADS)), nn.Linear(D, D)

    def forward(self, x):
        b, t = x.shape[:2]
        q = self.q(x).view(b, t, HEADS, D // HEADS).transpose(1, 2)
        k, v = self.kv(x).unsqueeze(1).chunk(2, dim=-1)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(b, t, D))


@pytest.mark.parametrize("via", ["symbolic_trace", "export"])
def test_a_computed_head_count_keeps_the_heads(via):
    """``reshape(b * heads, ...)``: the product is computed at run time from a constant head count, so
    the heads keep their width (before, they grew and the reshape failed)."""
    torch.manual_seed(0)
    model = Net(style="bmm_computed").eval()
    gm = r2r_fx.capture(model, (torch.randn(2, T, 8),), via=via)
    heads = [g for g in r2r_fx.width_groups(gm) if g.kind == "heads" or "attn_0_q" in g.producers]
    assert heads and not any(g.widenable for g in heads), heads
    grown = r2r_fx.widen(gm, factor=2.0, seed=0, check=False)
    for train in (False, True):
        assert _rel(model, grown, train) <= RTOL


def test_what_mixes_heads_keeps_them():
    """Fail closed: an op that mixes heads freezes the head group, with the reason."""
    torch.manual_seed(0)
    m = _HeadMixing().eval()
    gm = r2r_fx.capture(m, (torch.randn(2, T, D),))
    qkv = [g for g in r2r_fx.width_groups(gm) if "q" in g.producers]
    assert qkv and not any(g.widenable for g in qkv) and all(g.reason for g in qkv), qkv
    grown = r2r_fx.widen(copy.deepcopy(gm), factor=2.0, seed=0, check=False)
    x = torch.randn(2, T, D)
    with torch.no_grad():
        assert float((m(x) - grown(x)).abs().max() / m(x).abs().max()) <= RTOL


@pytest.mark.parametrize("via", ["symbolic_trace", "export"])
def test_query_heads_grow_over_one_key_value_head(via):
    torch.manual_seed(0)
    m = _OneKeyValueHead().eval()
    gm = r2r_fx.capture(m, (torch.randn(2, T, D),), via=via)
    (heads,) = [g for g in r2r_fx.width_groups(gm) if g.kind == "heads"]
    assert heads.widenable and heads.width == HEADS, heads
    grown = r2r_fx.widen(gm, groups=[heads.id], factor=2.0, seed=0, check=False)
    for train in (False, True):
        assert _rel_on(m, grown, torch.randn(3, T, D), train) <= RTOL


class _PerHeadBias(nn.Module):
    """A per-head additive attention bias held in a buffer: its head axis grows with the heads."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.o = nn.Linear(D, D), nn.Linear(D, D)
        self.register_buffer("bias", torch.randn(HEADS, T, T))

    def forward(self, x):
        b, t = x.shape[:2]
        q = self.q(x).view(b, t, HEADS, D // HEADS).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, q, q, attn_mask=self.bias)
        return self.o(y.transpose(1, 2).reshape(b, t, D))


@pytest.mark.parametrize("via", ["symbolic_trace", "export"])
def test_a_per_head_bias_grows_with_the_heads(via):
    torch.manual_seed(0)
    m = _PerHeadBias().eval()
    gm = r2r_fx.capture(m, (torch.randn(2, T, D),), via=via)
    (heads,) = [g for g in r2r_fx.width_groups(gm) if g.kind == "heads"]
    assert heads.widenable, heads
    grown = r2r_fx.widen(gm, groups=[heads.id], factor=2.0, seed=0, check=False)
    assert grown.get_buffer("bias").shape[0] == 2 * HEADS
    for train in (False, True):
        assert _rel_on(m, grown, torch.randn(3, T, D), train) <= RTOL


def _rel_on(model, grown, x, train) -> float:
    with torch.no_grad():
        ref, got = model.train(train)(x), grown.train(train)(x)
    return float((ref - got).abs().max() / ref.abs().max())


def test_groups_are_chosen_by_kind():
    torch.manual_seed(0)
    model = Net(depth=1).eval()
    gm = r2r_fx.capture(model, (torch.randn(2, T, 8),))
    kinds = {g.id: g.kind for g in r2r_fx.width_groups(gm)}
    assert sorted(set(kinds.values())) == ["channels", "heads", "stream"], kinds
    for kind in ("heads", "stream", "channels"):
        grown = r2r_fx.widen(gm, groups=[f"kind:{kind}"], factor=2.0, seed=0)
        widened = {g["id"] for g in grown.meta["r2r_record"][-1]["groups"] if g["status"] == "widened"}
        expected = {i for i, k in kinds.items() if k == kind and r2r_fx.width_groups(gm)[i].widenable}
        assert widened == expected and widened, (kind, widened)
        assert _rel(model, grown, False) <= RTOL
    with pytest.raises(r2r_fx.GrowthError, match="unknown group kind"):
        r2r_fx.widen(gm, groups=["kind:mlp"], factor=2.0)
    plain = r2r_fx.capture(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2)), (torch.randn(2, 8),))
    with pytest.raises(r2r_fx.GrowthError, match="no width group is of kind 'heads'"):
        r2r_fx.widen(plain, groups=["kind:heads"], factor=2.0)


class _WindowAttention(nn.Module):
    """Swin-like: cyclic shift (roll), zero-width padding of the channel axis, and a relative-position
    bias table (a parameter with one column per head) looked up by an index buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.o = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.table = nn.Parameter(torch.randn(2 * T - 1, HEADS))
        pos = torch.arange(T)
        self.register_buffer("rel", (pos[:, None] - pos[None, :] + T - 1).flatten())

    def forward(self, x):
        b = x.shape[0]
        x = F.pad(torch.roll(x, shifts=1, dims=1), (0, 0, 0, 0))
        q, k, v = self.qkv(x).reshape(b, T, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.table[self.rel].view(T, T, HEADS).permute(2, 0, 1)
        y = torch.softmax(q @ k.transpose(-2, -1) * (D // HEADS) ** -0.5 + bias, -1) @ v
        return self.o(torch.roll(y.transpose(1, 2).reshape(b, T, D), shifts=-1, dims=1))


def test_window_attention_with_a_relative_position_table():
    torch.manual_seed(0)
    m = _WindowAttention().eval()
    gm = r2r_fx.capture(m, (torch.randn(2, T, D),), via="export")
    groups = r2r_fx.width_groups(gm)
    assert not any("unsupported op" in g.reason or "padded axis" in g.reason for g in groups), groups
    grown = r2r_fx.widen(gm, factor=2.0, seed=0, check=False)
    assert grown.get_parameter("table").shape[1] == 2 * HEADS or not any(g.kind == "heads" for g in groups)
    for train in (False, True):
        assert _rel_on(m, grown, torch.randn(3, T, D), train) <= RTOL


class _MaskFromNewZeros(nn.Module):
    """``x.new_zeros(...)`` reads only x's dtype and device: x's channels stay free (Swin's shifted-window
    mask); the new tensor's own sizes keep their width."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(D, D), nn.Linear(D, 3)

    def forward(self, x):
        h = self.a(x)
        mask = h.new_zeros((T, T)).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -1e4)
        return self.b(h + (mask.softmax(-1) @ h) * 0.5)


@pytest.mark.parametrize("via", ["symbolic_trace", "export"])
def test_a_new_tensor_leaves_its_template_free(via):
    torch.manual_seed(0)
    m = _MaskFromNewZeros().eval()
    gm = r2r_fx.capture(m, (torch.randn(2, T, D),), via=via)
    (hidden,) = [g for g in r2r_fx.width_groups(gm) if g.width == D and g.producers]
    assert hidden.widenable, hidden
    grown = r2r_fx.widen(gm, factor=2.0, seed=0, check=False)
    for train in (False, True):
        assert _rel_on(m, grown, torch.randn(3, T, D), train) <= RTOL
