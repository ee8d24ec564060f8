"""Grow a network mid-training and watch the loss: does training continue from where it was?

For each task (``cnn``: a small ResNet on scikit-learn's digits with Adam; ``vit``: a pre-LN ViT on the
same digits with AdamW, a decay/no-decay split and a warm-up + cosine schedule; ``lm``: a pre-norm
character decoder on Python's own source text with AdamW and a cosine schedule; see growth_models.py;
``cnn-sgd``, not run by default: the CNN with SGD and momentum),
each method (r2r, net2net, netmorph, random) and each transform (widen 2x, deepen by one block per
stage), over several seeds: train ``--before`` steps, grow, carry the optimizer and scheduler with
``r2r_fx.carry_optimizer``, train ``--after`` more. Beside them, the ungrown control (same seed, same
batches: its own fluctuation is the reference) and the final architecture trained from scratch.

The loss is the full evaluation set's (the digits' 1400 training images; 256 fixed training windows of
text), in eval mode, every step for ``--window`` steps after the transform. Reported per arm: the loss
before growing, the change at the transform, the worst loss in the window / the loss before (mean and
worst seed), the steps until the loss is back below the loss before, the final loss and accuracy; for
widened CNNs the redundancy of the new stem filters (for each new filter the largest |cosine| with another
filter of the layer, averaged: 1 = a copy survives; the R2R paper's figure 4 as a number).

``--table2`` runs the R2R paper's Table 2 comparison instead: final validation accuracy of each widening
method against the final architecture trained from scratch, on a harder digits variant (a small training
split), more seeds.

``--carry seeded`` turns carry_optimizer's warm-up of new entries off; ``--carry zero`` also starts new
entries' optimizer state at zero (the carry-over before issue 19): the ablations.
Nothing is downloaded. Writes CSV, PNG plots and a markdown table to ``--out``.

    python tools/growth_experiment.py            # 3 tasks x 11 arms x 3 seeds, ~15 minutes on 2 cores
    python tools/growth_experiment.py --table2   # ~5 minutes
    python tools/growth_experiment.py --quick    # smoke test
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import os
import statistics
import sys
import time
from typing import Any

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from growth_models import Task, task  # noqa: E402

import r2r_fx  # noqa: E402
from r2r_fx.record import new_entry_mask, old_positions, param_changes  # noqa: E402

METHODS = ["r2r", "net2net", "netmorph", "random"]
EXACT = ["r2r", "net2net", "netmorph"]


def grow(gm: torch.fx.GraphModule, kind: str, method: str, seed: int) -> torch.fx.GraphModule:
    if kind == "widen":
        return r2r_fx.widen(gm, factor=2.0, method=method, seed=seed, check=False)
    return r2r_fx.deepen(gm, method=method, seed=seed, check=False)


def reinitialise(gm: torch.fx.GraphModule, seed: int) -> torch.fx.GraphModule:
    """The same architecture with PyTorch's default initialisation: the from-scratch arm."""
    fresh = copy.deepcopy(gm)
    torch.manual_seed(seed)
    for module in fresh.modules():
        if module is not fresh and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    with torch.no_grad():
        for name, p in fresh.named_parameters():
            if name.endswith(("cls", "pos")):
                p.normal_(0, 0.02)
    return fresh


