"""``r2r-rewrite``: load a model, grow it (widen and/or deepen), verify it, save it and its ONNX.

Exit codes: 0 success, 1 not function-preserving (the model is not written unless ``--force``), 2 bad usage or
input (also a refused no-op, a model too big for the machine, an unwritable destination), 3 internal
error (a bug: ``--debug`` shows the traceback), 130 / 143 interrupted by SIGINT / SIGTERM.

Trust model: model files come from strangers. Nothing in them is unpickled as arbitrary objects and
no code stored in them runs unless ``--trust-pickle`` is given; ``package.module:factory`` imports
code the user names on purpose.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import io
import json
import logging
import math
import operator
import os
import pickle
import re
import shutil
import signal
import sys
import tempfile
import threading
import time
import traceback
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from r2r_fx.record import GrowthRecord

__all__ = ["main"]

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_NOT_PRESERVED, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3

_DTYPES = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "bool": torch.bool,
}
_PROG = "r2r-rewrite"

# Every temporary path the command creates, removed on any exit (signals included), and the outputs written.
_TEMPS: set[str] = set()
_WRITTEN: list[str] = []
_STDERR: list[Any] = []  # the real stderr while the libraries' is silenced


class UsageError(Exception):
    """Bad usage or input: exit code 2 with a one-line message."""


class _PickleRefused(UsageError):
    """A .pt2 would need unpickling (or native code) to load; not a RuntimeError so torch does not swallow it."""


# What the .pt2 reader refused: torch wraps and sometimes swallows exceptions raised inside its reader.
_REFUSALS: list[str] = []


def _refusal(message: str) -> _PickleRefused:
    _REFUSALS.append(message)
    return _PickleRefused(message)


class _Interrupted(BaseException):
    """SIGINT / SIGTERM: unwinds like KeyboardInterrupt (past ``except Exception``), then exit 128 + signal."""

    def __init__(self, signum: int) -> None:
        self.code = 128 + signum
        self.name = signal.Signals(signum).name
        super().__init__(self.name)


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
    p.add_argument("--groups", help="comma-separated width group ids (or producer names) to widen")
    p.add_argument("--deepen", type=int, metavar="N", help="insert N >= 1 residual blocks at each stage's end")
    p.add_argument("--deepen-at", action="append", default=[], metavar="NODE", help="insert after NODE (repeatable)")
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
    previous = _install_signal_handlers()
    _WRITTEN.clear()
    with _library_noise(args.debug):
        try:
            return _run(args)
        except _Interrupted as exc:
            _error(f"interrupted by {exc.name}; {_interrupted_outputs()}")
            return exc.code
        except KeyboardInterrupt:
            _error(f"interrupted by SIGINT; {_interrupted_outputs()}")
            return 128 + signal.SIGINT
        except UsageError as exc:
            _debug_traceback(args)
            _error(str(exc))
            return EXIT_USAGE
        except Exception as exc:  # noqa: BLE001 - sorted below: refusals, a failed check, or a bug
            return _library_error(args, exc)
        finally:
            _remove_temps()
            _restore_signal_handlers(previous)


def _interrupted_outputs() -> str:
    if _WRITTEN:
        return f"after writing {', '.join(_WRITTEN)}"
    return "no output written, temporary files removed"


def _library_error(args: argparse.Namespace, exc: Exception) -> int:
    from r2r_fx.errors import NotPreservedError, R2RError

    _debug_traceback(args)
    if isinstance(exc, NotPreservedError):
        _error(f"not function-preserving, nothing written: {_one_line(exc)}")
        return EXIT_NOT_PRESERVED
    if isinstance(exc, R2RError):
        _error(_one_line(exc))
        return EXIT_USAGE
    if isinstance(exc, MemoryError):
        _error("out of memory (see the estimate of --plan; try a smaller --widen)")
        return EXIT_USAGE
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM):
        _error(f"cannot write {exc.filename or 'a file'}: {exc.strerror}")
        return EXIT_USAGE
    hint = "" if args.debug else "; run again with --debug for the traceback"
    text = _first_line(exc)
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


def _install_signal_handlers() -> dict[int, Any]:
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous[signum] = signal.signal(signum, _on_signal)
    return previous


def _on_signal(signum: int, frame: Any) -> None:
    for other in (signal.SIGINT, signal.SIGTERM):  # a second signal must not break the clean-up
        signal.signal(other, signal.SIG_IGN)
    raise _Interrupted(signum)


def _restore_signal_handlers(previous: dict[int, Any]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def _remove_temps() -> None:
    for path in list(_TEMPS):
        with contextlib.suppress(OSError):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.lexists(path):
                os.remove(path)
        _TEMPS.discard(path)


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


def _groups_arg(text: str | None) -> list[int | str] | None:
    if text is None:
        return None
    keys: list[int | str] = [int(g) if g.strip().isdigit() else g.strip() for g in text.split(",") if g.strip()]
    if not keys:
        raise UsageError(f"--groups {text!r} selects no group: give ids or producer names (see --plan)")
    return keys


def _check_arguments(args: argparse.Namespace) -> tuple[dict[str, Any] | None, list[int | str] | None]:
    from r2r_fx.methods import METHODS

    if args.method not in METHODS:
        raise UsageError(f"method {args.method!r} is not available; choose one of {', '.join(sorted(METHODS))}")
    widen_kw = _widen_args(args.widen)
    groups = _groups_arg(args.groups)
    if groups is not None and widen_kw is None:
        raise UsageError("--groups selects what --widen widens: give --widen too")
    if args.deepen is not None and args.deepen < 1:
        raise UsageError(f"--deepen {args.deepen}: the number of blocks per stage must be >= 1")
    if not -(2**63) <= args.seed < 2**63:
        raise UsageError(f"--seed {args.seed} is out of range (a 64-bit integer)")
    if args.weights_key is not None and not args.weights:
        raise UsageError("--weights-key needs --weights")
    if not args.plan and widen_kw is None and args.deepen is None and not args.deepen_at:
        raise UsageError("nothing to do: give --widen, --deepen or --deepen-at (or --plan)")
    return widen_kw, groups


# ---------------------------------------------------------------- outputs (checked before any work)


def _default_output(spec: str) -> str:
    if os.path.isfile(spec):
        stem, _ = os.path.splitext(spec)
        return f"{stem}.grown.pt2"
    return spec.replace(":", "_").replace(".", "_").replace(os.sep, "_") + ".grown.pt2"


def _check_outputs(args: argparse.Namespace, output: str) -> None:
    """Refuse outputs that collide, overwrite an input, are directories or cannot be written: before any work."""
    inputs = [("the model", args.model), ("--weights", args.weights), ("--inputs", args.inputs)]
    seen: dict[str, str] = {}
    for flag, path in (("-o", output), ("--onnx", args.onnx), ("--report", args.report)):
        if path is None:
            continue
        if not path or path.endswith(os.sep):
            raise UsageError(f"{flag} {path!r} is not a file name")
        real = os.path.realpath(path)
        if real in seen:
            raise UsageError(f"{flag} {path} and {seen[real]} name the same file: give each output its own name")
        seen[real] = f"{flag} {path}"
        for what, source in inputs:
            if source and os.path.exists(source) and os.path.realpath(source) == real:
                raise UsageError(f"{flag} {path} is {what} (an input): choose another name")
        if os.path.isdir(path):
            raise UsageError(f"{flag} {path} is a directory: give a file name")
        if len(os.path.basename(path).encode()) > 200:  # the staged name adds a prefix and a random part
            raise UsageError(f"{flag}: the file name is too long ({len(os.path.basename(path).encode())} bytes)")
        if os.path.lexists(path) and not os.path.isfile(path):
            raise UsageError(f"{flag} {path} exists and is not a regular file")
        _probe_folder(flag, path)
    if not output.endswith((".pt2", ".pt")):
        raise UsageError(f"-o {output} must end in .pt2 or .pt")
    if args.onnx and not args.onnx.endswith(".onnx"):
        raise UsageError(f"--onnx {args.onnx} must end in .onnx")


def _probe_folder(flag: str, path: str) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"{flag} {path}: output directory does not exist: {folder}")
    try:  # os.access says yes for root on read-only mounts and /proc: really create a file
        fd, probe = tempfile.mkstemp(prefix=".r2r-", suffix=".probe", dir=folder)
    except OSError as exc:
        raise UsageError(f"{flag} {path}: cannot write in {folder}: {exc.strerror or exc}") from None
    os.close(fd)
    os.remove(probe)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class _Staged:
    """Output files staged as hidden temporaries beside their destinations, renamed together at the end."""

    def __init__(self) -> None:
        self.pending: list[tuple[str, str]] = []

    def add(self, path: str, write: Callable[[io.BufferedWriter], None]) -> None:
        folder = os.path.dirname(os.path.abspath(path))
        try:
            fd, tmp = tempfile.mkstemp(prefix=".r2r-", suffix=os.path.splitext(path)[1], dir=folder)
        except OSError as exc:
            raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None
        _TEMPS.add(tmp)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())
        except OSError as exc:
            raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None
        self.pending.append((tmp, path))

    def commit(self) -> None:
        """Rename every staged file into place, with SIGINT / SIGTERM held off: all outputs appear, or none."""
        blocked = {signal.SIGINT, signal.SIGTERM}
        held = threading.current_thread() is threading.main_thread()
        if held:
            signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            for tmp, path in self.pending:
                try:
                    os.replace(tmp, path)
                except OSError as exc:
                    raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None
                _TEMPS.discard(tmp)
                _WRITTEN.append(path)
            self.pending = []
        finally:
            if held:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)


# ---------------------------------------------------------------- loading


def _load_model(
    spec: str, args: argparse.Namespace
) -> tuple[nn.Module, tuple[Any, ...] | None, str, torch.fx.GraphModule | None]:
    """(model, stored example inputs or None, display name, the graph when the file already is one)."""
    if os.path.exists(spec) or spec.endswith((".pt2", ".pt", ".pth", ".safetensors")):
        if os.path.isdir(spec):
            raise UsageError(f"model {spec} is a directory, not a model file")
        if not os.path.isfile(spec):
            raise UsageError(
                f"model {spec} is not a regular file" if os.path.exists(spec) else f"model file not found: {spec}"
            )
        _readable(spec, "model file")
        if args.weights:
            raise UsageError("--weights only applies to a package.module:factory model")
        name = os.path.basename(spec)
        if spec.endswith(".safetensors"):
            raise UsageError(f"{spec} holds weights only: use package.module:factory --weights {spec}")
        _refuse_torchscript(spec)
        if spec.endswith(".pt2"):
            gm, inputs = _load_pt2(spec, args.trust_pickle)
            return gm, inputs, name, gm
        return _load_pickle(spec, args.trust_pickle), None, name, None
    if ":" in spec:
        return _load_factory(spec, args.weights, args.weights_key), None, spec, None
    raise UsageError(f"model file not found: {spec} (nor is it a package.module:factory spec)")


def _readable(path: str, what: str) -> None:
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise UsageError(f"cannot read {what} {path}: {exc.strerror or exc}") from None


def _zip_names(path: str) -> list[str] | None:
    try:
        with zipfile.ZipFile(path) as z:
            return z.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return None


def _refuse_torchscript(path: str) -> None:
    names = _zip_names(path) or []
    if any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names):
        raise UsageError(
            f"{path} is a TorchScript archive (torch.jit.save), which is not supported: save the model with "
            "torch.export.save (.pt2), or its state_dict for package.module:factory --weights"
        )


# What torch's serializer writes for shape expressions (``sympy.srepr``: ``Symbol('s77', positive=True,
# integer=True)``, ``Mul(Integer(2), ...)``, its own FloorDiv & co. come as ``locals``): nothing else is evaluated.
_SYMPY_NAMES = frozenset(
    "Symbol Dummy Integer Rational Float Add Mul Pow Mod Max Min Abs floor ceiling Eq Ne Lt Le Gt Ge "
    "StrictLessThan StrictGreaterThan LessThan GreaterThan Equality Unequality And Or Not Piecewise ExprCondPair "
    "true false True False BooleanTrue BooleanFalse oo zoo nan Infinity NegativeInfinity NaN IntInfinity "
    "NegativeIntInfinity int_oo Zero One NegativeOne Half sqrt "
    "positive negative nonnegative nonpositive integer real finite infinite zero nonzero even odd commutative "
    "precision evaluate".split()
)
_SYMBOL_NAME = re.compile(r"[a-z]{1,4}\d+")


class _SafeSympy:
    """``sympy`` for torch's deserializer, whose ``sympify`` (an ``eval``) only sees shape arithmetic."""

    def __init__(self, sympy: Any) -> None:
        self._sympy = sympy

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sympy, name)

    def sympify(self, expr: Any, *a: Any, locals: Mapping[str, Any] | None = None, **kw: Any) -> Any:  # noqa: A002
        if isinstance(expr, str) and not _is_shape_arithmetic(expr, set(locals or {})):
            raise _refusal(
                f"the archive holds a shape expression that is not shape arithmetic ({expr[:60]!r}): "
                "it would run as code; refused"
            )
        return self._sympy.sympify(expr, *a, locals=locals, **kw)


