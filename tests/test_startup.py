"""What a run costs before it starts: ``import r2r_fx``, ``r2r-rewrite --help`` and argument errors import no
torch (checked in fresh interpreters), and the lazily loaded package still has every public name."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _fresh(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=HERE)


@pytest.mark.parametrize(
    "argv, code",
    [
        (["--help"], 0),
        (["missing.pt2", "--widen", "2"], 2),
        (["cli_models.py", "--widen", "two"], 2),
        (["missing.pt2"], 2),  # nothing to do
        (["missing.pt2", "--widen", "2", "-o", "/no/such/folder/x.pt2"], 2),
        (["missing.pt2", "--widen", "2", "--onnx", "x.txt"], 2),
        (["missing.pt2", "--deepen", "0"], 2),
        (["missing.pt2", "--widen", "2", "--weights-key", "model"], 2),
        (["--no-such-flag"], 2),
    ],
)
def test_help_and_argument_errors_import_no_torch(argv, code):
    done = _fresh(
        "import sys, contextlib, io\n"
        "import r2r_fx.cli as cli\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    rc = cli.main({argv!r})\n"
        "print(rc, 'torch' in sys.modules)\n"
    )
    assert done.returncode == 0, done.stderr
    rc, imported = done.stdout.split()
    assert int(rc) == code
    assert imported == "False"
    if code:
        assert done.stderr.count("\n") == 1 and done.stderr.startswith("r2r-rewrite: error:")


def test_package_is_lazy_and_complete():
    done = _fresh(
        "import sys, r2r_fx\n"
        "print('torch' in sys.modules)\n"
        "import r2r_fx.capture, r2r_fx.verify\n"  # binding the submodules must not hide the functions
        "assert callable(r2r_fx.capture) and callable(r2r_fx.verify), (r2r_fx.capture, r2r_fx.verify)\n"
        "for name in r2r_fx.__all__:\n"
        "    assert getattr(r2r_fx, name) is not None, name\n"
        "from r2r_fx import capture, widen, deepen, verify, carry_optimizer, tree, blocks\n"
        "assert r2r_fx.record.growth_history is r2r_fx.growth_history\n"
        "try:\n"
        "    r2r_fx.no_such_name\n"
        "except AttributeError as exc:\n"
        "    print('AttributeError', exc)\n"
    )
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.splitlines()
    assert first == "False"
    assert second.startswith("AttributeError") and "no_such_name" in second


def test_built_in_method_names_match_the_registry():
    from r2r_fx.cli import BUILT_IN_METHODS
    from r2r_fx.methods import METHODS

    assert set(BUILT_IN_METHODS) <= set(METHODS)
    assert set(BUILT_IN_METHODS) == {n for n, cls in METHODS.items() if cls.__module__ == "r2r_fx.methods"}


def _run_with_stderr_on_a_terminal(args: list[str], cwd: str) -> tuple[int, str, str]:
    pty = pytest.importorskip("pty")
    master, slave = pty.openpty()
    env = {**os.environ, "PYTHONPATH": HERE}
    proc = subprocess.Popen(
        [sys.executable, "-m", "r2r_fx", *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=slave
    )
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:  # the other end closed
            break
        if not chunk:
            break
        seen += chunk
    stdout = proc.stdout.read().decode()
    proc.wait(timeout=300)
    os.close(master)
    return proc.returncode, stdout, seen.decode()


def test_progress_on_a_terminal_only(tmp_path):
    """Each phase shows on a terminal's stderr; a pipe, --quiet and --json get nothing extra."""
    args = ["cli_models:small_cnn", "--input-shape", "2,3,16,16", "--widen", "2"]
    code, stdout, stderr = _run_with_stderr_on_a_terminal([*args, "-o", str(tmp_path / "a.pt2")], HERE)
    assert code == 0, stderr
    for phase in ("loading", "capturing", "analysing", "growing", "verifying", "writing"):
        assert f"done {phase}" in stderr, stderr
    assert "Warning" not in stderr and "\r" not in stdout
    code, _, stderr = _run_with_stderr_on_a_terminal([*args, "-o", str(tmp_path / "b.pt2"), "--quiet"], HERE)
    assert code == 0 and stderr == ""
    env = {**os.environ, "PYTHONPATH": HERE}
    piped = subprocess.run(
        [sys.executable, "-m", "r2r_fx", *args, "-o", str(tmp_path / "c.pt2")],
        cwd=HERE, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert piped.returncode == 0 and piped.stderr == ""
