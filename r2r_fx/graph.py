"""Small helpers on graphs and modules, one copy each."""

from __future__ import annotations

from typing import Any

import networkx as nx
import torch.fx
from torch import nn
from torch.nn.utils import parametrize

from r2r_fx.compat import has_forward_hooks

__all__ = [
    "attr_at",
    "describe",
    "hidden_weights",
    "output_dominators",
    "param_name",
    "shape_of",
    "target_name",
    "tensor_shapes",
]


def attr_at(root: nn.Module, target: str) -> Any:
    """The attribute at a dotted path (``"layer1.0.conv1.weight"``): a get_attr node's target."""
    owner, _, name = target.rpartition(".")
    return getattr(root.get_submodule(owner) if owner else root, name)


def shape_of(node: Any) -> tuple[int, ...] | None:
    """Static shape of a single-tensor node, from shape propagation."""
    if not isinstance(node, torch.fx.Node):
        return None
    meta = node.meta.get("tensor_meta")
    if meta is not None and hasattr(meta, "shape") and hasattr(meta, "dtype"):
        return tuple(map(int, meta.shape))
    return None


def tensor_shapes(node: torch.fx.Node) -> list[tuple[str, tuple[int, ...]]]:
    """(slot name, shape) for every tensor a node outputs; tuple outputs get ``name#i``."""
    meta = node.meta.get("tensor_meta")
    if meta is None:
        return []
    if hasattr(meta, "shape") and hasattr(meta, "dtype"):
        return [(node.name, tuple(map(int, meta.shape)))]
    out = []
    if isinstance(meta, (tuple, list)):
        for i, item in enumerate(meta):
            if hasattr(item, "shape") and hasattr(item, "dtype"):
                out.append((f"{node.name}#{i}", tuple(map(int, item.shape))))
    return out


def param_name(node: Any) -> str | None:
    """The parameter or buffer a get_attr node reads, or None."""
    return str(node.target) if isinstance(node, torch.fx.Node) and node.op == "get_attr" else None


def target_name(node: torch.fx.Node, gm: torch.fx.GraphModule | None = None) -> str:
    """What a node calls: a layer's class name (with ``gm``), a method's name, a function's or ATen
    op's name (``conv2d`` for ``aten.conv2d.default``)."""
    target = node.target
    if node.op == "call_module":
        return type(gm.get_submodule(str(target))).__name__ if gm is not None else str(target)
    if isinstance(target, str):
        return target
    return getattr(getattr(target, "overloadpacket", target), "__name__", str(target))


def describe(node: torch.fx.Node, gm: torch.fx.GraphModule) -> str:
    """An op as a reason names it: ``"Conv2d (conv1)"``, ``"matmul (matmul_2)"``, ``".view() (view_1)"``."""
    if node.op == "call_method":
        return f".{node.target}() ({node.name})"
    packet = getattr(node.target, "overloadpacket", None)
    name = str(packet) if packet is not None else target_name(node, gm)  # "aten.conv2d", "mylib.foo"
    return f"{name} ({node.name})"


def hidden_weights(module: nn.Module) -> str:
    """Why a layer's weights are not what its attributes say (hooks, parametrizations), or ""."""
    if parametrize.is_parametrized(module):
        return "parametrized weights (spectral or weight norm, ...)"
    for m in module.modules():
        if has_forward_hooks(m):
            return "forward hooks (spectral_norm, weight_norm, ...), which may compute or change its weights"
    return ""


def output_dominators(gm: torch.fx.GraphModule) -> set[str]:
    """Nodes on every tensor path from the inputs to the output (size queries do not count as paths)."""
    graph = nx.DiGraph()
    graph.add_node("__source__")
    for node in gm.graph.nodes:
        graph.add_node(node.name)
        if not tensor_shapes(node):
            continue
        if node.op == "placeholder":
            graph.add_edge("__source__", node.name)
        for user in node.users:
            graph.add_edge(node.name, user.name)
    output = next(n.name for n in gm.graph.nodes if n.op == "output")
    idom = nx.immediate_dominators(graph, "__source__")
    chain, node = set(), output
    while node in idom and idom[node] != node:
        node = idom[node]
        chain.add(node)
    return chain
