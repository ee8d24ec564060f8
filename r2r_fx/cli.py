"""``r2r-rewrite``: load a model, grow it (widen and/or deepen), verify it, save it and its ONNX.

Exit codes: 0 success, 1 not function-preserving (the model is not written unless ``--force``), 2 bad usage or
input (also a refused no-op, a model too big for the machine, an unwritable destination), 3 internal
error (a bug: ``--debug`` shows the traceback), 130 / 143 interrupted by SIGINT / SIGTERM.

Trust model: model files come from strangers. Nothing in them is unpickled as arbitrary objects and
no code stored in them runs unless ``--trust-pickle`` is given; ``package.module:factory`` imports
code the user names on purpose.

This module is the command itself: its arguments, the run, and what it prints. The rest lives in
``loading`` (reading the user's files without running their code), ``outputs`` (checking, staging and
writing the outputs atomically, signals and temporary files), ``estimate`` (the memory a growth needs)
and ``cli_errors`` (``UsageError``).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import logging
import math
import os
import signal
import sys
import time
import traceback
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from r2r_fx.cli_errors import UsageError, first_line, one_line
from r2r_fx.cli_report import build_report, print_plan, print_summary, say
from r2r_fx.input_files import check_input_files
from r2r_fx.outputs import (
    Interrupted,
    Staged,
    check_outputs,
    default_output,
    install_signal_handlers,
    interrupted_outputs,
    raise_if_interrupted,
    remove_temps,
    reset_written,
    restore_signal_handlers,
    scratch_folder,
    stage_onnx,
    write_text,
)
from r2r_fx.progress import Progress

if TYPE_CHECKING:  # torch is imported once the arguments and paths are known to be good
    import torch
    from torch import nn


__all__ = ["main"]

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_NOT_PRESERVED, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3

_PROG = "r2r-rewrite"
BUILT_IN_METHODS = ("r2r", "net2net", "netmorph", "random")  # r2r_fx.methods.METHODS's own, known without torch
_STDERR: list[Any] = []  # the real stderr while the libraries' is silenced


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block) and no ``sys.exit`` from inside ``main``."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{_PROG}: error: {message} (see --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=_PROG,
        description="Grow a PyTorch model without changing its function (R2WiderR / R2DeeperR), verify, save.",
        epilog=(
            "Trust: model files are never unpickled as arbitrary objects and no code stored in them runs "
            "(.pt2 archives included) unless --trust-pickle is given. "
            "Exit codes: 0 ok, 1 not function-preserving, 2 bad usage or input, 3 internal error (see --debug), "
            "130/143 interrupted."
        ),
    )
    p.add_argument("model", help="a .pt2 (torch.export.save), a .pt/.pth pickled nn.Module, or package.module:factory")
    p.add_argument("--weights", help="state_dict or checkpoint for a factory model (.pt/.pth, or .safetensors)")
    p.add_argument("--weights-key", metavar="KEY", help="the state_dict's key in a checkpoint dict (e.g. model)")
    p.add_argument(
        "--trust-pickle",
        action="store_true",
        help="allow pickles that run code: a full-module .pt/.pth, and .pt2 archives whose example inputs or "
        "tensors are pickled objects (only for files you trust)",
    )
    p.add_argument(
        "--input-shape",
        action="append",
        default=[],
        metavar="[DTYPE:]D0,D1,...",
        help="example input shape, repeatable (e.g. 1,3,224,224 or int64:1,128)",
    )
    p.add_argument("--inputs", help="example inputs saved with torch.save (a tensor or a tuple/list of tensors)")
    p.add_argument("--widen", metavar="FACTOR|+N", help="widen every widenable group by FACTOR > 1, or by +N channels")
    p.add_argument(
        "--groups",
        help="comma-separated width group ids, producer names or kinds to widen "
        "(kind:stream, kind:heads, kind:head_size, kind:channels)",
    )
    p.add_argument(
        "--size",
        action="append",
        default=[],
        metavar="GROUP=WIDTH",
        help="grow the groups GROUP selects (an id, producer name or kind) to WIDTH, repeatable "
        "(e.g. --size kind:stream=96 --size kind:heads=8: heads count query heads); instead of --widen",
    )
    p.add_argument(
        "--deepen",
        type=int,
        metavar="N",
        help="insert N >= 1 blocks at each stage's end: copies of the model's own residual blocks where it has "
        "some, else R2R's generic block (see --deepen-block); with --deepen-after, N copies after each",
    )
    p.add_argument(
        "--deepen-after",
        action="append",
        default=[],
        metavar="BLOCK",
        help="insert a copy of the model's block BLOCK (a module path, e.g. model.layers.3) after it (repeatable)",
    )
    p.add_argument(
        "--deepen-at",
        action="append",
        default=[],
        metavar="NODE",
        help="insert a generic block after NODE (repeatable)",
    )
    p.add_argument(
        "--deepen-block",
        choices=["auto", "own", "generic"],
        default="auto",
        help="what --deepen inserts: auto (default), own (only the model's blocks), generic (R2R's block)",
    )
    p.add_argument(
        "--deepen-init",
        choices=["random", "copy"],
        default="random",
        help="a copied block's weights: random at their scale (default) or the block's own",
    )
    p.add_argument("--method", default="r2r", help="growth method: r2r (default), net2net, netmorph, random")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plan", action="store_true", help="print width groups, insertion points and the size estimate")
    p.add_argument("-o", "--output", help="output model (.pt2 or .pt); default <stem>.grown.pt2 beside the input")
    p.add_argument("--onnx", help="also write the grown model as ONNX (FILE.onnx, verified in onnxruntime)")
    p.add_argument("--report", help="write the JSON report here")
    p.add_argument("--no-verify", action="store_true", help="skip the function-preservation check")
    p.add_argument(
        "--force", action="store_true", help="write outputs even if verification fails; grow past available memory"
    )
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("--json", action="store_true", help="print the JSON report on stdout")
    p.add_argument("--debug", action="store_true", help="show tracebacks and library warnings")
    return p


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    """Run the command; returns the exit code (the console script exits with it)."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed
        return int(exc.code or 0) if not isinstance(exc.code, str) else EXIT_USAGE
    previous = install_signal_handlers()
    reset_written()
    with _library_noise(args.debug):
        try:
            code = _run(args)
            raise_if_interrupted()
            return code
        except Interrupted as exc:
            _error(f"interrupted by {exc.name}; {interrupted_outputs()}")
            return exc.code
        except KeyboardInterrupt:
            _error(f"interrupted by SIGINT; {interrupted_outputs()}")
            return 128 + signal.SIGINT
        except UsageError as exc:
            _debug_traceback(args)
            _error(str(exc))
            return EXIT_USAGE
        except Exception as exc:  # noqa: BLE001 - sorted below: refusals, a failed check, or a bug
            return _library_error(args, exc)
        finally:
            remove_temps()
            restore_signal_handlers(previous)


