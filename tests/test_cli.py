"""End-to-end tests of the installed ``r2r-rewrite`` console script (subprocesses; the bad-input table in-process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import r2r_fx

from cli_models import small_cnn

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(os.path.dirname(sys.executable), "r2r-rewrite")
SHAPE = ["--input-shape", "2,3,16,16"]


def run(*args: str, cwd: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": HERE}
    return subprocess.run([SCRIPT, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def files(tmp_path):
    model = small_cnn()
    x = torch.randn(2, 3, 16, 16)
    torch.save(model, tmp_path / "model.pt")
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    torch.save((x,), tmp_path / "inputs.pt")
    batch = {0: torch.export.Dim("batch")}
    torch.export.save(torch.export.export(model, (x,), dynamic_shapes=(batch,)), tmp_path / "model.pt2")
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "static.pt2")
    (tmp_path / "truncated.pt").write_bytes((tmp_path / "model.pt").read_bytes()[:200])
    (tmp_path / "afile").write_text("not a folder")
    return tmp_path


def test_pt2_widen_deepen_onnx_and_report(files):
    proc = run("model.pt2", "--widen", "2", "--deepen", "1", "--onnx", "grown.onnx", "--report", "r.json", cwd=files)
    assert proc.returncode == 0, proc.stderr
    assert "relative error" in proc.stdout and "wrote model.grown.pt2" in proc.stdout
    report = json.loads((files / "r.json").read_text())
    assert set(report) == {
        "model",
        "method",
        "params_before",
        "params_after",
        "groups",
        "blocks_inserted",
        "deepen_skipped",
        "verify",
        "dynamic_axes",
        "timings_s",
    }
    assert report["params_after"] > report["params_before"] and report["blocks_inserted"]
    assert set(report["groups"][0]) == {"id", "width_before", "width_after", "status", "reason", "kind", "group_size"}
    assert set(report["verify"]) >= {"max_abs_error", "max_rel_error", "onnx_max_abs_error", "onnx_max_rel_error", "ok"}
    assert set(report["timings_s"]) == {"capture", "analyze", "rewrite", "verify", "export"}
    x = torch.randn(3, 3, 16, 16)  # another batch size: the ONNX file has a dynamic batch axis
    (onnx_out,) = r2r_fx.run_onnx(files / "grown.onnx", (x,))
    with torch.no_grad():
        expected = small_cnn()(x)
        grown = torch.export.load(files / "model.grown.pt2").module()(x)
    assert (onnx_out - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert (grown - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_a_static_program_grows_into_a_static_one(files):
    """A .pt2 exported without dynamic shapes holds only for its example's sizes (its module refuses
    others): the grown program and the ONNX file keep that, and another batch is refused, not guessed."""
    proc = run("static.pt2", "--widen", "2", "--onnx", "grown.onnx", cwd=files)
    assert proc.returncode == 0, proc.stderr
    assert "dynamic axes    none" in proc.stdout
    x = torch.randn(3, 3, 16, 16)
    with pytest.raises(Exception, match=r"\[0\] == 2"):  # noqa: B017 - torch's guard error
        torch.export.load(files / "static.grown.pt2").module()(x)
    with pytest.raises(Exception):  # noqa: B017 - onnxruntime's own error for a wrong input shape
        r2r_fx.run_onnx(files / "grown.onnx", (x,))


def test_pickle_needs_trust(files):
    proc = run("model.pt", "--widen", "2", *SHAPE, cwd=files)
    assert proc.returncode == 2 and "--trust-pickle" in proc.stderr and "runs code" in proc.stderr
    assert not (files / "model.grown.pt2").exists()
    proc = run("model.pt", "--trust-pickle", "--widen", "+4", *SHAPE, "-o", "out.pt", "--json", cwd=files)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["verify"]["ok"] and any(g["width_after"] == g["width_before"] + 4 for g in report["groups"])
    assert (files / "out.pt").exists()


@pytest.mark.parametrize("method_flag", [[], ["--method", "r2r"], ["--method", "net2net"], ["--method", "netmorph"]])
def test_factory_with_weights_and_inputs_file(files, method_flag):
    proc = run(
        "cli_models:small_cnn",
        "--weights",
        "weights.pt",
        "--inputs",
        "inputs.pt",
        "--widen",
        "2",
        "--groups",
        "1",
        "-o",
        "f.pt2",
        *method_flag,
        cwd=files,
    )
    assert proc.returncode == 0, proc.stderr
    assert "groups widened  1 of" in proc.stdout


def test_plan_lists_groups_and_points(files):
    proc = run("model.pt2", "--plan", cwd=files)
    assert proc.returncode == 0, proc.stderr
    assert "width groups:" in proc.stdout and "insertion points" in proc.stdout and "widenable" in proc.stdout
    plan = json.loads(run("model.pt2", "--plan", "--json", cwd=files).stdout)
    assert plan["groups"] and plan["insertion_points"]
    assert all(g["params_per_channel"] > 0 for g in plan["groups"] if g["widenable"]), plan["groups"]
    assert not (files / "model.grown.pt2").exists()


def test_size_grows_each_selected_group_to_its_width(files):
    proc = run("model.pt2", "--size", "kind:channels=32", "--report", "r.json", cwd=files)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((files / "r.json").read_text())
    widened = [g for g in report["groups"] if g["status"] == "widened"]
    assert widened and all(g["width_after"] == 32 for g in widened), report["groups"]


def test_size_counts_query_heads_under_grouped_query_attention(tmp_path):
    llama = ["cli_models:llama_like", "--input-shape", "int64:2,7"]
    proc = run(*llama, "--plan", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(" 4/2kv  heads ") == 2, proc.stdout
    plan = json.loads(run(*llama, "--plan", "--json", cwd=tmp_path).stdout)
    assert [(g["width"], g["query_heads"]) for g in plan["groups"] if g["kind"] == "heads"] == [(2, 4)] * 2
    proc = run(*llama, "--size", "kind:heads=8", "--report", "r.json", "-o", "g.pt2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("heads 4 -> 8 (key/value heads 2 -> 4)") == 2, proc.stdout
    widened = [g for g in json.loads((tmp_path / "r.json").read_text())["groups"] if g["status"] == "widened"]
    assert [(g["width_after"], g["group_size"]) for g in widened] == [(4, 2)] * 2
    bad = run(*llama, "--size", "kind:heads=5", cwd=tmp_path)
    assert bad.returncode == 2 and "grows in multiples of 2" in bad.stderr, bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1


def test_random_method_fails_verification_and_writes_nothing(files):
    proc = run("model.pt2", "--widen", "2", "--method", "random", "-o", "r.pt2", cwd=files)
    assert proc.returncode == 1 and "verification failed" in proc.stderr
    assert not (files / "r.pt2").exists()
    forced = run("model.pt2", "--widen", "2", "--method", "random", "-o", "r.pt2", "--force", cwd=files)
    assert forced.returncode == 1 and (files / "r.pt2").exists()


def test_deepen_at_node_and_python_dash_m(files):
    point = json.loads(run("model.pt2", "--plan", "--json", cwd=files).stdout)["insertion_points"][0]["node"]
    env = {**os.environ, "PYTHONPATH": HERE}
    proc = subprocess.run(
        [sys.executable, "-m", "r2r_fx", "model.pt2", "--deepen-at", point, "-o", "d.pt2"],
        cwd=files,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"blocks inserted 1 ({point})" in proc.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["missing.pt2", "--widen", "2"], "model file not found"),
        (["truncated.pt", "--widen", "2", *SHAPE], "corrupt or truncated"),
        (["model.pt", "--widen", "2", *SHAPE], "--trust-pickle"),
        (["no_such_pkg.mod:fn", "--widen", "2", *SHAPE], "cannot import no_such_pkg.mod:fn"),
        (["cli_models:small_cnn", "--widen", "2", "--input-shape", "2,5,16,16"], "fails on the example inputs"),
        (["cli_models:small_cnn", "--widen", "2", "--input-shape", "int64:2,3,16,16"], "fails on the example inputs"),
        (["cli_models:small_cnn", "--widen", "2"], "no example inputs"),
        (["cli_models:small_cnn", "--widen", "2", *SHAPE, "--groups", "99"], "unknown width group id 99"),
        (["cli_models:small_cnn", "--deepen-at", "nope", *SHAPE], "'nope' is not a node"),
        (["model.pt2", "--widen", "2", "-o", "model.pt2"], "is the model (an input)"),
        (["model.pt2", "--widen", "2", "-o", "no/such/dir/out.pt2"], "output directory does not exist"),
        (["model.pt2", "--widen", "2", "-o", "afile/out.pt2"], "output directory does not exist"),
        (["model.pt2", "--widen", "two"], "bad --widen"),
        (["model.pt2", "--size", "kind:channels"], "bad --size"),
        (["model.pt2", "--size", "kind:channels=9"], "cannot be 9 wide: it grows in steps of 2"),
        (["model.pt2", "--size", "kind:channels=2"], "would shrink width group"),
        (["model.pt2", "--size", "kind:channels=32", "--widen", "2"], "use it instead of --widen"),
        (["model.pt2"], "nothing to do"),
        (["model.pt2", "--widen", "2", "--method", "bogus"], "method 'bogus' is not available"),
        (["model.pt2", "--deepen-at", "conv2d_default", "--method", "net2net"], "needs an idempotent activation"),
    ],
)
def test_bad_input_is_a_clear_error_with_exit_2_and_no_output(files, args, message, monkeypatch, capfd):
    """In-process (``main(argv)``) for speed; tests/test_cli_hostile.py checks real processes too."""
    from r2r_fx.cli import main

    before = set(os.listdir(files))
    monkeypatch.chdir(files)
    monkeypatch.setattr(sys, "path", list(sys.path))  # main() puts the current directory on it for factories
    code = main(args)
    out, err = capfd.readouterr()
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("r2r-rewrite: error:") and message in lines[0], err
    assert "Traceback" not in out + err
    assert set(os.listdir(files)) == before


def test_deepen_copies_the_models_own_blocks(tmp_path):
    stack = ["cli_models:residual_stack", "--input-shape", "2,8"]
    plan = json.loads(run(*stack, "--plan", "--json", cwd=tmp_path).stdout)
    assert [b["path"] for b in plan["blocks"]] == ["1.0", "1.1", "1.2"] and all(
        b["params"] == 296 for b in plan["blocks"]
    )
    proc = run(*stack, "--deepen", "1", "--plan", cwd=tmp_path)
    assert "the model's blocks" in proc.stdout and "parameters 987 -> 1,283" in proc.stdout, proc.stdout
    proc = run(*stack, "--deepen-after", "1.0", "--deepen", "2", "--report", "r.json", "-o", "g.pt2", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert [b["module"] for b in report["blocks_inserted"]] == ["1.1", "1.2"] and report["verify"]["ok"]
    assert report["params_after"] == 987 + 2 * 296
    grown = torch.export.load(tmp_path / "g.pt2").module()
    assert {n.split(".")[1] for n, _ in grown.named_parameters() if n.startswith("1.")} == {"0", "1", "2", "3", "4"}
    bad = run(*stack, "--deepen-after", "1.7", cwd=tmp_path)
    assert (
        bad.returncode == 2 and "'1.7' is not one of the model's residual blocks; blocks: 1.0, 1.1, 1.2" in bad.stderr
    )
    assert len(bad.stderr.strip().splitlines()) == 1 and not list(tmp_path.glob("*.grown.*"))
    generic = run(*stack, "--deepen", "1", "--deepen-block", "generic", "--json", cwd=tmp_path)
    assert all(b["kind"] == "linear" for b in json.loads(generic.stdout)["blocks_inserted"]), generic.stderr
