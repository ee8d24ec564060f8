"""Random architectures (tests/fuzzgen.py) through every transform, checked against eager independently.

Fixed seeds, each program captured one way (every third seed torch.export, which costs twice as much,
the others symbolic_trace), one random deepen ``at=`` point per method. Strict: any wrong / broken /
internal outcome fails, with the seed, the transform, the call and the model's source.
``tools/fuzz.py`` runs long campaigns.
"""

from __future__ import annotations

import copy
import warnings
from types import SimpleNamespace

import fuzzgen
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import r2r_fx

__all__: list[str] = []

CHUNKS = 12
PER_CHUNK = 20  # 240 graphs
_FLOAT32 = SimpleNamespace(torch_dtype=torch.float32, random_train=False)  # what _evaluate reads of a Program


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _via(seed: int) -> str:
    return "export" if seed % 3 == 1 else "symbolic_trace"


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_fuzz_chunk(chunk: int) -> None:
    warnings.filterwarnings("ignore")
    seeds = range(chunk * PER_CHUNK, (chunk + 1) * PER_CHUNK)
    failures = fuzzgen.failures_report(((fuzzgen.generate(seed), _via(seed)) for seed in seeds), points=1)
    assert not failures, failures


def test_generator_is_deterministic_and_broad() -> None:
    features = set()
    for seed in range(120):
        program = fuzzgen.generate(seed)
        assert fuzzgen.generate(seed).source() == program.source()
        features.update(program.features)
    for needed in ("conv2d_depthwise", "conv2d_dw_mult", "conv_transpose2d", "linear_4d_spatial", "batchnorm2d"):
        assert needed in features, needed
    assert any(f.startswith("F.conv") for f in features)
    assert any(f.startswith("cat_") for f in features) and any(f.startswith("split_") for f in features)
    assert len(features) > 100


def test_models_run_fast() -> None:
    import time

    for seed in range(20):
        model, make_inputs = fuzzgen.generate(seed).build()
        inputs = make_inputs()
        model.eval()
        with torch.no_grad():
            model(*inputs)
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                model(*inputs)
                times.append(time.perf_counter() - t0)
        assert min(times) < 0.01, (seed, min(times))


def test_checker_catches_a_wrong_transform() -> None:
    """The comparison is independent of r2r_fx.verify and must flag a model that computes something else."""
    program = fuzzgen.generate(1)
    model, make_inputs = program.build()
    original = copy.deepcopy(model)
    broken = copy.deepcopy(model)
    with torch.no_grad():
        p = next(broken.parameters())
        p.add_(1.0)
    outcome, _, err = fuzzgen._evaluate(original, broken, make_inputs(3, 5), program, True)
    assert outcome == "wrong" and err and err > 1e-3
    outcome, _, _ = fuzzgen._evaluate(original, copy.deepcopy(model), make_inputs(3, 5), program, True)
    assert outcome == "preserved"


def test_checker_flags_a_shape_change() -> None:
    ref = nn.Linear(4, 3)
    assert fuzzgen.compare_outputs(ref(torch.ones(2, 4)), torch.ones(2, 5))[0] == float("inf")


def test_repro_is_standalone() -> None:
    program = fuzzgen.generate(2)
    report = fuzzgen.ModelReport(program.seed, "symbolic_trace", "ok", batch=program.batch)
    result = fuzzgen.CheckResult("widen/r2r/factor2", "r2r_fx.widen(gm, factor=2.0)", "wrong", "x")
    source = fuzzgen.repro_source(program, report, result)
    ns: dict = {"__name__": "not_main"}
    exec(compile(source, "<repro>", "exec"), ns)
    model = ns["make_model"]()
    assert isinstance(model, nn.Module) and r2r_fx.capture(model, ns["make_inputs"]()) is not None


class _ShiftedInTrain(nn.BatchNorm3d):
    def forward(self, x):
        return super().forward(x) + (1e-4 if self.training else 0.0)


def test_checker_measures_a_noise_output_against_its_noise() -> None:
    """Seed 950088: the output is a train-mode BatchNorm of a constant (float32 rounding noise). Widening
    changes the noise; the float64 re-check must judge it against the noise's size, and still flag a real change."""
    program = fuzzgen.generate(950088)
    report = fuzzgen.check_program(program, "export", only="widen/net2net/extra")
    assert [r.outcome for r in report.results if r.transform == "widen/net2net/extra"] == ["preserved"]
    model, make_inputs = program.build()
    changed = copy.deepcopy(model)
    changed.m22.__class__ = _ShiftedInTrain  # 1e-4 in train mode: tiny, but a thousand times the noise
    outcome, detail, _ = fuzzgen._evaluate(model, changed, make_inputs(3, 5), program, True)
    assert outcome == "wrong" and "train mode" in detail, detail


class _DropoutThenInplace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc, self.drop = nn.Linear(4, 4), nn.Dropout(0.5)

    def forward(self, x):
        return torch.relu_(self.drop(self.fc(x)))