def _library_error(args: argparse.Namespace, exc: Exception) -> int:
    from r2r_fx.errors import NotPreservedError, R2RError

    _debug_traceback(args)
    if isinstance(exc, NotPreservedError):
        _error(f"not function-preserving, nothing written: {one_line(exc)}")
        return EXIT_NOT_PRESERVED
    if isinstance(exc, R2RError):
        _error(one_line(exc))
        return EXIT_USAGE
    if isinstance(exc, MemoryError):
        _error("out of memory (see the estimate of --plan; try a smaller --widen)")
        return EXIT_USAGE
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
        _error(f"cannot write {exc.filename or 'a file'}: {exc.strerror}")
        return EXIT_USAGE
    hint = "" if args.debug else "; run again with --debug for the traceback"
    text = first_line(exc)
    text = text if len(text) <= 300 else text[:300] + " ..."
    _error(f"internal error: {type(exc).__name__}: {text} (a bug in r2r_fx{hint})")
    return EXIT_INTERNAL


def _error(text: str) -> None:
    print(f"{_PROG}: error: {' '.join(text.split())}", file=_STDERR[-1] if _STDERR else sys.stderr, flush=True)


def _debug_traceback(args: argparse.Namespace) -> None:
    if args.debug:
        traceback.print_exc()


@contextlib.contextmanager
def _library_noise(debug: bool) -> Iterator[None]:
    """Silence torch's log records and Python warnings (stderr carries one line per error) unless ``--debug``."""
    if debug:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        yield
        return
    loggers = [logging.getLogger(name) for name in ("torch", "onnxscript", "onnx_ir", "transformers", "r2r_fx")]
    levels = [(lg, lg.level) for lg in loggers]
    _STDERR.append(sys.stderr)  # our own error line goes here; libraries printing tracebacks (ShapeProp) do not
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.CRITICAL + 1)
        try:
            yield
        finally:
            for lg, level in levels:
                lg.setLevel(level)
            _STDERR.pop()


# ---------------------------------------------------------------- arguments