def make_optimizer(name: str, model: nn.Module, total: int) -> tuple[torch.optim.Optimizer, Any]:
    """The task's optimizer and schedule: Adam for the CNN (SGD with momentum for cnn-sgd); AdamW with weight
    decay on matrices only and a warm-up + cosine schedule for the transformers."""
    if name == "cnn":
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    if name == "cnn-sgd":
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    lr, warm = (5e-4, 20) if name == "vit" else (3e-3, 20)
    groups = [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr)

    def schedule(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


def zero_new_state(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """``--carry zero``: new entries' state at zero and inserted parameters fresh (the old carry-over)."""
    changes = param_changes(model)
    new = {n for record in r2r_fx.record.growth_history(model) for n in record.new_params}
    for name, p in model.named_parameters():
        state = optimizer.state.get(p)
        if not state:
            continue
        if name in new:
            optimizer.state.pop(p)
        elif name in changes:
            mask = new_entry_mask(changes[name][-1])
            for value in state.values():
                if isinstance(value, torch.Tensor) and value.shape == p.shape:
                    value[mask] = 0


def full_loss(t: Task, model: nn.Module) -> float:
    model.eval()
    with torch.no_grad():
        loss = float(t.loss(model(t.eval_set[0]), t.eval_set[1]))
    model.train()
    return loss


def accuracy(t: Task, model: nn.Module) -> float | None:
    if t.val_set is None:
        return None
    model.eval()
    with torch.no_grad():
        acc = float((model(t.val_set[0]).argmax(-1) == t.val_set[1]).float().mean())
    model.train()
    return acc


def new_filter_similarity(model: nn.Module) -> tuple[float, float] | None:
    """Redundancy of the new filters of the widened stem convolution: for each new filter, the largest
    |cosine| with any other filter of the layer (old or new; 1 = a copy or a twin survives), and with the old
    filters only (1 = it copies an old feature), each averaged over the new filters."""
    changes = param_changes(model)
    stems = [n for n in changes if n.startswith("stem") and n.endswith("weight")]
    name = next((n for n in stems if 0 in changes[n][-1].axes), None)
    if name is None:
        return None
    weight = dict(model.named_parameters())[name].detach()
    is_new = torch.ones(weight.shape[0], dtype=torch.bool)
    is_new[old_positions(changes[name][-1].axes[0].old_runs)] = False
    filters = nn.functional.normalize(weight.flatten(1), dim=1)
    cos = (filters[is_new] @ filters.T).abs()
    cos[torch.arange(cos.shape[0]), is_new.nonzero().flatten()] = 0.0  # a filter is not redundant with itself
    return float(cos.max(dim=1).values.mean()), float(cos[:, ~is_new].max(dim=1).values.mean())


def train_arm(t: Task, arm: dict[str, str], seed: int, args: argparse.Namespace, rows: list[dict]) -> dict:
    """One arm, one seed: the loss curve (every step in the window after the transform, every
    ``--every`` steps elsewhere) into ``rows``; the arm's summary returned."""
    total = args.before + args.after
    torch.manual_seed(seed)
    model: nn.Module = r2r_fx.capture(t.build().eval(), (t.example,))
    method, kind = arm["method"], arm["kind"]
    if method == "scratch":
        model = reinitialise(grow(model, kind, "r2r", seed), seed)
    model.train()
    optimizer, scheduler = make_optimizer(t.name, model, total)
    generator = torch.Generator().manual_seed(seed)
    out: dict[str, Any] = {"before": None, "jump": None, "window": [], "similarity": None}
    start = time.perf_counter()
    for step in range(total + 1):
        if step == args.before:
            out["before"] = full_loss(t, model)
            if method not in ("scratch", "control"):
                grown = grow(model, kind, method, seed)
                warmup = 100 if args.carry == "default" else 0
                optimizer = r2r_fx.carry_optimizer(optimizer, model, grown, warmup=warmup)
                r2r_fx.carry_scheduler(scheduler, optimizer)
                if args.carry == "zero":
                    zero_new_state(optimizer, grown)
                model = grown.train()
        in_window = args.before <= step <= args.before + args.window
        if in_window or step % args.every == 0 or step == total:
            loss = full_loss(t, model)
            if in_window:
                out["window"].append(loss)
            rows.append({"task": t.name, "arm": arm["name"], "seed": seed, "step": step, "loss": loss})
        if step == args.before and method not in ("scratch", "control"):
            out["jump"] = out["window"][0] - out["before"]
        if step == total:
            break
        x, y = t.batch(generator, args.batch)
        optimizer.zero_grad()
        t.loss(model(x), y).backward()
        optimizer.step()
        scheduler.step()
    before = out["before"]
    window = out["window"]
    recovered = next((i for i, loss in enumerate(window) if i > 0 and loss < before), None)
    if kind == "widen" and t.name.startswith("cnn"):
        out["similarity"] = new_filter_similarity(model)
    out.update(
        worst=max(window) / before,
        recover=recovered,
        final=rows[-1]["loss"],  # measured at the last step
        acc=accuracy(t, model),
        params=sum(p.numel() for p in model.parameters()),
        seconds=time.perf_counter() - start,
    )
    return out


def arms_for(table2: bool) -> list[dict[str, str]]:
    if table2:
        return [{"name": f"widen/{m}", "kind": "widen", "method": m} for m in ["scratch", *METHODS]]
    arms = [{"name": "control", "kind": "none", "method": "control"}]
    for kind in ("widen", "deepen"):
        arms += [{"name": f"{kind}/{m}", "kind": kind, "method": m} for m in ["scratch", *METHODS]]
    return arms


def _stat(values: list[float | None], fmt: str) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{format(statistics.mean(values), fmt)} ± {format(spread, fmt)}"


def _similarity(runs: list[dict]) -> str:
    pairs = [r["similarity"] for r in runs if r["similarity"] is not None]
    if not pairs:
        return "-"
    return f"{_stat([a for a, _ in pairs], '.3f')} / {_stat([b for _, b in pairs], '.3f')}"


def table(summary: dict[tuple[str, str], list[dict]], tasks: list[str], arms: list[dict[str, str]]) -> str:
    lines = [
        "| task | arm | loss before | change at transform | worst loss in window / before (mean ± sd) "
        "| worst seed | steps to recover | final loss | final val accuracy (%) | new-filter redundancy (any / old) "
        "| params |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name in tasks:
        for arm in arms:
            runs = summary[(name, arm["name"])]
            scratch = arm["method"] == "scratch"
            recover = [r["recover"] for r in runs]
            recover_text = "-" if scratch else ", ".join(str(r) if r is not None else ">window" for r in recover)
            lines.append(
                f"| {name} | {arm['name']} | {_stat([r['before'] for r in runs], '.4f')} | "
                f"{_stat([r['jump'] for r in runs], '.1e')} | "
                f"{'-' if scratch else _stat([r['worst'] for r in runs], '.3f')} | "
                f"{'-' if scratch else format(max(r['worst'] for r in runs), '.3f')} | {recover_text} | "
                f"{_stat([r['final'] for r in runs], '.4f')} | "
                f"{_stat([None if r['acc'] is None else 100 * r['acc'] for r in runs], '.1f')} | "
                f"{_similarity(runs)} | {runs[0]['params']} |"
            )
    return "\n".join(lines)


def plot(rows: list[dict], tasks: list[str], arms: list[dict[str, str]], args: argparse.Namespace) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    kinds = sorted({a["kind"] for a in arms if a["kind"] != "none"}, reverse=True)
    fig, axes = plt.subplots(len(tasks), 2 * len(kinds), figsize=(6 * len(kinds) * 2, 3.2 * len(tasks)), squeeze=False)
    for i, name in enumerate(tasks):
        for j, kind in enumerate(kinds):
            for zoom, ax in ((False, axes[i][2 * j]), (True, axes[i][2 * j + 1])):
                for arm in arms:
                    if arm["kind"] not in (kind, "none"):
                        continue
                    mine = [r for r in rows if r["task"] == name and r["arm"] == arm["name"]]
                    steps = sorted({r["step"] for r in mine})
                    if zoom:
                        steps = [s for s in steps if args.before - 20 <= s <= args.before + args.window]
                    loss = [statistics.mean(r["loss"] for r in mine if r["step"] == s) for s in steps]
                    style = {"color": "black", "linewidth": 2} if arm["method"] == "control" else {}
                    ax.plot(steps, loss, label=arm["name"], **style)
                ax.axvline(args.before, color="grey", linestyle=":", linewidth=1)
                ax.set_yscale("log")
                ax.set_xlabel("step")
                ax.set_ylabel("full-data loss")
                ax.set_title(f"{name}, {kind}" + (": the window after growing" if zoom else ""), fontsize=9)
                ax.grid(alpha=0.3)
                if zoom:
                    ax.legend(fontsize=7)
    fig.suptitle(f"grown at step {args.before} (dotted); mean over {args.seeds} seeds; carry-over: {args.carry}")
    fig.tight_layout()
    path = os.path.join(args.out, "table2.png" if args.table2 else "loss_curves.png")
    fig.savefig(path, dpi=80)
    plt.close(fig)
    written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed, few steps (smoke test)")
    parser.add_argument("--table2", action="store_true", help="the paper's Table 2: final accuracy per method")
    parser.add_argument("--tasks", default="cnn,vit,lm", help="comma-separated: cnn, vit, lm, cnn-sgd")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--before", type=int, default=300, help="steps before growing")
    parser.add_argument("--after", type=int, default=300, help="steps after growing")
    parser.add_argument("--window", type=int, default=100, help="steps after growing with the loss every step")
    parser.add_argument("--every", type=int, default=10, help="loss every N steps outside the window")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--train", type=int, default=1400, help="digits training images (the rest validate)")
    parser.add_argument("--threads", type=int, default=max(1, min(2, os.cpu_count() or 1)))
    parser.add_argument(
        "--carry",
        choices=["default", "seeded", "zero"],
        default="default",
        help="default: carry_optimizer as it is; seeded: without its warm-up; zero: new entries' state at zero",
    )
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "docs", "experiment"))
    args = parser.parse_args(argv)
    if args.table2:
        args.tasks, args.train, args.before, args.after, args.window = "cnn", 100, 200, 600, 100
        args.seeds = max(args.seeds, 5)
    if args.quick:
        args.seeds, args.before, args.after, args.window, args.every = 1, 20, 20, 10, 5
    torch.set_num_threads(args.threads)
    os.makedirs(args.out, exist_ok=True)
    tasks = [s for s in args.tasks.split(",") if s]
    arms = arms_for(args.table2)
    rows: list[dict] = []
    summary: dict[tuple[str, str], list[dict]] = {}
    total, done, start = len(tasks) * len(arms) * args.seeds, 0, time.perf_counter()
    for name in tasks:
        t = task(name, args.train)
        for seed in range(args.seeds):
            for arm in arms:
                result = train_arm(t, arm, seed, args, rows)
                summary.setdefault((name, arm["name"]), []).append(result)
                done += 1
                elapsed = time.perf_counter() - start
                print(
                    f"[{done}/{total}] {name} {arm['name']} seed {seed}: worst/before {result['worst']:.3f}, "
                    f"final loss {result['final']:.4f} ({elapsed:.0f} s elapsed, "
                    f"~{elapsed / done * (total - done):.0f} s left)",
                    file=sys.stderr,
                    flush=True,
                )
    stem = "table2" if args.table2 else "runs"
    with open(os.path.join(args.out, f"{stem}.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, tasks, arms, args)
    text = table(summary, tasks, arms)
    header = (
        f"{args.seeds} seeds; grown after {args.before} steps, {args.after} more (batch {args.batch}, digits "
        f"training images {args.train}); window {args.window} steps; carry-over: {args.carry}; "
        "mean ± standard deviation over seeds.\n\n"
    )
    with open(os.path.join(args.out, f"{stem}.md"), "w") as f:
        f.write(header + text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
