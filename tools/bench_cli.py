"""Benchmark: ``r2r-rewrite`` against a naive script doing the same job with public torch APIs.

For each case, in one run (fresh processes, alternating, ``--repeats`` times; medians reported):

* **cli**: ``r2r-rewrite MODEL --widen 2 [--deepen 1] --onnx OUT.onnx -o OUT.pt2``.
* **naive**: what a person would write for the same outputs without r2r_fx: import torch and onnxruntime,
  load the model (``torch.export.load`` of the ``.pt2``, or build it from its factory and
  ``torch.export.export`` it), load the grown model the CLI wrote (a stand-in for growing it, which has no
  public API), run the eval and train forwards of both, export the grown program to ONNX once, run it in
  ONNX Runtime once, and save it as a ``.pt2``. It checks nothing and grows nothing: the floor.

Cases: the README's bundled example (``examples/small_resnet.pt2 --widen 2 --deepen 1``), torchvision
``resnet50`` (``--widen 2``, random weights, one 1x3x224x224 input; needs torchvision) and a tiny HuggingFace
Llama (``--widen 2``; needs transformers). Also timed: ``r2r-rewrite --help`` and an argument error.
The target is ``cli / naive <= 1.0`` on every case and <= 0.5 s for ``--help`` and argument errors.

    .venv/bin/python tools/bench_cli.py --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")
ZOO = os.path.join(os.path.dirname(ROOT), "shared", "zoo")

# factories for the CLI's package.module:factory (the torchvision shim is imported first, as the README says)
_MODELS = """
import os, sys
import torch

def _torchvision():
    for folder in {paths!r}:
        if folder not in sys.path:
            sys.path.insert(0, folder)
    try:
        import torchvision_cpu_ops  # noqa: F401 - the CPU ops torchvision's CUDA wheel lacks
    except ImportError:
        pass
    import torchvision
    return torchvision

def resnet50():
    torch.manual_seed(0)
    return _torchvision().models.resnet50().eval()

def tiny_llama():
    _torchvision()  # transformers imports torchvision when it is installed
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64, use_cache=False)
    return LlamaForCausalLM(config).eval()
"""

_NAIVE = """
import sys, importlib
import torch
import onnxruntime

source, inputs_file, grown_file, onnx_out, pt2_out = sys.argv[1:6]
if source.endswith(".pt2"):
    program = torch.export.load(source)
    model = program.module()
    inputs = program.example_inputs[0]
else:
    module, factory = source.split(":")
    inputs = tuple(torch.load(inputs_file))
    model = torch.export.export(getattr(importlib.import_module(module), factory)(), inputs).module()
grown_program = torch.export.load(grown_file)
grown = grown_program.module()
with torch.no_grad():
    for m in (model, grown):
        for _ in range(2):  # eval and train: an exported program's module refuses train(), so eval twice
            m(*inputs)
torch.onnx.export(grown_program, (), onnx_out, dynamo=True)  # from the program in hand
session = onnxruntime.InferenceSession(onnx_out, providers=["CPUExecutionProvider"])
feeds = {{i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}}
session.run(None, feeds)
torch.export.save(grown_program, pt2_out)
"""


def _timed(cmd: list[str], env: dict[str, str], code: int = 0) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != code:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return seconds


def _cases(folder: str, only: list[str]) -> list[tuple[str, str, str | None, list[str]]]:
    """(name, model spec, inputs file or None, growth flags) for the cases whose packages are installed."""
    import torch

    sys.path[:0] = [folder]
    import bench_models

    cases = [("example", os.path.join(ROOT, "examples", "small_resnet.pt2"), None, ["--widen", "2", "--deepen", "1"])]
    for name, inputs in (
        ("resnet50", (torch.randn(1, 3, 224, 224),)),
        ("tiny_llama", (torch.randint(0, 256, (1, 16)),)),
    ):
        try:
            getattr(bench_models, name)()
        except Exception as exc:  # noqa: BLE001 - torchvision or transformers missing: say so, go on
            print(f"{name}: skipped ({type(exc).__name__}: {exc})", file=sys.stderr)
            continue
        path = os.path.join(folder, f"{name}_inputs.pt")
        torch.save(inputs, path)
        cases.append((name, f"bench_models:{name}", path, ["--widen", "2"]))
    return [c for c in cases if not only or c[0] in only]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cases", default="", help="comma-separated subset: example, resnet50, tiny_llama")
    args = parser.parse_args(argv)
    cli = [sys.executable, "-m", "r2r_fx"]
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "bench_models.py"), "w") as f:
            f.write(textwrap.dedent(_MODELS.format(paths=[ZOO, TOOLS])))
        naive = os.path.join(folder, "naive.py")
        with open(naive, "w") as f:
            f.write(_NAIVE.format())
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([folder, ROOT, os.environ.get("PYTHONPATH", "")])}
        for what, cmd, code in (
            ("--help", [*cli, "--help"], 0),
            ("argument error", [*cli, "model.pt2", "--widen", "bogus"], 2),
        ):
            times = [_timed(cmd, env, code) for _ in range(args.repeats)]
            rows.append((what, statistics.median(times), None))
        for name, spec, inputs, flags in _cases(folder, [c for c in args.cases.split(",") if c]):
            out = os.path.join(folder, name)
            run = [*cli, spec, *flags, "--onnx", f"{out}.grown.onnx", "-o", f"{out}.grown.pt2", "--quiet"]
            run += ["--inputs", inputs] if inputs else []
            _timed(run, env)  # the grown .pt2 the naive script loads; warms the file cache
            naive_cmd = [sys.executable, naive, spec, inputs or "", f"{out}.grown.pt2", f"{out}.n.onnx", f"{out}.n.pt2"]
            cli_times, naive_times = [], []
            for _ in range(args.repeats):
                cli_times.append(_timed(run, env))
                naive_times.append(_timed(naive_cmd, env))
            rows.append((name, statistics.median(cli_times), statistics.median(naive_times)))
            print(f"{name}: cli {cli_times}, naive {naive_times}", file=sys.stderr, flush=True)
    print(f"{'case':<16} {'cli (s)':>8} {'naive (s)':>10} {'cli / naive':>12}")
    for name, cli_s, naive_s in rows:
        if naive_s is None:
            print(f"{name:<16} {cli_s:8.2f} {'-':>10} {'target <= 0.5 s':>16}")
        else:
            print(f"{name:<16} {cli_s:8.2f} {naive_s:10.2f} {cli_s / naive_s:12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