def _widen_args(text: str | list[str] | None) -> dict[str, Any] | None:
    if text is None:
        return None
    if isinstance(text, list):  # argparse turns ``--widen=--`` into an empty list
        text = " ".join(text) or "--"
    bad = f"bad --widen {text!r}: a factor > 1 such as 2.0, or +N channels (N >= 1)"
    if text.startswith("+"):
        if not text[1:].isdigit():
            raise UsageError(bad)
        extra = int(text[1:])
        if extra == 0:
            raise UsageError("--widen +0 adds no channels: nothing would change")
        return {"extra": extra}
    try:
        factor = float(text)
    except ValueError:
        raise UsageError(bad) from None
    if not math.isfinite(factor):
        raise UsageError(bad)
    if factor == 1:
        raise UsageError("--widen 1 keeps every width: nothing would change")
    if factor < 1:
        raise UsageError(f"--widen {text}: widening cannot shrink a model (a factor > 1, or +N)")
    return {"factor": factor}


def _sizes_arg(items: list[str]) -> dict[int | str, int]:
    sizes: dict[int | str, int] = {}
    for item in items:
        key, _, width = item.rpartition("=")
        if not key.strip() or not width.strip().isdigit() or int(width) < 1:
            raise UsageError(f"bad --size {item!r}: GROUP=WIDTH, e.g. kind:stream=96 or 3=128 (see --plan)")
        key = key.strip()
        sizes[int(key) if key.isdigit() else key] = int(width)
    return sizes


def _groups_arg(text: str | None) -> list[int | str] | None:
    if text is None:
        return None
    keys: list[int | str] = [int(g) if g.strip().isdigit() else g.strip() for g in text.split(",") if g.strip()]
    if not keys:
        raise UsageError(f"--groups {text!r} selects no group: give ids or producer names (see --plan)")
    return keys


def _check_arguments(args: argparse.Namespace) -> tuple[dict[str, Any] | None, list[int | str] | None]:
    if args.method not in BUILT_IN_METHODS:  # a registered one, or a typo: ask the registry
        from r2r_fx.methods import METHODS

        if args.method not in METHODS:
            raise UsageError(f"method {args.method!r} is not available; choose one of {', '.join(sorted(METHODS))}")
    widen_kw = _widen_args(args.widen)
    groups = _groups_arg(args.groups)
    if groups is not None and widen_kw is None:
        raise UsageError("--groups selects what --widen widens: give --widen too")
    if args.size:
        if widen_kw is not None:
            raise UsageError("--size gives each group its width: use it instead of --widen (and --groups)")
        widen_kw = {"sizes": _sizes_arg(args.size)}
    if args.deepen is not None and args.deepen < 1:
        raise UsageError(f"--deepen {args.deepen}: the number of blocks per stage must be >= 1")
    if not -(2**63) <= args.seed < 2**63:
        raise UsageError(f"--seed {args.seed} is out of range (a 64-bit integer)")
    if args.weights_key is not None and not args.weights:
        raise UsageError("--weights-key needs --weights")
    if args.deepen_after and args.deepen_at:
        raise UsageError("--deepen-after copies the model's blocks, --deepen-at inserts generic ones: give one of them")
    if not args.plan and widen_kw is None and args.deepen is None and not args.deepen_at and not args.deepen_after:
        raise UsageError("nothing to do: give --widen, --deepen, --deepen-after or --deepen-at (or --plan)")
    return widen_kw, groups


# ---------------------------------------------------------------- the plan (refused when it changes nothing)


def _refuse_no_op(estimate: dict[str, Any], groups: list[int | str] | None, widen: bool) -> None:
    if not widen:
        return
    report = estimate["groups"]
    frozen = [g for g in report if g.id in (groups or []) and g.status != "widened"]
    if frozen:
        g = frozen[0]
        raise UsageError(f"--groups {g.id}: width group {g.id} cannot be widened ({g.reason or 'frozen'})")
    if not estimate["widened"]:
        reasons = sorted({g.reason for g in report if g.reason})
        raise UsageError(
            "--widen would change nothing: no selected width group can be widened"
            + (f" ({'; '.join(reasons[:4])})" if reasons else "")
        )


# ---------------------------------------------------------------- the run


def _run(args: argparse.Namespace) -> int:
    widen_kw, groups = _check_arguments(args)
    output = args.output if args.output is not None else default_output(args.model)
    if not args.plan:
        check_outputs(args, output)
    check_input_files(args)
    stream = None if args.quiet or args.json else (_STDERR[-1] if _STDERR else sys.stderr)
    progress = Progress(stream, before_phase=raise_if_interrupted)
    try:
        return _grow(args, progress, widen_kw, groups, output)
    finally:
        progress.close()