def _is_shape_arithmetic(expr: str, known: set[str]) -> bool:
    """Only whitelisted names, numbers, operators and quoted symbol names: no attribute, item or dunder access."""
    if "__" in expr or re.search(r"[^A-Za-z0-9_ +\-*/%()<>=!,.&|~']", expr):
        return False
    if re.search(r"(?<![0-9])\.|\.(?![0-9])", expr):  # a dot only inside a number
        return False
    if any(not re.fullmatch(r"[A-Za-z0-9_.+\-/ ]*", q) for q in re.findall(r"'([^']*)'", expr)):
        return False
    if expr.count("'") % 2:
        return False
    names = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", expr)
    return all(n in known or n in _SYMPY_NAMES or _SYMBOL_NAME.fullmatch(n) for n in names)


class _NoPickle:
    """``pickle`` for torch's archive reader, without ``loads``/``load``."""

    def __getattr__(self, name: str) -> Any:
        if name in ("loads", "load", "Unpickler"):
            raise _refusal("the archive holds a pickled object (opaque constant): it would run code")
        return getattr(pickle, name)


def _refuse_native(*args: Any, **kwargs: Any) -> Any:
    raise _refusal("the archive holds compiled code or a TorchScript object")


# Plain functions a graph may call besides registered operators (torch's own symbolic-shape ops come from serde).
_OPERATOR_FUNCTIONS = frozenset(
    getattr(operator, name)
    for name in (
        "add sub mul truediv floordiv mod pow neg pos abs and_ or_ xor invert not_ eq ne lt le gt ge "
        "getitem lshift rshift matmul truth"
    ).split()
)


