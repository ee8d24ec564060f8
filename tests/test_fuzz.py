"""Random architectures (tests/fuzzgen.py) through every transform, checked against eager independently.

Fixed seeds, each program captured one way (every third seed torch.export, which costs twice as much,
the others symbolic_trace), one random deepen ``at=`` point per method. Strict: any wrong / broken /
internal outcome fails, with the seed, the transform, the call and the model's source.
``tools/fuzz.py`` runs long campaigns.
"""

from __future__ import annotations

import copy
import warnings

import fuzzgen
import pytest
import torch
from torch import nn

import r2r_fx

__all__: list[str] = []

CHUNKS = 12
PER_CHUNK = 20  # 240 graphs
SHOWN = 3  # failing models whose source goes into the message


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one torch thread is several times faster than two on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _via(seed: int) -> str:
    return "export" if seed % 3 == 1 else "symbolic_trace"


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_fuzz_chunk(chunk: int) -> None:
    warnings.filterwarnings("ignore")
    failures: list[str] = []
    sources: list[str] = []
    for seed in range(chunk * PER_CHUNK, (chunk + 1) * PER_CHUNK):
        program = fuzzgen.generate(seed)
        report = fuzzgen.check_program(program, _via(seed), points=1)
        if report.capture == "internal":
            failures.append(f"seed {seed} via {report.via}: capture internal error: {report.capture_detail}")
        bad = [r for r in report.results if r.outcome in fuzzgen.FAILURES]
        for r in bad:
            failures.append(f"seed {seed} via {report.via}: {r.transform}: {r.outcome}: {r.detail}\n    {r.call}")
        if (bad or report.capture == "internal") and len(sources) < SHOWN:
            sources.append(f"# ---- seed {seed}, via {report.via}\n{program.source()}")
    assert not failures, f"{len(failures)} failing transforms:\n" + "\n".join(failures) + "\n\n" + "\n".join(sources)


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
