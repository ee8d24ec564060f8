"""Long fuzz campaigns: random architectures through every transform, independent check against eager.

    python tools/fuzz.py --models 10000 --seed 0 --minutes 60 --out fuzz_out
    python tools/fuzz.py --kind blocks --seed 18700000 --minutes 20 --out fuzz_blocks

Each seed's program (``--kind general``, the default: ``tests/fuzzgen.py``'s random programs through
widen, deepen and grow_kernel; ``--kind blocks``: ``tests/fuzzgen_blocks.py``'s residual-block models
through ``deepen(block="own")``, a second deepen and a widen of the deepened model) is captured both
ways (``--via both``, the default; or one of ``symbolic_trace`` / ``export``), every transform is applied
with the safety net off and checked.
``DIR/summary.json`` holds the counts (per outcome, per transform, per graph flavour, capture
outcomes, frozen-group statistics and reasons, the rate) and is rewritten as the campaign goes;
``DIR/repro/`` gets one standalone ``.py`` per failure (wrong / broken / internal; at most
``--repros-per-class`` per failure class, each class keyed by transform, outcome and message;
``--minimize S`` also writes a shrunk ``min_*.py`` of each class's first failure of a general program).

The campaign runs in worker processes: a worker killed by a signal (a segfault inside torch, seen
in these campaigns) is recorded under ``crashes`` with ``repro/crash_seed*.py`` for the model it was
checking, and a new worker goes on from the next seed (``--no-isolation`` runs in this process).
``--reduce SEED TRANSFORM --via VIA`` only shrinks one failure and prints its repro.
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
import fuzzgen_blocks  # noqa: E402
import torch  # noqa: E402

__all__ = ["GENERATORS", "Campaign", "failure_class", "main"]

GENERATORS = {"general": fuzzgen.generate, "blocks": fuzzgen_blocks.generate}  # --kind: seed -> Program


def failure_class(result: fuzzgen.CheckResult, via: str) -> str:
    """A failure's class: transform kind, flavour, outcome and the message without numbers and names."""
    kind = result.transform.rsplit("/", 1)[0] if result.transform.startswith("deepen") else result.transform
    kind = re.sub(r"/(factor2|extra)$", "", kind)
    detail = re.sub(r"\d+(\.\d+)?(e-?\d+)?", "N", result.detail)
    detail = re.sub(r"'[^']*'", "'#'", detail)
    return f"{kind} | {via} | {result.outcome} | {detail[:140]}"


class Campaign:
    """Runs programs and accumulates the summary; writes repro files for failures."""

    def __init__(
        self, out: str, repros_per_class: int, points: int | None, minimize: float = 0.0, kind: str = "general"
    ) -> None:
        self.out, self.repros_per_class, self.points, self.minimize = out, repros_per_class, points, minimize
        self.kind, self.generate = kind, GENERATORS[kind]
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
        self.progress_file = ""
        self.part_file = ""
        self.timeouts: list[str] = []
        self.repros = 0

    def run_seed(self, seed: int, vias: list[str]) -> None:
        try:
            program = self.generate(seed)
        except RuntimeError:
            self.generator_failures += 1
            return
        self.models += 1
        self.features.update(program.features)
        for via in vias:
            if self.progress_file:
                with open(self.progress_file, "w") as f:
                    f.write(f"{seed} {via}\n")
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
            "kind": self.kind,
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
        path = self.part_file or os.path.join(self.out, "summary.json")
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
    """A repro of ``result`` from the smallest program :func:`fuzzgen.minimize` finds (None if none; block models,
    whose statements live in their block classes, are not shrunk)."""
    if isinstance(program, fuzzgen_blocks.BlockProgram):
        return None
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


