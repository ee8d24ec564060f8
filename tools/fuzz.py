"""Long fuzz campaigns: random architectures through every transform, independent check against eager.

    python tools/fuzz.py --models 10000 --seed 0 --minutes 60 --out fuzz_out

Each seed's program (``tests/fuzzgen.py``) is captured both ways (``--via both``, the default; or one
of ``symbolic_trace`` / ``export``), every transform is applied with the safety net off and checked.
``DIR/summary.json`` holds the counts (per outcome, per transform, per graph flavour, capture
outcomes, frozen-group statistics and reasons, the rate) and is rewritten as the campaign goes;
``DIR/repro/`` gets one standalone ``.py`` per failure (wrong / broken / internal; at most
``--repros-per-class`` per failure class, each class keyed by transform, outcome and message).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterator
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import fuzzgen  # noqa: E402
import torch  # noqa: E402

__all__ = ["Campaign", "failure_class", "main"]


def failure_class(result: fuzzgen.CheckResult, via: str) -> str:
    """A failure's class: transform kind, flavour, outcome and the message without numbers and names."""
    kind = result.transform.rsplit("/", 1)[0] if result.transform.startswith("deepen") else result.transform
    kind = re.sub(r"/(factor2|extra)$", "", kind)
    detail = re.sub(r"\d+(\.\d+)?(e-?\d+)?", "N", result.detail)
    detail = re.sub(r"'[^']*'", "'#'", detail)
    return f"{kind} | {via} | {result.outcome} | {detail[:140]}"


class Campaign:
    """Runs programs and accumulates the summary; writes repro files for failures."""

    def __init__(self, out: str, repros_per_class: int, points: int | None, minimize: float = 0.0) -> None:
        self.out, self.repros_per_class, self.points, self.minimize = out, repros_per_class, points, minimize
        os.makedirs(os.path.join(out, "repro"), exist_ok=True)
        self.start = time.time()
        self.commit_at_start = _commit()  # what the campaign imported; others may commit while it runs
        self.models = 0
        self.graphs = 0
        self.outcomes: Counter = Counter()
        self.per_transform: dict[str, Counter] = defaultdict(Counter)
        self.per_via: dict[str, Counter] = defaultdict(Counter)
        self.capture: Counter = Counter()
        self.capture_details: Counter = Counter()
        self.notes: Counter = Counter()
        self.note_seeds: dict[str, list[int]] = defaultdict(list)
        self.classes: Counter = Counter()
        self.class_examples: dict[str, list[str]] = defaultdict(list)
        self.features: Counter = Counter()
        self.groups = Counter()
        self.frozen_reasons: Counter = Counter()
        self.internal_reasons: Counter = Counter()
        self.generator_failures = 0
        self.timeout = 300
        self.timeouts: list[str] = []
        self.repros = 0

    def run_seed(self, seed: int, vias: list[str]) -> None:
        try:
            program = fuzzgen.generate(seed)
        except RuntimeError:
            self.generator_failures += 1
            return
        self.models += 1
        self.features.update(program.features)
        for via in vias:
            try:
                with _time_limit(self.timeout):
                    report = fuzzgen.check_program(program, via, points=self.points)
            except TimeoutError:
                self.timeouts.append(f"seed {seed} via {via}")
                continue
            self.graphs += 1
            self.capture[f"{via}:{report.capture}"] += 1
            if report.capture != "ok":
                self.capture_details[f"{via}: {fuzzgen.normalize_reason(report.capture_detail)}"] += 1
                continue
            for note in report.notes:
                key = f"{via}: {fuzzgen.normalize_reason(note)}"
                self.notes[key] += 1
                if len(self.note_seeds[key]) < 10:
                    self.note_seeds[key].append(seed)
            self.groups["total"] += report.groups_total
            self.groups["widenable"] += report.groups_widenable
            self.groups["frozen"] += report.groups_total - report.groups_widenable
            self.groups["frozen_internal"] += report.internal_frozen
            self.frozen_reasons.update(report.frozen_reasons)
            self.internal_reasons.update(report.internal_reasons)
            for result in report.results:
                self.outcomes[result.outcome] += 1
                key = result.transform
                self.per_transform[key][result.outcome] += 1
                self.per_via[via][result.outcome] += 1
                if result.outcome in fuzzgen.FAILURES:
                    self._failure(program, report, result)

    def _failure(self, program: fuzzgen.Program, report: fuzzgen.ModelReport, result: fuzzgen.CheckResult) -> None:
        cls = failure_class(result, report.via)
        self.classes[cls] += 1
        if self.classes[cls] > self.repros_per_class:
            return
        name = f"seed{program.seed}_{report.via}_{re.sub(r'[^A-Za-z0-9]+', '_', result.transform)}_{self.repros}.py"
        self.repros += 1
        with open(os.path.join(self.out, "repro", name), "w") as f:
            f.write(fuzzgen.repro_source(program, report, result))
        self.class_examples[cls].append(name)
        if self.minimize and self.classes[cls] == 1:
            small = reduce(program, report.via, result, self.minimize)
            if small is not None:
                name = "min_" + name
                with open(os.path.join(self.out, "repro", name), "w") as f:
                    f.write(small)
                self.class_examples[cls].append(name)

    def summary(self) -> dict[str, Any]:
        minutes = (time.time() - self.start) / 60
        transforms = sum(self.outcomes.values())
        return {
            "r2r_fx_commit": self.commit_at_start,
            "r2r_fx_commit_now": _commit(),
            "torch": torch.__version__,
            "minutes": round(minutes, 2),
            "models": self.models,
            "graphs": self.graphs,
            "generator_failures": self.generator_failures,
            "timeouts": self.timeouts,
            "models_per_minute": round(self.models / minutes, 1) if minutes else None,
            "transforms": transforms,
            "transforms_per_model": round(transforms / self.models, 1) if self.models else None,
            "outcomes": dict(self.outcomes),
            "capture": dict(self.capture),
            "capture_refusals": dict(self.capture_details.most_common(40)),
            "capture_notes": {k: {"count": v, "seeds": self.note_seeds[k]} for k, v in self.notes.most_common(40)},
            "per_via": {k: dict(v) for k, v in self.per_via.items()},
            "per_transform": {k: dict(v) for k, v in sorted(self.per_transform.items())},
            "groups": dict(self.groups),
            "frozen_reasons": dict(self.frozen_reasons.most_common()),
            "frozen_internal_reasons": dict(self.internal_reasons.most_common()),
            "failure_classes": {
                k: {"count": v, "repros": self.class_examples[k]} for k, v in self.classes.most_common()
            },
            "features": dict(self.features.most_common()),
        }

    def write(self) -> None:
        path = os.path.join(self.out, "summary.json")
        with open(path + ".tmp", "w") as f:
            json.dump(self.summary(), f, indent=1)
        os.replace(path + ".tmp", path)


