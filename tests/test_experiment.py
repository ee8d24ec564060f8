"""The growth experiment runs end to end in --quick mode and writes its CSV, plot and table; the exactly
preserving arms do not change the loss at the transform, random padding does."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

TOOL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "growth_experiment.py")


def test_quick_run_writes_results_and_preserving_arms_do_not_jump(tmp_path):
    proc = subprocess.run(
        [sys.executable, TOOL, "--quick", "--out", str(tmp_path)], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr
    assert {"runs.csv", "runs.md", "loss_curves.png"} <= set(os.listdir(tmp_path))
    with open(tmp_path / "runs.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["task"] for r in rows} == {"cnn", "vit", "lm"}
    assert {r["arm"] for r in rows} >= {"control", "widen/r2r", "deepen/r2r", "widen/scratch", "widen/random"}
    table = (tmp_path / "runs.md").read_text()
    for task in ("cnn", "vit", "lm"):
        for arm in ("widen/r2r", "widen/net2net", "widen/netmorph", "deepen/r2r", "deepen/net2net", "deepen/netmorph"):
            line = next(line for line in table.splitlines() if line.startswith(f"| {task} | {arm} |"))
            before, jump = (float(line.split("|")[i].split("±")[0]) for i in (3, 4))
            assert abs(jump) <= 1e-5 * before, line
        line = next(line for line in table.splitlines() if line.startswith(f"| {task} | widen/random |"))
        assert abs(float(line.split("|")[4].split("±")[0])) > 1e-3, line