def _is_operator(target: Any, sym_ops: Any) -> bool:
    """A registered operator (ATen, custom, higher-order), a symbolic-shape op, or a pure operator/math function."""
    from r2r_fx.compat import HigherOrderOperator, OpOverload, OpOverloadPacket

    if isinstance(target, (str, OpOverload, OpOverloadPacket, HigherOrderOperator)):
        return True  # a string stays unresolved: torch's reader refuses it itself
    try:
        if target in sym_ops or target in _OPERATOR_FUNCTIONS:
            return True
    except TypeError:  # unhashable
        return False
    name = getattr(target, "__name__", "")
    return getattr(math, name, None) is target and callable(target)


@contextlib.contextmanager
def _no_code_from_archive() -> Iterator[None]:
    """Load with torch.export.load's internals, but no pickle beyond plain tensors and no eval of stored text.

    torch 2.x falls back to ``torch.load(weights_only=False)`` for example inputs and pickled tensors
    (``torch/_export/serde/serialize.py: deserialize_torch_artifact``, ``torch/export/pt2_archive/_package.py``),
    ``pickle.loads`` for opaque constants, TorchScript unpickling for custom objects, ``dlopen`` for AOTInductor
    libraries, and ``sympy.sympify`` (an ``eval``) for shape expressions: each is forced safe or refused here.
    """
    import torch._export.serde.serialize as serialize
    import torch.export.pt2_archive._package as package

    real_load = torch.load

    def weights_only_load(f: Any, *a: Any, **kw: Any) -> Any:
        kw["weights_only"] = True
        try:
            return real_load(f, *a, **kw)
        except pickle.UnpicklingError as exc:
            raise _refusal(
                f"it holds a pickle that is not plain tensors (stored example inputs or tensors): {_first_line(exc)}"
            ) from None

    deserializer = serialize.GraphModuleDeserializer
    real_operator = deserializer.deserialize_operator

    def operator_only(self: Any, serialized_target: str) -> Any:
        if serialized_target.startswith("#"):  # a registered extension's own operator
            return real_operator(self, serialized_target)
        target = real_operator(self, serialized_target)  # attribute look-ups only; nothing is called yet
        if not _is_operator(target, serialize._SYM_OPS):
            raise _refusal(f"its graph calls {serialized_target!r}, which is not an operator: it would run as code")
        return target

    saved = (
        torch.load,
        serialize.sympy,
        package.pickle,
        package._load_aoti,
        torch._C._pickle_load_obj,
        deserializer.deserialize_operator,
    )
    torch.load = weights_only_load
    serialize.sympy = _SafeSympy(serialize.sympy)
    package.pickle = _NoPickle()
    package._load_aoti = _refuse_native
    torch._C._pickle_load_obj = _refuse_native
    deserializer.deserialize_operator = operator_only
    try:
        yield
    finally:
        (
            torch.load,
            serialize.sympy,
            package.pickle,
            package._load_aoti,
            torch._C._pickle_load_obj,
            deserializer.deserialize_operator,
        ) = saved


