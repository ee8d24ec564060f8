"""Head size grows exactly: q's new positions in identical pairs, k's in opposite pairs (so every new
score term cancels), v's and the output columns as plain R2R, and SDPA's default scale kept at the old
head size. Independent checks against the eager model on fresh inputs, eval and train, and ORT."""

from __future__ import annotations

import pytest
import torch
from test_heads import HEADS, RTOL, D, Net, T, _rel

import r2r_fx

from helpers import assert_function_preserved, assert_new_weights_train

CASES = {
    "sdpa": {},
    "manual": {"style": "manual"},
    "gqa": {"kv_heads": 2},
    "packed": {"packed": "chunk"},
    "packed_gqa_manual": {"packed": "split", "kv_heads": 2, "style": "manual"},
}


@pytest.mark.parametrize("case", list(CASES))
def test_head_size_grows_exactly(case):
    torch.manual_seed(0)
    model = Net(**CASES[case]).eval()
    gm = r2r_fx.capture(model, (torch.randn(2, T, 8),), via="export")
    groups = [g for g in r2r_fx.analyze(gm, head_size=True).groups if g.kind == "head_size"]
    count = 2 if CASES[case].get("packed") == "chunk" else 4  # an equal split ties v's head size to q's
    assert len(groups) == count and all(g.widenable and g.width == D // HEADS for g in groups), groups
    grown = r2r_fx.widen(gm, factor=2.0, groups=["kind:head_size"], seed=0, check=False)
    if CASES[case].get("packed"):
        rows = HEADS + 2 * CASES[case].get("kv_heads", HEADS)
        assert grown.get_submodule("attn.0.qkv").weight.shape[0] == 2 * rows * (D // HEADS)
    else:
        assert grown.get_submodule("attn.0.q").weight.shape[0] == 2 * D
    for train in (False, True):
        assert _rel(model, grown, train) <= RTOL, (case, train)
    assert_function_preserved(model, grown, (torch.randn(2, T, 8),))


def test_key_side_takes_opposite_pairs_and_the_scale_is_kept():
    torch.manual_seed(0)
    model = Net().eval()
    gm = r2r_fx.capture(model, (torch.randn(2, T, 8),), via="export")
    grown = r2r_fx.widen(gm, factor=2.0, groups=["kind:head_size"], seed=0, check=False)
    hd = D // HEADS
    q, k = grown.get_submodule("attn.0.q").weight, grown.get_submodule("attn.0.k").weight
    new = torch.arange(hd, 2 * hd)  # head 0's new positions: two halves of hd/2
    a, b = new[: hd // 2], new[hd // 2 :]
    assert torch.equal(q[a], q[b]) and torch.equal(k[a], -k[b])
    scales = [n.kwargs.get("scale") for n in grown.graph.nodes if "scaled_dot_product" in str(n.target)]
    assert scales and all(s == pytest.approx(hd**-0.5) for s in scales)
    for n in grown.graph.nodes:  # without the kept scale the model changes: the check can fail
        if "scaled_dot_product" in str(n.target):
            n.update_kwarg("scale", None)
    grown.recompile()
    assert _rel(model, grown, False) > 1e-3


@pytest.mark.parametrize("method", ["net2net", "netmorph"])
def test_other_methods_grow_head_size(method):
    torch.manual_seed(0)
    model = Net(kv_heads=2).eval()
    gm = r2r_fx.capture(model, (torch.randn(2, T, 8),), via="export")
    grown = r2r_fx.widen(gm, factor=2.0, groups=["kind:head_size"], method=method, seed=0, check=False)
    for train in (False, True):
        assert _rel(model, grown, train) <= RTOL, (method, train)


def test_rotary_head_size_stays_and_what_grows_is_exact():
    torch.manual_seed(0)
    model = Net(rope=True, style="manual").eval()
    gm = r2r_fx.capture(model, (torch.randn(2, T, 8),), via="export")
    sized = [g for g in r2r_fx.analyze(gm, head_size=True).groups if g.kind == "head_size" and g.widenable]
    assert len(sized) == 2, sized  # only the value side: q/k under the rotation keep their size
    grown = r2r_fx.widen(gm, factor=2.0, groups=["kind:head_size"], seed=0, check=False)
    assert grown.get_submodule("attn.0.q").weight.shape[0] == D
    for train in (False, True):
        assert _rel(model, grown, train) <= RTOL, train
    assert not any(g.kind == "head_size" for g in r2r_fx.analyze(gm).groups)


def test_packed_projection_grows_each_third_per_head():
    """A packed q/k/v projection (GPT-2's c_attn): every head of each third gains positions after its
    own, q's in identical pairs, k's in opposite pairs, v's in identical pairs under opposite output
    columns; the old rows stay in place within their head, and every new weight trains."""
    torch.manual_seed(0)
    model = Net(depth=1, packed="chunk").eval()
    gm = r2r_fx.capture(model, (torch.randn(2, T, 8),), via="export")
    (group,) = [g for g in r2r_fx.analyze(gm, head_size=True).groups if g.kind == "head_size"]
    assert group.width == D // HEADS and group.widenable, group  # one head size for q, k and v
    grown = r2r_fx.widen(gm, sizes={"kind:head_size": 2 * (D // HEADS)}, seed=0, check=False)
    hd = D // HEADS
    old = model.attn[0].qkv.weight.reshape(3, HEADS, hd, D)
    new = grown.get_submodule("attn.0.qkv").weight.reshape(3, HEADS, 2 * hd, D)
    assert torch.equal(new[:, :, :hd], old)
    a, b = new[:, :, hd : hd + hd // 2], new[:, :, hd + hd // 2 :]
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], -b[1]) and torch.equal(a[2], b[2])
    assert a.abs().min() > 0
    o = grown.get_submodule("attn.0.o").weight.reshape(D, HEADS, 2 * hd)
    assert torch.equal(o[:, :, hd : hd + hd // 2], -o[:, :, hd + hd // 2 :])
    for train in (False, True):
        assert _rel(model, grown, train) <= RTOL, train
    assert_new_weights_train(grown, (torch.randn(2, T, 8),))


class _Between(torch.nn.Module):
    """One attention whose q or k passes ``op`` between its projection and the product."""

    def __init__(self, op: str, packed: bool) -> None:
        super().__init__()
        self.op, self.packed = op, packed
        self.inp, self.o, self.out = torch.nn.Linear(8, D), torch.nn.Linear(D, D), torch.nn.Linear(D, 3)
        self.qkv = torch.nn.Linear(D, 3 * D)
        self.w = torch.nn.Parameter(torch.rand(D) + 0.5)

    def _op(self, t: torch.Tensor) -> torch.Tensor:
        if self.op == "gelu":
            return torch.nn.functional.gelu(t)
        if self.op == "dropout":
            return torch.nn.functional.dropout(t, 0.3, self.training)
        return t * (self.w if t.shape[-1] == D else self.w.repeat(3))  # a per-channel scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        h = self.inp(x)
        if self.packed:
            q, k, v = self._op(self.qkv(h)).split(D, -1)
        else:
            q, k, v = self.qkv(h).split(D, -1)
            k = self._op(k)
        q, k, v = (z.view(b, t, HEADS, D // HEADS).transpose(1, 2) for z in (q, k, v))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, D)
        return self.out(h + self.o(y))


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("op", ["gelu", "dropout", "scale"])
def test_an_op_between_projection_and_product_keeps_the_head_size(op, packed):
    """New k positions come in opposite pairs, which only a linear, deterministic path keeps: gelu,
    dropout (a different mask per member) or a per-channel scale on the way freeze the q/k head size."""
    torch.manual_seed(0)
    model = _Between(op, packed).eval()
    gm = r2r_fx.capture(model, (torch.randn(2, T, 8),), via="export")
    groups = [g for g in r2r_fx.analyze(gm, head_size=True).groups if "between a projection" in g.reason]
    assert groups, r2r_fx.analyze(gm, head_size=True).groups
    grown = r2r_fx.widen(gm, factor=2.0, groups=["kind:head_size"], seed=0, check=False)
    assert grown.get_submodule("qkv").weight.shape[0] == 3 * D  # the equal split ties v to q and k
    x = torch.randn(3, T, 8)
    with torch.no_grad():
        ref, got = model(x), grown(x)
    assert (ref - got).abs().max() <= RTOL * ref.abs().max()
