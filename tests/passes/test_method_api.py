"""One notion of method: a Method owns its widen fill, its deepen block and its refusals; options it
does not use are errors; a user's own Method works in both passes without touching the package."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import r2r_fx
from r2r_fx.errors import GrowthError
from r2r_fx.methods import METHODS, R2R, Block, Net2Net, get_method
from r2r_fx.record import param_changes

from helpers import captured, parameter_count


def _rel_error(reference: nn.Module, candidate: nn.Module, inputs, *, train: bool = False) -> float:
    """An independent comparison: one random batch, eval (or train without randomness) mode."""
    torch.manual_seed(0)
    x = tuple(torch.randn_like(t) for t in inputs)
    reference.train(train), candidate.train(train)
    with torch.no_grad():
        a, b = reference(*x), candidate(*x)
    return float((a - b).abs().max() / a.abs().max())


@pytest.mark.parametrize(
    "call",
    [
        lambda gm: r2r_fx.widen(gm, method="r2r", noise=0.1),
        lambda gm: r2r_fx.widen(gm, method="netmorph", noise=0.1),
        lambda gm: r2r_fx.deepen(gm, block="generic", method="random", noise=0.1),
        lambda gm: r2r_fx.widen(gm, method=R2R(), init_scale=2.0),
        lambda gm: r2r_fx.deepen(gm, block="generic", method="netmorph", hidden=8),
        lambda gm: r2r_fx.deepen(gm, block="generic", method="net2net", hidden=8),
        lambda gm: r2r_fx.widen(gm, method="r2r", temperature=1.0),
    ],
    ids=[
        "r2r-noise",
        "netmorph-noise",
        "deepen-random-noise",
        "instance-plus-options",
        "netmorph-hidden",
        "net2net-hidden",
        "unknown-option",
    ],
)
def test_an_option_the_method_does_not_use_is_an_error(call):
    _, _, gm = captured("resnet")
    with pytest.raises(GrowthError, match="option|hidden|constructor"):
        call(gm)


def test_bad_option_values_are_errors():
    for bad in (lambda: R2R(init_scale=0), lambda: R2R(init_scale=-1.0), lambda: Net2Net(noise=-0.1)):
        with pytest.raises(GrowthError):
            bad()
    with pytest.raises(GrowthError, match="unknown method"):
        get_method("r2r2")


def test_deepen_takes_a_method_instance_and_its_scale():
    model, inputs, gm = captured("resnet")
    small = r2r_fx.DeepenPass(block="generic", method=R2R(init_scale=0.25), seed=0).call(gm)
    plain = r2r_fx.DeepenPass(block="generic", method="r2r", seed=0).call(gm)
    assert small.modified and small.record.method == "r2r" and small.record.exact and small.record.blocks
    assert _rel_error(model, small.model, inputs) <= 1e-5
    first = small.record.blocks[0].module
    ratio = (
        small.model.get_submodule(f"{first}.conv1").weight.detach().std()
        / plain.model.get_submodule(f"{first}.conv1").weight.detach().std()
    )
    assert 0.2 < float(ratio) < 0.3


def test_net2net_deepen_noise_is_used_and_reported_as_inexact():
    model, inputs, gm = captured("vgg")
    result = r2r_fx.DeepenPass(block="generic", method="net2net", noise=0.1, seed=0, check=False).call(gm)
    assert result.modified and not result.record.exact
    assert _rel_error(model, result.model, inputs) > 1e-4
    exact = r2r_fx.DeepenPass(block="generic", method="net2net", seed=0).call(gm)
    assert exact.record.exact and _rel_error(model, exact.model, inputs) <= 1e-5


class HalfZero(r2r_fx.Method):
    """A user's method: widening with every new weight zero (exact, and the new channels start dead);
    its deepen block is one Linear/conv chain whose last layer starts at zero."""

    name = "half_zero"

    def grow(self, tensor, axes, generator):
        grows = [a for a in axes if a[1].grows]
        with torch.no_grad():
            t = self._grown(tensor.detach(), grows, self._scale(tensor), generator)
            for axis, idx, role in grows:
                if role in ("in", "out"):
                    t.index_fill_(axis, idx.new_pos, 0)
        return t

    def refuses_point(self, gm, x):
        return "" if x.meta["tensor_meta"].shape[-1] != 3 else "no blocks on 3-channel tensors"

    def block(self, site, hidden, generator):
        width, hidden = site.width, hidden or site.width
        if site.kind == "linear":
            first, last = nn.Linear(width, hidden), nn.Linear(hidden, width)
        else:
            first, last = nn.Conv2d(width, hidden, 1), nn.Conv2d(hidden, width, 1)
        nn.init.zeros_(last.weight), nn.init.zeros_(last.bias)
        layers = {"first": first, "act": nn.ReLU(), "last": last}
        return Block([{k: m.to(site.like) for k, m in layers.items()}], hidden)


def test_a_users_method_widens_and_deepens_without_touching_the_package():
    model, inputs, gm = captured("resnet")
    widened = r2r_fx.WidenPass(method=HalfZero(), seed=0).call(gm)
    assert widened.modified and widened.record.method == "half_zero"
    assert param_changes(widened.model) and parameter_count(widened.model) > parameter_count(gm)
    assert _rel_error(model, widened.model, inputs) <= 1e-5
    assert _rel_error(model, widened.model, inputs, train=True) <= 1e-5
    deepened = r2r_fx.DeepenPass(block="generic", method=HalfZero(), hidden=6, seed=0).call(widened.model)
    assert deepened.modified and all(b.hidden == 6 for b in deepened.record.blocks)
    assert _rel_error(model, deepened.model, inputs) <= 1e-5
    assert any(type(m) is nn.Conv2d and m.out_channels == 6 for m in deepened.model.modules())


def test_a_registered_method_is_known_by_its_name():
    saved = dict(METHODS)
    try:
        r2r_fx.register_method(HalfZero)
        assert isinstance(get_method("half_zero"), HalfZero)
        _, _, gm = captured("mlp")
        assert r2r_fx.WidenPass(method="half_zero", seed=0).call(gm).record.method == "half_zero"
        with pytest.raises(GrowthError):
            r2r_fx.register_method(int)
    finally:
        METHODS.clear()
        METHODS.update(saved)


def test_hidden_is_checked_before_any_work():
    _, _, gm = captured("vit")  # every point is refused by net2net: the option error must still come
    for method in ("net2net", "netmorph"):
        with pytest.raises(GrowthError, match="takes no hidden"):
            r2r_fx.DeepenPass(block="generic", method=method, hidden=8)
    for bad in (True, 0, -2, 2.5, "8"):
        with pytest.raises(GrowthError, match="hidden must be"):
            r2r_fx.DeepenPass(block="generic", hidden=bad)
    import numpy as np

    result = r2r_fx.DeepenPass(block="generic", hidden=np.int64(6), seed=0).call(gm)
    assert result.record.blocks and all(b.hidden == 6 for b in result.record.blocks)


def test_options_of_a_method_taking_keywords_and_names_taken_already():
    class Keywords(R2R):
        name = "keywords"

        def __init__(self, **options):
            self.seen = options
            super().__init__(init_scale=options.get("init_scale", "match"))

    saved = dict(METHODS)
    try:
        r2r_fx.register_method(Keywords)
        assert get_method("keywords", init_scale=2.0).seen == {"init_scale": 2.0}
        r2r_fx.register_method(Keywords)  # the same class again: fine

        class Other(R2R):
            name = "r2r"

        with pytest.raises(GrowthError, match="registered already"):
            r2r_fx.register_method(Other)
        assert METHODS["r2r"] is R2R
    finally:
        METHODS.clear()
        METHODS.update(saved)


def test_net2net_exactness_follows_its_noise():
    method = Net2Net()
    assert method.exact
    method.noise = 0.1
    assert not method.exact
    with pytest.raises(GrowthError):
        Net2Net(noise=float("inf"))
