"""``r2r-rewrite``: load a model, grow it (widen and/or deepen), verify it, save it and its ONNX.

Exit codes: 0 success, 1 verification failed (nothing written unless ``--force``), 2 bad usage or input.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import pickle
import sys
import tempfile
import time
import warnings
import zipfile
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["main"]

logger = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}


class UsageError(Exception):
    """Bad usage or input: exit code 2 with a one-line message."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="r2r-rewrite",
        description="Grow a PyTorch model without changing its function (R2WiderR / R2DeeperR), verify, save.",
    )
    p.add_argument("model", help="a .pt2 (torch.export.save), a .pt/.pth pickled nn.Module, or package.module:factory")
    p.add_argument("--weights", help="state_dict for a factory model (.pt/.pth, or .safetensors)")
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow loading a full-module pickle (runs code from the file: only for files you trust)",
    )
    p.add_argument(
        "--input-shape",
        action="append",
        default=[],
        metavar="[DTYPE:]D0,D1,...",
        help="example input shape, repeatable (e.g. 1,3,224,224 or int64:1,128)",
    )
    p.add_argument("--inputs", help="example inputs saved with torch.save (a tensor or a tuple/list of tensors)")
    p.add_argument("--widen", metavar="FACTOR|+N", help="widen every widenable group by FACTOR, or by +N channels")
    p.add_argument("--groups", help="comma-separated width group ids (or producer names) to widen")
    p.add_argument("--deepen", type=int, metavar="N", help="insert N residual blocks at each stage's end")
    p.add_argument("--deepen-at", action="append", default=[], metavar="NODE", help="insert after NODE (repeatable)")
    p.add_argument("--method", default="r2r", help="growth method: r2r (default), net2net, netmorph, random")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plan", action="store_true", help="print width groups and insertion points, then stop")
    p.add_argument("-o", "--output", help="output model (.pt2 or .pt); default <stem>.grown.pt2 beside the input")
    p.add_argument("--onnx", help="also write the grown model as ONNX (and verify it in onnxruntime)")
    p.add_argument("--report", help="write the JSON report here")
    p.add_argument("--no-verify", action="store_true", help="skip the function-preservation check")
    p.add_argument("--force", action="store_true", help="write outputs even if verification fails")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("--json", action="store_true", help="print the JSON report on stdout")
    return p


# ---------------------------------------------------------------- loading


def _load_model(spec: str, weights: str | None, trust: bool) -> tuple[nn.Module, tuple[Any, ...] | None, str]:
    """(model, stored example inputs or None, display name)."""
    if os.path.exists(spec) or spec.endswith((".pt2", ".pt", ".pth")):
        if not os.path.isfile(spec):
            raise UsageError(f"model file not found: {spec}")
        if weights:
            raise UsageError("--weights only applies to a package.module:factory model")
        if spec.endswith(".pt2"):
            return (*_load_pt2(spec), os.path.basename(spec))
        return _load_pickle(spec, trust), None, os.path.basename(spec)
    if ":" in spec:
        return _load_factory(spec, weights), None, spec
    raise UsageError(f"model file not found: {spec} (nor is it a package.module:factory spec)")


def _load_pt2(path: str) -> tuple[nn.Module, tuple[Any, ...] | None]:
    try:
        program = torch.export.load(path)
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"cannot read {path} as a torch.export program: {_first_line(exc)}") from exc
    from r2r_fx.capture import from_exported_program

    inputs = None
    if program.example_inputs is not None:
        args, kwargs = program.example_inputs
        inputs = tuple(args) if not kwargs else None
    return from_exported_program(program), inputs


def _load_pickle(path: str, trust: bool) -> nn.Module:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust:
            raise UsageError(
                f"{path} is a full-module pickle: loading it runs code stored in the file. Only if you trust "
                "the file, pass --trust-pickle (or save a state_dict and use package.module:factory --weights)"
            ) from exc
        obj = _load_trusted(path)
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as exc:
        raise UsageError(f"cannot read {path}: corrupt or truncated ({_first_line(exc)})") from exc
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, dict):
        raise UsageError(f"{path} holds a state_dict, not a model: use package.module:factory --weights {path}")
    raise UsageError(f"{path} holds a {type(obj).__name__}, not an nn.Module")


