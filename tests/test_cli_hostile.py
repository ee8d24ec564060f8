"""``r2r-rewrite`` against bad and hostile inputs: one line on stderr, the right exit code, nothing left behind.

Most invocations run ``r2r_fx.cli.main(argv)`` in this process (capfd sees the file descriptors, so
C-level noise counts too); real processes are used where only they can tell: signals, exit codes of
the console script, imports from the current directory, and reloading every output in a fresh process.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
import zipfile

import pytest
import torch

import r2r_fx
from r2r_fx import cli, outputs

from cli_models import other_cnn, small_cnn

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TOOLS = os.path.join(ROOT, "tools")
SCRIPT = os.path.join(os.path.dirname(sys.executable), "r2r-rewrite")
SHAPE = ["--input-shape", "2,3,16,16"]
FACTORY = ["cli_models:small_cnn", *SHAPE]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([HERE, TOOLS])}


class _Payload:
    """Unpickling this creates ``path``: proof that a pickle ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').close()",))


def _pickle_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _rewrite_zip(src: str, dst: str, edit) -> None:
    """Copy a zip member by member; ``edit(name, data)`` returns the new data, or None to keep it."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for name in zin.namelist():
            data = zin.read(name)
            new = edit(name, data)
            zout.writestr(name, data if new is None else new)


def _plant_sample_inputs(src: str, dst: str, marker: str) -> None:
    _rewrite_zip(src, dst, lambda n, d: _pickle_bytes(_Payload(marker)) if "/sample_inputs/" in n else None)


def _plant_pickled_weight(src: str, dst: str, marker: str) -> None:
    def edit(name: str, data: bytes) -> bytes | None:
        if name.endswith("_weights_config.json"):
            config = json.loads(data)
            first = next(iter(config["config"].values()))
            first["use_pickle"] = True
            return json.dumps(config).encode()
        if name.endswith("/data/weights/weight_0"):
            return _pickle_bytes(_Payload(marker))
        return None

    _rewrite_zip(src, dst, edit)


def _plant_shape_expression(src: str, dst: str, marker: str) -> None:
    code = f"__import__('builtins').open({marker!r}, 'w')"

    def walk(tree):
        if isinstance(tree, dict):
            return {k: code if k == "expr_str" else walk(v) for k, v in tree.items()}
        if isinstance(tree, list):
            return [walk(v) for v in tree]
        return tree

    def edit(name: str, data: bytes) -> bytes | None:
        return json.dumps(walk(json.loads(data))).encode() if name.endswith("/models/model.json") else None

    _rewrite_zip(src, dst, edit)


def _plant_call(src: str, dst: str, marker: str) -> None:
    """A graph node calling ``os.system`` (reachable as ``torch.serialization.os.system``) instead of an operator."""

    def edit(name: str, data: bytes) -> bytes | None:
        if not name.endswith("/models/model.json"):
            return None
        program = json.loads(data)
        node = next(n for n in program["graph_module"]["graph"]["nodes"] if "relu" in n["target"])
        node["target"] = "torch.serialization.os.system"
        node["inputs"] = [{"name": "command", "arg": {"as_string": f"touch {marker}"}, "kind": 1}]
        return json.dumps(program).encode()

    _rewrite_zip(src, dst, edit)


def _plant_custom_object(src: str, dst: str) -> None:
    """A constant stored as a TorchScript object: torch would unpickle it with ``torch._C._pickle_load_obj``."""

    def edit(name: str, data: bytes) -> bytes | None:
        if name.endswith("_constants_config.json"):
            config = json.loads(data)
            config["config"]["evil"] = {"path_name": "custom_obj_0", "is_param": False, "use_pickle": True}
            return json.dumps(config).encode()
        return None

    _rewrite_zip(src, dst, edit)


def _plant_aoti(src: str, dst: str) -> None:
    with zipfile.ZipFile(src) as zin:
        prefix = zin.namelist()[0].split("/")[0]
    shutil.copy(src, dst)
    with zipfile.ZipFile(dst, "a", zipfile.ZIP_STORED) as z:
        z.writestr(f"{prefix}/data/aotinductor/model/model.so", b"\x7fELF not really")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """One folder of ordinary and hostile inputs, shared by the table (which must leave it as it is)."""
    d = tmp_path_factory.mktemp("hostile")
    marker = str(d / "PWNED")
    model = small_cnn()
    x = torch.randn(2, 3, 16, 16)
    torch.save(model, d / "model.pt")
    torch.save(model.state_dict(), d / "weights.pt")
    torch.save({"model": model.state_dict(), "optimizer": {"lr": 0.1}, "epoch": 3}, d / "ckpt.pt")
    torch.save({"model": model.state_dict(), "ema": model.state_dict()}, d / "two_states.pt")
    torch.save(other_cnn().state_dict(), d / "other_weights.pt")
    torch.save((x,), d / "inputs.pt")
    torch.save({"x": 1}, d / "dict_inputs.pt")
    (d / "evil.pt").write_bytes(_pickle_bytes(_Payload(marker)))
    from safetensors.torch import save_file

    save_file(model.state_dict(), str(d / "weights.safetensors"))
    static = torch.export.export(model, (x,))
    torch.export.save(static, d / "model.pt2")
    dynamic = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim.AUTO},))
    torch.export.save(dynamic, d / "dynamic.pt2")
    _plant_sample_inputs(str(d / "model.pt2"), str(d / "evil_inputs.pt2"), marker)
    _plant_pickled_weight(str(d / "model.pt2"), str(d / "evil_weight.pt2"), marker)
    _plant_shape_expression(str(d / "dynamic.pt2"), str(d / "evil_expr.pt2"), marker)
    _plant_aoti(str(d / "model.pt2"), str(d / "evil_aoti.pt2"))
    _plant_custom_object(str(d / "model.pt2"), str(d / "evil_object.pt2"))
    _plant_call(str(d / "model.pt2"), str(d / "evil_call.pt2"), marker)
    with warnings.catch_warnings():  # TorchScript is deprecated: exactly why a user may still have such a file
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.script(model), str(d / "scripted.pt"))
    (d / "truncated.pt").write_bytes((d / "model.pt").read_bytes()[:200])
    (d / "empty.pt").write_bytes(b"")
    (d / "text.pt2").write_text("not a zip archive")
    (d / "afile").write_text("not a folder")
    (d / "adir").mkdir()
    (d / "adir.pt2").mkdir()
    os.symlink(d / "model.pt2", d / "link.pt2")
    (d / "hostile_mods.py").write_text(
        "import torch\n"
        "def raises():\n    raise RuntimeError('factory exploded')\n"
        "def not_a_module():\n    return 42\n"
        "NOT_CALLABLE = 3\n"
    )
    (d / "broken_mod.py").write_text("raise ImportError('broken on import')\n")
    return d


def _listing(folder) -> set[tuple[str, int, int]]:
    """Every file and folder below ``folder`` (hidden ones too) with its size and mtime: a rewrite shows."""
    entries = set()
    for root, dirs, names in os.walk(folder):
        for name in names + dirs:
            path = os.path.join(root, name)
            st = os.lstat(path)
            entries.add((os.path.relpath(path, folder), st.st_size, st.st_mtime_ns))
    return entries


@pytest.fixture
def run(monkeypatch, capfd, tmp_path):
    """``run(folder, *argv) -> (code, stdout, stderr)``: main() in-process, cwd ``folder``, a private TMPDIR."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)  # factories imported from the folder: no __pycache__

    def call(folder, *argv: str) -> tuple[int, str, str]:
        monkeypatch.chdir(folder)
        capfd.readouterr()
        code = cli.main(list(argv))
        out, err = capfd.readouterr()
        left = [n for n in os.listdir(scratch) if not n.startswith("torchinductor_")]  # torch's own cache
        assert not left, f"temporary files left: {left}"
        return code, out, err

    return call


