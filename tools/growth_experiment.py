"""Grow a network mid-training and compare methods: the R2R paper's experiment on scikit-learn's digits.

Arms (each over several seeds): a small teacher trained with Adam, grown at a fixed step (widen 2x
or one block per stage) with r2r, net2net, netmorph or random padding and trained on, against the
final architecture trained from scratch. Per step it records the training loss, the validation
accuracy (every ``--eval-every`` steps), wall time and parameter count; the loss on a fixed probe batch
right before and after the transform shows whether the function jumped. After training, the
redundancy of the new filters of the widened stem convolution is, for each new filter, the largest
|cosine| with any other filter of the layer, averaged (1 = an exact copy survives, lower = more
diverse: the paper's figure 4 as a number).

Data: sklearn.datasets.load_digits (1797 8x8 images shipped with scikit-learn; nothing is downloaded).
Writes CSV, PNG plots and a markdown table to ``--out`` (default docs/experiment).

    python tools/growth_experiment.py            # full run, < 10 minutes on 2 CPU cores
    python tools/growth_experiment.py --quick    # one seed, few steps (CI smoke test)
"""

from __future__ import annotations

import argparse
import copy
import csv
import itertools
import os
import statistics
import sys
import time
from typing import Any

import torch
from torch import nn

import r2r_fx
from r2r_fx.record import old_positions, param_changes

METHODS = ["r2r", "net2net", "netmorph", "random"]


class SmallResNet(nn.Module):
    """Two residual stages on 8x8 digits: stem, block, downsample block, pool, head."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.block1 = nn.Sequential(
            nn.Conv2d(w, w, 3, padding=1, bias=False),
            nn.BatchNorm2d(w),
            nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1, bias=False),
            nn.BatchNorm2d(w),
        )
        self.down = nn.Sequential(nn.Conv2d(w, 2 * w, 1, stride=2, bias=False), nn.BatchNorm2d(2 * w))
        self.block2 = nn.Sequential(
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * w),
        )
        self.head = nn.Linear(2 * w, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.block1(x))
        x = torch.relu(self.down(x) + self.block2(x))
        return self.head(x.mean((2, 3)))


def load_digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits as sk_digits

    data = sk_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
    x, y = x[order], y[order]
    return x[:1400], y[:1400], x[1400:], y[1400:]


def grow(gm: torch.fx.GraphModule, kind: str, method: str, seed: int) -> torch.fx.GraphModule:
    if kind == "widen":
        return r2r_fx.widen(gm, factor=2.0, method=method, seed=seed)
    return r2r_fx.deepen(gm, method=method, seed=seed)


def reinitialise(gm: torch.fx.GraphModule, seed: int) -> torch.fx.GraphModule:
    """The same architecture with PyTorch's default initialisation: the from-scratch arm."""
    fresh = copy.deepcopy(gm)
    torch.manual_seed(seed)
    for module in fresh.modules():
        if module is not fresh and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    for name, p in fresh.named_parameters():
        if name.endswith("alpha"):
            with torch.no_grad():
                p.fill_(1.0)
    return fresh


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        acc = float((model(x).argmax(1) == y).float().mean())
    model.train()
    return acc


def new_filter_similarity(model: nn.Module) -> float | None:
    """Redundancy of the new filters of the widened stem convolution: for each new filter, the largest
    |cosine| with any other filter of the layer (old or new), averaged. 1 = an exact copy survives."""
    changes = param_changes(model)

    def rows_axis(name: str) -> Any:
        return changes[name][-1].axes.get(0)

    name = next((n for n in changes if n.startswith("stem") and n.endswith("weight") and rows_axis(n)), None)
    if name is None:
        return None
    weight = dict(model.named_parameters())[name].detach()
    is_new = torch.ones(weight.shape[0], dtype=torch.bool)
    is_new[old_positions(rows_axis(name).old_runs)] = False
    filters = nn.functional.normalize(weight.flatten(1), dim=1)
    cos = (filters[is_new] @ filters.T).abs()
    cos[torch.arange(cos.shape[0]), is_new.nonzero().flatten()] = 0.0  # a filter is not redundant with itself
    return float(cos.max(dim=1).values.mean())


def train_arm(
    arm: dict[str, Any], seed: int, data: tuple[torch.Tensor, ...], args: argparse.Namespace, rows: list[dict[str, Any]]
) -> dict[str, Any]:
    xtr, ytr, xva, yva = data
    torch.manual_seed(seed)
    teacher = SmallResNet(8).eval()
    gm = r2r_fx.capture(teacher, (xtr[:4],))
    model = reinitialise(grow(gm, arm["kind"], "r2r", seed), seed) if arm["method"] == "scratch" else gm
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    generator = torch.Generator().manual_seed(seed)
    probe = xtr[:256], ytr[:256]
    start, jump, similarity = time.perf_counter(), None, None
    loss_fn = nn.functional.cross_entropy
    for step in range(args.steps + 1):
        if step == args.transform_step and arm["method"] != "scratch":
            model.eval()
            with torch.no_grad():
                before = float(loss_fn(model(probe[0]), probe[1]))
            grown = grow(model, arm["kind"], arm["method"], seed)
            optimizer = r2r_fx.carry_optimizer(optimizer, model, grown)
            model = grown
            with torch.no_grad():
                jump = float(loss_fn(model(probe[0]), probe[1])) - before
            model.train()
        index = torch.randint(0, len(ytr), (args.batch,), generator=generator)
        optimizer.zero_grad()
        loss = loss_fn(model(xtr[index]), ytr[index])
        loss.backward()
        optimizer.step()
        row = {
            "arm": arm["name"],
            "seed": seed,
            "step": step,
            "loss": loss.item(),
            "wall_s": time.perf_counter() - start,
            "params": sum(p.numel() for p in model.parameters()),
            "val_acc": accuracy(model, xva, yva) if step % args.eval_every == 0 or step == args.steps else "",
            "transform_step": args.transform_step if arm["method"] != "scratch" else "",
        }
        rows.append(row)
    if arm["kind"] == "widen":
        similarity = new_filter_similarity(model)
    return {
        "final_acc": accuracy(model, xva, yva),
        "jump": jump,
        "similarity": similarity,
        "params": sum(p.numel() for p in model.parameters()),
    }


