"""What ``r2r-rewrite`` prints and reports: the JSON report of a run, the plan (``--plan``) and the summary.
No torch at import."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from r2r_fx.record import GrowthRecord

__all__ = ["build_report", "print_plan", "print_summary", "say"]


def say(args: argparse.Namespace, text: str) -> None:
    if not args.quiet and not args.json:
        print(text, flush=True)


def build_report(
    args: argparse.Namespace,
    name: str,
    model: nn.Module,
    grown: torch.fx.GraphModule,
    timings: dict[str, float],
    records: list[GrowthRecord],
) -> dict[str, Any]:
    report: dict[str, Any] = {
        "model": name,
        "method": args.method,
        "params_before": sum(p.numel() for p in model.parameters()),
        "params_after": sum(p.numel() for p in grown.parameters()),
        "groups": [],
        "blocks_inserted": [],
        "deepen_skipped": [],
        "verify": None,
        "dynamic_axes": None,
        "timings_s": timings,
    }
    for entry in records:
        if entry.op == "widen":
            report["groups"] = [
                {"id": g.id, "width_before": g.width_before, "width_after": g.width_after, "status": g.status,
                 "reason": g.reason, "kind": g.kind, "group_size": g.group_size}
                for g in entry.groups
            ]  # fmt: skip
        elif entry.op == "deepen":
            report["blocks_inserted"] += [
                {"at": b.at, "kind": b.kind, "module": b.module, "params": b.params, "no_grad": list(b.no_grad)}
                for b in entry.blocks
            ]
            report["deepen_skipped"] += [f"{s.at}: {s.reason}" for s in entry.skipped]
    return report


def print_plan(
    args: argparse.Namespace,
    groups: list[Any],
    points: list[Any],
    blocks: list[Any],
    estimate: dict[str, Any] | None,
    costs: dict[int, int],
) -> None:
    from r2r_fx.estimate import format_bytes

    if args.json:
        plan = {
            "groups": [
                {
                    "id": g.id,
                    "width": g.width,
                    "kind": g.kind,
                    "query_heads": g.query_heads if g.heads else None,  # grouped-query attention: width is kv heads
                    "producers": g.producers,
                    "widenable": g.widenable,
                    "reason": g.reason,
                    "integer_only": g.integer_only,  # a stream that only whole copies keep exact: why
                    "params_per_channel": costs.get(g.id, 0),  # one more channel (head) adds
                }
                for g in groups
            ],
            "insertion_points": [
                {"node": p.node, "shape": list(p.shape), "kind": p.kind, "stage": p.stage, "default": p.default}
                for p in points
            ],
            "blocks": [
                {"path": b.path, "class": b.cls, "stage": b.stage, "params": b.params, "refusal": b.refusal}
                for b in blocks
            ],
        }
        if estimate is not None:
            plan["estimate"] = {k: v for k, v in estimate.items() if k != "groups"}
        print(json.dumps(plan, indent=2))
        return
    say(args, "width groups:")
    say(args, "  (params/ch: the parameters one more channel of the group adds; for heads, one more head;")
    say(args, "   Q/Nkv: Q query heads over N key/value heads, grown by whole key/value heads)")
    say(args, f"  {'id':>4}  {'width':>6}  {'kind':9}  {'params/ch':>9}  {'status':10}  producers / reason")
    for g in groups:
        status = "widenable" if g.widenable else "frozen"
        detail = ", ".join(g.producers[:4]) + (" ..." if len(g.producers) > 4 else "")
        why = g.reason if not g.widenable else f"whole copies only: {g.integer_only}" if g.integer_only else ""
        cost = f"{costs.get(g.id, 0):>9,}"
        width = f"{g.query_heads}/{g.width}kv" if g.heads and g.group_size > 1 else str(g.width)
        line = f"  {g.id:>4}  {width:>6}  {g.kind:9}  {cost}  {status:10}  {detail}{' -- ' + why if why else ''}"
        say(args, line)
    if blocks:
        say(args, "the model's blocks (--deepen copies them; params: the cost of one more):")
        for b in blocks:
            why = f" -- {b.refusal}" if b.refusal else ""
            say(args, f"  stage {b.stage:>2}  {b.path:30s} {b.cls:24s} {b.params:>12,}{why}")
    say(args, "insertion points of the generic block (* = default, one per stage):")
    for p in points:
        say(args, f"  {'*' if p.default else ' '} {p.node:30s} {str(list(p.shape)):22s} {p.kind}")
    if estimate is not None:
        say(args, "estimate of the growth asked for:")
        for g in estimate["groups"]:
            if g.status == "widened":
                say(args, f"  group {g.id:>3}: {_change(g.width_before, g.width_after, g.kind, g.group_size)}")
        fits = "fits" if estimate["memory_needed"] <= estimate["memory_available"] else "does NOT fit (refused)"
        say(
            args,
            f"  parameters {estimate['params_before']:,} -> {estimate['params_after']:,} "
            f"({format_bytes(estimate['bytes_after'])}); "
            f"growing and checking needs ~{format_bytes(estimate['memory_needed'])}, "
            f"{format_bytes(estimate['memory_available'])} available: {fits}",
        )


def print_summary(args: argparse.Namespace, report: dict[str, Any], written: str | None, asked: dict[str, Any]) -> None:
    """The run in a few lines; ``asked``: the --widen arguments (a +N not met exactly is explained)."""
    groups = report["groups"]
    widened = [g for g in groups if g["status"] == "widened"]
    skipped = [g for g in groups if g["status"] == "skipped"]
    say(args, f"parameters      {report['params_before']:,} -> {report['params_after']:,}")
    if groups:
        say(args, f"groups widened  {len(widened)} of {len(groups)}")
        for g in widened[:20]:
            added = g["width_after"] - g["width_before"]
            note = ""
            if "extra" in asked and added != asked["extra"]:
                note = f" (asked +{asked['extra']}: channels come in pairs or whole groups)"
            change = _change(g["width_before"], g["width_after"], g["kind"], g["group_size"])
            plus = "" if g["kind"] == "heads" and g["group_size"] > 1 else f" (+{added})"
            say(args, f"  group {g['id']:>3}: {change}{plus}{note}")
        if len(widened) > 20:
            say(args, f"  ... {len(widened) - 20} more (see --report)")
        reasons: dict[str, int] = {}
        for g in skipped:
            reasons[g["reason"]] = reasons.get(g["reason"], 0) + 1
        for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:6]:
            say(args, f"  skipped x{n}: {reason}")
    if report["blocks_inserted"]:
        say(
            args,
            f"blocks inserted {len(report['blocks_inserted'])} "
            f"({', '.join(b['at'] for b in report['blocks_inserted'][:6])})",
        )
    v = report["verify"]
    if v:
        onnx = f", ONNX Runtime {v['onnx_max_rel_error']:.1e}" if v["onnx_max_rel_error"] is not None else ""
        say(args, f"relative error  PyTorch {v['max_rel_error']:.1e}{onnx} -> {'ok' if v['ok'] else 'FAILED'}")
    if written and isinstance(report.get("dynamic_axes"), list):
        say(args, f"dynamic axes    {', '.join(report['dynamic_axes']) or 'none (fixed to the example shapes)'}")
    say(args, "time (s)        " + ", ".join(f"{k} {s:.2f}" for k, s in report["timings_s"].items()))
    if written:
        say(args, f"wrote {written}" + (f" and {args.onnx}" if args.onnx else ""))


def _change(before: int, after: int, kind: str, group_size: int) -> str:
    """A group's growth in words: widths, or query and key/value heads for grouped-query attention."""
    if kind == "heads" and group_size > 1:
        return f"heads {before * group_size} -> {after * group_size} (key/value heads {before} -> {after})"
    return f"width {before} -> {after}"
