"""The model's own repeated blocks: residual layers found in the graph (analysis only, no mutation).

A *block* is a module (by path: ``layers.3``, ``layer2.1``, ``features.5``) whose nodes form one residual
unit of the main path: exactly one tensor enters from the stream and one leaves, of the same shape and
dtype, every node between the two is the module's own, and on the way the stream only passes through
residual additions ``s + f(s)`` (at least one) and ops that change nothing once every branch adds 0.
Copying such a block and making its branches add exactly 0 inserts an identity (``passes/deepen.py``).

Which stream ops are an identity at insertion: casts to the same dtype and copies; reshapes and
permutations that cancel (followed on the entry's element indices: OPT flattens its tokens for the MLP,
MaxViT cuts its map into windows and puts them back); and one idempotent activation after the last
addition (ResNet's ``relu(x + f(x))``), since the copy's input is then that activation's output. A
post-norm block (BERT: ``LN(h + f(h))`` after each addition, one LayerNorm or RMSNorm kind, the last
after the last addition) is copied too: with every branch adding 0 the copy is a chain of norms after
the block's last one, which ``passes/deepen_norms.py`` sets to compose exactly to that one norm. A
block whose stream passes anything else is listed with the reason a copy is not an identity.

Modules are read from ``node.meta["nn_module_stack"]`` (both graph levels record it) and from the
targets of layers and parameters. Among nested candidates the repeated ones win: modules of one class
under one parent (``layers.0``, ``layers.1``, ...); a candidate with no such sibling is kept when it
neither contains nor sits inside a repeated one. Blocks are grouped into *stages*: runs of
consecutive blocks with the same ops and shapes up to names.
"""

from __future__ import annotations

import math
import operator
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.fx
from torch import nn

from r2r_fx.aliasing import unsafe_points, writes_into
from r2r_fx.graph import output_dominators, shape_of, target_name

__all__ = [
    "RepeatedBlock",
    "attr_or_none",
    "block_params",
    "block_region",
    "params_of",
    "depends_on",
    "repeated_blocks",
    "stream_adds",
    "norm_kind",
    "stream_norms",
]

ADDS = {operator.add, operator.iadd, torch.add, "add", "add_", "iadd"}
_SAME_VALUE = {  # one tensor in, the same values out (given the same shape and dtype)
    "contiguous",
    "clone",
    "alias",
    "to",
    "_to_copy",
    "type_as",
    "float",
    "view",
    "reshape",
    "Identity",
    "detach",
}
_NORM_KINDS = {
    nn.LayerNorm: "layer",
    nn.RMSNorm: "rms",
    nn.functional.layer_norm: "layer",
    torch.layer_norm: "layer",
    torch.ops.aten.layer_norm.default: "layer",
    nn.functional.rms_norm: "rms",
    torch.rms_norm: "rms",
    torch.ops.aten.rms_norm.default: "rms",
}
_RESHAPES = {"view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as"}
_PERMUTES = {"permute", "transpose", "swapaxes"}
IDEMPOTENT = {"relu", "relu_", "ReLU", "relu6", "ReLU6", "hardtanh", "hardtanh_", "Hardtanh", "clamp", "clamp_", "clip"}


@dataclass(frozen=True)
class RepeatedBlock:
    """One of the model's residual blocks; ``refusal`` says why a copy of it cannot be inserted ("" if it can)."""

    path: str  # module path
    cls: str  # the module's class name
    stage: int
    index: int  # position within its stage
    input: str  # the stream node that enters
    output: str  # the node that leaves
    shape: tuple[int, ...]
    params: int  # parameters of one copy
    refusal: str = ""


