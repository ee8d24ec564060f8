"""Benchmark: r2r_fx width-group analysis against Torch-Pruning's dependency graph, on resnet50.

What is measured, on torchvision ``resnet50(weights=None).eval()`` with one ``torch.randn(1, 3, 224, 224)``
input:

* **r2r_fx**: ``r2r_fx.capture(model, inputs)`` followed by ``r2r_fx.width_groups(gm)``, i.e. everything a
  user pays to get from an eager model to its width groups.
* **Torch-Pruning**: ``tp.DependencyGraph().build_dependency(model, example_inputs=inputs)`` followed by
  ``list(DG.get_all_groups())`` (the channel groups rooted at every Conv/Linear).

The project target is ``r2r / tp <= 1``. Both sides are measured two ways in one run of this script:

1. **Each side in its own process** (as pyperf isolates benchmarks: no interference). ``--rounds``
   rounds; each round starts one worker process per side (the order alternates from round to round, so
   drift hits both alike), which times its first call, warms up, and then times ``--repeats`` calls,
   dropping each result before the next call. The ratio compares the medians over all calls of all
   processes of a side; means and the first call of each process (what a user who captures once pays)
   are printed too.
2. **Both sides in one process**, alternating call by call, as earlier versions of this script measured.

In compute the two sides are at parity (one forward each, plus 0.025-0.03 s of Python). They differ
in memory: Torch-Pruning's DependencyGraph keeps the autograd graph of its trace alive, with every
activation the forward saved (about 83 MB here; printed), inside reference cycles that only Python's
cycle collector frees. A capture holds no activations (the joint run frees each after its last use).
So in a loop of its own, until the collector next runs, each Torch-Pruning call faults in memory the
process has not touched before (about 21,000 minor page faults per such call; the tables print the mean
per call), and the collector's pauses grow. A bare loop makes few long-lived objects, so the collector
runs rarely there: that is near Torch-Pruning's worst case, and a real program's own allocations can
move it either way. In one process with both sides the collector's schedule is shared: Torch-Pruning
reuses memory the other side freed and some of its collections fall into r2r_fx's calls, so that
measurement is tilted towards Torch-Pruning. Neither is a user's exact situation; both are printed.

The script also times, in one process, the pieces ``capture`` is made of (see ``r2r_fx/capture.py``) by
re-running them one by one: symbolic tracing (capture's ``torch.fx.Tracer`` subclass, then the
GraphModule with its generated code), the joint run of the eager model and the graph that checks the
graph and records shapes (``r2r_fx/instep.py``: each layer computes once, the glue between layers
twice), the output comparison, and ``r2r_fx.analysis.Analysis`` (the width-group analysis proper); and
Torch-Pruning's two calls one by one. As yardsticks it times one eager forward without and with autograd
(Torch-Pruning traces with autograd), with their page faults.

Runs offline (random weights). Example::

    .venv/bin/python tools/bench_analysis.py --repeats 20 --rounds 4 --threads 1,0
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

import torch
import torch.fx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torchvision_zoo import import_torchvision  # noqa: E402

tv = import_torchvision()  # the CPU shim must be loaded before anything imports torchvision

import torch_pruning as tp  # noqa: E402

import r2r_fx  # noqa: E402
from r2r_fx.analysis import Analysis  # noqa: E402
from r2r_fx.capture import _Tracer, record_shapes  # noqa: E402
from r2r_fx.instep import run_in_step  # noqa: E402
from r2r_fx.tree import max_errors  # noqa: E402


def run_r2r(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[Any]:
    gm = r2r_fx.capture(model, inputs)
    return r2r_fx.width_groups(gm)


def run_r2r_unchecked(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[Any]:
    """``capture(check=False)``: no comparison with eager, shapes from a meta-device run."""
    gm = r2r_fx.capture(model, inputs, check=False)
    return r2r_fx.width_groups(gm)


def run_tp(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[Any]:
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=inputs, verbose=False)
    return list(dg.get_all_groups())


def r2r_steps(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> dict[str, float]:
    """The steps of ``capture`` + ``width_groups``, timed one by one (same order as in capture.py)."""
    times: dict[str, float] = {}
    clock = time.perf_counter

    t = clock()
    graph = _Tracer().trace(model)  # capture's torch.fx.Tracer subclass
    times["symbolic_trace: tracer"] = clock() - t
    graph._tracer_cls = torch.fx.Tracer
    t = clock()
    gm = torch.fx.GraphModule(model, graph)
    times["symbolic_trace: GraphModule + codegen"] = clock() - t
    t = clock()
    eager, graph = run_in_step(model, gm, inputs)
    times["joint eager + graph run (instep)"] = clock() - t
    t = clock()
    max_errors(eager, graph)
    times["compare with eager"] = clock() - t
    t = clock()
    Analysis(gm)
    times["Analysis (width groups)"] = clock() - t
    t = clock()
    record_shapes(gm, inputs, meta=True)
    times["[check=False] meta-device shapes"] = clock() - t
    return times


def tp_steps(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> dict[str, float]:
    """Torch-Pruning's two calls, timed one by one."""
    t = time.perf_counter()
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=inputs, verbose=False)
    build = time.perf_counter() - t
    t = time.perf_counter()
    list(dg.get_all_groups())
    return {"build_dependency (autograd forward)": build, "get_all_groups": time.perf_counter() - t}