def _pt2_needs_trust(path: str, names: list[str]) -> str:
    """Why this archive cannot load without running code from it ("" when it can).

    Pickled tensors and example inputs need no refusal here: they load with ``weights_only=True``
    (``_no_code_from_archive``), which refuses anything but plain tensors and containers.
    """
    if any("/data/aotinductor/" in n for n in names):
        return "it holds AOTInductor compiled code (a shared library that would be loaded)"
    with zipfile.ZipFile(path) as z:
        for n in names:
            if not n.endswith("_constants_config.json"):
                continue
            try:
                config = json.loads(z.read(n)).get("config", {})
            except (ValueError, AttributeError):
                return ""  # malformed: torch's reader gives the error
            for fqn, meta in config.items() if isinstance(config, dict) else ():
                if isinstance(meta, dict) and str(meta.get("path_name", "")).startswith(("custom_obj", "opaque")):
                    return f"it stores the constant {fqn!r} as a pickled object (a TorchScript or opaque object)"
    return ""


def _load_pt2(path: str, trust: bool) -> tuple[torch.fx.GraphModule, tuple[Any, ...] | None]:
    names = _zip_names(path)
    if names is None:
        raise UsageError(f"cannot read {path} as a torch.export program: not a .pt2 (zip) archive")
    refusal = "" if trust else _pt2_needs_trust(path, names)
    if refusal:
        raise UsageError(f"{path}: {refusal}; loading it runs code from the file. Only if you trust it: --trust-pickle")
    program = _read_program(path, trust)
    from r2r_fx.capture import from_exported_program

    inputs = None
    if program.example_inputs is not None:
        args, kwargs = program.example_inputs
        inputs = tuple(args) if not kwargs else None
    return from_exported_program(program), inputs


# Packages whose output classes a .pt2 may name: imported (installed code, not the file's) so torch can read it.
_OUTPUT_TYPE_PACKAGES = ("transformers",)


def _read_program(path: str, trust: bool, retried: bool = False) -> Any:
    _REFUSALS.clear()
    swallowed: list[BaseException] = []
    try:
        with _torch_swallowed(swallowed), contextlib.nullcontext() if trust else _no_code_from_archive():
            program = torch.export.load(path)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a broken archive
        if _REFUSALS:
            raise UsageError(f"{path}: {_REFUSALS[0]}. Only if you trust the file: --trust-pickle") from None
        cause = swallowed[0] if swallowed else exc
        missing = re.search(r"Deserializing ([\w.]+) in pytree is not registered", str(cause))
        if missing and not retried:
            module = missing.group(1).rpartition(".")[0]
            if module.split(".")[0] in _OUTPUT_TYPE_PACKAGES:
                with contextlib.suppress(Exception):
                    importlib.import_module(module)
                    return _read_program(path, trust, retried=True)
            raise UsageError(
                f"cannot read {path}: its outputs are {missing.group(1)} objects, which torch reads only once that "
                "package is imported; save the program with plain outputs (tuples, dicts)"
            ) from None
        raise UsageError(f"cannot read {path} as a torch.export program: {_first_line(cause)}") from exc
    if _REFUSALS:  # refused inside torch, which went on without it: still refused
        raise UsageError(f"{path}: {_REFUSALS[0]}. Only if you trust the file: --trust-pickle")
    return program


@contextlib.contextmanager
def _torch_swallowed(found: list[BaseException]) -> Iterator[None]:
    """Collect the exceptions torch.export.load logs and replaces by "check the warnings above"."""

    class Catch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.exc_info and record.exc_info[1] is not None:
                found.append(record.exc_info[1])

    log = logging.getLogger("torch.export")
    handlers, level, propagate = log.handlers, log.level, log.propagate
    log.handlers, log.propagate = [Catch()], False  # torch's own handler would print it
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.handlers, log.propagate = handlers, propagate
        log.setLevel(level)


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
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise UsageError(f"cannot read {path}: corrupt or truncated ({_first_line(exc)})") from exc
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, dict):
        hint = "" if _looks_like_state_dict(obj) else " --weights-key KEY"
        raise UsageError(
            f"{path} holds a state_dict or checkpoint, not a model: use package.module:factory --weights {path}{hint}"
        )
    raise UsageError(f"{path} holds a {type(obj).__name__}, not an nn.Module")


def _load_trusted(path: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"cannot unpickle {path}: {_first_line(exc)}") from exc


def _load_factory(spec: str, weights: str | None, key: str | None) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UsageError(f"bad model {spec!r}: expected package.module:factory")
    if "" not in sys.path and os.getcwd() not in sys.path:  # as ``python -m`` does
        sys.path.insert(0, os.getcwd())
    try:
        factory: Callable[..., Any] = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise UsageError(f"cannot import {spec}: {_first_line(exc)}") from exc
    except Exception as exc:  # noqa: BLE001 - the user's module fails on import
        raise UsageError(f"importing {module_name} failed: {type(exc).__name__}: {_first_line(exc)}") from exc
    if not callable(factory):
        raise UsageError(f"{spec} is a {type(factory).__name__}, not a callable factory")
    try:
        model = factory()
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"{spec}() failed: {type(exc).__name__}: {_first_line(exc)}") from exc
    if not isinstance(model, nn.Module):
        raise UsageError(f"{spec}() returned a {type(model).__name__}, not an nn.Module")
    if weights:
        _fit_weights(model, _load_weights(weights, key), weights, spec)
    return model