def repeated_blocks(gm: torch.fx.GraphModule) -> list[RepeatedBlock]:
    """The model's residual blocks in graph order, with stages (see the module docstring)."""
    dominators = output_dominators(gm)
    regions, classes = _module_regions(gm)
    unsafe = unsafe_points(gm)
    found: dict[str, tuple[torch.fx.Node, torch.fx.Node, str]] = {}
    for path, nodes in regions.items():
        shape = _qualify(gm, nodes, dominators)
        if shape is not None:
            entry, exit_, refusal = shape
            writer = writes_into(gm, nodes, entry)
            if writer is not None and not refusal:
                refusal = (
                    f"{_op_name(writer)} ({writer.name}) writes its input in place: a copy would change what it reads"
                )
            if exit_.name in unsafe and not refusal:
                refusal = f"a copy cannot read its output: {unsafe[exit_.name]}"
            found[path] = (entry, exit_, refusal)
    chosen = _choose(found, classes)
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    chosen.sort(key=lambda p: order[found[p][1].name])
    out: list[RepeatedBlock] = []
    stage, previous = -1, None
    for path in chosen:
        entry, exit_, refusal = found[path]
        key = (path.rpartition(".")[0], _signature(gm, regions[path], path))
        if key != previous:
            stage, index = stage + 1, 0
        else:
            index += 1
        previous = key
        params = _param_count(gm, regions[path])
        out.append(
            RepeatedBlock(
                path, classes.get(path, ""), stage, index, entry.name, exit_.name, shape_of(exit_), params, refusal
            )
        )
    return out


def block_region(gm: torch.fx.GraphModule, path: str) -> list[torch.fx.Node]:
    """The nodes of module ``path`` in graph order."""
    return _module_regions(gm)[0].get(path, [])


def stream_adds(
    nodes: list[torch.fx.Node], entry: torch.fx.Node, dominators: set[str]
) -> list[tuple[torch.fx.Node, torch.fx.Node, torch.fx.Node]]:
    """(addition, stream operand, branch operand) for each addition on the stream of a block. A sum of
    several terms counts each (Cohere's parallel layer: ``(x + attention) + mlp``; only its last addition is
    on every path, the first is its operand)."""
    out, previous = [], entry
    for node in nodes:
        if node.name not in dominators:
            continue
        if _is_add(node):
            terms = _terms(node, dominators)
            if sum(t is previous for t in terms) == 1:
                out += [(node, previous, t) for t in terms if t is not previous]
        previous = node
    return out


def _terms(add: torch.fx.Node, dominators: set[str]) -> list[object]:
    """The operands of a sum, through inner additions used only by it and not on the stream."""
    out = []
    for arg in add.args[:2]:
        inner = isinstance(arg, torch.fx.Node) and _is_add(arg) and arg.name not in dominators and len(arg.users) == 1
        out += _terms(arg, dominators) if inner else [arg]
    return out


def _module_regions(gm: torch.fx.GraphModule) -> tuple[dict[str, list[torch.fx.Node]], dict[str, str]]:
    regions: dict[str, list[torch.fx.Node]] = defaultdict(list)
    classes: dict[str, str] = {}
    gone: set[str] = set()
    for node in gm.graph.nodes:
        paths = set()
        for value in (node.meta.get("nn_module_stack") or {}).values():
            path, cls = value[0], value[1]
            path = str(path)
            paths.add(path)
            classes.setdefault(path, cls.__name__ if isinstance(cls, type) else str(cls).rpartition(".")[2])
        if node.op in ("call_module", "get_attr"):
            parts = str(node.target).split(".")
            paths.update(".".join(parts[:i]) for i in range(1, len(parts) + (node.op == "call_module")))
        for path in paths:
            if path and path not in gone:
                try:
                    gm.get_submodule(path)
                except AttributeError:  # a slice of a ModuleList ("blocks.slice(1, None, None)"): no module
                    gone.add(path)
                    continue
                regions[path].append(node)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for path, nodes in regions.items():  # parameters of other modules the block reads (an exported graph
        inside = set(nodes)  # records no module for a get_attr): part of the block, copied with it
        extra = {a for n in nodes for a in n.all_input_nodes if a.op == "get_attr" and a not in inside}
        if extra:
            regions[path] = sorted(inside | extra, key=order.__getitem__)
    for path in regions:
        if path not in classes:
            try:
                classes[path] = type(gm.get_submodule(path)).__name__
            except AttributeError:
                classes[path] = ""
    return dict(regions), classes


