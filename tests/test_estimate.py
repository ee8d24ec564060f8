"""The plan's parameter count (``--plan``, the memory check) is the grown model's, for every method."""

from __future__ import annotations

import pytest

import r2r_fx
from r2r_fx.estimate import estimate_growth
from r2r_fx.passes.deepen import insertion_points

from helpers import captured, parameter_count


@pytest.mark.parametrize("widen", [False, True])
@pytest.mark.parametrize("method", ["r2r", "random", "net2net", "netmorph"])
@pytest.mark.parametrize("name", ["resnet", "mlp", "vit"])
def test_the_estimate_counts_the_parameters_the_passes_add(name, method, widen):
    _, _, gm = captured(name)
    analysis = r2r_fx.analyze(gm)
    estimate = estimate_growth(
        gm, analysis, {"factor": 2.0} if widen else None, None, method, (1, []), insertion_points(gm, analysis)
    )
    grown = r2r_fx.widen(gm, factor=2.0, method=method, seed=0, check=False) if widen else gm
    grown = r2r_fx.deepen(grown, method=method, seed=0, check=False)
    blocks = r2r_fx.growth_history(grown)[-1].blocks
    assert blocks or (method, name) == ("net2net", "vit")  # no idempotent activation before any ViT point
    assert parameter_count(grown) > parameter_count(gm) or not (blocks or widen)
    assert estimate["params_after"] == parameter_count(grown)
