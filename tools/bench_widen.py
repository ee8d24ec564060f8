"""Benchmark: cost of ``r2r_fx.WidenPass(factor=2.0)`` against the floor of materialising the grown model.

For torchvision ``resnet50`` and ``vit_b_16`` (random weights, eval, one 1x3x224x224 input), captured
once with ``r2r_fx.capture``, this times in one process (one warm-up each, then ``--repeats`` timed
repetitions, alternating the two measurements; medians reported):

* **widen**: ``r2r_fx.WidenPass(factor=2.0, seed=0).call(gm)``: the whole pass (analysis, copy of the
  model, growing every parameter, fixing module attributes and shape arguments, recompile, and the
  shape-recording run of the grown model).
* **floor**: allocating and uniformly filling (``torch.rand``) one tensor per parameter of the grown
  model, with exactly its shape: ``shape_after`` from ``record.params`` for grown parameters, the
  unchanged shape for the others. No widening method can produce the grown parameters for less.

The project target is ``widen / floor <= 2``. The script also re-runs the pass's steps one by one (see
``passes/widen.py``) to show where the time goes, and with ``--profile`` prints a cProfile of one
``call`` (top 15 by cumulative time) per model.

Runs offline (random weights). Example::

    .venv/bin/python tools/bench_widen.py --repeats 3 --profile
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import os
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.fx

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torchvision_zoo import import_torchvision, randomize  # noqa: E402

tv = import_torchvision()  # the CPU shim must be loaded before anything imports torchvision

import r2r_fx  # noqa: E402
from r2r_fx.analysis import analyze  # noqa: E402
from r2r_fx.methods import get_method  # noqa: E402
from r2r_fx.passbase import copy_graph_module  # noqa: E402
from r2r_fx.passes.widen import grow_parameters, plan_new_channels  # noqa: E402
from r2r_fx.record import GrowthRecord  # noqa: E402
from r2r_fx.surgery import fix_widths, get_tensor, update_shapes  # noqa: E402

MODELS = ("resnet50", "vit_b_16")
FACTOR = 2.0


def grown_shapes(gm: torch.fx.GraphModule, record: GrowthRecord) -> dict[str, tuple[int, ...]]:
    """Every parameter of the grown model with its grown shape (unchanged ones keep theirs)."""
    after = {change.param: change.shape_after for change in record.params}
    shapes = {name: tuple(p.shape) for name, p in gm.named_parameters()}
    shapes.update({name: shape for name, shape in after.items() if name in shapes})
    return shapes


def floor(shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    """Allocate and uniformly fill one tensor per shape: the least work that yields the grown parameters."""
    return [torch.rand(shape) for shape in shapes]


def widen_steps(gm: torch.fx.GraphModule) -> dict[str, float]:
    """The steps of ``WidenPass.call``, re-run one by one in its order (uses the pass's helpers)."""
    times: dict[str, float] = {}
    clock = time.perf_counter
    t = clock()
    analysis = analyze(gm)
    times["analyze"] = clock() - t
    t = clock()
    new_channels, _ = plan_new_channels(analysis, factor=FACTOR, extra=None, groups=None)
    times["plan_new_channels"] = clock() - t
    t = clock()
    replaced = [
        get_tensor(gm, p)
        for p, axes in analysis.bound_params().items()
        if any(new_channels.get(a) for _, layout, _ in axes for a in layout.channel_sets())
    ]
    grown = copy_graph_module(gm, skip=replaced)
    times["copy_graph_module (grown params shared)"] = clock() - t
    generator = torch.Generator()
    generator.manual_seed(0)
    t = clock()
    grow_parameters(grown, analysis, new_channels, get_method("r2r"), generator)
    times["grow_parameters"] = clock() - t
    t = clock()
    fix_widths(grown, analysis, new_channels)
    times["fix_widths (+ recompile)"] = clock() - t
    t = clock()
    update_shapes(grown, analysis, new_channels)
    times["update_shapes (from layouts)"] = clock() - t
    return times


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t = time.perf_counter()
    result = fn()
    return time.perf_counter() - t, result


def bench(name: str, repeats: int, profile: bool) -> float:
    torch.manual_seed(0)
    model = tv.models.get_model(name, weights=None).eval()
    randomize(model)
    inputs = (torch.randn(1, 3, 224, 224),)
    gm = r2r_fx.capture(model, inputs)
    del model

    def run_widen() -> Any:
        return r2r_fx.WidenPass(factor=FACTOR, seed=0).call(gm)

    result = run_widen()  # warm-up; also gives the grown shapes
    shapes = grown_shapes(gm, result.record)
    grown_params = dict(result.model.named_parameters())
    mismatched = [n for n, s in shapes.items() if tuple(grown_params[n].shape) != s]
    if mismatched or len(grown_params) != len(shapes):
        raise SystemExit(f"{name}: record['params'] disagrees with the grown model on {mismatched[:5]}")
    n_before = sum(p.numel() for p in gm.parameters())
    n_after = sum(p.numel() for p in grown_params.values())
    grown_count = sum(1 for change in result.record.params if change.param in shapes)
    del result, grown_params
    shape_list = list(shapes.values())
    floor(shape_list)  # warm-up

    widen_times: list[float] = []
    floor_times: list[float] = []
    for i in range(repeats):
        order = [("widen", run_widen), ("floor", lambda: floor(shape_list))]
        if i % 2:
            order.reverse()
        for key, fn in order:
            gc.collect()
            seconds, out = timed(fn)
            del out
            (widen_times if key == "widen" else floor_times).append(seconds)

    step_runs = []
    for _ in range(repeats):
        gc.collect()
        step_runs.append(widen_steps(gm))

    w_med, f_med = statistics.median(widen_times), statistics.median(floor_times)
    ratio = w_med / f_med
    print(
        f"\n{name}: {n_before / 1e6:.1f}M -> {n_after / 1e6:.1f}M parameters "
        f"({len(shapes)} tensors, {grown_count} grown)"
    )
    print(f"  {'':36s}{'median s':>10s}{'min s':>10s}{'max s':>10s}")
    print(f"  {'widen (WidenPass.call)':36s}{w_med:10.3f}{min(widen_times):10.3f}{max(widen_times):10.3f}")
    print(f"  {'floor (alloc + uniform fill)':36s}{f_med:10.3f}{min(floor_times):10.3f}{max(floor_times):10.3f}")
    verdict = "meets" if ratio <= 2.0 else "MISSES"
    print(f"  ratio widen/floor (medians): {ratio:.2f}  -> {verdict} the target (<= 2)")
    print("  widen breakdown (steps re-run one by one, medians):")
    total = 0.0
    for key in step_runs[0]:
        med = statistics.median(run[key] for run in step_runs)
        total += med
        print(f"    {key:34s}{med:10.3f}")
    print(f"    {'sum of steps':34s}{total:10.3f}")

    if profile:
        gc.collect()
        profiler = cProfile.Profile()
        profiler.enable()
        run_widen()
        profiler.disable()
        stream = io.StringIO()
        stats = pstats.Stats(profiler, stream=stream)
        stats.sort_stats("cumulative").print_stats(15)
        print(f"  cProfile of one WidenPass.call on {name} (top 15 by cumulative time):")
        print(stream.getvalue())
    return ratio


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed repetitions per side (median reported)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="torchvision model names")
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of one widen per model")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch.set_num_threads; 0 keeps torch's default. 1 by default: on a small "
        "shared machine, OpenMP threads spinning against other load swing timings 10x",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"WidenPass(factor={FACTOR}, seed=0) vs allocate+fill floor; input 1x3x224x224, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, {args.repeats} repeats (median), "
        "1 warm-up"
    )
    ratios = {name: bench(name, args.repeats, args.profile) for name in args.models}
    print("\nsummary: " + ", ".join(f"{n} {r:.2f}x floor" for n, r in ratios.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
