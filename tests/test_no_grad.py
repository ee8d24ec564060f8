"""The record's first-step gradient statement (``AxisChange.no_grad``): the new entries it names get a
zero gradient at the first step, checked by a backward pass on a random batch (not by the record's own
reasoning). A claim that is wrong fails here; NetMorph's new producer rows and a normalised stream's
tail are the claims, R2R's pairs make none outside streams."""

from __future__ import annotations

import pytest
import torch

import r2r_fx
from r2r_fx.record import param_changes

from helpers import random_batch
from zoo import ZOO


def _grads(grown: torch.nn.Module, inputs) -> dict[str, torch.Tensor]:
    grown = grown.train()
    grown.zero_grad()
    out = grown(*random_batch(inputs))
    leaves = [t for _, t in r2r_fx.tree.leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    sum((t * torch.randn_like(t)).sum() for t in leaves).backward()
    return {n: p.grad for n, p in grown.named_parameters() if p.grad is not None}


def _claims(grown: torch.nn.Module, grads: dict[str, torch.Tensor]) -> list[tuple[str, str, torch.Tensor]]:
    """(parameter, why, its gradient on the entries the record says get none)."""
    found = []
    for name, history in param_changes(grown).items():
        for axis, info in history[-1].axes.items():
            if not info.no_grad or name not in grads:
                continue
            pos = torch.cat([torch.arange(s, s + n) for s, n in info.no_grad])
            found.append((name, info.no_grad_why, grads[name].index_select(axis, pos)))
    return found


def _check(grown, inputs, *, rtol: float) -> list[str]:
    grads = _grads(grown, inputs)
    scale = max(g.abs().max() for g in grads.values())
    claims = _claims(grown, grads)
    for name, why, g in claims:
        assert g.abs().max() <= rtol * scale, (name, why, float(g.abs().max()), float(scale))
    return [why for _, why, _ in claims]


CNNS = ["mlp", "vgg", "resnet", "densenet", "mobilenetv2", "inception", "conv1d", "unet_like"]


@pytest.mark.parametrize("name", CNNS + ["vit", "llama_like"])
def test_netmorph_new_producer_rows_get_no_gradient(name):
    model, inputs = ZOO[name]()
    gm = r2r_fx.capture(model, inputs)
    grown = r2r_fx.widen(gm, factor=2.0, method="netmorph", seed=0, check=False)
    whys = _check(grown, inputs, rtol=0.0)  # exactly zero: nothing reaches them
    assert any("producer rows" in w for w in whys), whys
    # and the claim is not everything: the new consumer columns (zeros) do get gradients
    grads = _grads(grown, inputs)
    claimed = {(n, w) for n, w, _ in _claims(grown, grads)}
    assert any(g.ne(0).any() for n, g in grads.items() if all(n != c for c, _ in claimed))


@pytest.mark.parametrize("name", ["vit", "encoder_pre_ln", "mha"])
def test_mean_channel_tail_gets_no_gradient(name):
    model, inputs = ZOO[name]()
    gm = r2r_fx.capture(model, inputs)
    grown = r2r_fx.widen(gm, factor=1.5, seed=0, groups=["kind:stream"], check=False)
    whys = _check(grown, inputs, rtol=1e-5)  # a LayerNorm computes the zero tail up to rounding
    assert any("tail weight" in w for w in whys), whys


def test_r2r_outside_streams_claims_nothing():
    model, inputs = ZOO["resnet"]()
    grown = r2r_fx.widen(r2r_fx.capture(model, inputs), factor=2.0, seed=0, check=False)
    assert not _claims(grown, _grads(grown, inputs))
