"""The torch-internals module: an ATen op this torch lacks must not break the rules."""

from __future__ import annotations

import pytest
import torch

from r2r_fx.compat import aten


def test_a_missing_aten_op_is_a_placeholder_that_matches_nothing():
    missing = aten.no_such_op_in_this_torch
    assert "missing aten op" in repr(missing) and "missing aten op" in repr(missing.default)
    assert missing != torch.ops.aten.add and missing.default != torch.ops.aten.add.default
    assert aten.add is torch.ops.aten.add  # ops that exist are torch's own


def test_the_layer_base_classes_are_what_the_rules_assume():
    from torch import nn

    from r2r_fx.compat import DropoutBase, NormBase

    for cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm2d, nn.SyncBatchNorm):
        assert issubclass(cls, NormBase), cls
    for cls in (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout):
        assert issubclass(cls, DropoutBase), cls
    assert not issubclass(nn.LayerNorm, NormBase) and not issubclass(nn.GroupNorm, NormBase)


def test_tree_map_only_maps_tensors_in_nested_outputs():
    from r2r_fx.compat import tree_map_only

    out = tree_map_only(torch.Tensor, lambda t: t + 1, {"a": [torch.zeros(1), 3], "b": (torch.ones(2),)})
    assert out["a"][1] == 3 and torch.equal(out["a"][0], torch.ones(1)) and torch.equal(out["b"][0], 2 * torch.ones(2))


def test_swapped_tensors_swaps_for_the_context_only():
    from torch import nn

    from r2r_fx.compat import swapped_tensors

    layer = nn.Linear(2, 3)
    weight = layer.weight
    with swapped_tensors(layer, {"weight": torch.zeros(3, 2, device="meta")}):
        assert layer.weight.device.type == "meta"
    assert layer.weight is weight


def test_has_forward_hooks_sees_hooks_and_pre_hooks():
    from torch import nn

    from r2r_fx.compat import has_forward_hooks

    a, b, c = nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2)
    a.register_forward_hook(lambda m, i, o: o)
    b.register_forward_pre_hook(lambda m, i: i)
    assert has_forward_hooks(a) and has_forward_hooks(b) and not has_forward_hooks(c)
    assert has_forward_hooks(nn.utils.spectral_norm(nn.Linear(2, 2)))


def test_export_guards_are_dropped_and_the_graph_still_runs():
    from torch import nn

    from r2r_fx.compat import drop_export_guards

    module = torch.export.export(nn.Linear(2, 2), (torch.randn(3, 2),)).module()
    guards = [n for n in module.graph.nodes if n.op == "call_module" and n.target == "_guards_fn"]
    drop_export_guards(module.graph)
    left = [n for n in module.graph.nodes if n.op == "call_module" and n.target == "_guards_fn"]
    assert not left
    gm = torch.fx.GraphModule(module, module.graph)
    assert gm(torch.randn(3, 2)).shape == (3, 2)
    assert guards  # torch 2.13 checks inputs with this submodule


def test_a_graph_module_without_a_tracer_class_pickles_and_reloads():
    import pickle

    from torch import nn

    from r2r_fx.compat import set_tracer_class, tracer_class

    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    set_tracer_class(gm, None), set_tracer_class(gm.graph, None)
    assert tracer_class(gm) is None and tracer_class(gm.graph) is None
    x = torch.randn(1, 2)
    assert torch.equal(pickle.loads(pickle.dumps(gm))(x), gm(x))


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split("+")[0].split(".")[:3] if p.isdigit())


def test_the_installed_torch_is_in_the_declared_and_pinned_range():
    """pyproject.toml declares the torch range the suite runs on; constraints.txt pins the tested one."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1]
    declared = re.search(r'"torch>=([\d.]+),<([\d.]+)"', (root / "pyproject.toml").read_text())
    pinned = re.search(r"^torch==([\d.]+)$", (root / "constraints.txt").read_text(), re.M)
    assert declared and pinned
    low, high, pin = _version(declared[1]), _version(declared[2]), _version(pinned[1])
    assert low <= pin < high, "the pinned torch must lie in the declared range"
    assert low[:2] == pin[:2], "the lowest declared torch must be the tested one"
    assert _version(torch.__version__)[:2] == pin[:2]


def test_every_pt2_code_path_exists_and_a_moved_one_is_refused(monkeypatch):
    import torch.export.pt2_archive._package as package

    from r2r_fx.compat import pt2_code_paths

    paths = pt2_code_paths()
    assert set(paths) >= {"torch_load", "sympy", "pickle", "aoti", "native_pickle", "operator", "sym_ops"}
    monkeypatch.delattr(package, "_load_aoti")
    with pytest.raises(RuntimeError, match="aoti"):
        pt2_code_paths()