def assert_one_line(err: str, out: str, message: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("r2r-rewrite: error: ") and message in lines[0], lines[0]
    assert "Traceback" not in out + err


# (argv, exit code, a piece of the one-line message). The folder must be unchanged afterwards.
HOSTILE: list[tuple[list[str], int, str]] = [
    # ---- security: nothing from a file runs without --trust-pickle, .pt2 archives included
    (["evil_inputs.pt2", "--plan"], 2, "--trust-pickle"),
    (["evil_inputs.pt2", "--widen", "2"], 2, "not plain tensors"),
    (["evil_weight.pt2", "--plan"], 2, "not plain tensors"),
    (["evil_expr.pt2", "--plan"], 2, "not shape arithmetic"),
    (["evil_aoti.pt2", "--plan"], 2, "AOTInductor"),
    (["evil_call.pt2", "--plan"], 2, "calls 'torch.serialization.os.system', which is not an operator"),
    (["evil_object.pt2", "--plan"], 2, "as a pickled object (a TorchScript or opaque object)"),
    (["evil.pt", "--widen", "2", *SHAPE], 2, "--trust-pickle"),
    (["model.pt", "--widen", "2", *SHAPE], 2, "runs code"),
    (["cli_models:small_cnn", "--weights", "evil.pt", "--widen", "2", *SHAPE], 2, "beyond tensors"),
    (["cli_models:small_cnn", "--inputs", "evil.pt", "--widen", "2"], 2, "beyond tensors"),
    (["cli_models:small_cnn", "--inputs", "dict_inputs.pt", "--widen", "2"], 2, "must hold a tensor"),
    (["cli_models:small_cnn", "--inputs", "scripted.pt", "--widen", "2"], 2, "TorchScript"),
    (["scripted.pt", "--widen", "2", *SHAPE], 2, "TorchScript"),
    (["cli_models:small_cnn", "--weights", "scripted.pt", "--widen", "2", *SHAPE], 2, "TorchScript"),
    (["text.pt2", "--widen", "2"], 2, "not a .pt2 (zip) archive"),
    (["truncated.pt", "--widen", "2", *SHAPE], 2, "corrupt or truncated"),
    (["empty.pt", "--widen", "2", *SHAPE], 2, "corrupt or truncated"),
    (["weights.safetensors", "--widen", "2", *SHAPE], 2, "weights only"),
    (["weights.pt", "--widen", "2", *SHAPE], 2, "state_dict or checkpoint, not a model"),
    (["ckpt.pt", "--widen", "2", *SHAPE], 2, "--weights-key"),
    (["adir", "--widen", "2"], 2, "is a directory"),
    (["missing.pt2", "--widen", "2"], 2, "model file not found"),
    # ---- outputs: checked before any work
    (["model.pt2", "--widen", "2", "-o", "x.pt2", "--onnx", "x.pt2"], 2, "name the same file"),
    (["model.pt2", "--widen", "2", "-o", "x.pt2", "--report", "x.pt2"], 2, "name the same file"),
    (["model.pt2", "--widen", "2", "--onnx", "x.onnx", "--report", "./x.onnx"], 2, "name the same file"),
    (["model.pt2", "--widen", "2", "-o", "model.pt2"], 2, "is the model (an input)"),
    (["model.pt2", "--widen", "2", "-o", "link.pt2"], 2, "is the model (an input)"),
    (["model.pt2", "--widen", "2", "-o", "inputs.pt", "--inputs", "inputs.pt"], 2, "is --inputs"),
    (
        ["cli_models:small_cnn", "--weights", "weights.pt", "--widen", "2", *SHAPE, "--report", "weights.pt"],
        2,
        "is --weights",
    ),
    (["model.pt2", "--widen", "2", "-o", "adir.pt2"], 2, "is a directory"),
    (["model.pt2", "--widen", "2", "--onnx", "adir"], 2, "is a directory"),
    (["model.pt2", "--widen", "2", "--report", "adir"], 2, "is a directory"),
    (["model.pt2", "--widen", "2", "-o", "no/such/dir/out.pt2"], 2, "output directory does not exist"),
    (["model.pt2", "--widen", "2", "-o", "afile/out.pt2"], 2, "output directory does not exist"),
    (["model.pt2", "--widen", "2", "-o", "/proc/x.pt2"], 2, "cannot write in /proc"),
    (["model.pt2", "--widen", "2", "-o", "/dev/null"], 2, "not a regular file"),
    (["model.pt2", "--widen", "2", "-o", ""], 2, "is not a file name"),
    (["model.pt2", "--widen", "2", "-o", "adir/"], 2, "is not a file name"),
    (["model.pt2", "--widen", "2", "-o", "x" * 300 + ".pt2"], 2, "the file name is too long"),
    (["/dev/zero", "--widen", "2", *SHAPE], 2, "is not a regular file"),
    (["cli_models:small_cnn", "--inputs", "empty.pt", "--widen", "2"], 2, "cannot read inputs empty.pt"),
    (["cli_models:small_cnn", "--weights", "empty.pt", "--widen", "2", *SHAPE], 2, "cannot read weights empty.pt"),
    (["model.pt2", "--widen", "2", "-o", "out.txt"], 2, "must end in .pt2 or .pt"),
    (["model.pt2", "--widen", "2", "--onnx", "out.pt"], 2, "must end in .onnx"),
    # ---- arguments: no-op growth is refused, numbers are checked before anything is allocated
    (["model.pt2", "--deepen", "0"], 2, "must be >= 1"),
    (["model.pt2", "--deepen", "-3"], 2, "must be >= 1"),
    (["model.pt2", "--deepen", "many"], 2, "invalid int value"),
    (["model.pt2", "--widen", "1"], 2, "nothing would change"),
    (["model.pt2", "--widen", "1.0"], 2, "nothing would change"),
    (["model.pt2", "--widen", "+0"], 2, "nothing would change"),
    (["model.pt2", "--widen", "0.5"], 2, "cannot shrink"),
    (["model.pt2", "--widen", "-2"], 2, "cannot shrink"),
    (["model.pt2", "--widen", "inf"], 2, "bad --widen 'inf'"),
    (["model.pt2", "--widen", "nan"], 2, "bad --widen 'nan'"),
    (["model.pt2", "--widen=--"], 2, "bad --widen '--'"),
    (["model.pt2", "--widen", "+x"], 2, "bad --widen"),
    (["model.pt2", "--widen", "two"], 2, "bad --widen"),
    (["model.pt2", "--widen", "1e400"], 2, "bad --widen"),
    (["model.pt2", "--widen", "100000"], 2, "more than the"),
    (["model.pt2", "--widen", "+99999999999"], 2, "more than the"),
    (["model.pt2", "--deepen", "100000000"], 2, "more than the"),
    (["model.pt2", "--widen", "2", "--groups", "0"], 2, "width group 0 cannot be widened"),
    (["model.pt2", "--widen", "2", "--groups", ","], 2, "selects no group"),
    (["model.pt2", "--widen", "2", "--groups", "99"], 2, "unknown width group id 99"),
    (["model.pt2", "--widen", "2", "--groups", "nope"], 2, "no width group is produced by a node named 'nope'"),
    (["model.pt2", "--groups", "1", "--deepen", "1"], 2, "give --widen too"),
    (["cli_models:small_cnn", "--widen", "2", "--input-shape", "1,3,200000,200000"], 2, "memory available"),
    (["cli_models:small_cnn", "--widen", "2", "--input-shape", "0,3,16,16"], 2, "sizes must be positive"),
    (["cli_models:small_cnn", "--widen", "2", "--input-shape", "a,b"], 2, "comma-separated integers"),
    (["cli_models:small_cnn", "--widen", "2", "--input-shape", "1,3,99999999999999,1"], 2, "comma-separated"),
    (["cli_models:small_cnn", "--widen", "2", "--input-shape", "cplx:1,3"], 2, "unknown dtype 'cplx'"),
    (["cli_models:small_cnn", "--widen", "2", "--input-shape", "2,5,16,16"], 2, "fails on the example inputs"),
    (["cli_models:small_cnn", "--widen", "2"], 2, "no example inputs"),
    (["model.pt2", "--widen", "2", "--method", "bogus"], 2, "method 'bogus' is not available"),
    (["model.pt2"], 2, "nothing to do"),
    (["model.pt2", "--frobnicate"], 2, "unrecognized arguments: --frobnicate"),
    ([], 2, "the following arguments are required: model"),
    (["model.pt2", "--deepen-at", "nope"], 2, "'nope' is not a node"),
    (["model.pt2", "--deepen-at", "conv2d_default", "--method", "net2net"], 2, "needs an idempotent activation"),
    # ---- loading ergonomics
    (["model.pt2", "--weights", "weights.pt", "--widen", "2"], 2, "--weights only applies"),
    (["cli_models:small_cnn", "--weights-key", "model", "--widen", "2", *SHAPE], 2, "--weights-key needs --weights"),
    (FACTORY + ["--weights", "two_states.pt", "--widen", "2"], 2, "several state_dicts (model, ema)"),
    (FACTORY + ["--weights", "ckpt.pt", "--weights-key", "nope", "--widen", "2"], 2, "keys: model, optimizer, epoch"),
    (FACTORY + ["--weights", "ckpt.pt", "--weights-key", "optimizer", "--widen", "2"], 2, "is not a state_dict"),
    (FACTORY + ["--weights", "missing.pt", "--widen", "2"], 2, "weights file not found"),
    (FACTORY + ["--weights", "adir", "--widen", "2"], 2, "is a directory"),
    (FACTORY + ["--inputs", "adir", "--widen", "2"], 2, "is a directory"),
    (["hostile_mods:raises", *SHAPE, "--widen", "2"], 2, "RuntimeError: factory exploded"),
    (["hostile_mods:not_a_module", *SHAPE, "--widen", "2"], 2, "returned a int, not an nn.Module"),
    (["hostile_mods:NOT_CALLABLE", *SHAPE, "--widen", "2"], 2, "not a callable factory"),
    (["hostile_mods:absent", *SHAPE, "--widen", "2"], 2, "cannot import hostile_mods:absent"),
    (["broken_mod:f", *SHAPE, "--widen", "2"], 2, "broken on import"),
    (["no_such_pkg.mod:fn", *SHAPE, "--widen", "2"], 2, "cannot import no_such_pkg.mod:fn"),
    ([":fn", *SHAPE, "--widen", "2"], 2, "expected package.module:factory"),
]


@pytest.mark.parametrize(("argv", "code", "message"), HOSTILE, ids=[" ".join(a)[:70] for a, _, _ in HOSTILE])
def test_hostile_invocation(files, run, argv, code, message):
    before = _listing(files)
    got, out, err = run(files, *argv)
    assert got == code, (out, err)
    assert_one_line(err, out, message)
    assert _listing(files) == before
    assert not (files / "PWNED").exists()


def test_table_is_large_enough():
    assert len(HOSTILE) >= 50


def test_weights_mismatch_lists_every_key(files, run):
    before = _listing(files)
    code, out, err = run(files, *FACTORY, "--weights", "other_weights.pt", "--widen", "2")
    assert code == 2
    assert_one_line(err, out, "does not fit cli_models:small_cnn")
    expected = set(small_cnn().state_dict())
    given = set(other_cnn().state_dict())
    for key in (expected - given) | (given - expected):  # every missing and unexpected key, nothing cut off
        assert key in err
    assert "0.weight [16, 3, 3, 3] vs [8, 3, 3, 3]" in err
    assert _listing(files) == before


def test_planted_payloads_are_live(files, tmp_path, run):
    """The planted files really run code when trusted: the refusals above are not vacuous."""
    for name in ("evil_inputs.pt2", "evil_weight.pt2", "evil_expr.pt2"):
        marker = tmp_path / "PWNED"
        planted = tmp_path / name
        plant = {
            "evil_inputs.pt2": _plant_sample_inputs,
            "evil_weight.pt2": _plant_pickled_weight,
            "evil_expr.pt2": _plant_shape_expression,
        }[name]
        plant(str(files / ("dynamic.pt2" if name == "evil_expr.pt2" else "model.pt2")), str(planted), str(marker))
        run(tmp_path, str(planted), "--plan", "--trust-pickle")
        assert marker.exists(), name
        marker.unlink()
        code, out, err = run(tmp_path, str(planted), "--plan")
        assert code == 2 and not marker.exists(), (name, err)


# ---------------------------------------------------------------- library errors and exit codes 1 / 3


def test_internal_error_is_exit_3_with_one_line(files, run, monkeypatch):
    def boom(*args, **kwargs):
        print("Traceback (most recent call last): what torch's ShapeProp prints", file=sys.stderr)
        raise KeyError("a bug")

    monkeypatch.setattr(r2r_fx, "widen", boom)
    before = _listing(files)
    code, out, err = run(files, "model.pt2", "--widen", "2")
    assert code == 3
    assert_one_line(err, out, "internal error: KeyError")
    assert "--debug" in err
    code, out, err = run(files, "model.pt2", "--widen", "2", "--debug")
    assert code == 3 and "Traceback" in err and "KeyError" in err.strip().splitlines()[-1]
    assert _listing(files) == before


def test_not_preserved_error_is_exit_1(files, run, monkeypatch):
    def not_preserved(*args, **kwargs):
        raise r2r_fx.NotPreservedError("widen", "out", "eval", 0.5, 1e-5)

    monkeypatch.setattr(r2r_fx, "widen", not_preserved)
    before = _listing(files)
    code, out, err = run(files, "model.pt2", "--widen", "2", "-o", "never.pt2")
    assert code == 1
    assert_one_line(err, out, "not function-preserving, nothing written")
    assert _listing(files) == before


def test_random_method_is_exit_1_and_writes_only_the_report(files, run):
    before = _listing(files)
    code, out, err = run(files, "model.pt2", "--widen", "2", "--method", "random", "-o", "r.pt2", "--report", "r.json")
    assert code == 1
    assert_one_line(err, out, "the model was not written (use --force); the report is in r.json")
    after = _listing(files)
    assert before < after and {p for p, _, _ in after - before} == {"r.json"}  # the report says why
    assert json.loads((files / "r.json").read_text())["verify"]["ok"] is False
    (files / "r.json").unlink()


def test_frozen_only_deepen_refused(tmp_path, run):
    """A model without a point for a residual block: --deepen would change nothing."""
    torch.export.save(torch.export.export(torch.nn.Linear(4, 3), (torch.randn(2, 4),)), tmp_path / "lin.pt2")
    before = _listing(tmp_path)
    code, out, err = run(tmp_path, "lin.pt2", "--deepen", "1")
    assert code == 2
    assert_one_line(err, out, "--deepen")
    assert _listing(tmp_path) == before


# ---------------------------------------------------------------- what works, said clearly


def test_checkpoint_detected_and_widths_printed(files, tmp_path, run):
    for name in ("ckpt.pt", "weights.pt", "weights.safetensors"):
        shutil.copy(files / name, tmp_path / name)
    code, out, err = run(tmp_path, *FACTORY, "--weights", "ckpt.pt", "--widen", "+3", "-o", "a.pt2")
    assert code == 0 and err == "", err
    assert "group   1: width 8 -> 12 (+4) (asked +3" in out
    code, out, err = run(
        tmp_path, *FACTORY, "--weights", "ckpt.pt", "--weights-key", "model", "--deepen", "1", "-o", "b.pt"
    )
    assert code == 0 and "blocks inserted" in out, err
    code, out, err = run(tmp_path, *FACTORY, "--weights", "weights.safetensors", "--widen", "2", "--plan")
    assert code == 0 and "width 8 -> 16" in out and "fits" in out, err
    assert err == ""


def test_outputs_respect_the_umask(files, tmp_path, run):
    shutil.copy(files / "model.pt2", tmp_path / "model.pt2")
    old = os.umask(0o027)
    try:
        code, out, err = run(
            tmp_path, "model.pt2", "--widen", "2", "-o", "g.pt2", "--onnx", "g.onnx", "--report", "r.json"
        )
    finally:
        os.umask(old)
    assert code == 0 and err == "", err
    for name in ("g.pt2", "g.onnx", "r.json"):
        assert (os.stat(tmp_path / name).st_mode & 0o777) == 0o640, name
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".r2r-")]


