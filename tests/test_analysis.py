"""Width-group analysis on the local zoo: the exact groups found, on both graph flavours."""

from __future__ import annotations

import pytest

import r2r_fx
from r2r_fx.rules import factor_reshape

from zoo import ZOO

# (width, producers, None if widenable else the start of the reason), in analysis order.
_ENCODER_WRITERS = [
    "encoder_layers_0_self_attn_out_proj",
    "encoder_layers_0_linear2",
    "encoder_layers_1_self_attn_out_proj",
    "encoder_layers_1_linear2",
]
_ENCODER = [
    (16, ["embed", *_ENCODER_WRITERS, "pos"], None),  # the stream (post-LN: whole copies only)
    (2, ["encoder_layers_0_self_attn_in_proj"], None),  # heads of the packed q/k/v (r2r_fx.inline)
    (32, ["encoder_layers_0_linear1"], None),
    (2, ["encoder_layers_1_self_attn_in_proj"], None),
    (32, ["encoder_layers_1_linear1"], None),
    (5, ["head"], "model output"),
]
EXPECTED = {
    "conv1d": [
        (4, [], "model input"),
        (8, ["conv1"], None),
        (16, ["conv2"], None),
        (10, ["fc"], "model output"),
    ],
    "conv3d": [
        (3, [], "model input"),
        (8, ["conv1"], None),
        (16, ["conv2"], None),
        (10, ["fc"], "model output"),
    ],
    "densenet": [
        (3, [], "model input"),
        (8, ["stem"], None),
        (4, ["layers_0_conv"], None),
        (4, ["layers_1_conv"], None),
        (4, ["layers_2_conv"], None),
        (10, ["transition_2"], None),
        (10, ["fc"], "model output"),
    ],
    "embedding": [
        (16, ["embed"], None),
        (32, ["fc1"], None),
        (16, ["fc2"], None),
        (10, ["head"], "model output"),
    ],
    "encoder_post_ln": _ENCODER,
    "encoder_pre_ln": _ENCODER,
    "llama_like": [
        (16, ["embed", "blocks_0_attn_o", "blocks_0_down", "blocks_1_attn_o", "blocks_1_down"], None),
        (2, ["blocks_0_attn_q", "blocks_0_attn_k", "blocks_0_attn_v"], None),  # kv heads (GQA), RoPE tables kept
        (48, ["blocks_0_gate", "blocks_0_up"], None),
        (2, ["blocks_1_attn_q", "blocks_1_attn_k", "blocks_1_attn_v"], None),
        (48, ["blocks_1_gate", "blocks_1_up"], None),
        (50, ["lm_head"], "model output"),
    ],
    "mha": [
        (3, [], "model input"),
        (16, ["stem", "attn_out_proj"], None),
        (4, ["attn_in_proj"], None),  # nn.MultiheadAttention's heads
        (10, ["head"], "model output"),
    ],
    "grouped": [
        (3, [], "model input"),
        (32, ["stem_0", "block_conv3"], None),
        (16, ["block_conv1", "block_conv2"], None),
        (10, ["fc"], "model output"),
    ],
    "inception": [
        (3, [], "model input"),
        (16, ["stem_0"], None),
        (8, ["inception_branch1_0"], None),
        (8, ["inception_branch2_0_0"], None),
        (12, ["inception_branch2_1_0"], None),
        (4, ["inception_branch3_0_0"], None),
        (6, ["inception_branch3_1_0"], None),
        (6, ["inception_branch4_1_0"], None),
        (16, ["reduce"], None),
        (10, ["fc"], "model output"),
    ],
    "mlp": [
        (16, [], "model input"),
        (32, ["fc1"], None),
        (32, ["fc2"], None),
        (10, ["fc3"], "model output"),
    ],
    "mlp_tokens": [
        (12, [], "model input"),
        (16, ["proj_in", "fc2"], None),
        (32, ["fc1"], None),
        (8, ["head"], "model output"),
    ],
    "mobilenetv2": [
        (3, [], "model input"),
        (8, ["stem_0", "block1_project_0"], None),
        (16, ["block1_expand_0", "block1_depthwise_0", "block1_se_fc2"], None),
        (4, ["block1_se_fc1"], None),
        (16, ["block2_expand_0", "block2_depthwise_0", "block2_se_fc2"], None),
        (4, ["block2_se_fc1"], None),
        (12, ["block2_project_0"], None),
        (10, ["fc"], "model output"),
    ],
    "multi_output": [
        (3, [], "model input"),
        (8, ["body_0_0"], None),
        (16, ["body_1_0"], "model output"),
        (10, ["fc"], "model output"),
    ],
    "resnet": [
        (3, [], "model input"),
        (8, ["conv1", "layer1_conv2"], None),
        (8, ["layer1_conv1"], None),
        (16, ["layer2_conv1"], None),
        (16, ["layer2_conv2", "layer2_downsample_0"], None),
        (10, ["fc"], "model output"),
    ],
    "shufflenet": [
        (3, [], "model input"),
        (16, ["stem_0"], "both concatenated"),
        (8, ["stage_0_branch_0", "stage_0_branch_3"], None),
        (8, ["stage_0_branch_5"], "both concatenated"),
        (16, [], "both concatenated"),
        (8, ["stage_1_branch_0", "stage_1_branch_3"], None),
        (8, ["stage_1_branch_5"], "both concatenated"),
        (16, [], "reshape splits"),
        (10, ["fc"], "model output"),
    ],
    "tuple_output": [
        (3, [], "model input"),
        (8, ["body_0_0"], None),
        (16, ["body_1_0"], None),
        (10, ["cls_head"], "model output"),
        (4, ["aux_head"], "model output"),
    ],
    "two_inputs": [
        (3, [], "model input"),
        (16, ["conv_0", "vec"], None),
        (8, [], "model input"),
        (10, ["head"], "model output"),
    ],
    "unet_like": [
        (3, [], "model input"),
        (8, ["enc_0"], None),
        (16, ["down"], None),
        (8, ["up"], None),
        (4, ["side"], None),
        (8, ["head_0_0"], None),
        (2, ["head_1"], "model output"),
    ],
    "vgg": [
        (3, [], "model input"),
        (8, ["features_0_0"], None),
        (8, ["features_1_0"], None),
        (16, ["features_3_0"], None),
        (32, ["classifier_0"], None),
        (10, ["classifier_3"], "model output"),
    ],
    "vit": [
        (3, [], "model input"),
        (
            16,
            [
                "patch_embed",
                "blocks_0_attn_proj",
                "blocks_0_fc2",
                "blocks_1_attn_proj",
                "blocks_1_fc2",
                "cls_token",
                "pos_embed",
            ],
            None,  # a LayerNorm stream: grows by whole copies (tests/test_stream.py)
        ),
        (2, ["blocks_0_attn_q", "blocks_0_attn_k", "blocks_0_attn_v"], None),  # heads (tests/test_heads.py)
        (32, ["blocks_0_fc1"], None),
        (2, ["blocks_1_attn_q", "blocks_1_attn_k", "blocks_1_attn_v"], None),
        (32, ["blocks_1_fc1"], None),
        (10, ["head"], "model output"),
    ],
}