def _qualify(
    gm: torch.fx.GraphModule, nodes: list[torch.fx.Node], dominators: set[str]
) -> tuple[torch.fx.Node, torch.fx.Node, str] | None:
    """(entry, exit, refusal) when ``nodes`` form a residual block, else None."""
    inside = set(nodes)
    exits = [n for n in nodes if n.op != "get_attr" and not _is_size(n) and any(u not in inside for u in n.users)]
    if len(exits) != 1 or exits[0].name not in dominators or shape_of(exits[0]) is None:
        return None
    exit_ = exits[0]
    inputs = list(dict.fromkeys(a for n in nodes for a in n.all_input_nodes if a not in inside))
    entries = [a for a in inputs if a.name in dominators]
    if len(entries) != 1:
        return None
    entry = entries[0]
    meta_in, meta_out = entry.meta.get("tensor_meta"), exit_.meta.get("tensor_meta")
    if shape_of(entry) != shape_of(exit_) or meta_in.dtype != meta_out.dtype:
        return None
    if _reaches_outside(entry, inside, {a for a in inputs if a is not entry and not _is_size(a)}):
        return None  # another input is computed from the stream outside the module: not one unit
    adds = stream_adds(nodes, entry, dominators)
    if not adds or any(not depends_on(branch, stream) for _, stream, branch in adds):
        return None  # x + a constant or x + an input: not a residual branch
    return entry, exit_, _refusal(gm, nodes, entry, dominators)


def _refusal(gm: torch.fx.GraphModule, nodes: list[torch.fx.Node], entry: torch.fx.Node, dominators: set[str]) -> str:
    """Why the block's stream ops are not an identity once its branches add 0 ("" if they are)."""
    stream = [n for n in nodes if n.name in dominators]
    last_add = max(i for i, n in enumerate(stream) if _is_add(n))
    changing = [(i, n) for i, n in enumerate(stream) if not (_is_add(n) or _same_value(n) or _moves(n))]
    moved = [n for n in stream if _moves(n)]
    if moved and any(norm_kind(gm, n) for _, n in changing):
        return (
            f"its stream is reshaped or permuted ({moved[0].name}) and normalised: a chain of norms over other "
            "shapes would not be exact"
        )
    if moved and not _moves_cancel(stream, entry):
        return (
            f"its stream's reshapes and permutations ({', '.join(n.name for n in moved[:3])}) do not compose to the "
            "identity: a copy would not be an identity at insertion"
        )
    if not changing:
        return ""  # moves between additions that cancel (OPT's flattened tokens, MaxViT's partitions)
    if len(changing) == 1:
        i, node = changing[0]
        if i > last_add and _op_name(node) in IDEMPOTENT:
            return ""  # act(act(y)) = act(y): the copy's input is the block's output, act(...)
    kinds = {norm_kind(gm, n) for _, n in changing}
    if len(kinds) == 1 and None not in kinds:  # post-norm: a chain of norms once the branches add 0
        if changing[-1][0] > last_add and sum(i > last_add for i, _ in changing) == 1:
            return ""
        i, node = changing[-1]
        return (
            f"its stream passes {_op_name(node)} ({node.name}) but does not end in exactly one normalisation after "
            "its last residual addition (post-norm): a copy would not be an identity at insertion"
        )
    if None not in kinds:
        names = ", ".join(f"{_op_name(n)} ({n.name})" for _, n in changing)
        return f"its stream passes norms of different kinds ({names}): a copy would not be an identity at insertion"
    i, node = next((i, n) for i, n in changing if norm_kind(gm, n) is None)
    where = "after its residual addition" if i > last_add else "between its residual additions"
    return f"its stream passes {_op_name(node)} ({node.name}) {where}: a copy would not be an identity at insertion"