def plot(rows: list[dict[str, Any]], arms: list[dict[str, Any]], out: str, transform_step: int) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for kind in ("widen", "deepen"):
        names = [a["name"] for a in arms if a["kind"] == kind]
        fig, axes = plt.subplots(2, 2, figsize=(12, 8))
        for name in names:
            mine = [r for r in rows if r["arm"] == name]
            steps = sorted({r["step"] for r in mine})
            loss = [statistics.mean(r["loss"] for r in mine if r["step"] == s) for s in steps]
            wall = [statistics.mean(r["wall_s"] for r in mine if r["step"] == s) for s in steps]
            smooth = [statistics.mean(loss[max(0, i - 9) : i + 1]) for i in range(len(loss))]
            acc_steps = sorted({r["step"] for r in mine if r["val_acc"] != ""})
            acc = [
                statistics.mean(r["val_acc"] for r in mine if r["step"] == s and r["val_acc"] != "") for s in acc_steps
            ]
            acc_wall = [wall[steps.index(s)] for s in acc_steps]
            axes[0][0].plot(steps, smooth, label=name)
            axes[0][1].plot(acc_steps, acc, label=name)
            axes[1][0].plot(wall, smooth, label=name)
            axes[1][1].plot(acc_wall, acc, label=name)
        for ax, (xl, yl) in zip(
            axes.flat,
            [
                ("step", "training loss (10-step mean)"),
                ("step", "validation accuracy"),
                ("wall time (s)", "training loss (10-step mean)"),
                ("wall time (s)", "validation accuracy"),
            ],
        ):
            ax.set_xlabel(xl)
            ax.set_ylabel(yl)
            if xl == "step":
                ax.axvline(transform_step, color="grey", linestyle=":", linewidth=1)
            ax.grid(alpha=0.3)
        axes[0][1].legend(fontsize=8)
        fig.suptitle(f"{kind}: teacher grown at step {transform_step} (dotted), mean over seeds")
        fig.tight_layout()
        path = os.path.join(out, f"{kind}.png")
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def table(summary: dict[str, list[dict[str, Any]]], arms: list[dict[str, Any]]) -> str:
    def stat(values: list[float], fmt: str) -> str:
        values = [v for v in values if v is not None]
        if not values:
            return "-"
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{format(statistics.mean(values), fmt)} ± {format(spread, fmt)}"

    lines = [
        "| arm | final val accuracy (%) | loss jump at transform | new-filter redundancy (max abs cosine) | params |",
        "|---|---|---|---|---|",
    ]
    for arm in arms:
        runs = summary[arm["name"]]
        lines.append(
            f"| {arm['name']} | {stat([100 * r['final_acc'] for r in runs], '.1f')} | "
            f"{stat([r['jump'] for r in runs], '.2e')} | {stat([r['similarity'] for r in runs], '.3f')} | "
            f"{runs[0]['params']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed, 60 steps (smoke test)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "docs", "experiment"))
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.steps, args.eval_every = 1, 60, 20
    args.transform_step = args.steps // 3
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    os.makedirs(args.out, exist_ok=True)
    data = load_digits()
    arms = [
        {"name": f"{kind}/{method}", "kind": kind, "method": method}
        for kind, method in itertools.product(("widen", "deepen"), ["scratch", *METHODS])
    ]
    rows: list[dict[str, Any]] = []
    summary: dict[str, list[dict[str, Any]]] = {a["name"]: [] for a in arms}
    total, done, start = len(arms) * args.seeds, 0, time.perf_counter()
    for seed in range(args.seeds):
        for arm in arms:
            summary[arm["name"]].append(train_arm(arm, seed, data, args, rows))
            done += 1
            elapsed = time.perf_counter() - start
            print(
                f"[{done}/{total}] {arm['name']} seed {seed}: val acc {summary[arm['name']][-1]['final_acc']:.3f} "
                f"({elapsed:.0f} s elapsed, ~{elapsed / done * (total - done):.0f} s left)",
                file=sys.stderr,
                flush=True,
            )
    with open(os.path.join(args.out, "runs.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, arms, args.out, args.transform_step)
    text = table(summary, arms)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(
            f"{args.seeds} seeds, {args.steps} Adam steps (lr {args.lr}, batch {args.batch}), transform at step "
            f"{args.transform_step}; mean ± standard deviation over seeds.\n\n{text}\n"
        )
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