def yardsticks(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> dict[str, tuple[float, int]]:
    """One eager forward without and with autograd: (seconds, minor page faults) each."""

    def no_grad() -> None:
        with torch.no_grad():
            model(*inputs)

    return {"eager forward, no_grad": timed(no_grad)[:2], "eager forward, autograd": timed(lambda: model(*inputs))[:2]}


def page_faults() -> int:
    """Minor page faults of this process so far (first touches of memory the system handed out)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def timed(fn: Callable[[], Any]) -> tuple[float, int, Any]:
    """``fn()``'s wall time, the minor page faults it caused, and its result."""
    faults, t = page_faults(), time.perf_counter()
    result = fn()
    return time.perf_counter() - t, page_faults() - faults, result


_WARM_UPS = 3
SIDES: dict[str, Callable[[torch.nn.Module, tuple[torch.Tensor, ...]], list[Any]]] = {
    "r2r": run_r2r,
    "tp": run_tp,
    "fast": run_r2r_unchecked,
}
LABELS = {
    "r2r": "r2r_fx capture + width_groups",
    "tp": "torch-pruning DG + get_all_groups",
    "fast": "r2r_fx capture(check=False) + groups",
}


def measure_in_process(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], repeats: int) -> float:
    """All sides in this process, alternating call by call; prints its table, returns r2r/tp."""
    print(f"\n-- all sides in one process, alternating: {repeats} repeats (median), {_WARM_UPS} warm-ups")
    # Warm-up: first calls pay for lazy imports, kernel selection and allocator growth.
    groups = run_r2r(model, inputs)
    notes = {
        "r2r": f"{len(groups)} groups ({sum(1 for g in groups if g.widenable)} widenable)",
        "tp": f"{len(run_tp(model, inputs))} groups",
        "fast": "no eager comparison, meta-device shapes",
    }
    del groups
    for _ in range(_WARM_UPS):
        for fn in SIDES.values():
            fn(model, inputs)
        r2r_steps(model, inputs)
        tp_steps(model, inputs)
        yardsticks(model, inputs)

    times: dict[str, list[float]] = {name: [] for name in SIDES}
    faults: dict[str, list[int]] = {name: [] for name in SIDES}
    for i in range(repeats):
        order = list(SIDES) if i % 2 == 0 else list(reversed(SIDES))
        for name in order:  # each result is dropped before the next call
            seconds, fault_count = timed(lambda fn=SIDES[name]: fn(model, inputs))[:2]
            times[name].append(seconds)
            faults[name].append(fault_count)
    step_runs = [r2r_steps(model, inputs) for _ in range(repeats)]
    tp_runs = [tp_steps(model, inputs) for _ in range(repeats)]
    yard_runs = [yardsticks(model, inputs) for _ in range(repeats)]

    _print_table({name: (times[name], faults[name], notes[name]) for name in SIDES})
    ratio = statistics.median(times["r2r"]) / statistics.median(times["tp"])
    fast = statistics.median(times["fast"]) / statistics.median(times["tp"])
    print(f"ratio r2r/tp (medians), checked capture: {ratio:.2f}  -> {_verdict(ratio)} the target (<= 1)")
    print(f"ratio r2r/tp (medians), check=False:     {fast:.2f}")
    _print_paired(times["r2r"], times["tp"], "repetitions")

    print("r2r_fx breakdown (steps re-run one by one, medians):")
    for key in step_runs[0]:
        print(f"  {key:36s}{statistics.median(run[key] for run in step_runs):10.3f}")
    print("torch-pruning breakdown (medians):")
    for key in tp_runs[0]:
        print(f"  {key:36s}{statistics.median(run[key] for run in tp_runs):10.3f}")
    print("yardsticks (medians):                    seconds  page faults")
    for key in yard_runs[0]:
        seconds = statistics.median(run[key][0] for run in yard_runs)
        print(f"  {key:36s}{seconds:10.3f}{statistics.median(run[key][1] for run in yard_runs):11.0f}")
    return ratio


