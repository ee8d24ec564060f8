"""Random residual-block models (tests/fuzzgen_blocks.py) through ``deepen(block="own")``, checked against eager.

Fixed seeds, each model captured one way (every third seed torch.export, the others symbolic_trace), one
placement per method besides the default one, then a second deepen and a widen of the deepened model. The
checker and its tolerances are tests/fuzzgen.py's. Strict: any wrong / broken / internal outcome fails, with
the seed, the transform, the call and the model's source. ``tools/fuzz.py --kind blocks`` runs long campaigns.
"""

from __future__ import annotations

import copy
import dataclasses
import random
import warnings

import fuzzgen
import fuzzgen_blocks
import pytest
import torch

import r2r_fx

__all__: list[str] = []

CHUNKS = 2
PER_CHUNK = 8  # 16 models


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_fuzz_blocks_chunk(chunk: int) -> None:
    warnings.filterwarnings("ignore")
    seeds = range(chunk * PER_CHUNK, (chunk + 1) * PER_CHUNK)
    runs = ((fuzzgen_blocks.generate(seed), "export" if seed % 3 == 1 else "symbolic_trace") for seed in seeds)
    failures = fuzzgen.failures_report(runs, points=1)
    assert not failures, failures


def test_block_generator_is_deterministic_and_broad() -> None:
    features = set()
    for seed in range(60):
        program = fuzzgen_blocks.generate(seed)
        assert fuzzgen_blocks.generate(seed).source() == program.source()
        features.update(program.features)
    for needed in ("img", "tok", "struct:parallel", "branch:attn", "norm:bn", "layerscale", "side:pos"):
        assert needed in features, needed
    assert len(features) > 50


def test_block_checker_catches_a_wrong_copy() -> None:
    """A deepened model whose inserted block is no identity is wrong; the float32 rounding excuses do not hide it."""
    program = fuzzgen_blocks.generate(1)
    model, make_inputs = program.build()
    gm = r2r_fx.capture(copy.deepcopy(model), make_inputs(program.batch, 0))
    grown = r2r_fx.deepen(gm, block="own", seed=0, check=False)
    inputs = make_inputs(4, 123)
    assert fuzzgen._evaluate(model, copy.deepcopy(grown), inputs, program, True)[0] == "preserved"
    new = r2r_fx.growth_history(grown)[-1].new_params
    with torch.no_grad():
        for name in new:
            grown.get_parameter(name).add_(0.1)
    outcome, detail, _ = fuzzgen._evaluate(model, grown, inputs, program, True, replay=lambda: True)
    assert new and outcome == "wrong", detail


def test_block_repro_is_standalone() -> None:
    program = fuzzgen_blocks.generate(3)
    model, make_inputs = program.build()
    gm = r2r_fx.capture(model, make_inputs())
    label, call, _ = program.transforms(gm, r2r_fx, random.Random(program.seed), 1)[-2]
    report = fuzzgen.ModelReport(program.seed, "symbolic_trace", "ok", batch=program.batch)
    source = fuzzgen.repro_source(program, report, fuzzgen.CheckResult(label, call, "wrong", "x"))
    ns: dict = {"__name__": "__main__"}
    exec(compile(source, "<repro>", "exec"), ns)  # runs the repro's own check: the transform preserves


class _Mutating(fuzzgen_blocks.BlockProgram):
    """Transforms that write into the model they are given: one returns a good copy, one refuses afterwards."""

    def transforms(self, gm, r2r_fx, rng, points):
        def grow(refuse: bool):
            grown = copy.deepcopy(gm)
            with torch.no_grad():
                next(gm.parameters()).add_(1.0)
            if refuse:
                raise r2r_fx.R2RError("no")
            return grown

        return [
            ("mutate", "grow(False)", lambda: grow(False)),
            ("mutate_refuse", "grow(True)", lambda: grow(True)),
            ("copy", "copy.deepcopy(gm)", lambda: copy.deepcopy(gm)),
        ]


def test_checker_flags_a_transform_that_changes_its_input() -> None:
    """A transform returns a new model; one that writes into ``gm`` (even one that then refuses) is wrong,
    and ``gm`` is put back so that the transforms after it start from the captured model."""
    program = fuzzgen_blocks.generate(1)
    mutating = _Mutating(**{f.name: getattr(program, f.name) for f in dataclasses.fields(program)})
    report = fuzzgen.check_program(mutating, "symbolic_trace")
    outcomes = [(r.transform, r.outcome) for r in report.results]
    assert outcomes == [("mutate", "wrong"), ("mutate_refuse", "wrong"), ("copy", "preserved")], report.results
    assert "changed the model it was given before it refused" in report.results[1].detail