def _looks_like_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def _load_weights(path: str, key: str | None) -> dict[str, torch.Tensor]:
    if os.path.isdir(path):
        raise UsageError(f"--weights {path} is a directory")
    if not os.path.isfile(path):
        raise UsageError(f"weights file not found: {path}")
    _readable(path, "--weights")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        _refuse_torchscript(path)
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except UsageError:
        raise
    except pickle.UnpicklingError as exc:
        raise UsageError(
            f"--weights {path} holds pickled objects beyond tensors (a full model?), which are not loaded: "
            f"save model.state_dict() instead ({_first_line(exc)})"
        ) from None
    except Exception as exc:  # noqa: BLE001
        raise UsageError(f"cannot read weights {path}: {_first_line(exc)}") from exc
    return _state_dict_in(obj, path, key)


def _state_dict_in(obj: Any, path: str, key: str | None) -> dict[str, torch.Tensor]:
    """The state_dict itself, the one under ``key``, or the only state_dict inside a checkpoint dict."""
    if not isinstance(obj, Mapping):
        raise UsageError(f"{path} holds a {type(obj).__name__}, not a state_dict")
    if key is not None:
        if key not in obj:
            raise UsageError(f"--weights-key {key!r} is not in {path}; its keys: {', '.join(map(str, obj))}")
        obj = obj[key]
        if not _looks_like_state_dict(obj):
            raise UsageError(f"{path}[{key!r}] is not a state_dict (a dict of tensors)")
        return dict(obj)
    if _looks_like_state_dict(obj):
        return dict(obj)
    inside = [k for k, v in obj.items() if _looks_like_state_dict(v)]
    if len(inside) == 1:
        return dict(obj[inside[0]])
    if inside:
        raise UsageError(f"{path} is a checkpoint with several state_dicts ({', '.join(inside)}): pick --weights-key")
    raise UsageError(f"{path} holds no state_dict (keys: {', '.join(map(str, list(obj)[:12]))}); see --weights-key")


def _fit_weights(model: nn.Module, state: dict[str, torch.Tensor], path: str, spec: str) -> None:
    expected = model.state_dict()
    if state and all(k.startswith("module.") for k in state) and not any(k.startswith("module.") for k in expected):
        state = {k[len("module.") :]: v for k, v in state.items()}  # saved from DataParallel
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    sizes = [
        f"{k} {list(state[k].shape)} vs {list(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = [
        f"{len(items)} {what}: {', '.join(items)}"
        for what, items in (("missing", missing), ("unexpected", unexpected), ("size mismatch (file vs model)", sizes))
        if items
    ]
    if problems:
        raise UsageError(f"--weights {path} does not fit {spec}: " + "; ".join(problems))
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise UsageError(f"--weights {path} does not fit {spec}: {' '.join(str(exc).split())}") from exc