def measure_isolated(threads: int, repeats: int, rounds: int, seed: int) -> float:
    """Each side in worker processes of its own (see the module docstring); prints a table, returns r2r/tp."""
    print(f"\n-- each side in its own process: {rounds} rounds x {repeats} repeats, {_WARM_UPS} warm-ups per process")
    results: dict[str, list[dict[str, Any]]] = {"r2r": [], "tp": []}
    for round_ in range(rounds):
        for side in ("r2r", "tp") if round_ % 2 == 0 else ("tp", "r2r"):
            command = [sys.executable, os.path.abspath(__file__), "--worker", side]
            command += ["--threads", str(threads), "--repeats", str(repeats), "--seed", str(seed)]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise SystemExit(f"worker {side} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
            results[side].append(json.loads(done.stdout.strip().splitlines()[-1]))
    rows = {}
    for side, runs in results.items():
        times = [t for run in runs for t in run["times"]]
        faults = [f for run in runs for f in run["faults"]]
        held = [run["held_mb"] for run in runs if run["held_mb"] is not None]
        memory = f"result holds {max(statistics.median(held), 0.0):.0f} MB; " if held else ""
        rows[side] = (times, faults, f"{runs[0]['groups']} groups; {memory}per-process medians " + _medians(runs))
    _print_table(rows)
    # Pooled over all calls of all processes of a side: a per-process median swings with where the
    # cycle collector happened to run in that process.
    ratio = statistics.median(rows["r2r"][0]) / statistics.median(rows["tp"][0])
    print(f"ratio r2r/tp (medians of all calls): {ratio:.2f}  -> {_verdict(ratio)} the target (<= 1)")
    mean = statistics.mean(rows["r2r"][0]) / statistics.mean(rows["tp"][0])
    print(f"ratio r2r/tp (means, collector pauses included): {mean:.2f}")
    per_process = {side: [statistics.median(run["times"]) for run in runs] for side, runs in results.items()}
    _print_paired(per_process["r2r"], per_process["tp"], "rounds (per-process medians)")
    first = {side: statistics.median(run["first"] for run in runs) for side, runs in results.items()}
    print(
        f"first call in a fresh process (median): r2r_fx {first['r2r']:.3f} s, torch-pruning {first['tp']:.3f} s, "
        f"ratio {first['r2r'] / first['tp']:.2f}"
    )
    return ratio


def _medians(runs: list[dict[str, Any]]) -> str:
    return ", ".join(f"{statistics.median(run['times']):.3f}" for run in runs)


def _print_table(rows: dict[str, tuple[list[float], list[int], str]]) -> None:
    print(f"{'':38s}{'median s':>10s}{'mean s':>10s}{'min s':>10s}{'max s':>10s}{'faults/call':>13s}")
    for name, (times, faults, note) in rows.items():
        print(
            f"{LABELS[name]:38s}{statistics.median(times):10.3f}{statistics.mean(times):10.3f}{min(times):10.3f}"
            f"{max(times):10.3f}{statistics.mean(faults):13.0f}  {note}"
        )


def _print_paired(r2r_times: list[float], tp_times: list[float], what: str) -> None:
    """Ratios of the two sides measured back to back (same load), one per repetition or round."""
    paired = sorted(r / t for r, t in zip(r2r_times, tp_times))
    below = sum(1 for x in paired if x <= 1.0)
    print(
        f"paired ratios r2r/tp: median {statistics.median(paired):.2f}, range {paired[0]:.2f}-{paired[-1]:.2f}, "
        f"<= 1 in {below} of {len(paired)} {what}"
    )


def _verdict(ratio: float) -> str:
    return "meets" if ratio <= 1.0 else "MISSES"


def build_model(seed: int) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(seed)
    return tv.models.resnet50(weights=None).eval(), (torch.randn(1, 3, 224, 224),)


def held_memory(side: str, model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> float | None:
    """Resident memory (MB) one result of ``side`` keeps alive, or None where it cannot be read (not Linux).

    Garbage is collected and glibc's free memory returned to the system before both readings, so the
    difference is what the result itself holds."""
    if not os.path.exists("/proc/self/statm"):
        return None
    libc = ctypes.CDLL(None)
    trim = getattr(libc, "malloc_trim", None)

    def resident() -> float:
        gc.collect()
        if trim is not None:
            trim(0)
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    before = resident()
    result = SIDES[side](model, inputs)
    held = resident() - before
    del result
    return held


def worker(side: str, threads: int, repeats: int, seed: int) -> int:
    """One side, warmed up and then timed in this process; prints one JSON line."""
    if threads:
        torch.set_num_threads(threads)
    model, inputs = build_model(seed)
    first, _, groups = timed(lambda: SIDES[side](model, inputs))  # a fresh process's first call
    count = len(groups)
    del groups
    for _ in range(_WARM_UPS - 1):
        SIDES[side](model, inputs)
    times, faults = [], []
    for _ in range(repeats):  # each result is dropped before the next call, as a user would hold one
        seconds, fault_count = timed(lambda: SIDES[side](model, inputs))[:2]
        times.append(seconds)
        faults.append(fault_count)
    print(
        json.dumps(
            {
                "times": times,
                "faults": faults,
                "first": first,
                "groups": count,
                "held_mb": held_memory(side, model, inputs),
            }
        )
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20, help="timed calls per side and process (median reported)")
    parser.add_argument("--rounds", type=int, default=4, help="worker processes per side and thread count")
    parser.add_argument(
        "--threads",
        default="1,0",
        help="comma-separated torch.set_num_threads values to measure at, one after the other; 0 is "
        "torch's default (all cores). 1 is the steadiest on a small shared machine, where OpenMP "
        "threads spinning against other load swing timings",
    )
    parser.add_argument(
        "--only", choices=("isolated", "in-process"), help="run one of the two measurements (default: both)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=("r2r", "tp"), help=argparse.SUPPRESS)  # internal: one side
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.rounds < 1:
        parser.error("--repeats and --rounds must be >= 1")
    try:
        thread_counts = [int(t) for t in args.threads.split(",")]
    except ValueError:
        parser.error(f"--threads takes comma-separated integers, got {args.threads!r}")
    if any(t < 0 for t in thread_counts):
        parser.error("--threads values must be >= 0")
    if args.worker:
        if len(thread_counts) != 1:
            parser.error("a worker measures at one thread count")
        return worker(args.worker, thread_counts[0], args.repeats, args.seed)

    model, inputs = build_model(args.seed)
    print(
        f"resnet50, input 1x3x224x224, torch {torch.__version__}, torch-pruning {version('torch-pruning')}, "
        f"{os.cpu_count()} cores"
    )
    default_threads = torch.get_num_threads()
    ratios: dict[tuple[int, str], float] = {}
    for threads in thread_counts:
        torch.set_num_threads(threads or default_threads)
        count = torch.get_num_threads()
        print(f"\n== {count} torch thread(s)")
        if args.only != "in-process":
            ratios[(count, "each side in its own process")] = measure_isolated(
                count, args.repeats, args.rounds, args.seed
            )
        if args.only != "isolated":
            ratios[(count, "both sides in one process")] = measure_in_process(model, inputs, args.repeats)
    print("\nsummary, checked capture + width_groups against torch-pruning (ratio of medians):")
    for (threads, how), ratio in ratios.items():
        print(f"  {threads} thread(s), {how + ':':31s} {ratio:.2f}  -> {_verdict(ratio)} the target (<= 1)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
