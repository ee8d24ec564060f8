"""A tied input embedding and output head on a normalised stream: kept tied through growth by copies.

GPT-2 and many small LMs share one tensor ``E`` (``[vocab, d]``) between the embedding, which writes
the stream (its rows: role ``out``), and the head, which reads it (its columns: role ``in``). A stream
grows by whole copies (``r2r_fx.analysis``): writers copy, readers split their columns into shares.
One tensor cannot do both, but with copies it need not: give ``E`` the writer's fill for both uses,
``E' = [E, ..., E]``, so the embedding writes ``[e, ..., e]``, and make the head's input ``k`` times
smaller. The head reads the output ``y`` of an affine norm (LayerNorm/RMSNorm) through ops that commute
with a scale (views, slices, dropout, casts); scaling that norm's weight and bias by ``1/k`` makes its
output ``[y/k, ..., y/k]``, and the head computes ``sum_j E (y/k) = E y``: the same logits, one tensor.

Only where that is exact: the roles of the tied axis are exactly ``out`` and ``in``, on a stream; each
reader's stream input leads back, through single-use ops of that kind, to the output of an affine norm
read by nothing else; the norm's weight and bias are its own (used by that norm only, not tied). The
fill (``r2r_fx.surgery.grow_stream``) sees role ``"out"`` for the tied axis and ``"scaled"`` for the
norm's weights. Anything else keeps the freeze, with the reason.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch.fx
from torch import nn

from r2r_fx.graph import shape_of, target_name, tensor_shapes
from r2r_fx.rules.norm_idioms import CASTS, real_users

if TYPE_CHECKING:
    from r2r_fx.analysis import Analysis, Binding, NormSite

__all__ = ["TiedHead", "fill_roles", "find_tied_heads"]

# Ops between a norm and a head that commute with scaling their input (one tensor in, linear in it).
_COMMUTING = CASTS | {
    "view",
    "reshape",
    "_unsafe_view",
    "flatten",
    "unsqueeze",
    "squeeze",
    "slice",
    "select",
    "getitem",
    "contiguous",
    "clone",
    "alias",
    "dropout",
    "feature_dropout",
}


@dataclass(frozen=True)
class TiedHead:
    """The tied axis ``axis`` of ``param`` kept as one tensor: read by ``heads``, each after a norm of
    ``norms`` whose parameters ``scaled`` are divided by ``k`` when the stream grows ``k``-fold."""

    param: str
    axis: int
    heads: tuple[str, ...]
    norms: tuple[str, ...]
    scaled: tuple[str, ...]


def find_tied_heads(
    analysis: Analysis, bindings: Mapping[tuple[str, int], Sequence[Binding]], norms: Iterable[NormSite]
) -> tuple[dict[tuple[str, int], TiedHead], dict[tuple[str, int], str]]:
    """The tied parameter axes that stay tied (``(param, axis) -> TiedHead``), and for the other
    ``out``-and-``in`` axes on a stream why not (``(param, axis) -> reason``)."""
    gm = analysis.gm
    nodes = {n.name: n for n in gm.graph.nodes}
    sites = {site.out_slot[0]: site for site in norms}
    bound: dict[str, set[tuple[int, str]]] = {}  # parameter -> (axis, node) of each of its bindings
    for (param, axis), binds in bindings.items():
        bound.setdefault(param, set()).update((axis, x.node) for x in binds)
    kept: dict[tuple[str, int], TiedHead] = {}
    refused: dict[tuple[str, int], str] = {}
    for (param, axis), binds in bindings.items():
        roles = {x.role for x in binds}
        layout = analysis.layout((f"param:{param}", axis))
        if len(roles) < 2 or len(layout.pieces) != 1 or layout.pieces[0][0] not in analysis.stream_sets:
            continue
        if roles != {"out", "in"}:
            refused[(param, axis)] = "; a tie is kept only between writers and readers of a stream"
            continue
        heads, found, why = [x.node for x in binds if x.role == "in"], [], ""
        for head in dict.fromkeys(heads):
            norm, scaled, why = _scalable_norm(analysis, nodes[head], (f"param:{param}", axis), sites, bound)
            if why:
                break
            found.append((norm, scaled))
        if why:
            refused[(param, axis)] = f"; the tie is kept only where the head reads an affine norm's output ({why})"
            continue
        scaled = tuple(p for _, ps in found for p in ps)
        if param in scaled or len(set(scaled)) != len(scaled):
            refused[(param, axis)] = "; the tie is kept only where each head has a norm of its own"
            continue
        kept[(param, axis)] = TiedHead(param, axis, tuple(dict.fromkeys(heads)), tuple(n for n, _ in found), scaled)
    return kept, refused


def fill_roles(kept: Mapping[tuple[str, int], TiedHead]) -> dict[tuple[str, int], str]:
    """The role the stream fill gives each axis a kept tie touches: the tied axis is copied like a
    writer's (``out``), the norms' weights are ``scaled`` (copies divided by ``k``)."""
    roles = {key: "out" for key in kept}
    for tie in kept.values():
        roles.update({(p, 0): "scaled" for p in tie.scaled})
    return roles


def _scalable_norm(
    analysis: Analysis,
    head: torch.fx.Node,
    tied: tuple[str, int],
    sites: Mapping[str, NormSite],
    bound: Mapping[str, set[tuple[int, str]]],
) -> tuple[str, tuple[str, ...], str]:
    """``(norm node, its parameters to scale, "")`` for the norm whose output ``head`` reads on the tied
    axis, or ``("", (), reason)``."""
    reads = [
        n
        for n in head.all_input_nodes
        if n.op != "get_attr" and any(analysis.same_channels((n.name, a), tied) for a in range(len(shape_of(n) or ())))
    ]
    if len(reads) != 1:
        return "", (), f"{head.name} reads the stream through {len(reads)} inputs"
    node, after = reads[0], head
    while node.name not in sites:
        if real_users(node) != [after] or not _commutes(node, analysis.gm):
            return "", (), f"{head.name} reads {node.name}, not a norm's output alone"
        node, after = node.args[0], node
    site = sites[node.name]
    if real_users(node) != [after]:
        return "", (), f"the output of {site.node} is read by more than {head.name}"
    if not site.affine:
        return "", (), f"{site.node} has no weight to scale"
    owner = node.name  # the norm op binds its weight and bias; a norm written out ends in ``w * y``
    if node.op != "call_module" and target_name(node) == "mul":
        weights = [a for a in node.args if isinstance(a, torch.fx.Node) and a.op == "get_attr"]
        if len(weights) != 1 or real_users(weights[0]) != [node]:
            return "", (), f"{site.node} scales by a weight that is not a parameter of its own"
        owner = weights[0].name
    names = tuple(p for p, at in bound.items() if any(n == owner for _, n in at))
    if not names or any(bound[p] != {(0, owner)} or len(analysis.aliases(p)) > 1 for p in names):
        return "", (), f"{site.node} shares its weights with other nodes"
    return site.node, names, ""


def _commutes(node: torch.fx.Node, gm: torch.fx.GraphModule) -> bool:
    """A one-tensor op, linear in its first argument: ``op(c * x) = c * op(x)``."""
    if not node.args or not isinstance(node.args[0], torch.fx.Node):
        return False
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        return isinstance(module, (nn.modules.dropout._DropoutNd, nn.Identity)) and len(node.all_input_nodes) == 1
    if node.op not in ("call_function", "call_method") or target_name(node) not in _COMMUTING:
        return False
    tensors = [n for n in node.all_input_nodes if tensor_shapes(n)]  # sizes (``sym_size``) are no tensors
    return target_name(node) in CASTS or tensors == [node.args[0]]
