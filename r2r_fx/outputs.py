"""Writing the outputs of ``r2r-rewrite``: all of them or none, and no temporary file left behind.

- Destinations are checked before any work (``check_outputs``): no two outputs name one file, none is an
  input, a directory or in a folder that cannot be written.
- Each output is staged as a hidden temporary beside its destination (``Staged``) and all are renamed
  into place together at the end, with SIGINT / SIGTERM held off while they are.
- SIGINT / SIGTERM unwind the run as :class:`Interrupted`; every temporary path is removed on any exit
  (``remove_temps``), and ``interrupted_outputs`` says what was written.
- Nothing here imports torch (``--help`` and bad arguments answer at once); the grown model's own
  serialisation is in :mod:`r2r_fx.saving`.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable
from typing import Any

from r2r_fx.cli_errors import UsageError

__all__ = [
    "Interrupted",
    "Staged",
    "check_outputs",
    "default_output",
    "install_signal_handlers",
    "interrupted_outputs",
    "raise_if_interrupted",
    "remove_temps",
    "reset_written",
    "restore_signal_handlers",
    "scratch_folder",
    "stage_onnx",
    "write_text",
]

# ---------------------------------------------------------------- signals and temporary files

# Every temporary path the command creates, removed on any exit (signals included), and the outputs written.
_TEMPS: set[str] = set()
_WRITTEN: list[str] = []
# Signals received during this run. Python swallows an exception raised where it cannot propagate (a weakref
# callback or ``__del__`` the handler happened to interrupt, seen inside an import), so every check raises the
# signal again until the run ends.
_RECEIVED: list[int] = []


class Interrupted(BaseException):
    """SIGINT / SIGTERM: unwinds like KeyboardInterrupt (past ``except Exception``), then exit 128 + signal."""

    def __init__(self, signum: int) -> None:
        self.code = 128 + signum
        self.name = signal.Signals(signum).name
        super().__init__(self.name)


def install_signal_handlers() -> dict[int, Any]:
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous = {}
    _RECEIVED.clear()
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous[signum] = signal.signal(signum, _on_signal)
    return previous


def _on_signal(signum: int, frame: Any) -> None:
    for other in (signal.SIGINT, signal.SIGTERM):  # a second signal must not break the clean-up
        signal.signal(other, signal.SIG_IGN)
    _RECEIVED.append(signum)
    raise Interrupted(signum)


def raise_if_interrupted() -> None:
    """Raise the run's signal again if one arrived: its first raise may have been swallowed."""
    if _RECEIVED:
        raise Interrupted(_RECEIVED[0])


def restore_signal_handlers(previous: dict[int, Any]) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def remove_temps() -> None:
    for path in list(_TEMPS):
        with contextlib.suppress(OSError):
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            elif os.path.lexists(path):
                os.remove(path)
        _TEMPS.discard(path)


def scratch_folder() -> str:
    """A private temporary folder, removed with the other temporaries."""
    path = tempfile.mkdtemp(prefix="r2r-")
    _TEMPS.add(path)
    return path


def reset_written() -> None:
    _WRITTEN.clear()


def interrupted_outputs() -> str:
    if _WRITTEN:
        return f"after writing {', '.join(_WRITTEN)}"
    return "no output written, temporary files removed"


# ---------------------------------------------------------------- destinations (checked before any work)


def default_output(spec: str) -> str:
    if os.path.isfile(spec):
        stem, _ = os.path.splitext(spec)
        return f"{stem}.grown.pt2"
    return spec.replace(":", "_").replace(".", "_").replace(os.sep, "_") + ".grown.pt2"


def check_outputs(args: argparse.Namespace, output: str) -> None:
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


# ---------------------------------------------------------------- staging


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _cannot_write(path: str, exc: OSError) -> UsageError:
    return UsageError(f"cannot write {path}: {exc.strerror or exc}")


class Staged:
    """Output files staged as hidden temporaries beside their destinations, renamed together at the end."""

    def __init__(self) -> None:
        self.pending: list[tuple[str, str]] = []

    def add(self, path: str, write: Callable[[io.BufferedWriter], None]) -> None:
        folder = os.path.dirname(os.path.abspath(path))
        try:
            fd, tmp = tempfile.mkstemp(prefix=".r2r-", suffix=os.path.splitext(path)[1], dir=folder)
        except OSError as exc:
            raise _cannot_write(path, exc) from None
        _TEMPS.add(tmp)
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())
        except OSError as exc:
            raise _cannot_write(path, exc) from None
        self.pending.append((tmp, path))

    def commit(self) -> None:
        """Rename every staged file into place, with SIGINT / SIGTERM held off: all outputs appear, or none."""
        raise_if_interrupted()
        blocked = {signal.SIGINT, signal.SIGTERM}
        held = threading.current_thread() is threading.main_thread()
        if held:
            signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            for tmp, path in self.pending:
                try:
                    os.replace(tmp, path)
                except OSError as exc:
                    raise _cannot_write(path, exc) from None
                _TEMPS.discard(tmp)
                _WRITTEN.append(path)
            self.pending = []
        finally:
            if held:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, blocked)


# ---------------------------------------------------------------- files staged as they are


def _write_copy(src: str) -> Callable[[io.BufferedWriter], None]:
    def write(f: io.BufferedWriter) -> None:
        with open(src, "rb") as g:
            shutil.copyfileobj(g, f, 1 << 20)

    return write


def stage_onnx(staged: Staged, built: str, path: str) -> None:
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


def write_text(text: str) -> Callable[[io.BufferedWriter], None]:
    return lambda f: f.write((text + "\n").encode())