def test_api_export_onnx_respects_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        r2r_fx.export_onnx(small_cnn(), (torch.randn(2, 3, 16, 16),), tmp_path / "m.onnx")
    finally:
        os.umask(old)
    assert (os.stat(tmp_path / "m.onnx").st_mode & 0o777) == 0o644
    assert os.listdir(tmp_path) == ["m.onnx"]


def test_full_disk_is_one_line_and_leaves_nothing(files, tmp_path, run):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=120k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        (disk / "filler").write_bytes(b"\0" * 100_000)
        before = _listing(disk)
        code, out, err = run(
            files, "model.pt2", "--widen", "2", "-o", str(disk / "g.pt2"), "--onnx", str(disk / "g.onnx")
        )
        assert code == 2, (out, err)
        assert_one_line(err, out, "No space left on device")
        assert _listing(disk) == before
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_read_only_destination_is_refused_before_any_work(files, tmp_path, run):
    disk = tmp_path / "ro"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        code, out, err = run(files, "model.pt2", "--widen", "2", "--report", str(disk / "r.json"))
        assert code == 2, (out, err)
        assert_one_line(err, out, "Read-only file system")
        assert out == ""  # refused before loading anything
        assert os.listdir(disk) == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_onnx_with_external_data_is_staged_with_its_data_file(tmp_path):
    """Past 2 GiB an ONNX file keeps its weights beside it: both are renamed in, the file names its data."""
    import onnx

    built = tmp_path / "scratch" / "grown.onnx"
    built.parent.mkdir()
    r2r_fx.export_onnx(small_cnn(), (torch.randn(2, 3, 16, 16),), built)
    onnx.save(onnx.load(built), built, save_as_external_data=True, location="grown.onnx.data", size_threshold=0)
    (tmp_path / "out").mkdir()
    staged = outputs.Staged()
    outputs.stage_onnx(staged, str(built), str(tmp_path / "out" / "m.onnx"))
    staged.commit()
    assert sorted(os.listdir(tmp_path / "out")) == ["m.onnx", "m.onnx.data"]
    shutil.rmtree(tmp_path / "scratch")
    x = torch.randn(3, 3, 16, 16)
    (got,) = r2r_fx.run_onnx(tmp_path / "out" / "m.onnx", (x,))
    with torch.no_grad():
        expected = small_cnn()(x)
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_permissions_as_an_unprivileged_user(files):
    """Unreadable inputs and unwritable folders, as a user the permissions apply to (root ignores them)."""
    prefix = []
    if os.geteuid() == 0:
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv: permissions cannot be tested")
        prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    folder = tempfile.mkdtemp(prefix="r2r-perm-", dir="/tmp")
    home = tempfile.mkdtemp(prefix="r2r-perm-home-", dir="/tmp")
    try:
        os.chmod(folder, 0o755)  # readable, not writable, for the other user
        shutil.copy(files / "model.pt2", os.path.join(folder, "model.pt2"))
        shutil.copy(files / "model.pt2", os.path.join(folder, "secret.pt2"))
        os.chmod(os.path.join(folder, "model.pt2"), 0o644)
        os.chmod(os.path.join(folder, "secret.pt2"), 0o600)
        if prefix:
            os.chown(home, 65534, 65534)
        else:
            os.chmod(folder, 0o555)
        env = {**ENV, "HOME": home, "TMPDIR": home}
        before = _listing(folder)
        for argv, message in (
            (["model.pt2", "--widen", "2", "-o", "out.pt2"], "Permission denied"),
            (["secret.pt2", "--widen", "2", "-o", os.path.join(home, "out.pt2")], "cannot read model file"),
        ):
            proc = subprocess.run(
                [*prefix, SCRIPT, *argv], cwd=folder, env=env, capture_output=True, text=True, timeout=300
            )
            assert proc.returncode == 2, proc.stderr
            assert_one_line(proc.stderr, proc.stdout, message)
            assert _listing(folder) == before
        assert not [n for n in os.listdir(home) if n.startswith((".r2r-", "r2r-", "out"))]
    finally:
        os.chmod(folder, 0o755)
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)