_CRASH_HARNESS = """

# ---- the crash -------------------------------------------------------------------------------------
# The fuzz worker died with {signal} while checking this model via {via!r} (a segfault or abort inside
# torch; no Python exception). This runs every transform the fuzzer runs, printing each before it runs.

if __name__ == "__main__":
    import copy

    import r2r_fx

    model = make_model()
    gm = r2r_fx.capture(model, make_inputs(), via={via!r})
    inputs = make_inputs(BATCH + 2, 123)
    calls = []
{calls}    for name, kwargs in calls:
        print(name, kwargs, flush=True)
        try:
            grown = getattr(r2r_fx, name)(gm, **kwargs, seed=0, check=False) if name != "grow_kernel" else (
                r2r_fx.grow_kernel(gm, kwargs["node"], kwargs["size"], check=False)
            )
        except Exception as exc:  # noqa: BLE001
            print("   ", type(exc).__name__)
            continue
        for train in (False, True):
            with torch.no_grad():
                copy.deepcopy(grown).train(train)(*inputs)
        out = grown.train()(*inputs)
        sum(o.sum() for o in (out if isinstance(out, (tuple, list)) else [out]) if torch.is_tensor(o)).backward()
    print("no crash")
"""


_CRASH_CALLS = {
    "general": """    for method in ("r2r", "net2net", "netmorph", "random"):
        calls += [("widen", dict(factor=2.0, method=method)), ("widen", dict(extra=2, method=method))]
        calls.append(("deepen", dict(method=method)))
        calls += [("deepen", dict(at=p.node, method=method)) for p in r2r_fx.insertion_points(gm)]
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), nn.modules.conv._ConvNd):
            k = gm.get_submodule(str(node.target)).kernel_size[0]
            calls.append(("grow_kernel", dict(node=node.name, size=k + 2)))
""",
    "blocks": """    for method in ("r2r", "net2net", "netmorph", "random"):
        calls += [("deepen", dict(block="own", method=method)), ("deepen", dict(block="own", where="end"))]
        calls += [("deepen", dict(block="own", after=b.path, method=method)) for b in r2r_fx.repeated_blocks(gm)]
""",
}


def _merge(a: Any, b: Any) -> Any:
    """Sum two summaries: numbers add, dicts merge key by key, lists concatenate, other values keep ``a``."""
    if isinstance(a, dict) and isinstance(b, dict):
        return {k: _merge(a[k], b[k]) if k in a and k in b else a.get(k, b.get(k)) for k in {**a, **b}}
    if isinstance(a, bool) or isinstance(b, bool):
        return a
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a + b
    if isinstance(a, list) and isinstance(b, list):
        return a + b
    return a


