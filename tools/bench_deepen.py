"""Benchmark: cost of deepening with the model's own blocks against the floor of materialising them.

For torchvision ``resnet50`` and ``vit_b_16`` (random weights, eval, one 1x3x224x224 input), captured
once, this times in one process (one warm-up, then ``--repeats`` timed repetitions, alternating; medians):

* **deepen**: ``r2r_fx.DeepenPass(block="own", count=4, seed=0, check=False).call(gm)``: the whole pass
  (analysis, finding the blocks, copying the model, copying and initialising the blocks, recompile and,
  as ``check=False`` asks, the one forward run that checks each copy passes its input through).
* **floor (blocks)**: allocating and uniformly filling one tensor per new parameter (the issue's target
  is ``deepen / floor <= 2``).
* **floor (model)**: the same for every parameter of the grown model: a pass that returns a model
  independent of its input copies the old parameters too, so it cannot beat this one.

Then the pass's steps one by one, to show where the time goes. Runs offline. Example::

    .venv/bin/python tools/bench_deepen.py --repeats 3
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torchvision_zoo import import_torchvision, randomize  # noqa: E402

tv = import_torchvision()  # the CPU shim must be loaded before anything imports torchvision

import r2r_fx  # noqa: E402
from r2r_fx.analysis import analyze  # noqa: E402
from r2r_fx.blocks import repeated_blocks  # noqa: E402
from r2r_fx.passbase import copy_graph_module, make_generator  # noqa: E402
from r2r_fx.passes.deepen import DeepenPass, check_identities  # noqa: E402
from r2r_fx.passes.deepen_blocks import insert_copy, plan_zero, resolve  # noqa: E402
from r2r_fx.record import growth_history  # noqa: E402

MODELS = ("resnet50", "vit_b_16")
COUNT = 4


def _time(fn: Callable[..., object], *args: object) -> float:
    gc.collect()
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def _fill(shapes: list[tuple[int, ...]]) -> None:
    for shape in shapes:
        torch.empty(shape).uniform_(-1.0, 1.0)


def _steps(gm: torch.fx.GraphModule) -> dict[str, float]:
    """The pass's steps one by one (the same calls ``DeepenPass._own_blocks`` makes)."""
    times, t = {}, time.perf_counter()
    analysis = analyze(gm)
    times["analysis"], t = time.perf_counter() - t, time.perf_counter()
    blocks = repeated_blocks(gm)
    chosen = DeepenPass(block="own", count=COUNT).choose(blocks)
    plans = {b.path: plan_zero(gm, analysis, b, True) for b in dict.fromkeys(chosen)}
    times["find blocks, plan"], t = time.perf_counter() - t, time.perf_counter()
    grown = copy_graph_module(gm)
    times["copy model"], t = time.perf_counter() - t, time.perf_counter()
    method, generator = r2r_fx.methods.get_method("r2r"), make_generator(0)
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    ends, tensors = {}, resolve(grown, analysis, list(plans.values()))
    for block in sorted(chosen, key=lambda b: order[b.output], reverse=True):
        done = insert_copy(grown, analysis, block, plans[block.path], method, "random", generator, tensors)
        ends.setdefault(block.output, done.output_node)
    grown.recompile()
    times["insert copies"], t = time.perf_counter() - t, time.perf_counter()
    check_identities(grown, ends)
    times["identity check"] = time.perf_counter() - t
    return times


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"{'model':10s} {'params':>12s} {'new':>11s} {'deepen s':>9s} {'floor blk':>9s} {'ratio':>6s} "
          f"{'floor mdl':>9s} {'ratio':>6s}")  # fmt: skip
    for name in args.models:
        model = getattr(tv.models, name)()
        randomize(model)
        gm = r2r_fx.capture(model.eval(), (torch.randn(1, 3, 224, 224),))
        pass_ = DeepenPass(block="own", count=COUNT, seed=0, check=False)
        grown = pass_.call(gm).model  # warm-up, and the shapes of the floors
        new = set(growth_history(grown)[-1].new_params)
        params = dict(grown.named_parameters())
        blocks = [tuple(params[n].shape) for n in new]
        whole = [tuple(p.shape) for p in params.values()]
        runs: dict[str, list[float]] = {"deepen": [], "blocks": [], "model": []}
        for _ in range(args.repeats):
            runs["deepen"].append(_time(pass_.call, gm))
            runs["blocks"].append(_time(_fill, blocks))
            runs["model"].append(_time(_fill, whole))
        deepen, floor_b, floor_m = (statistics.median(runs[k]) for k in ("deepen", "blocks", "model"))
        total = sum(p.numel() for p in params.values())
        added = sum(params[n].numel() for n in new)
        print(f"{name:10s} {total:>12,} {added:>11,} {deepen:>9.2f} {floor_b:>9.3f} {deepen / floor_b:>6.1f} "
              f"{floor_m:>9.3f} {deepen / floor_m:>6.1f}")  # fmt: skip
        steps = _steps(gm)
        print("   steps: " + ", ".join(f"{k} {v:.2f}s" for k, v in steps.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