def _summary(gm):
    return [(g.width, g.producers, None if g.widenable else g.reason) for g in r2r_fx.width_groups(gm)]


@pytest.mark.parametrize("name", sorted(ZOO))
def test_exact_groups_module_graph(name):
    model, inputs = ZOO[name]()
    found = _summary(r2r_fx.capture(model, inputs, via="symbolic_trace"))
    expected = EXPECTED[name]
    assert [(w, p) for w, p, _ in found] == [(w, p) for w, p, _ in expected]
    for (_, _, reason), (_, _, want) in zip(found, expected):
        assert (reason is None) == (want is None)
        assert want is None or reason.startswith(want), (reason, want)


@pytest.mark.parametrize("name", sorted(ZOO))
def test_aten_graph_finds_the_same_groups(name):
    """The ATen-level graph (torch.export) has other node names but the same group structure."""
    model, inputs = ZOO[name]()
    found = _summary(r2r_fx.capture(model, inputs, via="export"))
    expected = EXPECTED[name]
    key = sorted((w, len(p) > 0, r is None) for w, p, r in expected)
    assert sorted((w, len(p) > 0, r is None) for w, p, r in found) == key


def test_every_group_knows_producers_consumers_and_reason():
    model, inputs = ZOO["resnet"]()
    groups = r2r_fx.width_groups(r2r_fx.capture(model, inputs))
    residual = next(g for g in groups if "conv1" in g.producers)
    assert residual.widenable and residual.granularity == 2
    assert {"conv1", "layer1_conv2"} <= set(residual.producers)
    assert {"layer1_conv1", "layer2_conv1", "layer2_downsample_0"} <= set(residual.consumers)
    assert all(g.reason for g in groups if not g.widenable)