def _grow(
    args: argparse.Namespace,
    progress: Progress,
    widen_kw: dict[str, Any] | None,
    groups: list[int | str] | None,
    output: str,
) -> int:
    import r2r_fx
    from r2r_fx.capture import weights_on_meta
    from r2r_fx.estimate import channel_costs, estimate_growth, format_bytes
    from r2r_fx.loading import example_inputs, load_model
    from r2r_fx.record import growth_history
    from r2r_fx.saving import export_program, write_pickle, write_program

    timings: dict[str, float] = {}
    t = time.perf_counter()
    progress.phase(f"loading {args.model}")
    model, stored, name, graph = load_model(args.model, args)
    inputs = example_inputs(args, stored)
    if not args.plan and weights_on_meta(model):
        raise UsageError(f"{name} has its weights on the meta device (shapes, no values): only --plan works on it")
    say(args, f"capturing {name} ...")
    progress.phase(f"capturing {name}")
    gm, inputs = _capture_keeping_batch(model, inputs, graph)
    timings["capture"] = time.perf_counter() - t
    t = time.perf_counter()
    progress.phase("analysing")
    from r2r_fx.passes.widen import wants_head_size

    analysis = r2r_fx.analyze(gm, head_size=wants_head_size(groups, (widen_kw or {}).get("sizes")))
    points = r2r_fx.insertion_points(gm, analysis)
    blocks = r2r_fx.repeated_blocks(gm)
    deepen = _deepen_pass(args) if args.deepen is not None or args.deepen_at or args.deepen_after else None
    if deepen and not deepen.uses_own_blocks(blocks) and not deepen.at and not any(p.default for p in points):
        raise UsageError("--deepen: this model has no point where a residual block can be inserted")
    estimate = None
    if widen_kw is not None or deepen is not None:
        try:
            estimate = estimate_growth(gm, analysis, widen_kw, groups, args.method, deepen, points)
        except ValueError as exc:  # plan_new_channels refusing an unknown group id or name
            raise UsageError(str(exc)) from exc
        _refuse_no_op(estimate, groups, widen_kw is not None)
    timings["analyze"] = time.perf_counter() - t
    if args.plan:
        progress.close()
        print_plan(args, analysis.groups, points, blocks, estimate, channel_costs(gm, analysis))
        return EXIT_OK
    assert estimate is not None
    if estimate["memory_needed"] > estimate["memory_available"] and not args.force:
        raise UsageError(
            f"the grown model would have {estimate['params_after']:,} parameters "
            f"({format_bytes(estimate['bytes_after'])}) "
            f"and growing and checking it needs ~{format_bytes(estimate['memory_needed'])}, more than the "
            f"{format_bytes(estimate['memory_available'])} available: grow less (or --force)"
        )
    t = time.perf_counter()
    progress.phase("growing")
    grown = gm
    try:
        if widen_kw is not None:
            grown = r2r_fx.widen(grown, **widen_kw, groups=groups, method=args.method, seed=args.seed)
        if deepen is not None:
            grown = deepen.call(grown).model
    except ValueError as exc:  # GrowthError is one too: a pass refusing its arguments
        raise UsageError(one_line(exc)) from exc
    timings["rewrite"] = time.perf_counter() - t
    report = build_report(args, name, model, grown, timings, growth_history(grown))
    if deepen is not None and not report["blocks_inserted"]:
        raise UsageError("--deepen would change nothing: " + "; ".join(report["deepen_skipped"][:3] or ["no block"]))
    ok = True
    staged = Staged()
    scratch = scratch_folder()
    onnx_tmp = os.path.join(scratch, "grown.onnx") if args.onnx else None
    t = time.perf_counter()
    program, dynamic, unsaveable = None, None, None
    if not output.endswith(".pt"):  # one torch.export of the grown model: saved, and the ONNX exported from it
        progress.phase("exporting the grown program (torch.export)")
        try:
            program, dynamic = export_program(grown, inputs)
        except UsageError as exc:  # said after the check, whose verdict comes first
            unsaveable = exc
    exported = time.perf_counter() - t
    if not args.no_verify:
        say(args, "verifying (PyTorch eval/train" + (", ONNX Runtime)" if args.onnx else ") ..."))
        progress.phase("verifying: PyTorch eval and train" + (", ONNX export and ONNX Runtime" if args.onnx else ""))
        t = time.perf_counter()
        result = _verify(model, grown, inputs, onnx_tmp, program)
        timings["verify"] = time.perf_counter() - t
        report["verify"] = {
            k: getattr(result, k)
            for k in ("max_abs_error", "max_rel_error", "onnx_max_abs_error", "onnx_max_rel_error", "ok")
        }
        report["verify"]["notes"] = result.notes
        ok = result.ok
    t = time.perf_counter()
    progress.phase("writing")
    if ok or args.force:
        if unsaveable is not None:
            raise unsaveable
        if program is None:
            staged.add(output, write_pickle(grown))
            report["dynamic_axes"] = "as captured"
        else:
            staged.add(output, write_program(program, [r.to_json() for r in growth_history(grown)]))
            report["dynamic_axes"] = dynamic
        if onnx_tmp:
            if not os.path.exists(onnx_tmp):
                try:
                    r2r_fx.export_onnx(grown if program is None else program, inputs, onnx_tmp)
                except Exception as exc:  # noqa: BLE001 - an operator ONNX lacks, say
                    raise _no_onnx(exc) from exc
            stage_onnx(staged, onnx_tmp, args.onnx)
    timings["export"] = exported + time.perf_counter() - t
    progress.close()
    if args.report:
        staged.add(args.report, write_text(json.dumps(report, indent=2, default=str)))
    staged.commit()
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print_summary(args, report, output if ok or args.force else None, widen_kw or {})
    if not ok:
        _error(
            "verification failed: the grown model is not function-preserving within tolerance"
            + ("; outputs written anyway (--force)" if args.force else "; the model was not written (use --force)")
            + (f"; the report is in {args.report}" if args.report else "")
        )
        return EXIT_NOT_PRESERVED
    return EXIT_OK