def _load_trusted(path: str) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"cannot unpickle {path}: {_first_line(exc)}") from exc


def _load_factory(spec: str, weights: str | None) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    try:
        factory: Callable[..., Any] = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise UsageError(f"cannot import {spec}: {_first_line(exc)}") from exc
    try:
        model = factory()
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"{spec}() failed: {_first_line(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise UsageError(f"{spec}() returned a {type(model).__name__}, not an nn.Module")
    if weights:
        state = _load_weights(weights)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise UsageError(f"{weights} does not fit {spec}: {_first_line(exc)}") from exc
    return model


def _load_weights(path: str) -> dict[str, torch.Tensor]:
    if not os.path.isfile(path):
        raise UsageError(f"weights file not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"cannot read weights {path}: {_first_line(exc)}") from exc
    if not isinstance(state, dict):
        raise UsageError(f"{path} does not hold a state_dict")
    return state


def _example_inputs(args: argparse.Namespace, stored: tuple[Any, ...] | None) -> tuple[Any, ...]:
    if args.inputs:
        if not os.path.isfile(args.inputs):
            raise UsageError(f"inputs file not found: {args.inputs}")
        try:
            obj = torch.load(args.inputs, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001
            raise UsageError(f"cannot read inputs {args.inputs}: {_first_line(exc)}") from exc
        inputs = (obj,) if isinstance(obj, torch.Tensor) else tuple(obj) if isinstance(obj, (tuple, list)) else None
        if inputs is None or not all(isinstance(t, torch.Tensor) for t in inputs):
            raise UsageError(f"{args.inputs} must hold a tensor or a tuple/list of tensors")
        return inputs
    if args.input_shape:
        return tuple(_parse_shape(s) for s in args.input_shape)
    if stored:
        return stored
    raise UsageError("no example inputs: give --input-shape (e.g. 1,3,224,224) or --inputs FILE")


def _parse_shape(text: str) -> torch.Tensor:
    dtype_name, _, dims = text.rpartition(":")
    dtype = _DTYPES.get(dtype_name or "float32")
    if dtype is None:
        raise UsageError(f"unknown dtype {dtype_name!r} in --input-shape {text}; one of {', '.join(_DTYPES)}")
    try:
        shape = [int(d) for d in dims.split(",")]
    except ValueError:
        raise UsageError(f"bad --input-shape {text!r}: expected comma-separated integers such as 1,3,224,224") from None
    if not shape or any(d <= 0 for d in shape):
        raise UsageError(f"bad --input-shape {text!r}: sizes must be positive")
    generator = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    if dtype == torch.bool:
        return torch.ones(shape, dtype=dtype)
    return torch.randint(0, 2, shape, generator=generator, dtype=dtype)


def _widen_args(text: str | None) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        if text.startswith("+"):
            return {"extra": int(text[1:])}
        return {"factor": float(text)}
    except ValueError:
        raise UsageError(f"bad --widen {text!r}: a factor such as 2.0 or +N channels") from None


def _groups_arg(text: str | None) -> list[int | str] | None:
    if not text:
        return None
    return [int(g) if g.strip().isdigit() else g.strip() for g in text.split(",") if g.strip()]


# ---------------------------------------------------------------- saving


def _default_output(spec: str) -> str:
    if os.path.isfile(spec):
        stem, _ = os.path.splitext(spec)
        return f"{stem}.grown.pt2"
    return spec.replace(":", "_").replace(".", "_") + ".grown.pt2"


def _check_output(path: str, model_spec: str) -> None:
    if os.path.exists(model_spec) and os.path.abspath(path) == os.path.abspath(model_spec):
        raise UsageError(f"output {path} is the input file: choose another -o")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"output directory does not exist: {folder}")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"output directory is not writable: {folder}")