def _example_inputs(args: argparse.Namespace, stored: tuple[Any, ...] | None) -> tuple[Any, ...]:
    if args.inputs:
        if os.path.isdir(args.inputs):
            raise UsageError(f"--inputs {args.inputs} is a directory")
        if not os.path.isfile(args.inputs):
            raise UsageError(f"inputs file not found: {args.inputs}")
        _readable(args.inputs, "--inputs")
        _refuse_torchscript(args.inputs)
        try:
            obj = torch.load(args.inputs, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise UsageError(
                f"--inputs {args.inputs} holds pickled objects beyond tensors, which are not loaded"
            ) from None
        except Exception as exc:  # noqa: BLE001
            raise UsageError(f"cannot read inputs {args.inputs}: {_first_line(exc)}") from exc
        inputs = (obj,) if isinstance(obj, torch.Tensor) else tuple(obj) if isinstance(obj, (tuple, list)) else None
        if not inputs or not all(isinstance(t, torch.Tensor) for t in inputs):
            raise UsageError(f"{args.inputs} must hold a tensor or a non-empty tuple/list of tensors")
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
    parts = dims.split(",")
    if not all(re.fullmatch(r"\s*\d{1,12}\s*", d) for d in parts):
        raise UsageError(f"bad --input-shape {text!r}: expected comma-separated integers such as 1,3,224,224")
    shape = [int(d) for d in parts]
    if any(d <= 0 for d in shape):
        raise UsageError(f"bad --input-shape {text!r}: sizes must be positive")
    size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    available = _available_memory()
    if size > available // 4:
        raise UsageError(
            f"--input-shape {text}: one example input would take {_bytes(size)}, "
            f"more than a quarter of the {_bytes(available)} of memory available"
        )
    generator = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    if dtype == torch.bool:
        return torch.ones(shape, dtype=dtype)
    return torch.randint(0, 2, shape, generator=generator, dtype=dtype)


# ---------------------------------------------------------------- size estimate (before allocating)


def _available_memory() -> int:
    """MemAvailable from /proc/meminfo in bytes (a large number where it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 1 << 50


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _estimate(
    gm: torch.fx.GraphModule,
    analysis: Any,
    widen_kw: dict[str, Any] | None,
    groups: list[int | str] | None,
    method: str,
    deepen: tuple[int, list[str]] | None,
    points: list[Any],
) -> dict[str, Any]:
    """Parameters and bytes of the grown model, and the memory growing and checking it needs, from the plan alone.

    Widening: every bound parameter axis grows as its layout's atoms gain channels (``plan_extras``,
    which allocates nothing). Deepening: one block per chosen point and count (conv-BN-conv or
    linear-linear at the point's width, scaled by the widening). Checking holds the reference and the
    grown model, float64 copies for the train-mode fallback, the ONNX export and an onnxruntime session.
    """
    from r2r_fx.methods import get_method
    from r2r_fx.passes.widen import plan_extras
    from r2r_fx.surgery import get_tensor

    tensors = {id(t): t for t in [*gm.parameters(), *gm.buffers()]}
    params = {id(p) for p in gm.parameters()}
    before_numel = sum(t.numel() for t in gm.parameters())
    before_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    extras: dict[int, int] = {}
    report: list[dict[str, Any]] = []
    if widen_kw is not None:
        extras, report = plan_extras(
            analysis,
            factor=widen_kw.get("factor"),
            extra=widen_kw.get("extra"),
            groups=groups,
            method=get_method(method),
        )
    numel, nbytes = before_numel, before_bytes
    for name, axes in analysis.bound_params().items():
        t = get_tensor(gm, name)
        shape = list(t.shape)
        for axis, layout, _ in axes:
            shape[axis] = layout.outer * sum((n + extras.get(a, 0)) * inner for a, n, inner in layout.pieces)
        grown = math.prod(shape)
        numel += (grown - t.numel()) if id(t) in params else 0
        nbytes += (grown - t.numel()) * t.element_size()
    ratio = max([g.width_after / g.width_before for g in report if g.width_before] or [1.0])
    blocks = 0
    if deepen is not None:
        count, at = deepen
        chosen = [p for p in points if (p.node in at if at else p.default)]
        for p in chosen:
            w = int(p.width * ratio)
            per_block = 2 * w * w + w if p.kind == "linear" else 2 * w * w * 9 + 4 * w
            numel += per_block * count
            nbytes += per_block * count * 4
            blocks += count
    activations = 0
    for node in gm.graph.nodes:
        meta = node.meta.get("tensor_meta")
        if hasattr(meta, "shape") and hasattr(meta, "dtype"):
            activations += math.prod(meta.shape) * torch.empty((), dtype=meta.dtype).element_size()
    # measured: ~7.5x the grown model's bytes at the peak of verify + ONNX export, on top of the interpreter
    need = (512 << 20) + 3 * before_bytes + 8 * nbytes + 4 * int(activations * ratio) * (1 + blocks)
    return {
        "params_before": before_numel,
        "params_after": numel,
        "bytes_after": nbytes,
        "memory_needed": need,
        "memory_available": _available_memory(),
        "groups": report,
        "widened": sum(1 for g in report if g.status == "widened"),
    }


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


# ---------------------------------------------------------------- saving


def _plain(tree: Any) -> Any:
    """Outputs as plain dicts / tuples / lists, so the saved program loads without the model's own classes."""
    import dataclasses

    if isinstance(tree, torch.Tensor) or tree is None:
        return tree
    if isinstance(tree, Mapping):
        return {k: _plain(v) for k, v in tree.items()}
    if isinstance(tree, tuple):
        return tuple(_plain(v) for v in tree)
    if isinstance(tree, list):
        return [_plain(v) for v in tree]
    if dataclasses.is_dataclass(tree) and not isinstance(tree, type):
        return {f.name: _plain(getattr(tree, f.name)) for f in dataclasses.fields(tree)}
    return tree


class _PlainOutputs(nn.Module):
    """A graph module's forward returning plain containers, on the same attributes (so the same state_dict names).

    Not a GraphModule itself: torch.export takes a GraphModule's own output structure, not its forward's.
    """

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__()
        self.__dict__.update({k: v for k, v in gm.__dict__.items() if k not in ("forward", "_wrapped_call")})
        self._graph_forward = type(gm).forward

    def forward(self, *args: Any) -> Any:
        return _plain(self._graph_forward(self, *args))


def _export_program(grown: torch.fx.GraphModule, inputs: tuple[Any, ...]) -> tuple[Any, list[str]]:
    """An ExportedProgram of ``grown`` with the batch (and a token model's sequence) axis dynamic where it can be.

    torch.export specialises a size-1 axis, so a batch (or sequence) of 1 is exported from an example
    repeated to 2; the program is checked against ``grown`` on the real inputs before it is kept.
    """
    from r2r_fx.export import dynamic_axes_candidates, expand_for_export
    from r2r_fx.tree import max_errors

    grown.eval()
    with torch.no_grad():
        expected = _plain(grown(*inputs))
    last: Exception | None = None
    plain = _PlainOutputs(grown)
    for axes, names in dynamic_axes_candidates(inputs):
        try:
            example = expand_for_export(inputs, axes)
            dynamic = (tuple({a: torch.export.Dim.DYNAMIC for a in ax} if ax else None for ax in axes),)
            program = torch.export.export(plain, example, strict=False, dynamic_shapes=dynamic if names else None)
            with torch.no_grad():
                _, rel = max_errors(expected, program.module()(*inputs))
            if not rel <= 1e-5:
                raise ValueError(f"exported program differs (relative error {rel:.2g})")
            return program, names
        except Exception as exc:  # noqa: BLE001 - try fewer dynamic axes
            last = exc
    raise UsageError(
        f"the grown model cannot be saved as a .pt2: torch.export fails ({_first_line(last or Exception())}); "
        "-o NAME.pt saves it as a pickle"
    )


def _write_program(program: Any, record: list[Any]) -> Callable[[io.BufferedWriter], None]:
    buffer = io.BytesIO()  # torch's C++ writer aborts the process on a full disk: write from Python instead
    torch.export.save(program, buffer, extra_files={"r2r_record.json": json.dumps(record, default=str)})
    return lambda f: f.write(buffer.getbuffer())


def _write_pickle(grown: torch.fx.GraphModule) -> Callable[[io.BufferedWriter], None]:
    buffer = io.BytesIO()
    # Unpickling re-traces with the saved tracer class: torch.export's cannot be built without arguments
    # (``_ModuleStackTracer.__init__() missing 'scope_root'``), so such a file would never load again.
    saved = [(owner, owner._tracer_cls) for owner in (grown, grown.graph) if not _buildable(owner._tracer_cls)]
    for owner, _ in saved:
        owner._tracer_cls = None
    try:
        torch.save(grown, buffer)
    finally:
        for owner, tracer in saved:
            owner._tracer_cls = tracer
    return lambda f: f.write(buffer.getbuffer())


def _buildable(tracer: Any) -> bool:
    if tracer is None:
        return True
    try:
        tracer()
    except Exception:  # noqa: BLE001
        return False
    return True


def _write_copy(src: str) -> Callable[[io.BufferedWriter], None]:
    def write(f: io.BufferedWriter) -> None:
        with open(src, "rb") as g:
            shutil.copyfileobj(g, f, 1 << 20)

    return write


def _stage_onnx(staged: _Staged, built: str, path: str) -> None:
    """Stage an ONNX file; one past protobuf's 2 GiB keeps its weights in ``path + ".data"``, named inside it."""
    if not os.path.exists(built + ".data"):
        staged.add(path, _write_copy(built))
        return
    import onnx

    final = os.path.join(os.path.dirname(built), "final")
    os.makedirs(final, exist_ok=True)
    named = os.path.join(final, os.path.basename(path))
    onnx.save(onnx.load(built), named, save_as_external_data=True, location=os.path.basename(path) + ".data")
    staged.add(path, _write_copy(named))
    staged.add(path + ".data", _write_copy(named + ".data"))


def _write_text(text: str) -> Callable[[io.BufferedWriter], None]:
    return lambda f: f.write((text + "\n").encode())


# ---------------------------------------------------------------- the run


def _say(args: argparse.Namespace, text: str) -> None:
    if not args.quiet and not args.json:
        print(text, flush=True)


def _run(args: argparse.Namespace) -> int:
    import r2r_fx
    from r2r_fx.record import growth_history

    widen_kw, groups = _check_arguments(args)
    output = args.output if args.output is not None else _default_output(args.model)
    if not args.plan:
        _check_outputs(args, output)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    model, stored, name, graph = _load_model(args.model, args)
    inputs = _example_inputs(args, stored)
    _say(args, f"capturing {name} ...")
    gm, inputs = _capture_keeping_batch(model, inputs, graph)
    timings["capture"] = time.perf_counter() - t
    t = time.perf_counter()
    analysis = r2r_fx.analyze(gm)
    points = r2r_fx.insertion_points(gm, analysis)
    deepen = (args.deepen or 1, list(args.deepen_at)) if args.deepen is not None or args.deepen_at else None
    if deepen and not deepen[1] and not any(p.default for p in points):
        raise UsageError("--deepen: this model has no point where a residual block can be inserted")
    estimate = None
    if widen_kw is not None or deepen is not None:
        try:
            estimate = _estimate(gm, analysis, widen_kw, groups, args.method, deepen, points)
        except ValueError as exc:  # plan_extras refusing an unknown group id or name
            raise UsageError(str(exc)) from exc
        _refuse_no_op(estimate, groups, widen_kw is not None)
    timings["analyze"] = time.perf_counter() - t
    if args.plan:
        _print_plan(args, analysis.groups, points, estimate)
        return EXIT_OK
    assert estimate is not None
    if estimate["memory_needed"] > estimate["memory_available"] and not args.force:
        raise UsageError(
            f"the grown model would have {estimate['params_after']:,} parameters ({_bytes(estimate['bytes_after'])}) "
            f"and growing and checking it needs ~{_bytes(estimate['memory_needed'])}, more than the "
            f"{_bytes(estimate['memory_available'])} available: grow less (or --force)"
        )
    t = time.perf_counter()
    grown = gm
    try:
        if widen_kw is not None:
            grown = r2r_fx.widen(grown, **widen_kw, groups=groups, method=args.method, seed=args.seed)
        if deepen is not None:
            grown = r2r_fx.deepen(grown, at=deepen[1] or None, count=deepen[0], method=args.method, seed=args.seed)
    except ValueError as exc:  # GrowthError is one too: a pass refusing its arguments
        raise UsageError(_one_line(exc)) from exc
    timings["rewrite"] = time.perf_counter() - t
    report = _report(args, name, model, grown, timings, growth_history(grown))
    if deepen is not None and not report["blocks_inserted"]:
        raise UsageError("--deepen would change nothing: " + "; ".join(report["deepen_skipped"][:3] or ["no block"]))
    ok = True
    staged = _Staged()
    scratch = tempfile.mkdtemp(prefix="r2r-")
    _TEMPS.add(scratch)
    onnx_tmp = os.path.join(scratch, "grown.onnx") if args.onnx else None
    if not args.no_verify:
        _say(args, "verifying (PyTorch eval/train" + (", ONNX Runtime)" if args.onnx else ") ..."))
        t = time.perf_counter()
        result = _verify(model, grown, inputs, onnx_tmp)
        timings["verify"] = time.perf_counter() - t
        report["verify"] = {
            k: getattr(result, k)
            for k in ("max_abs_error", "max_rel_error", "onnx_max_abs_error", "onnx_max_rel_error", "ok")
        }
        report["verify"]["notes"] = result.notes
        ok = result.ok
    t = time.perf_counter()
    if ok or args.force:
        if output.endswith(".pt"):
            staged.add(output, _write_pickle(grown))
            report["dynamic_axes"] = "as captured"
        else:
            program, dynamic = _export_program(grown, inputs)
            staged.add(output, _write_program(program, [r.to_json() for r in growth_history(grown)]))
            report["dynamic_axes"] = dynamic
        if onnx_tmp:
            if not os.path.exists(onnx_tmp):
                try:
                    r2r_fx.export_onnx(grown, inputs, onnx_tmp)
                except Exception as exc:  # noqa: BLE001 - an operator ONNX lacks, say
                    raise UsageError(
                        f"the grown model cannot be exported to ONNX ({_first_line(exc)}): drop --onnx"
                    ) from exc
            _stage_onnx(staged, onnx_tmp, args.onnx)
    timings["export"] = time.perf_counter() - t
    if args.report:
        staged.add(args.report, _write_text(json.dumps(report, indent=2, default=str)))
    staged.commit()
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        _print_summary(args, report, output if ok or args.force else None)
    if not ok:
        _error(
            "verification failed: the grown model is not function-preserving within tolerance"
            + ("; outputs written anyway (--force)" if args.force else "; the model was not written (use --force)")
            + (f"; the report is in {args.report}" if args.report else "")
        )
        return EXIT_NOT_PRESERVED
    return EXIT_OK


def _verify(model: nn.Module, grown: torch.fx.GraphModule, inputs: tuple[Any, ...], onnx_path: str | None) -> Any:
    """r2r_fx.verify; an ONNX export that fails is bad input (drop --onnx), not a crash of the check."""
    import r2r_fx

    try:
        return r2r_fx.verify(model, grown, inputs, onnx=onnx_path is not None, onnx_path=onnx_path)
    except Exception as exc:
        if onnx_path is None:
            raise
        r2r_fx.verify(model, grown, inputs, onnx=False)  # raises again when the problem is not ONNX
        raise UsageError(f"the grown model cannot be exported to ONNX ({_first_line(exc)}): drop --onnx") from exc


def _capture_keeping_batch(
    model: nn.Module, inputs: tuple[Any, ...], graph: torch.fx.GraphModule | None
) -> tuple[torch.fx.GraphModule, tuple[Any, ...]]:
    """Capture from a batch of 2 when the example has a batch of 1 (torch.export would fix the batch at 1).

    Rows are repeated, so nothing about the model is assumed but that it takes a batch; a model that
    does not is captured from the example as given. A .pt2's program keeps the shapes it was saved with.
    """
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
        text = _one_line(exc)
        if "Cache" in text or getattr(getattr(model, "config", None), "use_cache", False):
            text += " (a HuggingFace model returning its key/value cache: build it with use_cache=False)"
        raise UsageError(text) from exc
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:  # wrong input shape or dtype lands here
        raise UsageError(f"the model fails on the example inputs: {_first_line(exc)}") from exc


def _report(
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
                 "reason": g.reason}
                for g in entry.groups
            ]  # fmt: skip
        elif entry.op == "deepen":
            report["blocks_inserted"] += [{"at": b.at, "kind": b.kind, "params": b.params} for b in entry.blocks]
            report["deepen_skipped"] += [f"{s.at}: {s.reason}" for s in entry.skipped]
    return report