def _verify(
    model: nn.Module, grown: torch.fx.GraphModule, inputs: tuple[Any, ...], onnx_path: str | None, program: Any
) -> Any:
    """r2r_fx.verify (the ONNX file exported from ``program`` when there is one); an ONNX export that fails is
    bad input (drop --onnx), not a crash of the check."""
    import r2r_fx

    try:
        return r2r_fx.verify(model, grown, inputs, onnx=onnx_path is not None, onnx_path=onnx_path, onnx_from=program)
    except Exception as exc:
        if onnx_path is None:
            raise
        r2r_fx.verify(model, grown, inputs, onnx=False)  # raises again when the problem is not ONNX
        raise _no_onnx(exc) from exc


def _no_onnx(exc: Exception) -> UsageError:
    return UsageError(f"the grown model cannot be exported to ONNX ({first_line(exc)}): drop --onnx")


def _capture_keeping_batch(
    model: nn.Module, inputs: tuple[Any, ...], graph: torch.fx.GraphModule | None
) -> tuple[torch.fx.GraphModule, tuple[Any, ...]]:
    """Capture from a batch of 2 when the example has a batch of 1 (torch.export would fix the batch at 1).

    Rows are repeated, so nothing about the model is assumed but that it takes a batch; a model that
    does not is captured from the example as given. A .pt2's program keeps the shapes it was saved with.
    """
    import torch

    tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
    if graph is None and tensors and all(t.dim() > 0 and t.shape[0] == 1 for t in tensors):
        doubled = tuple(torch.cat([t, t]) if isinstance(t, torch.Tensor) else t for t in inputs)
        try:
            return _capture(model, doubled, None), doubled
        except Exception:  # noqa: BLE001 - the model wants a batch of 1: capture it as given
            logger.info("capture from a batch of 2 failed; capturing the example as given")
    return _capture(model, inputs, graph), inputs


def _capture(model: nn.Module, inputs: tuple[Any, ...], graph: torch.fx.GraphModule | None) -> torch.fx.GraphModule:
    import r2r_fx
    from r2r_fx.errors import CaptureError

    try:
        return r2r_fx.capture(graph if graph is not None else model, inputs)
    except CaptureError as exc:
        text = one_line(exc)
        if "Cache" in text or getattr(getattr(model, "config", None), "use_cache", False):
            text += " (a HuggingFace model returning its key/value cache: build it with use_cache=False)"
        raise UsageError(text) from exc
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:  # wrong input shape or dtype lands here
        raise UsageError(f"the model fails on the example inputs: {first_line(exc)}") from exc


def _deepen_pass(args: argparse.Namespace) -> Any:
    """The deepen pass the arguments ask for (a bad combination is a one-line usage error)."""
    from r2r_fx.passes.deepen import DeepenPass

    try:
        return DeepenPass(
            at=list(args.deepen_at) or None,
            after=list(args.deepen_after) or None,
            count=args.deepen,
            where="end" if not args.deepen_after and not args.deepen_at else None,
            block=args.deepen_block,
            init=args.deepen_init,
            method=args.method,
            seed=args.seed,
        )
    except ValueError as exc:
        raise UsageError(one_line(exc)) from exc


if __name__ == "__main__":
    sys.exit(main())
