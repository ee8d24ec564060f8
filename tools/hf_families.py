"""Sweep HuggingFace causal-LM families from tiny configs: what grows, what is refused and why, preserved?

Usage:
    python tools/hf_families.py                          # every family in FAMILIES that transformers has
    python tools/hf_families.py --families qwen3 gemma2 --no-onnx
    python tools/hf_families.py --out docs/hf            # also writes hf.json and hf.md there

Each family runs in its own subprocess with a time limit. A model is built from the family's default
config shrunk to hidden 64, 4 query heads and 2 key/value heads (where the family has GQA), head size 16,
2 layers, MLP 128, vocabulary 128 (no download), captured, and then, each against the eager model through
``r2r_fx.verify`` (eval and train mode with dropout 0, ONNX Runtime unless ``--no-onnx``):

* per kind of width group (stream, heads, head size, MLP): how many groups are widenable of how many, the
  first refusal reason, and ``widen(factor=2)`` of that kind (errors);
* ``deepen(block="own", count=1)``: one more layer of the model's own kind (errors), or the reason not.

Runs offline; the families are measured as they come, no family-specific code.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from zoo_table import run_isolated  # noqa: E402

FAMILIES = (
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi", "phi3", "olmo", "olmo2",
    "gpt2", "gpt_neox", "gptj", "opt", "falcon", "bloom", "stablelm", "starcoder2", "granite", "cohere",
    "smollm3", "codegen",
)  # fmt: skip
KINDS = ("stream", "heads", "head_size", "channels")
SIZES = {  # standard config names (families map their own through ``attribute_map``)
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "vocab_size": 128,
    "max_position_embeddings": 64,
    "head_dim": 16,
}
EXTRA = {  # other size fields some families have, and settings that keep the check deterministic
    "ffn_dim": 128,
    "n_inner": 128,
    "word_embed_proj_dim": 64,
    "rotary_dim": 8,
    "use_cache": False,
}
DROPOUTS = ("dropout", "attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop")


def build(family: str) -> Any:
    import torch

    from torchvision_zoo import import_torchvision

    try:
        import_torchvision()  # transformers imports torchvision when it is installed: the CPU shim first
    except ImportError:
        pass
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = dict(SIZES)
    if isinstance(getattr(type(AutoConfig.for_model(family)), "head_dim", None), property):
        del sizes["head_dim"]  # derived from the others (Falcon)
    config = AutoConfig.for_model(family, **sizes)
    for name, value in EXTRA.items():
        if hasattr(config, name):
            setattr(config, name, value)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):  # ids within the small vocabulary
        if isinstance(getattr(config, name, None), int) and getattr(config, name) >= SIZES["vocab_size"]:
            setattr(config, name, 0)
    if isinstance(getattr(config, "layer_types", None), list):  # every layer full attention
        config.layer_types = ["full_attention"] * SIZES["num_hidden_layers"]
    for name in DROPOUTS:
        if isinstance(getattr(config, name, None), float):
            setattr(config, name, 0.0)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def run_one(family: str, onnx: bool) -> dict[str, Any]:
    import torch

    import r2r_fx
    from r2r_fx.record import growth_history

    torch.set_num_threads(1)
    row: dict[str, Any] = {"family": family}
    model = build(family)
    ids = torch.randint(0, SIZES["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(0))
    row["params"] = sum(p.numel() for p in model.parameters())
    t = time.perf_counter()
    gm = r2r_fx.capture(model, (ids,))
    row["capture_s"] = time.perf_counter() - t
    groups = [*r2r_fx.analyze(gm).groups, *(g for g in r2r_fx.analyze(gm, head_size=True).groups if g.head_size)]
    for kind in KINDS:
        mine = [g for g in groups if g.kind == kind and not g.reason.startswith(("model input", "model output"))]
        refused = [g.reason for g in mine if not g.widenable]
        cell: dict[str, Any] = {"widenable": sum(g.widenable for g in mine), "of": len(mine)}
        cell["reason"] = refused[0][:160] if refused else ""
        if cell["widenable"]:
            grow = functools.partial(r2r_fx.widen, gm, factor=2.0, seed=0, groups=[f"kind:{kind}"])
            cell.update(_check(r2r_fx, model, ids, onnx, grow))
        row[kind] = cell
    deep: dict[str, Any] = {}
    try:
        blocks = r2r_fx.blocks.repeated_blocks(gm)
        deep["blocks"] = len(blocks)
        deep["refusal"] = next((b.refusal for b in blocks if b.refusal), "")[:160]
        deep.update(
            _check(r2r_fx, model, ids, onnx, functools.partial(r2r_fx.deepen, gm, block="own", count=1, seed=0))
        )
        if "error" not in deep:
            deep["grown"] = not growth_history(r2r_fx.deepen(gm, block="own", count=1, seed=0))[-1].skipped
    except Exception as error:  # noqa: BLE001 - reported in the table
        deep["error"] = f"{type(error).__name__}: {str(error)[:200]}"
    row["deepen"] = deep
    return row


def _check(r2r_fx: Any, model: Any, ids: Any, onnx: bool, grow: Any) -> dict[str, Any]:
    try:
        grown = grow()
        report = r2r_fx.verify(model, grown, (ids,), onnx=onnx, f64_fallback=True)
    except Exception as error:  # noqa: BLE001 - a refusal or a failure, reported in the table
        return {"error": f"{type(error).__name__}: {str(error)[:200]}"}
    return {
        "eval": report.eval_rel_error,
        "train": report.train_rel_error,
        "onnx": report.onnx_max_rel_error,
        "ok": report.ok,
    }


def _fmt(x: Any) -> str:
    return "-" if x is None else f"{x:.1e}" if isinstance(x, float) else str(x)


def _cell(cell: dict[str, Any]) -> str:
    if not cell:
        return "-"
    text = f"{cell.get('widenable', '')}/{cell.get('of', '')}" if "of" in cell else f"{cell.get('blocks', 0)} blocks"
    if "error" in cell:
        text += f" ERROR {cell['error'][:80]}"
    elif "eval" in cell:
        text += f" ({_fmt(cell['eval'])}; {_fmt(cell.get('onnx'))}){'' if cell.get('ok') else ' NOT PRESERVED'}"
    reason = cell.get("reason") or cell.get("refusal")
    return text + (f"; refused: {reason[:70]}" if reason else "")


def markdown(rows: list[dict[str, Any]]) -> str:
    head = "| family | params | stream | heads | head size | MLP | deepen (own layer) |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['family']} | - | FAILED: {r['error'][:150]} | | | | |")
            continue
        cells = [_cell(r.get(k, {})) for k in (*KINDS, "deepen")]
        lines.append(f"| {r['family']} | {r['params'] / 1e3:.0f}k | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="*", help="model types (default: FAMILIES)")
    parser.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime check")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per family")
    parser.add_argument("--out", help="folder for hf.json and hf.md")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one, not args.no_onnx)))
        return 0
    rows = []
    for family in args.families or FAMILIES:
        cmd = [sys.executable, __file__, "--one", family] + (["--no-onnx"] if args.no_onnx else [])
        row = run_isolated(cmd, {"family": family}, args.timeout)
        rows.append(row)
        print(f"{family}: {json.dumps(row)}", file=sys.stderr, flush=True)
        _write(rows, args.out)  # after each family: a long sweep shows what it has
    print(markdown(rows))
    return 0


def _write(rows: list[dict[str, Any]], out: str | None) -> None:
    if out:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "hf.json"), "w") as f:
            json.dump(rows, f, indent=1)
        with open(os.path.join(out, "hf.md"), "w") as f:
            f.write(markdown(rows) + "\n")


if __name__ == "__main__":
    sys.exit(main())
