"""Benchmark: r2r_fx width-group analysis against Torch-Pruning's dependency graph, on resnet50.

What is measured, on torchvision ``resnet50(weights=None).eval()`` with one ``torch.randn(1, 3, 224, 224)``
input, all in one process (each side warmed up once, then ``--repeats`` timed repetitions with the two
sides alternating so that background load hits both alike; medians are reported):

* **r2r_fx**: ``r2r_fx.capture(model, inputs)`` followed by ``r2r_fx.width_groups(gm)``, i.e. everything a
  user pays to get from an eager model to its width groups.
* **Torch-Pruning**: ``tp.DependencyGraph().build_dependency(model, example_inputs=inputs)`` followed by
  ``list(DG.get_all_groups())`` (the channel groups rooted at every Conv/Linear).

The project target is ``r2r / tp <= 1``. The script also times the pieces ``capture`` is made of (see
``r2r_fx/capture.py``) by re-running them one by one: the deep copy and eager forward that give the
reference output (on the model itself,
modes restored), the deep copy handed to the tracer, ``torch.fx.symbolic_trace`` (plus the ``recompile``
capture does after it), ``record_shapes`` (the ShapeProp run that validates the graph and stores
shapes), the output comparison, and ``r2r_fx.analysis.Analysis`` (the width-group analysis proper). As
yardsticks it times one eager forward without and with autograd (Torch-Pruning traces with autograd).

Runs offline (random weights). Example::

    .venv/bin/python tools/bench_analysis.py --repeats 7
"""

from __future__ import annotations

import argparse
import copy
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
from r2r_fx.capture import record_shapes  # noqa: E402
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
    with torch.no_grad():
        reference = model.eval()(*inputs)
    times["eager forward (reference)"] = clock() - t
    t = clock()
    traced = copy.deepcopy(model).eval()
    times["deepcopy (to trace)"] = clock() - t
    t = clock()
    gm = torch.fx.symbolic_trace(traced)
    for node in gm.graph.nodes:
        if isinstance(node.type, str):
            node.type = None
    gm.recompile()
    times["symbolic_trace + recompile"] = clock() - t
    t = clock()
    record_shapes(gm, inputs, meta=True)
    times["record_shapes on meta (check=False)"] = clock() - t
    t = clock()
    output = record_shapes(gm, inputs)
    times["record_shapes (ShapeProp run)"] = clock() - t
    t = clock()
    max_errors(reference, output)
    times["compare with eager"] = clock() - t
    t = clock()
    Analysis(gm)
    times["Analysis (width groups)"] = clock() - t
    return times


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per side (median reported)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads; 0 keeps torch's default. 1 by default: on a small "
        "shared machine, OpenMP threads spinning against other load swing timings 10x",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    model = tv.models.resnet50(weights=None).eval()
    inputs = (torch.randn(1, 3, 224, 224),)
    print(
        f"resnet50, input 1x3x224x224, torch {torch.__version__}, "
        f"torch-pruning {version('torch-pruning')}, {torch.get_num_threads()} threads, "
        f"{args.repeats} repeats (median), 1 warm-up"
    )

    # Warm-up: first calls pay for lazy imports, kernel selection and allocator growth.
    r2r_groups = run_r2r(model, inputs)
    tp_groups = run_tp(model, inputs)
    r2r_steps(model, inputs)
    yardsticks(model, inputs)

    run_r2r_unchecked(model, inputs)
    r2r_times: list[float] = []
    tp_times: list[float] = []
    fast_times: list[float] = []
    for i in range(args.repeats):
        order = [("r2r", run_r2r), ("tp", run_tp), ("fast", run_r2r_unchecked)]
        if i % 2:
            order.reverse()
        for name, fn in order:
            seconds, groups = timed(lambda fn=fn: fn(model, inputs))
            {"r2r": r2r_times, "tp": tp_times, "fast": fast_times}[name].append(seconds)
            if name == "r2r":
                r2r_groups = groups
            elif name == "tp":
                tp_groups = groups

    step_runs = [r2r_steps(model, inputs) for _ in range(args.repeats)]
    yard_runs = [yardsticks(model, inputs) for _ in range(args.repeats)]

    r2r_med, tp_med = statistics.median(r2r_times), statistics.median(tp_times)
    widenable = sum(1 for g in r2r_groups if g.widenable)
    print()
    print(f"{'':34s}{'median s':>10s}{'min s':>10s}{'max s':>10s}  groups")
    print(
        f"{'r2r_fx capture + width_groups':34s}{r2r_med:10.3f}{min(r2r_times):10.3f}{max(r2r_times):10.3f}"
        f"  {len(r2r_groups)} ({widenable} widenable)"
    )
    print(
        f"{'torch-pruning DG + get_all_groups':34s}{tp_med:10.3f}{min(tp_times):10.3f}{max(tp_times):10.3f}"
        f"  {len(tp_groups)}"
    )
    fast_med = statistics.median(fast_times)
    print(
        f"{'r2r_fx capture(check=False) + groups':34s}{fast_med:10.3f}{min(fast_times):10.3f}"
        f"{max(fast_times):10.3f}  (no eager comparison, meta-device shapes)"
    )
    ratio = r2r_med / tp_med
    verdict = "meets" if ratio <= 1.0 else "MISSES"
    print(f"ratio r2r/tp (medians), checked capture: {ratio:.2f}  -> {verdict} the target (<= 1)")
    fast_ratio = fast_med / tp_med
    verdict = "meets" if fast_ratio <= 1.0 else "MISSES"
    print(f"ratio r2r/tp (medians), check=False:     {fast_ratio:.2f}  -> {verdict} the target (<= 1)")

    print()
    print("r2r_fx breakdown (steps re-run one by one, medians):")
    total = 0.0
    for key in step_runs[0]:
        med = statistics.median(run[key] for run in step_runs)
        total += med
        print(f"  {key:34s}{med:10.3f}")
    print(f"  {'sum of steps (both record_shapes)':34s}{total:10.3f}")
    print("yardsticks (medians):")
    for key in yard_runs[0]:
        print(f"  {key:34s}{statistics.median(run[key] for run in yard_runs):10.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
