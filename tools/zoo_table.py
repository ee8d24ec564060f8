"""Sweep torchvision's classification models: capture, analyse, widen (and deepen), verify; print a table.

Usage:
    python tools/zoo_table.py                      # all 80 models, ONNX check included
    python tools/zoo_table.py --models resnet18 vit_b_16 --no-onnx
    python tools/zoo_table.py --out docs/zoo       # also writes zoo.json and zoo.md there
    python tools/zoo_table.py --no-widen --deepen-count 4 --no-onnx   # deepen alone: 4 blocks per model

Each model runs in its own subprocess (a crash or a memory blow-up is reported, not fatal) with a
time limit. Columns: graph level (module or ATen) and capture time, width groups (widened / internal / all), the main
skip reasons, widen time, relative errors in eval, train and ONNX Runtime; deepen (``block="auto"``): blocks
inserted, whether they copy the model's own blocks or are the generic block, the parameter ratio, errors.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

EXTERNAL = ("model input", "model output")


def run_one(
    name: str, onnx: bool, deepen: bool, widen: bool = True, method: str = "r2r", count: int | None = None
) -> dict[str, Any]:
    import torch

    import r2r_fx

    from torchvision_zoo import build

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    row: dict[str, Any] = {"model": name}
    model, inputs = build(name)
    row["params"] = sum(p.numel() for p in model.parameters())
    t = time.perf_counter()
    gm = r2r_fx.capture(model, inputs)
    row["capture_s"] = time.perf_counter() - t
    row["graph"] = gm.meta["r2r_graph_level"]
    t = time.perf_counter()
    groups = r2r_fx.width_groups(gm)
    row["analyze_s"] = time.perf_counter() - t
    internal = [g for g in groups if not g.reason.startswith(EXTERNAL)]
    row["groups"] = len(groups)
    row["internal"] = len(internal)
    row["widenable"] = sum(g.widenable for g in groups)
    reasons = collections.Counter(_short(g.reason) for g in internal if not g.widenable)
    row["skip_reasons"] = dict(reasons.most_common())
    row["ok"] = True
    row["method"] = method
    if widen:
        _widen_columns(row, gm, inputs, onnx, method)
    if deepen:
        _deepen_columns(row, gm, inputs, onnx, method, count)
    return row


def _widen_columns(row: dict[str, Any], gm: Any, inputs: Any, onnx: bool, method: str) -> None:
    import r2r_fx

    t = time.perf_counter()
    result = r2r_fx.WidenPass(factor=2.0, seed=0, method=method).call(gm)
    row["widen_s"] = time.perf_counter() - t
    grown = result.model
    row["widened"] = sum(g.status == "widened" for g in result.record.groups)
    row["params_widened"] = sum(p.numel() for p in grown.parameters())
    t = time.perf_counter()
    report = r2r_fx.verify(gm, grown, inputs, onnx=onnx)
    row["verify_s"] = time.perf_counter() - t
    row.update(
        rel_eval=report.eval_rel_error,
        rel_train=report.train_rel_error,
        rel_train_f64=report.train_rel_error_f64,
        train_floor=report.train_noise_floor,
        rel_onnx=report.onnx_max_rel_error,
        ok=report.ok,
        widen_ok=report.ok,
        notes=report.notes,
    )
    del grown, result


def _deepen_columns(row: dict[str, Any], gm: Any, inputs: Any, onnx: bool, method: str, count: int | None) -> None:
    import r2r_fx
    from r2r_fx.record import growth_history

    t = time.perf_counter()
    deep = r2r_fx.deepen(gm, seed=0, method=method, count=count)
    row["deepen_s"] = time.perf_counter() - t
    record = growth_history(deep)[-1]
    row["blocks"] = len(record.blocks)
    row["block_kind"] = "own" if any(b.kind.startswith("own:") for b in record.blocks) else "generic"
    row["block_skips"] = sorted({s.reason[:100] for s in record.skipped})
    row["params_deepened"] = sum(p.numel() for p in deep.parameters())
    row["deepen_params_x"] = row["params_deepened"] / max(1, sum(p.numel() for p in gm.parameters()))
    dreport = r2r_fx.verify(gm, deep, inputs, onnx=onnx, f64_fallback=True)
    row.update(
        deepen_rel_eval=dreport.eval_rel_error,
        deepen_rel_train=dreport.train_rel_error,
        deepen_rel_train_f64=dreport.train_rel_error_f64,
        deepen_rel_onnx=dreport.onnx_max_rel_error,
        deepen_ok=dreport.ok,
    )
    row["deepen_notes"] = dreport.notes
    row["ok"] = row["ok"] and dreport.ok


def _short(reason: str) -> str:
    for key in (
        "normalised over by",
        "attention",
        "unsupported op",
        "reshape",
        "concatenated and reshaped",
        "contracts activations",
        "softmax",
        "sliced",
        "indexed",
        "reduced",
        "no producer",
    ):
        if key in reason:
            if key == "unsupported op":
                return reason.split("(")[0].strip()
            return key
    return reason[:40]


def _fmt(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.1e}" if x < 0.01 else f"{x:.2f}"
    return str(x)


def markdown(rows: list[dict[str, Any]]) -> str:
    head = (
        "| model | graph | params | groups widened / internal / all | widen s | rel eval | rel train "
        "(f64; floor) | rel ONNX | blocks (params) | deepen rel (train; ONNX) | ok | main skip reasons / error |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | - | - | - | - | - | - | - | - | - | FAIL | {r['error'][:120]} |")
            continue
        reasons = ", ".join(f"{k} x{v}" for k, v in list(r.get("skip_reasons", {}).items())[:3])
        deep = f"{_fmt(r.get('deepen_rel_train'))}; {_fmt(r.get('deepen_rel_onnx'))}" if "blocks" in r else "-"
        cells = [
            r["model"],
            r["graph"],
            f"{r['params'] / 1e6:.1f}M",
            f"{_fmt(r.get('widened'))} / {r['internal']} / {r['groups']}",
            _fmt(r.get("widen_s")),
            _fmt(r.get("rel_eval")),
            _train(r),
            _fmt(r.get("rel_onnx")),
            _blocks(r),
            deep,
            "yes" if r["ok"] else "NO",
            reasons,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _blocks(r: dict[str, Any]) -> str:
    if "blocks" not in r:
        return "-"
    kind = f" {r['block_kind']}" if "block_kind" in r else ""
    ratio = f" (x{r['deepen_params_x']:.2f})" if "deepen_params_x" in r else ""
    return f"{r['blocks']}{kind}{ratio}"


def _train(r: dict[str, Any]) -> str:
    text = _fmt(r.get("rel_train"))
    if r.get("rel_train_f64") is not None:
        text += f" ({_fmt(r['rel_train_f64'])}; {_fmt(r.get('train_floor'))})"
    return text


def summary(rows: list[dict[str, Any]]) -> str:
    done = [r for r in rows if "error" not in r]
    ok = sum(bool(r.get("ok")) for r in done)
    conv = [r for r in done if not r["model"].startswith(("vit", "swin", "maxvit")) and "widened" in r]
    widened = sum(r["widened"] for r in conv)
    internal = sum(r["internal"] for r in conv)
    parts = [
        f"{len(rows)} models: {len(done)} ran, {ok} function-preserving within tolerance, "
        f"{len(rows) - len(done)} failed"
    ]
    if conv:
        parts.append(
            f"convolutional models: {widened}/{internal} internal width groups widened "
            f"({100 * widened / max(1, internal):.1f}%)"
        )
    widen_rows = [r for r in done if "rel_eval" in r]
    if widen_rows:
        worst_eval = max(r["rel_eval"] for r in widen_rows)
        onnx = [r["rel_onnx"] for r in widen_rows if r.get("rel_onnx") is not None]
        parts.append(
            f"widen: worst eval error {worst_eval:.1e}, worst ONNX Runtime error {_fmt(max(onnx, default=None))}"
            f" over {len(onnx)} models, {sum(r.get('rel_train_f64') is not None for r in widen_rows)} "
            "decided by the float64 train-mode re-check"
        )
    deep_rows = [r for r in done if "blocks" in r]
    if deep_rows:
        own = [r for r in deep_rows if r.get("block_kind") == "own"]
        parts.append(
            f"deepen: {sum(r['blocks'] for r in deep_rows)} blocks in {len(deep_rows)} models "
            f"({len(own)} with copies of their own blocks), "
            f"{sum(bool(r.get('deepen_ok')) for r in deep_rows)} preserved, worst eval error "
            f"{max(r['deepen_rel_eval'] for r in deep_rows):.1e}"
        )
    return "; ".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="*", help="model names (default: all classification models)")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime check")
    parser.add_argument("--no-deepen", action="store_true", help="skip the deepen columns")
    parser.add_argument("--no-widen", action="store_true", help="skip the widen columns")
    parser.add_argument("--method", default="r2r", help="r2r (default), net2net, netmorph or random")
    parser.add_argument(
        "--deepen-count",
        type=int,
        help="blocks deepen inserts, spread over the stages (default: one after each stage's last block)",
    )
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per model")
    parser.add_argument("--out", help="folder for zoo.json and zoo.md")
    parser.add_argument(
        "--from-json",
        nargs="+",
        metavar="ZOO_JSON",
        help="rebuild the table from earlier runs' zoo.json files (merged per model, later files "
        "adding the columns earlier ones lack) instead of running models",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        row = run_one(args.one, not args.no_onnx, not args.no_deepen, not args.no_widen, args.method, args.deepen_count)
        print(json.dumps(row))
        return 0
    from torchvision_zoo import classification_models

    if args.from_json:
        rows = _merge(args.from_json)
        _write(rows, args.out)
        return 0 if all(r.get("ok") for r in rows) else 1
    names = args.models or classification_models()
    rows = []
    for i, name in enumerate(names, 1):
        flags = {"--no-onnx": args.no_onnx, "--no-deepen": args.no_deepen, "--no-widen": args.no_widen}
        cmd = [sys.executable, __file__, "--one", name, "--method", args.method]
        cmd += ["--deepen-count", str(args.deepen_count)] if args.deepen_count else []
        cmd += [flag for flag, on in flags.items() if on]
        row = run_isolated(cmd, {"model": name}, args.timeout)
        rows.append(row)
        state = "error: " + row["error"] if "error" in row else ("ok" if row["ok"] else "NOT PRESERVED")
        print(f"[{i}/{len(names)}] {name}: {state} ({row['total_s']:.0f} s)", file=sys.stderr, flush=True)
    _write(rows, args.out)
    return 0 if all(r.get("ok") for r in rows) else 1


def run_isolated(cmd: list[str], row: dict[str, Any], timeout: float) -> dict[str, Any]:
    """The JSON row a ``--one`` subprocess prints last, or ``row`` with the error (its last stderr line, or
    the time limit); ``total_s`` either way. A crash or a memory blow-up is reported, not fatal."""
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode == 0:
            row = json.loads(proc.stdout.strip().splitlines()[-1])
        else:
            tail = [line for line in proc.stderr.strip().splitlines() if line.strip()]
            row = {**row, "error": tail[-1] if tail else f"exit code {proc.returncode}"}
    except subprocess.TimeoutExpired:
        row = {**row, "error": f"timed out after {timeout:.0f} s"}
    row["total_s"] = time.perf_counter() - t
    return row


def _merge(paths: list[str]) -> list[dict[str, Any]]:
    """Rows of several runs merged per model; later runs win key by key (re-runs replace results)."""
    merged: dict[str, dict[str, Any]] = {}
    for path in paths:
        with open(path) as f:
            for row in json.load(f):
                row = dict(row)
                if "error" not in row and "rel_eval" in row and "widen_ok" not in row:
                    row["widen_ok"] = bool(row.get("ok")) if "blocks" not in row else None
                base = merged.setdefault(row["model"], {})
                if "error" not in row:
                    base.pop("error", None)
                    if "rel_eval" in row and "blocks" in row:  # a complete re-run replaces earlier failures
                        base.pop("later_errors", None)
                elif "rel_eval" in base or "blocks" in base:
                    base.setdefault("later_errors", []).append(row.pop("error"))
                base.update(row)
    for row in merged.values():
        if "error" in row:
            row["ok"] = False
            continue
        parts = [row.get("widen_ok"), row.get("deepen_ok")]
        row["ok"] = all(p for p in parts if p is not None) and not row.get("later_errors")
    return list(merged.values())


def _write(rows: list[dict[str, Any]], out: str | None) -> None:
    table = markdown(rows)
    print(table)
    print()
    print(summary(rows))
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "zoo.json"), "w") as f:
            json.dump(rows, f, indent=1)
        with open(os.path.join(out, "zoo.md"), "w") as f:
            f.write(table + "\n\n" + summary(rows) + "\n")


if __name__ == "__main__":
    sys.exit(main())
