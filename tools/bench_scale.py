"""Benchmark: big models on one machine. Each measurement runs in its own process (its peak resident memory
is the process's own, read from ``getrusage``); nothing is downloaded (HF Llama configs, random weights).

* ``plan``: a 7B and a 70B Llama config (hidden 4096 / 8192, 32 / 80 layers, 32 / 64 heads, 32 / 8 kv
  heads) built on the meta device, captured, analysed, insertion points listed and ``--widen 2`` estimated:
  no weight is allocated. Targets: under a minute and under 2 GB each.
* ``grow``: a Llama of about 1.1B parameters (hidden 2048, 22 layers, intermediate 5632, 32 heads, 4 kv
  heads, vocabulary 32000), random bfloat16 weights: capture, widen the MLP x1.5 and the hidden size to
  2560, deepen by 2 layers, check in PyTorch, save the grown state_dict. Printed: time and peak memory per
  phase, against the floor (allocating and filling the grown parameters once, plus one forward of each
  model, timed in the same process) and the memory target (1.1 x the original's and the grown model's
  parameters, plus one forward's activations, plus the interpreter and torch as measured before building).

    .venv/bin/python tools/bench_scale.py            # both, ~5 minutes on 2 cores, ~12 GB
    .venv/bin/python tools/bench_scale.py plan
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ZOO = os.path.join(os.path.dirname(ROOT), "shared", "zoo")

_PRELUDE = f"""
import json, os, resource, sys, time
sys.path[:0] = [{ZOO!r}, {os.path.join(ROOT, "tools")!r}]
try:
    import torchvision_cpu_ops  # noqa: F401 - transformers imports torchvision; its CUDA wheel needs the CPU ops
except ImportError:
    pass
import torch
from transformers import LlamaConfig, LlamaForCausalLM
import r2r_fx
from r2r_fx.estimate import estimate_growth

def peak_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

out = {{}}
def phase(name, start):
    out[name] = {{"seconds": round(time.perf_counter() - start, 2), "peak_gb": round(peak_gb(), 2)}}
    print(name, out[name], file=sys.stderr, flush=True)
    return time.perf_counter()
"""

_PLAN = """
layers, hidden, inter, heads, kv = {shape}
config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                     num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096, use_cache=False)
t = time.perf_counter()
with torch.device("meta"):
    model = LlamaForCausalLM(config).eval()
t = phase("build on meta", t)
gm = r2r_fx.capture(model, (torch.zeros(2, 16, dtype=torch.long),))
t = phase("capture", t)
analysis = r2r_fx.analyze(gm)
points = r2r_fx.insertion_points(gm, analysis)
estimate = estimate_growth(gm, analysis, {{"factor": 2.0}}, None, "r2r", None, points)
t = phase("analyse + plan", t)
out["groups"] = len(analysis.groups)
out["widened"] = estimate["widened"]
out["params"] = [estimate["params_before"], estimate["params_after"]]
out["real_bytes_allocated"] = sum(p.numel() * p.element_size() for p in gm.parameters() if not p.is_meta)
print(json.dumps(out))
"""

_GROW = """
torch.set_num_threads(max(1, os.cpu_count() or 1))
base = peak_gb()
config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                     num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048, use_cache=False)
t = time.perf_counter()
torch.manual_seed(0)
torch.set_default_dtype(torch.bfloat16)  # built in bfloat16: no float32 copy on the way
model = LlamaForCausalLM(config).eval()
torch.set_default_dtype(torch.float32)
ids = torch.randint(0, 32000, (1, 32))
t = phase("build (random bfloat16)", t)
gm = r2r_fx.capture(model, (ids,))
t = phase("capture", t)
analysis = r2r_fx.analyze(gm)
sizes = {g.id: 8448 for g in analysis.groups if g.kind == "channels" and g.width == 5632 and g.widenable}
sizes["kind:stream"] = 2560
grown = r2r_fx.widen(gm, sizes=sizes, check=False)
t = phase("widen (MLP x1.5, hidden 2560)", t)
grown = r2r_fx.deepen(grown, count=2, check=False)
t = phase("deepen (+2 layers)", t)
report = r2r_fx.verify(model, grown, (ids,), onnx=False, train=False)
out["check"] = {"ok": report.ok, "rel_error": report.max_rel_error, "notes": report.notes}
t = phase("check (PyTorch, eval)", t)
with tempfile.TemporaryDirectory() as folder:
    torch.save(grown.state_dict(), os.path.join(folder, "grown.pt"))
t = phase("save (state_dict)", t)
old_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
new_bytes = sum(p.numel() * p.element_size() for p in grown.parameters())
out["params"] = [sum(p.numel() for p in model.parameters()), sum(p.numel() for p in grown.parameters())]
out["bytes_gb"] = [round(old_bytes / 2**30, 2), round(new_bytes / 2**30, 2)]
out["base_gb"] = round(base, 2)
# the floor: the grown parameters allocated and filled once, one forward of each model
start = time.perf_counter()
filled = [torch.empty(p.shape, dtype=p.dtype).uniform_() for p in grown.parameters()]
del filled
with torch.no_grad():
    model(ids)
    grown(ids)
out["floor_seconds"] = round(time.perf_counter() - start, 2)
print(json.dumps(out))
"""


def _child(code: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    sys.stderr.write(done.stderr[-3000:] if done.returncode else "")
    if done.returncode:
        raise SystemExit(f"the measurement failed (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _phases(result: dict) -> list[tuple[str, dict]]:
    return [(k, v) for k, v in result.items() if isinstance(v, dict) and "seconds" in v]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="?", choices=["all", "plan", "grow"], default="all")
    args = parser.parse_args(argv)
    if args.what in ("all", "plan"):
        for name, shape in (("7B", (32, 4096, 11008, 32, 32)), ("70B", (80, 8192, 28672, 64, 8))):
            result = _child(_PRELUDE + _PLAN.format(shape=shape))
            total = sum(v["seconds"] for _, v in _phases(result))
            peak = max(v["peak_gb"] for _, v in _phases(result))
            before, after = result["params"]
            print(
                f"plan {name}: {before / 1e9:.1f}B -> {after / 1e9:.1f}B parameters with --widen 2, "
                f"{result['widened']} of {result['groups']} groups widened; {total:.1f} s (target < 60), "
                f"peak {peak:.2f} GB (target < 2), real weight bytes allocated {result['real_bytes_allocated']}"
            )
    if args.what in ("all", "grow"):
        result = _child(_PRELUDE + "import tempfile\n" + _GROW)
        for name, v in _phases(result):
            print(f"grow 1.1B: {name:32s} {v['seconds']:7.1f} s   peak {v['peak_gb']:6.2f} GB")
        old_gb, new_gb = result["bytes_gb"]
        total = sum(v["seconds"] for name, v in _phases(result) if not name.startswith(("build", "save")))
        peak = max(v["peak_gb"] for _, v in _phases(result))
        budget = 1.1 * (old_gb + new_gb) + result["base_gb"]
        print(f"grow 1.1B: parameters {result['params'][0]:,} -> {result['params'][1]:,} ({old_gb} -> {new_gb} GB)")
        print(f"grow 1.1B: check {result['check']}")
        print(
            f"grow 1.1B: capture..check {total:.1f} s against the floor's {result['floor_seconds']:.1f} s: "
            f"x{total / result['floor_seconds']:.1f} (target <= 2)"
        )
        print(
            f"grow 1.1B: peak {peak:.2f} GB against 1.1 x (original + grown) + the interpreter "
            f"({result['base_gb']} GB) = {budget:.2f} GB: x{peak / budget:.2f} (target <= 1, plus activations)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
