"""A pass written outside the package, the way the README's "Extending" section says: a Pass subclass
returning a copy, its record written with replace_param/append_record, and the safety net of
Pass.call checking it like the built-in passes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import r2r_fx
from r2r_fx.errors import NotPreservedError
from r2r_fx.passbase import Pass, PassResult, copy_graph_module
from r2r_fx.record import GrowthRecord, append_record, growth_history, param_changes, replace_param

from helpers import assert_function_preserved


class Rescale(Pass):
    """``relu(a x) = a relu(x)`` for ``a > 0``: scale a Linear's weight and bias by ``a`` and the next
    Linear's weight by ``1 / a`` (powers of two: exact in floating point). ``wrong`` forgets the second."""

    name = "rescale"

    def __init__(self, first: str, second: str, a: float = 2.0, wrong: bool = False) -> None:
        self.first, self.second, self.a, self.wrong = first, second, a, wrong

    def transform(self, gm: torch.fx.GraphModule) -> PassResult:
        grown = copy_graph_module(gm)
        changes = []
        scales = {f"{self.first}.weight": self.a, f"{self.first}.bias": self.a}
        if not self.wrong:
            scales[f"{self.second}.weight"] = 1 / self.a
        for name, scale in scales.items():
            old = grown.get_parameter(name)
            new = nn.Parameter(old.detach() * scale, requires_grad=old.requires_grad)
            changes += replace_param(grown, name, new, [name], {})
        record = GrowthRecord(self.name, "rescale", True, params=tuple(changes), options={"a": self.a})
        append_record(grown, record)
        return PassResult(grown, True, record)


def _model_and_graph():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3)).eval()
    inputs = (torch.randn(4, 6),)
    return model, inputs, r2r_fx.capture(model, inputs)


def test_a_users_pass_returns_a_recorded_exact_copy():
    model, inputs, gm = _model_and_graph()
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    result = Rescale("0", "2").call(gm)
    assert result.modified and result.model is not gm
    assert all(torch.equal(v, gm.state_dict()[k]) for k, v in before.items())  # the input is untouched
    assert list(param_changes(result.model)) == ["0.weight", "0.bias", "2.weight"]
    assert r2r_fx.growth_history(result.model)[-1].op == "rescale"
    assert torch.equal(result.model.get_parameter("0.weight"), 2 * gm.get_parameter("0.weight"))
    x = torch.randn(32, 6)
    with torch.no_grad():
        assert torch.equal(result.model(x), model(x))  # exact: scaling by powers of two


def test_the_safety_net_catches_a_users_wrong_pass():
    _, _, gm = _model_and_graph()
    with pytest.raises(NotPreservedError, match="rescale"):
        Rescale("0", "2", wrong=True).call(gm)
    assert Rescale("0", "2", wrong=True).transform(gm).modified  # unchecked, it would have changed the model


def test_sizes_give_each_selected_group_its_width():
    from zoo import ZOO

    model, inputs = ZOO["encoder_pre_ln"]()
    gm = r2r_fx.capture(model, inputs)
    grown = r2r_fx.widen(gm, sizes={"kind:stream": 24, "kind:heads": 4, "encoder_layers_0_linear1": 40}, seed=0)
    after = {g.id: (g.kind, g.width_after, g.status) for g in growth_history(grown)[-1].groups}
    assert after[0] == ("stream", 24, "widened") and after[1] == ("heads", 4, "widened")
    assert after[2] == ("channels", 40, "widened") and after[4] == ("channels", 32, "skipped")
    assert_function_preserved(model, grown, inputs, onnx=False)
    for sizes, message in (
        ({"kind:channels": 41}, "cannot be 41 wide: it grows in steps of 2"),
        ({"kind:stream": 8}, "would shrink width group 0"),
        ({"kind:heads": 4, 1: 6}, "asked to be both 4 and 6 wide"),
        ({"kind:stream": 0}, "must be a width >= 1"),
    ):
        with pytest.raises(r2r_fx.GrowthError, match=message):
            r2r_fx.widen(gm, sizes=sizes)
    with pytest.raises(r2r_fx.GrowthError, match="without factor="):
        r2r_fx.widen(gm, factor=2.0, sizes={"kind:stream": 32})