def _print_plan(
    args: argparse.Namespace, groups: list[Any], points: list[Any], estimate: dict[str, Any] | None
) -> None:
    if args.json:
        plan = {
            "groups": [
                {"id": g.id, "width": g.width, "producers": g.producers, "widenable": g.widenable, "reason": g.reason}
                for g in groups
            ],
            "insertion_points": [
                {"node": p.node, "shape": list(p.shape), "kind": p.kind, "stage": p.stage, "default": p.default}
                for p in points
            ],
        }
        if estimate is not None:
            plan["estimate"] = {k: v for k, v in estimate.items() if k != "groups"}
        print(json.dumps(plan, indent=2))
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
    if estimate is not None:
        _say(args, "estimate of the growth asked for:")
        for g in estimate["groups"]:
            if g.status == "widened":
                _say(args, f"  group {g.id:>3}: width {g.width_before} -> {g.width_after}")
        fits = "fits" if estimate["memory_needed"] <= estimate["memory_available"] else "does NOT fit (refused)"
        _say(
            args,
            f"  parameters {estimate['params_before']:,} -> {estimate['params_after']:,} "
            f"({_bytes(estimate['bytes_after'])}); growing and checking needs ~{_bytes(estimate['memory_needed'])}, "
            f"{_bytes(estimate['memory_available'])} available: {fits}",
        )