def _atomic(path: str, write: Callable[[str], None]) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".r2r-", suffix=os.path.splitext(path)[1], dir=folder)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _save_model(grown: torch.fx.GraphModule, inputs: tuple[Any, ...], path: str, record: list[Any]) -> None:
    if path.endswith(".pt"):
        _atomic(path, lambda tmp: torch.save(grown, tmp))
        return
    dynamic = tuple({0: torch.export.Dim.AUTO} if isinstance(t, torch.Tensor) and t.dim() else None for t in inputs)
    program = torch.export.export(grown.eval(), inputs, strict=False, dynamic_shapes=dynamic)
    extra = {"r2r_record.json": json.dumps(record, default=str)}
    _atomic(path, lambda tmp: torch.export.save(program, tmp, extra_files=extra))


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # torch's own deprecation noise on deepcopy
    try:
        return _run(args)
    except UsageError as exc:
        print(f"r2r-rewrite: error: {exc}", file=sys.stderr)
        return 2


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.quiet and not args.json:
        print(text, flush=True)


def _run(args: argparse.Namespace) -> int:
    import r2r_fx
    from r2r_fx.methods import METHODS
    from r2r_fx.passbase import records_of

    if args.method not in METHODS:
        raise UsageError(f"method {args.method!r} is not available; choose one of {', '.join(sorted(METHODS))}")
    widen_kw = _widen_args(args.widen)
    groups = _groups_arg(args.groups)
    if not args.plan and widen_kw is None and args.deepen is None and not args.deepen_at:
        raise UsageError("nothing to do: give --widen, --deepen or --deepen-at (or --plan)")
    output = args.output or _default_output(args.model)
    if not args.plan:
        for path in filter(None, (output, args.onnx, args.report)):
            _check_output(path, args.model)
        if not output.endswith((".pt2", ".pt")):
            raise UsageError(f"output {output} must end in .pt2 or .pt")
    timings: dict[str, float] = {}
    t = time.perf_counter()
    model, stored, name = _load_model(args.model, args.weights, args.trust_pickle)
    inputs = _example_inputs(args, stored)
    _say(args, f"capturing {name} ...")
    try:
        gm = r2r_fx.capture(model, inputs)
    except r2r_fx.CaptureError as exc:
        raise UsageError(f"{exc}") from exc
    except Exception as exc:  # noqa: BLE001 - wrong input shape or dtype lands here
        raise UsageError(f"the model fails on the example inputs: {_first_line(exc)}") from exc
    timings["capture"] = time.perf_counter() - t
    t = time.perf_counter()
    analysis = r2r_fx.analyze(gm)
    points = r2r_fx.insertion_points(gm, analysis)
    timings["analyze"] = time.perf_counter() - t
    if args.plan:
        _print_plan(args, analysis.groups, points)
        return 0
    t = time.perf_counter()
    grown = gm
    try:
        if widen_kw is not None:
            grown = r2r_fx.widen(grown, **widen_kw, groups=groups, method=args.method, seed=args.seed)
        if args.deepen is not None or args.deepen_at:
            grown = r2r_fx.deepen(
                grown, at=args.deepen_at or None, count=args.deepen or 1, method=args.method, seed=args.seed
            )
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    timings["rewrite"] = time.perf_counter() - t
    report: dict[str, Any] = {
        "model": name,
        "method": args.method,
        "params_before": sum(p.numel() for p in model.parameters()),
        "params_after": sum(p.numel() for p in grown.parameters()),
        "groups": [],
        "blocks_inserted": [],
        "verify": None,
        "timings_s": timings,
    }
    for entry in records_of(grown):
        if entry["op"] == "widen":
            report["groups"] = [
                {k: g[k] for k in ("id", "width_before", "width_after", "status", "reason")} for g in entry["groups"]
            ]
        elif entry["op"] == "deepen":
            report["blocks_inserted"] += [
                {"at": b["at"], "kind": b["kind"], "params": b["params"]} for b in entry["blocks"]
            ]
    ok = True
    with tempfile.TemporaryDirectory() as scratch:
        onnx_tmp = os.path.join(scratch, "grown.onnx") if args.onnx else None
        if not args.no_verify:
            _say(args, "verifying (PyTorch eval/train" + (", ONNX Runtime)" if args.onnx else ") ..."))
            t = time.perf_counter()
            result = r2r_fx.verify(model, grown, inputs, onnx=bool(args.onnx), onnx_path=onnx_tmp)
            timings["verify"] = time.perf_counter() - t
            report["verify"] = {
                k: getattr(result, k)
                for k in ("max_abs_error", "max_rel_error", "onnx_max_abs_error", "onnx_max_rel_error", "ok")
            }
            report["verify"]["notes"] = result.notes
            ok = result.ok
        t = time.perf_counter()
        if ok or args.force:
            _save_model(grown, inputs, output, records_of(grown))
            if args.onnx:
                if onnx_tmp and os.path.exists(onnx_tmp):
                    _atomic(args.onnx, lambda tmp: _copy(onnx_tmp, tmp))
                else:
                    r2r_fx.export_onnx(grown, inputs, args.onnx)
        timings["export"] = time.perf_counter() - t
    if args.report:
        _atomic(args.report, lambda tmp: _write_text(tmp, json.dumps(report, indent=2, default=str)))
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        _print_summary(args, report, output if ok or args.force else None)
    if not ok:
        print(
            "r2r-rewrite: verification failed: the grown model is not function-preserving within tolerance"
            + ("; outputs written anyway (--force)" if args.force else "; nothing written (use --force)"),
            file=sys.stderr,
        )
        return 1
    return 0


