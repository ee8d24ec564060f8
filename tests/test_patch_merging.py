"""A norm over a concatenation of copies of the stream (Swin's patch merging: four strided samples of a
``(B, H, W, C)`` stream side by side, a LayerNorm over ``4C``, a reduction to ``2C``). Each piece grows as
the stream does, by whole copies, which keeps every piece's mean and variance: exact for ``k = 2``,
``1.5x`` refused with the reason, anything that is not whole copies of one stream frozen.

Checked against the eager model on fresh inputs (eval and train) and through ONNX Runtime."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import r2r_fx
from r2r_fx.record import growth_history

from helpers import assert_function_preserved, assert_new_weights_train

C = 8


class Block(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class Merging(nn.Module):
    """Two stages of a channels-last stream joined by patch merging; ``piece`` says what the fourth
    concatenated piece is: a sample of the stream (``"copy"``), the sample scaled (``"scaled"``), or
    another width's output (``"other"``: not a copy of the stream)."""

    def __init__(self, piece: str = "copy", norm: type[nn.Module] = nn.LayerNorm) -> None:
        super().__init__()
        self.piece = piece
        self.embed = nn.Linear(3, C)
        self.block1, self.block2 = Block(C), Block(2 * C)
        self.other = nn.Linear(C, C)
        self.norm = norm(4 * C)
        self.reduction = nn.Linear(4 * C, 2 * C, bias=False)
        self.head_norm, self.head = nn.LayerNorm(2 * C), nn.Linear(2 * C, 5)
        for m in self.modules():
            if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
                nn.init.uniform_(m.weight, 0.5, 1.5)
                if getattr(m, "bias", None) is not None:
                    nn.init.uniform_(m.bias, -0.5, 0.5)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        x = self.block1(self.embed(img))
        x0, x1, x2, x3 = x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]
        if self.piece == "scaled":
            x3 = 2.0 * x3
        elif self.piece == "other":
            x3 = self.other(x3)
        x = self.reduction(self.norm(torch.cat([x0, x1, x2, x3], -1)))
        x = self.block2(x)
        return self.head(self.head_norm(x.mean((1, 2))))


def _inputs() -> tuple[torch.Tensor]:
    return (torch.randn(2, 4, 4, 3),)


def _rel(model, grown, train: bool) -> float:
    x = torch.randn(3, 4, 4, 3)
    with torch.no_grad():
        ref, got = model.train(train)(x), grown.train(train)(x)
    return float((ref - got).abs().max() / ref.abs().max())


@pytest.mark.parametrize("via", ["symbolic_trace", "export"])
@pytest.mark.parametrize("case", ["copy", "scaled", "rms"])
def test_patch_merging_stream_doubles_exactly(case, via):
    torch.manual_seed(0)
    model = (Merging(norm=nn.RMSNorm) if case == "rms" else Merging(case)).eval()
    gm = r2r_fx.capture(model, _inputs(), via=via)
    streams = [g for g in r2r_fx.width_groups(gm) if g.kind == "stream"]
    assert [(g.width, g.widenable) for g in streams] == [(C, True), (2 * C, True)], streams
    assert streams[0].integer_only  # (the first reason: the RMSNorm case also mixes norm kinds)
    assert case == "rms" or "concatenation of copies" in streams[0].integer_only
    grown = r2r_fx.widen(gm, factor=2.0, seed=0, groups=["kind:stream"], check=False)
    assert grown.get_parameter("norm.weight").shape == (8 * C,)
    assert grown.get_parameter("reduction.weight").shape == (4 * C, 8 * C)
    # each piece keeps its old norm weights first, then their copy
    old, new = model.norm.weight.reshape(4, C), grown.get_parameter("norm.weight").reshape(4, 2 * C)
    assert torch.equal(new[:, :C], old) and torch.equal(new[:, C:], old)
    for train in (False, True):
        assert _rel(model, grown, train) <= 1e-5, train
    assert_function_preserved(model, grown, _inputs(), onnx=via == "export")
    assert_new_weights_train(grown, _inputs())


def test_patch_merging_refuses_mean_channels_with_the_reason():
    torch.manual_seed(0)
    model = Merging().eval()
    gm = r2r_fx.capture(model, _inputs())
    grown = r2r_fx.widen(gm, factor=1.5, seed=0, groups=["kind:stream"], check=False)
    first = next(g for g in growth_history(grown)[-1].groups if g.kind == "stream")
    assert first.status == "skipped" and "concatenation of copies" in first.reason, first
    assert _rel(model, grown, False) <= 1e-5


def test_a_concatenation_with_another_width_stays_frozen():
    torch.manual_seed(0)
    model = Merging("other").eval()
    gm = r2r_fx.capture(model, _inputs())
    (first,) = [g for g in r2r_fx.width_groups(gm) if g.width == C and g.producers[:1] == ["embed"]]
    assert not first.widenable and "concatenation" in first.reason, first
    grown = r2r_fx.widen(gm, factor=2.0, seed=0, check=False)
    assert grown.get_parameter("embed.weight").shape[0] == C
    for train in (False, True):
        assert _rel(model, grown, train) <= 1e-5