def _print_summary(args: argparse.Namespace, report: dict[str, Any], written: str | None) -> None:
    groups = report["groups"]
    widened = [g for g in groups if g["status"] == "widened"]
    skipped = [g for g in groups if g["status"] == "skipped"]
    _say(args, f"parameters      {report['params_before']:,} -> {report['params_after']:,}")
    if groups:
        _say(args, f"groups widened  {len(widened)} of {len(groups)}")
        asked = _widen_args(args.widen) or {}
        for g in widened[:20]:
            added = g["width_after"] - g["width_before"]
            note = ""
            if "extra" in asked and added != asked["extra"]:
                note = f" (asked +{asked['extra']}: channels come in pairs or whole groups)"
            _say(args, f"  group {g['id']:>3}: width {g['width_before']} -> {g['width_after']} (+{added}){note}")
        if len(widened) > 20:
            _say(args, f"  ... {len(widened) - 20} more (see --report)")
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
    if written and isinstance(report.get("dynamic_axes"), list):
        _say(args, f"dynamic axes    {', '.join(report['dynamic_axes']) or 'none (fixed to the example shapes)'}")
    _say(args, "time (s)        " + ", ".join(f"{k} {s:.2f}" for k, s in report["timings_s"].items()))
    if written:
        _say(args, f"wrote {written}" + (f" and {args.onnx}" if args.onnx else ""))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


if __name__ == "__main__":
    sys.exit(main())