def _copy(src: str, dst: str) -> None:
    with open(src, "rb") as f, open(dst, "wb") as g:
        g.write(f.read())


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as f:
        f.write(text + "\n")


def _print_plan(args: argparse.Namespace, groups: list[Any], points: list[Any]) -> None:
    if args.json:
        print(
            json.dumps(
                {
                    "groups": [
                        {
                            "id": g.id,
                            "width": g.width,
                            "producers": g.producers,
                            "widenable": g.widenable,
                            "reason": g.reason,
                        }
                        for g in groups
                    ],
                    "insertion_points": [
                        {"node": p.node, "shape": list(p.shape), "kind": p.kind, "stage": p.stage, "default": p.default}
                        for p in points
                    ],
                },
                indent=2,
            )
        )
        return
    _say(args, "width groups:")
    _say(args, f"  {'id':>4}  {'width':>6}  {'status':10}  producers / reason")
    for g in groups:
        status = "widenable" if g.widenable else "frozen"
        detail = ", ".join(g.producers[:4]) + (" ..." if len(g.producers) > 4 else "")
        _say(args, f"  {g.id:>4}  {g.width:>6}  {status:10}  {detail}{'' if g.widenable else ' -- ' + g.reason}")
    _say(args, "insertion points (* = default, one per stage):")
    for p in points:
        _say(args, f"  {'*' if p.default else ' '} {p.node:30s} {str(list(p.shape)):22s} {p.kind}")


def _print_summary(args: argparse.Namespace, report: dict[str, Any], written: str | None) -> None:
    groups = report["groups"]
    widened = [g for g in groups if g["status"] == "widened"]
    skipped = [g for g in groups if g["status"] == "skipped"]
    _say(args, f"parameters      {report['params_before']:,} -> {report['params_after']:,}")
    if groups:
        _say(args, f"groups widened  {len(widened)} of {len(groups)}")
        reasons: dict[str, int] = {}
        for g in skipped:
            reasons[g["reason"]] = reasons.get(g["reason"], 0) + 1
        for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:6]:
            _say(args, f"  skipped x{n}: {reason}")
    if report["blocks_inserted"]:
        _say(
            args,
            f"blocks inserted {len(report['blocks_inserted'])} "
            f"({', '.join(b['at'] for b in report['blocks_inserted'][:6])})",
        )
    v = report["verify"]
    if v:
        onnx = f", ONNX Runtime {v['onnx_max_rel_error']:.1e}" if v["onnx_max_rel_error"] is not None else ""
        _say(args, f"relative error  PyTorch {v['max_rel_error']:.1e}{onnx} -> {'ok' if v['ok'] else 'FAILED'}")
    _say(args, "time (s)        " + ", ".join(f"{k} {s:.2f}" for k, s in report["timings_s"].items()))
    if written:
        _say(args, f"wrote {written}" + (f" and {args.onnx}" if args.onnx else ""))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