# ---------------------------------------------------------------- real processes


def _script(*argv: str, cwd, env=None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([SCRIPT, *argv], cwd=cwd, env=env or ENV, capture_output=True, text=True, timeout=timeout)


def test_console_script_exit_codes_and_imports_from_the_current_directory(files, tmp_path):
    (tmp_path / "mymodels.py").write_text("from cli_models import small_cnn as make\n")
    env = {
        **os.environ,
        "PYTHONPATH": HERE,
    }  # cli_models importable; the current directory only by r2r-rewrite
    proc = _script("mymodels:make", *SHAPE, "--widen", "2", "--plan", cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "width groups:" in proc.stdout and proc.stderr == ""
    proc = _script("mymodels:make", *SHAPE, "--widen", "inf", cwd=tmp_path, env=env)
    assert proc.returncode == 2
    assert_one_line(proc.stderr, proc.stdout, "bad --widen 'inf'")
    assert sorted(os.listdir(tmp_path)) == ["__pycache__", "mymodels.py"] or sorted(os.listdir(tmp_path)) == [
        "mymodels.py"
    ]


_KILL_WHILE_WRITING = """
import os, signal, sys
import r2r_fx.cli as cli
import r2r_fx.outputs as outputs
real_add = outputs.Staged.add
def add(self, path, write):
    real_add(self, path, write)
    assert any(n.startswith(".r2r-") for n in os.listdir(os.path.dirname(os.path.abspath(path))))
    os.kill(os.getpid(), getattr(signal, sys.argv[1]))
outputs.Staged.add = add
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.mark.parametrize(("sig", "code"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_signal_while_writing_cleans_up(files, tmp_path, sig, code):
    shutil.copy(files / "model.pt2", tmp_path / "model.pt2")
    before = _listing(tmp_path)
    argv = ["model.pt2", "--widen", "2", "--no-verify", "-o", "g.pt2", "--report", "r.json"]
    proc = subprocess.run(
        [sys.executable, "-c", _KILL_WHILE_WRITING, sig, *argv],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == code, proc.stderr
    assert_one_line(proc.stderr, proc.stdout, f"interrupted by {sig}")
    assert _listing(tmp_path) == before


def test_sigterm_from_outside_mid_run(files, tmp_path):
    shutil.copy(files / "model.pt2", tmp_path / "model.pt2")
    before = _listing(tmp_path)
    proc = subprocess.Popen(
        [SCRIPT, "model.pt2", "--widen", "2", "--deepen", "1", "--onnx", "g.onnx", "-o", "g.pt2"],
        cwd=tmp_path,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().startswith("capturing")  # the handlers are installed by now
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, (out, err)
    assert_one_line(err, out, "interrupted by SIGTERM")
    assert _listing(tmp_path) == before


_SWALLOWED = """
import os, signal, sys
import r2r_fx.cli as cli
import r2r_fx.outputs as outputs
real = outputs.Staged.commit
class Finalised:
    def __del__(self):  # Python cannot propagate an exception out of here: it swallows the handler's raise
        os.kill(os.getpid(), getattr(signal, sys.argv[1]))
        sum(range(100))  # bytecode for the handler to run in
def commit(self):
    Finalised()
    return real(self)
outputs.Staged.commit = commit
sys.exit(cli.main(sys.argv[2:]))
"""


def test_a_signal_whose_raise_python_swallowed_still_interrupts(files, tmp_path):
    """A signal that lands in a finaliser or weakref callback (seen inside an import under load) used to be
    lost: the run went on and wrote its outputs with exit 0."""
    shutil.copy(files / "model.pt2", tmp_path / "model.pt2")
    before = _listing(tmp_path)
    argv = ["model.pt2", "--widen", "2", "--no-verify", "-o", "g.pt2", "--report", "r.json"]
    proc = subprocess.run(
        [sys.executable, "-c", _SWALLOWED, "SIGTERM", *argv],
        cwd=tmp_path,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 143, (proc.stdout, proc.stderr)
    assert_one_line(proc.stderr, proc.stdout, "interrupted by SIGTERM")
    assert _listing(tmp_path) == before


# ---------------------------------------------------------------- every output loads again, in a fresh process

_RELOAD = """
import json, sys
import torch
case = torch.load(sys.argv[1])
results = {}
program = torch.export.load(case["pt2"])
results["pt2_needs_transformers"] = "transformers" in sys.modules
module = program.module()
for name, x in case["inputs"].items():
    with torch.no_grad():
        out = module(x)
    out = out["logits"] if isinstance(out, dict) else out
    results[f"pt2 {name}"] = float((out - case["expected"][name]).abs().max() / case["expected"][name].abs().max())
import r2r_fx
for name, x in case["inputs"].items():
    (out,) = r2r_fx.run_onnx(case["onnx"], (x,))[:1]
    results[f"onnx {name}"] = float((out - case["expected"][name]).abs().max() / case["expected"][name].abs().max())
if case.get("import"):
    __import__(case["import"]).tiny_llama
pickled = torch.load(case["pt"], weights_only=False)
for name, x in case["inputs"].items():
    with torch.no_grad():
        out = pickled(x)
    out = out["logits"] if isinstance(out, dict) else getattr(out, "logits", out)
    results[f"pt {name}"] = float((out - case["expected"][name]).abs().max() / case["expected"][name].abs().max())
results["report"] = sorted(json.load(open(case["report"])))
print(json.dumps(results))
"""


def _reload(tmp_path, model, inputs: dict[str, torch.Tensor], **paths) -> dict:
    with torch.no_grad():
        expected = {k: getattr(model(x), "logits", model(x)) for k, x in inputs.items()}
    case = {**{k: str(v) for k, v in paths.items()}, "inputs": inputs, "expected": expected}
    if "import" in paths:
        case["import"] = paths["import"]
    torch.save(case, tmp_path / "case.pt")
    proc = subprocess.run(
        [sys.executable, "-c", _RELOAD, str(tmp_path / "case.pt")], env=ENV, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_module_path_outputs_reload_with_a_dynamic_batch(tmp_path, run):
    argv = ["cli_models:small_cnn", "--input-shape", "1,3,16,16", "--widen", "2", "--deepen", "1"]
    code, out, err = run(tmp_path, *argv, "-o", "g.pt2", "--onnx", "g.onnx", "--report", "r.json")
    assert code == 0 and err == "", err
    assert "dynamic axes    batch" in out
    code, _, err = run(tmp_path, *argv, "-o", "g.pt")
    assert code == 0 and err == "", err
    inputs = {"batch 1": torch.randn(1, 3, 16, 16), "batch 3": torch.randn(3, 3, 16, 16)}
    got = _reload(
        tmp_path,
        small_cnn(),
        inputs,
        pt2=tmp_path / "g.pt2",
        onnx=tmp_path / "g.onnx",
        pt=tmp_path / "g.pt",
        report=tmp_path / "r.json",
    )
    assert "params_after" in got.pop("report")
    assert got.pop("pt2_needs_transformers") is False
    assert len(got) == 6 and all(err <= 1e-4 for err in got.values()), got


def test_token_model_keeps_batch_and_sequence_dynamic(tmp_path, run):
    argv = ["cli_models:token_mlp", "--input-shape", "int64:1,8", "--widen", "2", "-o", "t.pt2", "--onnx", "t.onnx"]
    code, out, err = run(tmp_path, *argv)
    assert code == 0 and err == "", err
    assert "dynamic axes    batch, sequence" in out
    from cli_models import token_mlp

    ids = torch.randint(0, 64, (3, 5))
    with torch.no_grad():
        expected = token_mlp()(ids)
        got = torch.export.load(tmp_path / "t.pt2").module()(ids)
    (onnx_out,) = r2r_fx.run_onnx(tmp_path / "t.onnx", (ids,))
    for out_ in (got, onnx_out):
        assert out_.shape == (3, 5, 64)
        assert (out_ - expected).abs().max() <= 1e-4 * expected.abs().max()


def _tiny_llama_or_skip():
    try:
        from cli_models import tiny_llama

        return tiny_llama()
    except ImportError as exc:
        pytest.skip(f"transformers is not usable here: {exc}")


def test_export_path_outputs_reload_without_transformers(tmp_path, run):
    model = _tiny_llama_or_skip()
    argv = ["cli_models:tiny_llama", "--input-shape", "int64:1,8", "--widen", "2"]
    code, out, err = run(tmp_path, *argv, "-o", "l.pt2", "--onnx", "l.onnx", "--report", "r.json")
    assert code == 0 and err == "", err
    assert "dynamic axes    batch, sequence" in out  # capture exports token ids with a dynamic sequence
    code, _, err = run(tmp_path, *argv, "-o", "l.pt", "--no-verify")
    assert code == 0 and err == "", err
    inputs = {
        "batch 1": torch.randint(0, 64, (1, 8)),
        "batch 3": torch.randint(0, 64, (3, 8)),
        "batch 2, length 5": torch.randint(0, 64, (2, 5)),
    }
    got = _reload(
        tmp_path,
        model,
        inputs,
        pt2=tmp_path / "l.pt2",
        onnx=tmp_path / "l.onnx",
        pt=tmp_path / "l.pt",
        report=tmp_path / "r.json",
        **{"import": "cli_models"},
    )
    assert "verify" in got.pop("report")
    assert got.pop("pt2_needs_transformers") is False  # outputs are plain dicts in the saved program
    assert len(got) == 9 and all(err <= 1e-4 for err in got.values()), got


_RELOAD_PLAIN = """
import sys, torch
import r2r_fx
ids = torch.load(sys.argv[1])
module = torch.export.load(sys.argv[2]).module()
assert "transformers" not in sys.modules
with torch.no_grad():
    logits = module(ids)["logits"]
(onnx_logits,) = r2r_fx.run_onnx(sys.argv[3], (ids,))
torch.save((logits, onnx_logits), sys.argv[4])
"""


def test_hf_program_input_gives_a_plain_program_dynamic_in_batch_and_sequence(tmp_path, run):
    """A .pt2 of a HF model names its output class: the package is imported to read it; the output needs none."""
    model = _tiny_llama_or_skip()
    example = torch.randint(0, 64, (2, 8))
    dims = {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO}
    torch.export.save(torch.export.export(model, (example,), strict=False, dynamic_shapes=(dims,)), tmp_path / "l.pt2")
    code, out, err = run(tmp_path, "l.pt2", "--widen", "2", "-o", "g.pt2", "--onnx", "g.onnx")
    assert code == 0 and err == "", err
    assert "dynamic axes    batch, sequence" in out
    ids = torch.randint(0, 64, (3, 5))
    torch.save(ids, tmp_path / "ids.pt")
    paths = [str(tmp_path / n) for n in ("ids.pt", "g.pt2", "g.onnx", "got.pt")]
    proc = subprocess.run(
        [sys.executable, "-c", _RELOAD_PLAIN, *paths], env=ENV, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    with torch.no_grad():
        expected = model(ids).logits
    for got in torch.load(tmp_path / "got.pt"):
        assert got.shape == (3, 5, 64)
        assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_hf_cache_failure_suggests_use_cache_false(tmp_path, run):
    _tiny_llama_or_skip()
    code, out, err = run(tmp_path, "cli_models:tiny_llama_with_cache", "--input-shape", "int64:1,8", "--widen", "2")
    if code == 0:
        pytest.skip("this transformers version's cache is captured")
    assert code == 2
    assert_one_line(err, out, "use_cache=False")
    assert os.listdir(tmp_path) == ["tmp"]