def norm_kind(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str | None:
    """ "layer" for torch's LayerNorm (layer or function), "rms" for its RMSNorm, else None (a layer of another
    class, whatever its name, may compute something else: Gemma's ``(1 + weight)``)."""
    if node.op == "call_module":
        return _NORM_KINDS.get(type(gm.get_submodule(str(node.target))))
    if node.op == "call_function":
        return next((kind for target, kind in _NORM_KINDS.items() if target is node.target), None)
    return None


def stream_norms(gm: torch.fx.GraphModule, nodes: list[torch.fx.Node], dominators: set[str]) -> list[torch.fx.Node]:
    """The normalisations on a post-norm block's stream, in order ([] for a block without)."""
    return [n for n in nodes if n.name in dominators and norm_kind(gm, n)]


def _is_size(node: torch.fx.Node) -> bool:
    """Whether ``node`` computes a size from shapes alone (export shares them across modules; a copy of a
    block reads the same sizes), not from values (``.item()``)."""
    value = node.meta.get("val")
    if not isinstance(value, (int, torch.SymInt)) and node.meta.get("type") not in (int, torch.Size):
        return False
    name = target_name(node)
    if name in ("sym_size", "size") or (name == "getattr" and node.args[1:] == ("shape",)):
        return True
    return all(_is_size(a) for a in node.all_input_nodes)


def _is_add(node: torch.fx.Node) -> bool:
    if node.op == "call_method":
        return node.target in ("add", "add_") and len(node.args) == 2 and not node.kwargs
    if node.op != "call_function":
        return False
    target = getattr(node.target, "overloadpacket", node.target)
    name = getattr(target, "__name__", "")
    if target in ADDS or name in ("add", "add_"):
        return len(node.args) == 2 and node.kwargs.get("alpha", 1) == 1
    return False


def _op_name(node: torch.fx.Node) -> str:
    if node.op == "call_module":
        return str(node.meta.get("r2r_class") or _module_class(node))
    return target_name(node)


def _module_class(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    for value in stack.values():
        if str(value[0]) == str(node.target):
            cls = value[1]
            return cls.__name__ if isinstance(cls, type) else str(cls).rpartition(".")[2]
    return str(node.target)


def _same_value(node: torch.fx.Node) -> bool:
    """One tensor in, the same values out: a cast to the same dtype, a copy, a view to the same shape."""
    tensors = [a for a in node.all_input_nodes if shape_of(a) is not None]
    if len(tensors) != 1 or shape_of(tensors[0]) != shape_of(node):
        return False
    if tensors[0].meta["tensor_meta"].dtype != node.meta["tensor_meta"].dtype:
        return False
    return _op_name(node) in _SAME_VALUE


def _moves(node: torch.fx.Node) -> bool:
    """A reshape or a permutation by constant dims of one tensor (the same entries, no cast)."""
    tensors = [a for a in node.all_input_nodes if shape_of(a) is not None]
    if len(tensors) != 1 or shape_of(node) is None or _op_name(node) not in _RESHAPES | _PERMUTES:
        return False
    if _op_name(node) in _PERMUTES and _dims(node) is None:
        return False
    before, after = tensors[0].meta["tensor_meta"], node.meta["tensor_meta"]
    return before.dtype == after.dtype and math.prod(before.shape) == math.prod(after.shape)


def _dims(node: torch.fx.Node) -> list[int] | None:
    """A permute's or transpose's dims when they are constants."""
    dims = node.args[1:]
    if len(dims) == 1 and isinstance(dims[0], (list, tuple)):
        dims = dims[0]
    dims = list(node.kwargs.get("dims", dims))
    return dims if dims and all(isinstance(d, int) for d in dims) else None


def _moves_cancel(stream: list[torch.fx.Node], entry: torch.fx.Node) -> bool:
    """Whether the stream's moves, followed on the entry's element indices (additions pass the stream on,
    every other op keeps positions), bring every element back to its place."""
    start = torch.arange(math.prod(shape_of(entry))).reshape(shape_of(entry))
    values = {entry: start}
    for node in stream:
        inputs = [a for a in node.all_input_nodes if a in values]
        if len(inputs) != 1:
            return False
        x = values[inputs[0]]
        if _moves(node) and _op_name(node) in _PERMUTES:
            dims = _dims(node)
            values[node] = x.transpose(*dims) if _op_name(node) in ("transpose", "swapaxes") else x.permute(dims)
        elif _moves(node):
            values[node] = x.reshape(shape_of(node))
        else:  # additions, same-value ops, norms and activations: positions kept
            if shape_of(node) != tuple(x.shape):
                return False
            values[node] = x
    return torch.equal(values[stream[-1]], start.reshape(shape_of(stream[-1])))


def depends_on(node: object, source: torch.fx.Node) -> bool:
    """Whether ``source`` is ``node`` or one of its inputs, transitively."""
    if not isinstance(node, torch.fx.Node):
        return False
    frontier, seen = [node], set()
    while frontier:
        current = frontier.pop()
        if current is source:
            return True
        if current in seen:
            continue
        seen.add(current)
        frontier.extend(current.all_input_nodes)
    return False


def _reaches_outside(entry: torch.fx.Node, inside: set[torch.fx.Node], others: set[torch.fx.Node]) -> bool:
    """Whether a node outside the module, computed from ``entry``, feeds the module."""
    frontier, seen = [u for u in entry.users if u not in inside], set()
    while frontier:
        current = frontier.pop()
        if current in others:
            return True
        if current in seen:
            continue
        seen.add(current)
        frontier.extend(u for u in current.users if u not in inside)
    return False


def _choose(found: dict[str, tuple], classes: dict[str, str]) -> list[str]:
    """Repeated candidates (a sibling of the same class is one too), the innermost where they nest (ConvNeXt's
    stages of blocks), then lone candidates clear of those, outermost first."""
    siblings: dict[tuple[str, str], list[str]] = defaultdict(list)
    for path in found:
        siblings[(path.rpartition(".")[0], classes.get(path, ""))].append(path)
    repeated = [p for group in siblings.values() if len(group) > 1 for p in group]
    repeated = [p for p in repeated if not any(r.startswith(p + ".") for r in repeated)]

    def overlaps(a: str, b: str) -> bool:
        return a == b or a.startswith(b + ".") or b.startswith(a + ".")

    chosen = list(repeated)
    for path in sorted(found, key=lambda p: p.count(".")):  # outermost first
        if not any(overlaps(path, c) for c in chosen):
            chosen.append(path)
    return chosen


def _signature(gm: torch.fx.GraphModule, nodes: list[torch.fx.Node], path: str) -> tuple:
    """The block's ops and shapes, with its own module path left out (equal for structurally identical blocks)."""
    out = []
    for node in nodes:
        own = str(node.target).startswith(path + ".")
        if node.op == "call_module":
            module = gm.get_submodule(str(node.target))
            weights = tuple((n, tuple(t.shape)) for n, t in [*module.named_parameters(), *module.named_buffers()])
            what: object = (type(module).__name__, _relative(str(node.target), path) if own else "", weights)
        elif node.op == "get_attr":
            what = _relative(str(node.target), path) if own else ""
        else:
            what = target_name(node)
        out.append((node.op, what, shape_of(node)))
    return tuple(out)


def _relative(target: str, path: str) -> str:
    return target[len(path) + 1 :] if target.startswith(path + ".") else target


def block_params(gm: torch.fx.GraphModule, path: str) -> dict[str, nn.Parameter]:
    """The parameters block ``path`` reads, by name (layers and parameters of other modules it calls too)."""
    return params_of(gm, _module_regions(gm)[0].get(path, []))


def params_of(gm: torch.fx.GraphModule, nodes: list[torch.fx.Node]) -> dict[str, nn.Parameter]:
    """The parameters ``nodes`` read (get_attr targets, their layers' parameters), by name."""
    out: dict[str, nn.Parameter] = {}
    for node in nodes:
        if node.op == "get_attr":
            value = attr_or_none(gm, str(node.target))
            if isinstance(value, nn.Parameter):
                out[str(node.target)] = value
        elif node.op == "call_module":
            for name, p in gm.get_submodule(str(node.target)).named_parameters():
                out[f"{node.target}.{name}"] = p
    return out


def _param_count(gm: torch.fx.GraphModule, nodes: list[torch.fx.Node]) -> int:
    return sum({id(p): p.numel() for p in params_of(gm, nodes).values()}.values())


def attr_or_none(gm: torch.fx.GraphModule, target: str) -> object:
    owner, _, name = target.rpartition(".")
    try:
        return getattr(gm.get_submodule(owner) if owner else gm, name)
    except AttributeError:
        return None
