"""Benchmark: r2r_fx width-group analysis against Torch-Pruning's dependency graph, on resnet50.

What is measured, on torchvision ``resnet50(weights=None).eval()`` with one ``torch.randn(1, 3, 224, 224)``
input, all in one process (each side warmed up three times, then ``--repeats`` timed repetitions with
the two sides alternating so that background load hits both alike; medians are reported, and the
median of the per-repetition ratios, whose two sides ran back to back under the same load):

* **r2r_fx**: ``r2r_fx.capture(model, inputs)`` followed by ``r2r_fx.width_groups(gm)``, i.e. everything a
  user pays to get from an eager model to its width groups.
* **Torch-Pruning**: ``tp.DependencyGraph().build_dependency(model, example_inputs=inputs)`` followed by
  ``list(DG.get_all_groups())`` (the channel groups rooted at every Conv/Linear).

The project target is ``r2r / tp <= 1``. The script also times the pieces ``capture`` is made of (see
``r2r_fx/capture.py``) by re-running them one by one: symbolic tracing (capture's ``torch.fx.Tracer``
subclass, then the GraphModule with its generated code), the joint run of the eager model and the graph that checks
the graph and records shapes (``r2r_fx/instep.py``: each layer computes once, the glue between layers
twice), the output comparison, and ``r2r_fx.analysis.Analysis`` (the width-group analysis proper);
and Torch-Pruning's two calls one by one. As yardsticks it times one eager forward without and with
autograd (Torch-Pruning traces with autograd).

Runs offline (random weights). Example::

    .venv/bin/python tools/bench_analysis.py --repeats 21 --threads 1,0
"""

from __future__ import annotations

import argparse
import os
import statistics
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


def yardsticks(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> dict[str, float]:
    times: dict[str, float] = {}
    t = time.perf_counter()
    with torch.no_grad():
        model(*inputs)
    times["eager forward, no_grad"] = time.perf_counter() - t
    t = time.perf_counter()
    model(*inputs)
    times["eager forward, autograd"] = time.perf_counter() - t
    return times


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    result = fn()
    return time.perf_counter() - t, result


_WARM_UPS = 3


def measure(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], repeats: int) -> float:
    """One side-by-side measurement at the current thread count; prints its table, returns r2r/tp."""
    print(f"\n== {torch.get_num_threads()} torch thread(s), {repeats} repeats (median), {_WARM_UPS} warm-ups")
    # Warm-up: first calls pay for lazy imports, kernel selection and allocator growth. One round is
    # not enough here: right after start-up Torch-Pruning's autograd run stays slow for a few calls.
    for _ in range(_WARM_UPS):
        groups = {"r2r": run_r2r(model, inputs), "tp": run_tp(model, inputs), "fast": run_r2r_unchecked(model, inputs)}
        r2r_steps(model, inputs)
        tp_steps(model, inputs)
        yardsticks(model, inputs)

    sides = {"r2r": run_r2r, "tp": run_tp, "fast": run_r2r_unchecked}
    times: dict[str, list[float]] = {name: [] for name in sides}
    for i in range(repeats):
        order = list(sides) if i % 2 == 0 else list(reversed(sides))
        for name in order:
            seconds, groups[name] = timed(lambda fn=sides[name]: fn(model, inputs))
            times[name].append(seconds)
    step_runs = [r2r_steps(model, inputs) for _ in range(repeats)]
    tp_runs = [tp_steps(model, inputs) for _ in range(repeats)]
    yard_runs = [yardsticks(model, inputs) for _ in range(repeats)]

    med = {name: statistics.median(ts) for name, ts in times.items()}
    widenable = sum(1 for g in groups["r2r"] if g.widenable)
    labels = {
        "r2r": ("r2r_fx capture + width_groups", f"{len(groups['r2r'])} ({widenable} widenable)"),
        "tp": ("torch-pruning DG + get_all_groups", f"{len(groups['tp'])}"),
        "fast": ("r2r_fx capture(check=False) + groups", "(no eager comparison, meta-device shapes)"),
    }
    print(f"{'':38s}{'median s':>10s}{'min s':>10s}{'max s':>10s}  groups")
    for name, (label, note) in labels.items():
        ts = times[name]
        print(f"{label:38s}{med[name]:10.3f}{min(ts):10.3f}{max(ts):10.3f}  {note}")
    ratio = med["r2r"] / med["tp"]
    for name, label in (("r2r", "checked capture"), ("fast", "check=False")):
        value = med[name] / med["tp"]
        print(f"ratio r2r/tp (medians), {label + ':':16s} {value:.2f}  -> {_verdict(value)} the target (<= 1)")
    # Each repetition times the sides back to back, so the ratio within a repetition shares its load.
    paired = sorted(r / t for r, t in zip(times["r2r"], times["tp"]))
    below = sum(1 for x in paired if x <= 1.0)
    print(
        f"paired ratios r2r/tp, checked capture:   median {statistics.median(paired):.2f}, "
        f"quartiles {paired[len(paired) // 4]:.2f}-{paired[(3 * len(paired)) // 4]:.2f}, "
        f"<= 1 in {below} of {len(paired)} repetitions"
    )

    print("r2r_fx breakdown (steps re-run one by one, medians):")
    for key in step_runs[0]:
        print(f"  {key:36s}{statistics.median(run[key] for run in step_runs):10.3f}")
    print("torch-pruning breakdown (medians):")
    for key in tp_runs[0]:
        print(f"  {key:36s}{statistics.median(run[key] for run in tp_runs):10.3f}")
    print("yardsticks (medians):")
    for key in yard_runs[0]:
        print(f"  {key:36s}{statistics.median(run[key] for run in yard_runs):10.3f}")
    return ratio


def _verdict(ratio: float) -> str:
    return "meets" if ratio <= 1.0 else "MISSES"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=21, help="timed repetitions per side (median reported)")
    parser.add_argument(
        "--threads",
        default="1,0",
        help="comma-separated torch.set_num_threads values to measure at, one after the other; 0 is "
        "torch's default (all cores). 1 is the steadiest on a small shared machine, where OpenMP "
        "threads spinning against other load swing timings",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    try:
        thread_counts = [int(t) for t in args.threads.split(",")]
    except ValueError:
        parser.error(f"--threads takes comma-separated integers, got {args.threads!r}")
    if any(t < 0 for t in thread_counts):
        parser.error("--threads values must be >= 0")

    torch.manual_seed(args.seed)
    model = tv.models.resnet50(weights=None).eval()
    inputs = (torch.randn(1, 3, 224, 224),)
    print(
        f"resnet50, input 1x3x224x224, torch {torch.__version__}, torch-pruning {version('torch-pruning')}, "
        f"{os.cpu_count()} cores"
    )
    default_threads = torch.get_num_threads()
    ratios = {}
    for threads in thread_counts:
        torch.set_num_threads(threads or default_threads)
        ratios[torch.get_num_threads()] = measure(model, inputs, args.repeats)
    print("\nsummary, checked capture + width_groups against torch-pruning:")
    for threads, ratio in ratios.items():
        print(f"  {threads} thread(s): {ratio:.2f}  -> {_verdict(ratio)} the target (<= 1)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
