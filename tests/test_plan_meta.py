"""Planning without the weights: a model built on the meta device is captured and analysed like the same
model with real weights (same width groups, default insertion points and sizes after growing), by the API
and by ``r2r-rewrite --plan``. (The graphs may differ by a no-op: HF Llama's ``contiguous()`` after a
transpose is traced on meta tensors and elided on real ones, which adds two generic insertion points.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import r2r_fx
from r2r_fx.estimate import estimate_growth

from cli_models import meta_residual_stack, residual_stack, tiny_llama

HERE = os.path.dirname(os.path.abspath(__file__))


def _plan(model, inputs):
    gm = r2r_fx.capture(model, inputs)
    analysis = r2r_fx.analyze(gm)
    points = r2r_fx.insertion_points(gm, analysis)
    estimate = estimate_growth(gm, analysis, {"factor": 2.0}, None, "r2r", None, points)
    groups = [(g.width, g.kind, g.widenable, g.reason, tuple(g.producers)) for g in analysis.groups]
    sizes = {k: estimate[k] for k in ("params_before", "params_after", "bytes_after", "widened")}
    return gm, groups, [p.node for p in points if p.default], sizes


def test_meta_model_plans_like_the_real_one():
    real = _plan(residual_stack(), (torch.randn(2, 8),))
    gm, *meta = _plan(meta_residual_stack(), (torch.randn(2, 8),))
    assert meta == list(real[1:])
    assert all(p.is_meta for p in gm.parameters())  # no weight was ever allocated
    assert any(widenable for _, _, widenable, _, _ in meta[0])


def test_meta_llama_plans_like_the_real_one():
    pytest.importorskip("transformers")
    model = tiny_llama()
    ids = torch.randint(0, 64, (2, 8))
    real = _plan(model, (ids,))
    with torch.device("meta"):
        meta_model = type(model)(model.config).eval()
    gm, *meta = _plan(meta_model, (ids,))
    assert meta == list(real[1:])
    assert all(p.is_meta for p in gm.parameters())


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": HERE}
    return subprocess.run(
        [sys.executable, "-m", "r2r_fx", *args], cwd=HERE, env=env, capture_output=True, text=True, timeout=300
    )


def test_cli_plans_a_meta_model_and_refuses_to_grow_it(tmp_path):
    done = _cli("cli_models:meta_residual_stack", "--input-shape", "2,8", "--widen", "2", "--plan", "--json")
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    real = _cli("cli_models:residual_stack", "--input-shape", "2,8", "--widen", "2", "--plan", "--json")
    expected = json.loads(real.stdout)
    for key in ("groups", "insertion_points"):
        assert plan[key] == expected[key]
    assert plan["estimate"]["params_after"] == expected["estimate"]["params_after"]
    done = _cli("cli_models:meta_residual_stack", "--input-shape", "2,8", "--widen", "2", "-o", str(tmp_path / "g.pt2"))
    assert done.returncode == 2
    assert "meta device" in done.stderr and done.stderr.count("\n") == 1
    assert os.listdir(tmp_path) == []