def test_checker_keeps_dropout_rates_for_the_backward_run() -> None:
    """A rate-0 dropout returns its input itself, so the in-place op after it fails in backward; the
    checker zeroes rates only for the value comparison."""
    model = _DropoutThenInplace()
    outcome, detail, _ = fuzzgen._evaluate(model, copy.deepcopy(model), (torch.randn(3, 4),), _FLOAT32, True)
    assert outcome == "preserved", detail
    assert model.drop.p == 0.5


class _FrozenStatistics(nn.BatchNorm1d):
    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


def test_checker_counts_train_differences_of_an_eval_only_capture_as_refusals() -> None:
    """Capture marks graphs it can only hold in eval mode (``gm.meta["r2r_eval_only"]``): a train-mode
    difference there was announced, so it is a refusal; unannounced, it is wrong."""
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    frozen = copy.deepcopy(model)
    frozen[1].__class__ = _FrozenStatistics
    inputs = (torch.randn(6, 4),)
    assert fuzzgen._evaluate(model, frozen, inputs, _FLOAT32, True)[0] == "wrong"
    outcome, detail, _ = fuzzgen._evaluate(model, frozen, inputs, _FLOAT32, True, eval_only="a reason")
    assert outcome == "refused" and "a reason" in detail


def test_capture_finds_small_train_mode_differences_in_float64() -> None:
    """Seed 7501050: spectral norm's power iteration, close to convergence, moves the exported graph's
    train-mode output by 4e-6 on the example inputs (below float32's 1e-5) and 2e-5 on others; capture
    re-measures in float64 and marks the graph eval-only, so no transform of it is counted wrong."""
    program = fuzzgen.generate(7501050)
    report = fuzzgen.check_program(program, "export", points=1, only="widen/r2r")
    assert report.results and not [r for r in report.results if r.outcome in fuzzgen.FAILURES]
    assert any("eval-only" in note for note in report.notes)


def test_deepen_refuses_points_whose_values_are_written_into_untracked_views() -> None:
    """Seed 9002141 (export): ``v15 = split(...)[0]; v15 += v6`` with a block upstream of ``v6``: the write
    into a multi-output view becomes one autograd must track, and the grown model failed in backward."""
    report = fuzzgen.check_program(fuzzgen.generate(9002141), "export", only="deepen/r2r")
    assert report.results and not [r for r in report.results if r.outcome in fuzzgen.FAILURES]


def test_checker_measures_a_float64_noise_output_against_its_float32_noise() -> None:
    """Seed 10003006 (float64): the train-mode output is a BatchNorm of a constant, 1e-15 of pure float64
    rounding; widening changes that rounding. A change above the noise is still flagged."""
    program = fuzzgen.generate(10003006)
    report = fuzzgen.check_program(program, "symbolic_trace", only="widen/r2r")
    assert report.results and all(r.outcome == "preserved" for r in report.results if r.transform.startswith("widen"))
    model, make_inputs = program.build()
    changed = copy.deepcopy(model)
    changed.m22.__class__ = _ShiftedInTrain
    outcome, detail, _ = fuzzgen._evaluate(model, changed, make_inputs(3, 5), program, True)
    assert outcome == "wrong" and "train mode" in detail, detail


def test_checker_does_not_take_state_changes_for_randomness() -> None:
    """Seed 11003994 (export): spectral norm's power iteration changes the eager model between two
    train-mode calls; the checker took that for dropout randomness the graph had lost."""
    report = fuzzgen.check_program(fuzzgen.generate(11003994), "export", points=1, only="widen/r2r")
    assert report.results and not [r for r in report.results if r.outcome in fuzzgen.FAILURES]


def test_checker_replays_a_float32_failure_in_float64() -> None:
    """Seed 18500516: a LayerNorm over 2 channels amplifies the float32 rounding of the grown weights
    (widened in float32) to 3e-5 in eval, 1.3e-4 in train mode, within twice the model's own float32 floor,
    and a float64 re-run of those weights keeps it. The same transform of the model built in float64 is exact,
    so it is rounding; a real change of the same model stays wrong however the replay ends."""
    program = fuzzgen.generate(18500516)
    report = fuzzgen.check_program(program, "symbolic_trace", only="widen/r2r/extra")
    (result,) = [r for r in report.results if r.transform == "widen/r2r/extra"]
    assert result.outcome == "preserved" and "float64 is exact" in result.detail, result
    model, make_inputs = program.build()
    gm = r2r_fx.capture(copy.deepcopy(model), make_inputs(program.batch, 0))
    grown = r2r_fx.widen(gm, extra=3, method="r2r", seed=0, check=False)
    inputs = make_inputs(4, 123)
    assert fuzzgen._evaluate(model, copy.deepcopy(grown), inputs, program, True)[0] == "wrong"  # no replay
    with torch.no_grad():
        grown.m19.bias.mul_(1.001)
    outcome, _, _ = fuzzgen._evaluate(model, grown, inputs, program, True, replay=lambda: True)
    assert outcome == "wrong"