def test_grouped_conv_granularity_is_whole_groups_of_pairs():
    model, inputs = ZOO["grouped"]()
    groups = r2r_fx.width_groups(r2r_fx.capture(model, inputs))
    inner = next(g for g in groups if g.width == 16)
    assert inner.granularity == 8  # 4 channels per group, groups added in pairs


def test_unknown_op_freezes_what_it_touches():
    import torch
    from torch import nn

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)

        def forward(self, x):
            return self.c(self.b(self.a(x)).flip(1))  # a channel permutation without a rule

    groups = r2r_fx.width_groups(r2r_fx.capture(M(), (torch.randn(2, 3, 4, 4),)))
    frozen = next(g for g in groups if g.producers == ["b"])
    assert not frozen.widenable and "unsupported op" in frozen.reason and "flip" in frozen.reason
    assert next(g for g in groups if g.producers == ["a"]).widenable


@pytest.mark.parametrize(
    ("src", "dst", "blocks"),
    [
        ((2, 8, 4, 4), (2, 128), [([0], [0]), ([1, 2, 3], [1])]),
        ((2, 128), (2, 8, 16), [([0], [0]), ([1], [1, 2])]),
        ((2, 8, 1, 1), (2, 8), [([0], [0]), ([1], [1])]),
        ((2, 6, 4), (2, 4, 6), [([0], [0]), ([1, 2], [1, 2])]),  # no finer factoring: one merged block
        ((2, 6, 4), (2, 5, 5), None),  # different total sizes: no factoring
    ],
)
def test_factor_reshape(src, dst, blocks):
    got = factor_reshape(src, dst)
    assert got == blocks


def test_coupling_graph_is_a_networkx_view_of_the_couplings():
    import networkx as nx

    def analysis(name):
        model, inputs = ZOO[name]()
        return r2r_fx.analyze(r2r_fx.capture(model, inputs, via="symbolic_trace"))

    resnet = analysis("resnet")
    graph = resnet.coupling_graph
    assert isinstance(graph, nx.MultiGraph)
    assert nx.has_path(graph, ("conv1", 1), ("layer1_conv2", 1))  # joined by the residual add
    assert not nx.has_path(graph, ("conv1", 1), ("layer1_conv1", 1))  # a block's hidden width is its own
    same = nx.Graph((a, b) for a, b, kind in graph.edges(data="kind") if kind == "same")
    for component in nx.connected_components(same):  # "same" edges are exactly the union-find classes
        first = next(iter(component))
        assert all(resnet.same_channels(first, slot) for slot in component)
    kinds = {
        name: {kind for *_, kind in analysis(name).coupling_graph.edges(data="kind")} for name in ("densenet", "vgg")
    }
    assert "concat" in kinds["densenet"] and "merge" in kinds["vgg"]