def supervise(args: argparse.Namespace, argv: list[str]) -> int:
    """Run the campaign in worker processes; a worker killed by a signal (a crash inside torch) is
    recorded with a repro of the model it was checking, and a new worker goes on from the next seed."""
    os.makedirs(os.path.join(args.out, "parts"), exist_ok=True)
    os.makedirs(os.path.join(args.out, "repro"), exist_ok=True)
    start, end = args.seed, args.seed + args.models
    t0 = time.time()
    crashes: list[dict[str, Any]] = []
    commit = _commit()
    progress = os.path.join(args.out, "current_seed")
    while start < end:
        left = None if args.minutes is None else args.minutes - (time.time() - t0) / 60
        if left is not None and left <= 0:
            break
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--worker", "--seed", str(start)]
        cmd += ["--models", str(end - start)] + (["--minutes", f"{left:.3f}"] if left is not None else [])
        if os.path.exists(progress):
            os.remove(progress)
        code = subprocess.run(cmd).returncode
        if code == 0:
            break
        where = open(progress).read().split() if os.path.exists(progress) else [str(start), "?"]
        seed, via = int(where[0]), where[1] if len(where) > 1 else "?"
        sig = f"signal {-code}" if code < 0 else f"exit code {code}"
        crashes.append({"seed": seed, "via": via, "how": sig})
        print(f"worker died ({sig}) on seed {seed} via {via}; going on from seed {seed + 1}", flush=True)
        try:
            program = GENERATORS[args.kind](seed)
            calls = _CRASH_CALLS[args.kind]
            with open(os.path.join(args.out, "repro", f"crash_seed{seed}_{via}.py"), "w") as f:
                f.write(f"# r2r_fx fuzz repro: seed {seed}, via {via}: worker crashed ({sig})\n")
                f.write(program.source() + _CRASH_HARNESS.format(signal=sig, via=via, calls=calls))
        except Exception as exc:  # noqa: BLE001
            print(f"could not write the crash repro: {exc}")
        start = seed + 1
    total: dict[str, Any] = {}
    for name in sorted(os.listdir(os.path.join(args.out, "parts"))):
        with open(os.path.join(args.out, "parts", name)) as f:
            part = json.load(f)
        total = _merge(total, part) if total else part
    minutes = (time.time() - t0) / 60
    total.update(
        r2r_fx_commit=commit,
        r2r_fx_commit_now=_commit(),
        minutes=round(minutes, 2),
        crashes=crashes,
        models_per_minute=round(total.get("models", 0) / minutes, 1) if minutes else None,
        transforms_per_model=round(total["transforms"] / total["models"], 1) if total.get("models") else None,
    )
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(total, f, indent=1)
    print(
        f"{total.get('models', 0)} models, {total.get('graphs', 0)} graphs, {total.get('transforms', 0)} transforms "
        f"in {total['minutes']} min ({total['models_per_minute']} models/min, {total['transforms_per_model']} "
        f"transforms/model), {len(crashes)} worker crashes"
    )
    print("outcomes:", json.dumps(total.get("outcomes", {})))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", type=int, default=1000, help="number of programs (seeds)")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--minutes", type=float, default=None, help="stop after this long")
    parser.add_argument("--out", default="fuzz_out", help="output directory")
    parser.add_argument("--via", default="both", choices=["both", "symbolic_trace", "export"])
    parser.add_argument(
        "--kind", default="general", choices=sorted(GENERATORS), help="general programs or residual-block models"
    )
    parser.add_argument(
        "--points",
        type=int,
        default=None,
        help="deepen at= points per method (default: all); with --kind blocks, placements per method (default 2)",
    )
    parser.add_argument("--repros-per-class", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--minimize", type=float, default=0.0, help="seconds to shrink the first repro of each class")
    parser.add_argument(
        "--reduce",
        nargs=2,
        metavar=("SEED", "TRANSFORM"),
        help="only shrink one failure (with --via) and print it (a block model's: print it whole)",
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--no-isolation", action="store_true", help="run in this process (a crash inside torch ends the campaign)"
    )
    raw = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(raw)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    vias = ["symbolic_trace", "export"] if args.via == "both" else [args.via]
    if args.reduce:
        seed, label = int(args.reduce[0]), args.reduce[1]
        program = GENERATORS[args.kind](seed)
        for via in vias:
            report = fuzzgen.check_program(program, via, points=args.points, only=label)
            bad = [r for r in report.results if r.transform == label and r.outcome in fuzzgen.FAILURES]
            if bad and isinstance(program, fuzzgen_blocks.BlockProgram):  # not shrunk: the whole model
                print(fuzzgen.repro_source(program, report, bad[0]))
                return 0
            if bad:
                print(reduce(program, via, bad[0], args.minimize or 120.0) or "could not reproduce after shrinking")
                return 0
        print(f"seed {seed}: {label} does not fail")
        return 1
    if not args.worker and not args.no_isolation:
        keep = []
        skip = 0
        for a in raw:  # the supervisor sets --seed/--models/--minutes per worker itself
            if skip:
                skip -= 1
                continue
            name = a.split("=", 1)[0]
            if name in ("--seed", "--models", "--minutes"):
                skip = 0 if "=" in a else 1
                continue
            keep.append(a)
        return supervise(args, keep)
    campaign = Campaign(args.out, args.repros_per_class, args.points, args.minimize, args.kind)
    if args.worker:
        campaign.progress_file = os.path.join(args.out, "current_seed")
        campaign.part_file = os.path.join(args.out, "parts", f"part_{args.seed:09d}.json")
    deadline = time.time() + 60 * args.minutes if args.minutes else None
    last_write = time.time()
    for seed in range(args.seed, args.seed + args.models):
        if deadline and time.time() > deadline:
            break
        campaign.run_seed(seed, vias)
        if args.worker or time.time() - last_write > 30:  # a worker may die in torch: keep its part current
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