@contextlib.contextmanager
def _time_limit(seconds: int) -> Iterator[None]:
    """Raise TimeoutError in the main thread after ``seconds`` (a hung transform must not stop a campaign)."""

    def _raise(signum: int, frame: Any) -> None:
        raise TimeoutError

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def reduce(program: fuzzgen.Program, via: str, result: fuzzgen.CheckResult, seconds: float) -> str | None:
    """A repro of ``result`` from the smallest program :func:`fuzzgen.minimize` finds (None if none)."""
    mode = result.detail.split(":", 1)[0] if result.outcome == "wrong" else result.detail.split(":", 1)[-1][:40]
    small = fuzzgen.minimize(program, via, result.transform, result.outcome, mode, budget=seconds)
    report = fuzzgen.check_program(small, via, only=result.transform)
    for r in report.results:
        if r.transform == result.transform and r.outcome == result.outcome:
            return fuzzgen.repro_source(small, report, r)
    return None


def _commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "r2r_fx", "passes"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        if not dirty:
            return head
        diff = subprocess.run(["git", "diff", "--", "r2r_fx", "passes"], cwd=ROOT, capture_output=True).stdout
        return f"{head}+uncommitted r2r_fx/passes changes (diff sha1 {hashlib.sha1(diff).hexdigest()[:12]})"
    except OSError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=1000, help="number of programs (seeds)")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--minutes", type=float, default=None, help="stop after this long")
    parser.add_argument("--out", default="fuzz_out", help="output directory")
    parser.add_argument("--via", default="both", choices=["both", "symbolic_trace", "export"])
    parser.add_argument("--points", type=int, default=None, help="deepen at= points per method (default: all)")
    parser.add_argument("--repros-per-class", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--minimize", type=float, default=0.0, help="seconds to shrink the first repro of each class")
    parser.add_argument(
        "--reduce", nargs=2, metavar=("SEED", "TRANSFORM"), help="only shrink one failure (with --via) and print it"
    )
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    vias = ["symbolic_trace", "export"] if args.via == "both" else [args.via]
    if args.reduce:
        seed, label = int(args.reduce[0]), args.reduce[1]
        program = fuzzgen.generate(seed)
        for via in vias:
            report = fuzzgen.check_program(program, via, points=args.points, only=label)
            bad = [r for r in report.results if r.transform == label and r.outcome in fuzzgen.FAILURES]
            if bad:
                print(reduce(program, via, bad[0], args.minimize or 120.0) or "could not reproduce after shrinking")
                return 0
        print(f"seed {seed}: {label} does not fail")
        return 1
    campaign = Campaign(args.out, args.repros_per_class, args.points, args.minimize)
    deadline = time.time() + 60 * args.minutes if args.minutes else None
    last_write = time.time()
    for seed in range(args.seed, args.seed + args.models):
        if deadline and time.time() > deadline:
            break
        campaign.run_seed(seed, vias)
        if time.time() - last_write > 30:
            campaign.write()
            last_write = time.time()
    campaign.write()
    s = campaign.summary()
    print(
        f"{s['models']} models, {s['graphs']} graphs, {s['transforms']} transforms in {s['minutes']} min "
        f"({s['models_per_minute']} models/min, {s['transforms_per_model']} transforms/model)"
    )
    print("outcomes:", json.dumps(s["outcomes"]))
    print(f"{len(campaign.classes)} failure classes, {campaign.repros} repro files in {args.out}/repro")
    return 0


if __name__ == "__main__":
    sys.exit(main())
