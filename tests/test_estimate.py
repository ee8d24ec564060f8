"""The plan's parameter count (``--plan``, the memory check) is the grown model's, for every method."""

from __future__ import annotations

import pytest

import r2r_fx
from r2r_fx.estimate import estimate_growth
from r2r_fx.passes.deepen import DeepenPass, insertion_points

from helpers import captured, parameter_count


@pytest.mark.parametrize("block", ["auto", "generic"])
@pytest.mark.parametrize("widen", [False, True])
@pytest.mark.parametrize("method", ["r2r", "random", "net2net", "netmorph"])
@pytest.mark.parametrize("name", ["resnet", "mlp", "vit"])
def test_the_estimate_counts_the_parameters_the_passes_add(name, method, widen, block):
    _, _, gm = captured(name)
    analysis = r2r_fx.analyze(gm)
    deepen = DeepenPass(method=method, block=block, seed=0, check=False)
    estimate = estimate_growth(
        gm, analysis, {"factor": 2.0} if widen else None, None, method, deepen, insertion_points(gm, analysis)
    )
    grown = r2r_fx.widen(gm, factor=2.0, method=method, seed=0, check=False) if widen else gm
    grown = deepen.call(grown).model
    blocks = r2r_fx.growth_history(grown)[-1].blocks
    assert blocks or (method, name) == ("net2net", "vit")  # no idempotent activation before any ViT point
    assert parameter_count(grown) > parameter_count(gm) or not (blocks or widen)
    assert estimate["params_after"] == parameter_count(grown)


def test_the_estimate_builds_a_block_that_reads_values_on_the_cpu():
    from r2r_fx.methods import R2R

    class ReadsValues(R2R):
        name = "reads_values"

        def block(self, site, hidden, generator):
            block = super().block(site, hidden, generator)
            float(next(iter(block.branches[0].values())).weight.abs().max())  # a value: not on meta
            return block

    _, _, gm = captured("mlp")
    analysis = r2r_fx.analyze(gm)
    points = insertion_points(gm, analysis)
    estimate = estimate_growth(gm, analysis, None, None, ReadsValues(), DeepenPass(method=ReadsValues()), points)
    assert estimate["params_after"] == parameter_count(r2r_fx.deepen(gm, method=ReadsValues(), seed=0))


def test_the_estimate_refuses_an_explicit_point_the_method_refuses():
    from r2r_fx.errors import GrowthError

    _, _, gm = captured("vit")
    analysis = r2r_fx.analyze(gm)
    points = insertion_points(gm, analysis)
    with pytest.raises(GrowthError, match="idempotent"):
        estimate_growth(gm, analysis, None, None, "net2net", DeepenPass(at=points[0].node, method="net2net"), points)
