"""Deepening with the model's own blocks: a copy of a residual block (``r2r_fx.blocks``) inserted after
it, its branches adding exactly 0 at insertion.

Each residual addition ``s + b`` of the copy gets ``b = 0``. Walking back from ``b`` through ops that
keep 0 at 0 (dropout, stochastic depth, scaling, views, moves, casts, activations with ``f(0) = 0``)
leads to the branch's last weighted layer ``T`` (Linear, convolution, ``addmm``), or to a norm
(ResNet's BatchNorm after ``T``, Swin v2's LayerNorm), which then gets weight and bias 0 (zero-init
residual, exact in both modes; the layers before it stay random and first train through that norm's
weight). At a ``T``, with ``method="r2r"`` the channels ``T`` reads are made identical
in pairs (channel ``j + w/2`` a copy of ``j``: every producer row, bias and per-channel value of that
channel set, which the width analysis lists) and ``T``'s columns opposite (``[V, -V]``), so
``T(h) = V h - V h = 0`` while every weight stays random and gets a gradient. The pairs need a channel
set of even width owned by the block that the analysis can widen (its ops treat channels alike), and
no dropout before ``T`` (its masks would differ within a pair in train mode); otherwise, and with
``method="netmorph"``/``"net2net"``, ``T``'s weight is 0, and the layers before ``T`` in that branch
get no gradient at the first step (recorded per block). ``T``'s bias is 0 either way.

Weights: ``init="random"`` (default) draws every tensor of rank >= 2 uniformly at the standard
deviation of the one it copies and copies the rest (norm weights, biases, running statistics);
``init="copy"`` copies all (as LLaMA-Pro and LEMON do); ``net2net`` copies.

A post-norm block (``r2r_fx.blocks``: a LayerNorm or RMSNorm after each addition) is exact by a chain of
norms (``passes/deepen_norms.py``); the block's own last norm, which the copy then follows, is set too.

The copy gets the next index of its siblings (``layers.2`` after ``layers.1``; the later ones move up
by one: ``layers.2`` becomes ``layers.3``), so its parameter names follow the model's pattern.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass

import torch
import torch.fx
from torch import nn

from r2r_fx.analysis import Analysis
from r2r_fx.blocks import (
    RepeatedBlock,
    attr_or_none,
    block_region,
    depends_on,
    norm_kind,
    params_of,
    stream_adds,
    stream_norms,
)
from r2r_fx.errors import GrowthError
from r2r_fx.graph import describe, output_dominators, shape_of, target_name
from r2r_fx.methods import Method
from r2r_fx.passes.deepen_norms import norm_targets, plan_chain, set_chain
from r2r_fx.rules import is_stochastic_depth
from r2r_fx.surgery import get_tensor

__all__ = ["BlockCopy", "Plan", "Tensors", "insert_copy", "plan_zero", "resolve"]

_KEEP_ZERO = {  # f(0) = 0 along the operand that carries the branch
    "Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "dropout", "feature_dropout", "Identity", "stochastic_depth",
    "mul", "mul_", "div", "neg", "view", "reshape", "permute", "transpose", "flatten", "contiguous", "clone",
    "to", "_to_copy", "squeeze", "unsqueeze", "type_as", "float", "alias", "_unsafe_view",
    "relu", "relu_", "ReLU", "gelu", "GELU", "silu", "SiLU", "tanh", "Tanh", "hardswish", "Hardswish",
    "leaky_relu", "LeakyReLU", "elu", "ELU", "mish", "Mish",
}  # fmt: skip
_MOVES = {  # rearrange or select their first operand's entries (Swin's window partitions, shifts and crops)
    "getitem", "slice", "select", "narrow", "roll", "expand", "repeat", "unflatten", "movedim", "index_select",
    "split", "split_with_sizes", "chunk", "unbind", "constant_pad_nd", "pad",
}  # fmt: skip
_WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_WEIGHTED_OPS = {"linear", "conv1d", "conv2d", "conv3d", "addmm", "mm", "matmul", "conv"}


@dataclass
class Tail:
    """A branch's last weighted layer and what else must be set so that the branch gives 0."""

    node: str
    weight: str  # parameter name (the original block's)
    axis: int  # the weight's input axis
    biases: list[str]  # to 0
    upstream: list[str]  # parameters the branch uses before the layer (no gradient when the weight is 0)
    pair_set: int | None = None  # the channel set read in identical pairs, or None: the weight is 0
    why_not_pairs: str = ""
    is_norm: bool = False  # the branch ends in a norm: its weight (and bias) are 0, it gives 0 whatever it reads


@dataclass
class Plan:
    """How a copy of one block is made an identity: its branches' tails, and the norms on its stream."""

    tails: list[Tail]
    norms: list[str]  # post-norm: the block's stream norms in order (the last one's output enters the copy)


@dataclass
class BlockCopy:
    """What inserting one copy did."""

    module: nn.Module  # the copy (its path moves when later copies go before it)
    output_node: str
    params: int
    paired: int  # channels read in identical pairs, over all tails
    no_grad: tuple[nn.Parameter, ...]  # without a gradient at the first step
    no_grad_why: str
    new_params: tuple[nn.Parameter, ...]
    reset: tuple[nn.Parameter, ...] = ()  # the model's own parameters it set (post-norm: the norm before it)


def plan_zero(gm: torch.fx.GraphModule, analysis: Analysis, block: RepeatedBlock, pairs: bool) -> Plan:
    """How each branch of ``block`` is made to add 0, and its stream norms made one (raises GrowthError with
    the reason if they cannot)."""
    nodes = block_region(gm, block.path)
    inside = set(nodes)
    named = {n.name: n for n in nodes}
    dominators = output_dominators(gm)
    entry = next(a for n in nodes for a in n.all_input_nodes if a.name == block.input)
    own = _own_tensors(gm, nodes, block.path)
    tails = []
    for _, stream, branch in stream_adds(nodes, entry, dominators):
        for tail in _tails(gm, analysis, branch, stream, inside):
            own_params = {tail.weight, *tail.biases}  # an exported graph reads them by get_attr: not upstream
            tail.upstream = [p for p in _upstream_params(gm, named[tail.node], stream, inside) if p not in own_params]
            changed = [tail.weight, *tail.biases]
            if any(id(get_tensor(gm, n)) not in own for n in changed):
                raise GrowthError(f"the last layer of a branch ({tail.node}) reads a tensor shared with the model")
            if pairs and not tail.is_norm:
                tail.pair_set, tail.why_not_pairs = _pair_set(gm, analysis, tail, nodes, own, stream)
            tails.append(tail)
    return Plan(tails, plan_chain(gm, stream_norms(gm, nodes, dominators), own))


def _tails(gm, analysis, node, stream, inside) -> list[Tail]:
    if not isinstance(node, torch.fx.Node) or node not in inside:
        raise GrowthError(f"a branch of the block ends outside it ({node}): its output cannot be made 0")
    tail = _as_tail(gm, analysis, node)
    if tail is not None:
        return [tail]
    name = _name(gm, node)
    if name in ("add", "add_") and len(node.args) == 2:
        return [t for a in node.args for t in _tails(gm, analysis, a, stream, inside)]
    module = gm.get_submodule(str(node.target)) if node.op == "call_module" else None
    moves = name in _MOVES and _pads_zeros(node)
    dropping = module is not None and is_stochastic_depth(module)
    if moves or name in _KEEP_ZERO or dropping:
        carriers = [a for a in node.all_input_nodes if a in inside and depends_on(a, stream)]
        if name == "div" or moves:  # the first operand only (an index computed from the stream is no carrier)
            carriers = carriers[:1] if node.args and node.args[0] in carriers else []
        inner = None
        for carrier in carriers:
            try:
                found = _tails(gm, analysis, carrier, stream, inside)
            except GrowthError as error:
                inner = inner or error
                continue
            return found
        if inner is not None:
            raise inner
    last_norm = _norm_tail(gm, node)
    if last_norm is not None:
        return [last_norm]
    raise GrowthError(f"a branch ends in {describe(node, gm)}, which cannot be made to give 0")


_TAIL_NORMS = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _norm_tail(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Tail | None:
    """A Tail for a norm that ends a branch (ResNet's last BatchNorm, Swin v2's ``x + LN(attention(x))``):
    torch's norms with weight and bias 0 give 0 for any input, in both modes, while the layers before stay
    random (zero-init residual; pairs there would leave rounding that a train-mode BatchNorm scales up by
    1/sqrt(eps)). None if ``node`` is no norm."""
    if node.op == "call_module":
        if type(gm.get_submodule(str(node.target))) not in _TAIL_NORMS:
            return None
    elif norm_kind(gm, node) is None:
        return None
    weight, bias = norm_targets(gm, node)
    if weight is None:
        raise GrowthError(
            f"a branch ends in {describe(node, gm)}, without affine parameters: it has no weight to start at 0"
        )
    why = (
        f"{describe(node, gm)} ends the branch: its weight and bias start at 0 (zero-init residual), the layers "
        "before it stay random"
    )
    return Tail(node.name, weight, 0, [bias] if bias else [], [], why_not_pairs=why, is_norm=True)


def _pads_zeros(node: torch.fx.Node) -> bool:
    """False for a pad with a value other than 0, True for every other op."""
    name = target_name(node)
    if name == "constant_pad_nd":
        value = node.kwargs.get("value", node.args[2] if len(node.args) > 2 else 0)
    elif name == "pad":  # reflect, replicate and circular padding of zeros give zeros
        mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
        value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else None)
        if mode != "constant":
            return True
    else:
        return True
    return value is None or value == 0


def _name(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str:
    return target_name(node, gm) if node.op == "call_module" else target_name(node)


def _as_tail(gm, analysis: Analysis, node: torch.fx.Node) -> Tail | None:
    """A Tail when ``node`` is a weighted layer whose output is 0 once its weight and bias are."""
    if node.op == "call_module":
        if not isinstance(gm.get_submodule(str(node.target)), _WEIGHTED):
            return None
    elif node.op != "call_function" or target_name(node) not in _WEIGHTED_OPS:
        return None
    binds = analysis.bindings_at(node.name)
    weights = [b for b in binds if b.role == "in"]
    if len(weights) != 1:
        return None
    params = {b.param for b in binds}
    if node.op == "call_function":  # one activation, every other tensor operand a parameter
        tensors = [a for a in node.all_input_nodes if shape_of(a) is not None]
        if sum(a.op != "get_attr" for a in tensors) != 1:
            return None
        params |= {str(a.target) for a in tensors if a.op == "get_attr"}
    else:
        params |= {f"{node.target}.{n}" for n, _ in gm.get_submodule(str(node.target)).named_parameters()}
    weight = weights[0]
    return Tail(node.name, weight.param, weight.axis, sorted(params - {weight.param}), [])


def _ancestors_from(node: torch.fx.Node, stream: torch.fx.Node, inside: set) -> list[torch.fx.Node]:
    """Nodes of the block between ``stream`` and ``node`` (exclusive), in no particular order."""
    out, frontier, seen = [], list(node.all_input_nodes), set()
    while frontier:
        current = frontier.pop()
        if current in seen or current is stream or current not in inside:
            continue
        seen.add(current)
        if current.op == "get_attr" or depends_on(current, stream):
            out.append(current)
            frontier.extend(current.all_input_nodes)
    return out


def _upstream_params(gm, node, stream, inside) -> list[str]:
    users = [n for n in _ancestors_from(node, stream, inside) if n.op != "get_attr" or _feeds_path(n, stream)]
    return sorted(params_of(gm, users))


def _feeds_path(get_attr: torch.fx.Node, stream: torch.fx.Node) -> bool:
    return any(depends_on(u, stream) for u in get_attr.users)


def _own_tensors(gm: torch.fx.GraphModule, nodes: list[torch.fx.Node], path: str) -> set[int]:
    """ids of the tensors a copy of the block gets its own of: its layers' parameters and buffers, the
    parameters it reads, the buffers of its module (a buffer of another module it reads stays shared)."""
    ids = set()
    for node in nodes:
        if node.op == "call_module":
            ids |= {id(t) for _, t in _tensors(gm.get_submodule(str(node.target)))}
        elif node.op == "get_attr":
            value = attr_or_none(gm, str(node.target))
            if isinstance(value, nn.Parameter) or str(node.target).startswith(path + "."):
                ids.add(id(value))
    return ids


def _pair_set(gm, analysis: Analysis, tail: Tail, nodes, own: set[int], stream) -> tuple[int | None, str]:
    """A channel set of the tail's input to read in identical pairs, or (None, why not)."""
    named = {n.name: n for n in nodes}
    before = _ancestors_from(named[tail.node], stream, set(nodes))
    random = [n for n in before if _random(gm, n)]
    if random:
        return None, f"{describe(random[0], gm)} before {tail.node} would break the pairs in train mode"
    odd = [n for n in before if _odd_groups(gm, n)]
    if odd:  # channel j and j + w/2 fall in different groups, whose statistics differ
        return None, f"{describe(odd[0], gm)} normalises an odd number of groups: it would mix the pairs"
    layout = analysis.layout((f"param:{tail.weight}", tail.axis))
    bound = analysis.bound_params()
    why = "no channel set of its input is the block's own, widenable and of even width"
    for a in reversed(layout.channel_sets()):
        group = analysis.group_of(a)
        if group is None or not group.widenable or group.stream or analysis.set_width[a] % 2:
            continue
        params = {id(get_tensor(gm, p)) for p, axes in bound.items() for _, lay, _ in axes if a in lay.channel_sets()}
        producers_inside = all(p in named for p in group.producers)
        if params <= own and producers_inside:
            return a, ""
    return None, why


def _odd_groups(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """A GroupNorm (layer or ``group_norm`` call) over an odd number of groups."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        return isinstance(module, nn.GroupNorm) and module.num_groups % 2 == 1
    name = target_name(node)
    if "group_norm" in name:  # group_norm(x, num_groups, ...); native_group_norm(x, w, b, N, C, HxW, group, eps)
        index = 6 if name == "native_group_norm" else 1
        groups = node.kwargs.get("num_groups", node.args[index] if len(node.args) > index else None)
        return not isinstance(groups, int) or groups % 2 == 1
    return False


def _random(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    """Whether ``node`` draws random numbers in train mode (dropout with p > 0, random ops)."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        return (isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0) or is_stochastic_depth(module)
    name = target_name(node)
    if "dropout" in name:
        p = node.kwargs.get("p", node.args[1] if len(node.args) > 1 else 0.5)
        return not (isinstance(p, (int, float)) and p == 0)
    return any(word in name for word in ("rand", "bernoulli", "normal", "multinomial"))


# ---------------------------------------------------------------- mutation


def insert_copy(
    gm: torch.fx.GraphModule,
    analysis: Analysis,
    block: RepeatedBlock,
    plan: Plan,
    method: Method,
    init: str,
    generator: torch.Generator,
    tensors: Tensors,
) -> BlockCopy:
    """Insert a copy of ``block`` right after it (``gm`` changes in place; recompile after).

    The analysis names tensors as the original graph does (a tied weight by one of its names), and copies
    inserted before rename later blocks: ``tensors`` resolved the names before any insertion. Every change
    goes to the copy's twin of a tensor, found by identity, never to the tensor itself."""
    nodes = block_region(gm, block.path)
    tensor, weights = tensors.by_name, tensors.weights
    new_path = _make_room(gm, block.path)
    renames = _copy_modules(gm, block.path, new_path, nodes)
    copies = _copy_nodes(gm, nodes, block, new_path, renames)
    twins = _twins(gm, nodes, copies)

    def twin(t: torch.Tensor) -> torch.Tensor:
        found = twins.get(id(t))
        if found is None:  # plan_zero only plans changes to tensors the copy has its own of
            raise GrowthError(f"{block.path}: a tensor the copy would change is shared with the rest of the model")
        return found

    with torch.no_grad():
        if init == "random" and method.name != "net2net":
            for old_id, new in twins.items():
                if old_id in weights and isinstance(new, nn.Parameter) and new.is_floating_point():
                    new.copy_(method._uniform(new.shape, method._scale(new), new, generator))
        paired, silent, reasons = 0, [], set()
        for tail in plan.tails if method.name != "random" else ():  # random: a copy that is not an identity
            if tail.pair_set is not None and method.name == "r2r":
                paired += _pair(analysis, tail, lambda name: twin(tensor[name]))
            else:
                twin(tensor[tail.weight]).zero_()
                silent += tail.upstream
                own_reason = method.name == "r2r" or tail.is_norm
                reasons.add(tail.why_not_pairs if own_reason else f"{method.name}: its last layer is 0")
            for bias in tail.biases:
                twin(tensor[bias]).zero_()
        reset = ()
        if plan.norms and method.name != "random":
            named = {n.name: n for n in nodes}
            reset = set_chain(gm, [named[n] for n in plan.norms], copies, twin)
    no_grad = tuple({id(p): p for p in (twin(tensor[n]) for n in silent)}.values())
    why = "; ".join(sorted(reasons)) if no_grad else ""
    new = {id(p): p for p in twins.values() if isinstance(p, nn.Parameter)}
    params = sum(p.numel() for p in new.values())
    module = gm.get_submodule(new_path)
    output = copies[_exit(nodes, block)].name
    return BlockCopy(module, output, params, paired, no_grad, why, tuple(new.values()), reset)


@dataclass
class Tensors:
    """What the plans name, resolved in the graph before any copy is inserted (see :func:`insert_copy`)."""

    by_name: dict[str, torch.Tensor]
    weights: set[int]  # ids of the tensors the analysis binds as weights (producer rows, consumer columns)


def resolve(gm: torch.fx.GraphModule, analysis: Analysis, plans: list[Plan]) -> Tensors:
    """Every tensor a plan reads or changes (tails, biases, upstream weights, the pairs' parameters)."""
    tails = [t for plan in plans for t in plan.tails]
    names = {n for t in tails for n in (t.weight, *t.biases, *t.upstream)}
    sets = {t.pair_set for t in tails if t.pair_set is not None}
    bound = analysis.bound_params()
    for param, axes in bound.items():
        if any(a in lay.channel_sets() for _, lay, _ in axes for a in sets):
            names.add(param)
    weights = {id(get_tensor(gm, p)) for p, axes in bound.items() if any(r in ("in", "out") for _, _, r in axes)}
    return Tensors({n: get_tensor(gm, n) for n in names}, weights)


def _exit(nodes: list[torch.fx.Node], block: RepeatedBlock) -> torch.fx.Node:
    return next(n for n in nodes if n.name == block.output)


def _twins(gm: torch.fx.GraphModule, nodes, copies) -> dict[int, torch.Tensor]:
    """id(a tensor the block reads) -> the copy's own tensor (shared constants and buffers have none)."""
    twins: dict[int, torch.Tensor] = {}
    for node in nodes:
        new = copies[node]
        if node.op == "get_attr":
            a, b = attr_or_none(gm, str(node.target)), attr_or_none(gm, str(new.target))
            if isinstance(a, torch.Tensor) and a is not b:
                twins[id(a)] = b
        elif node.op == "call_module":
            ma, mb = gm.get_submodule(str(node.target)), gm.get_submodule(str(new.target))
            if ma is not mb:
                for (_, a), (_, b) in zip(_tensors(ma), _tensors(mb)):
                    twins[id(a)] = b
    return twins


def _tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]


def _pair(analysis: Analysis, tail: Tail, twin_of) -> int:
    """Channel ``j + w/2`` of the tail's pair set := channel ``j`` in every producer and per-channel value;
    the tail's columns for it := minus those for ``j``. Returns the channels paired."""
    a = tail.pair_set
    width = analysis.set_width[a]
    for param, axes in analysis.bound_params().items():
        for axis, layout, role in axes:
            if a not in layout.channel_sets():
                continue
            if role == "in" and param != tail.weight:
                continue  # another reader of the pairs: any columns do
            value = twin_of(param)
            first, second = _positions(layout, a, width)
            sign = -1.0 if param == tail.weight else 1.0
            value.index_copy_(axis, second, sign * value.index_select(axis, first))
    return width


def _positions(layout, a: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions on an axis of the first and the second half of channel set ``a``'s channels, matched."""
    first, second, pos = [], [], 0
    half = width // 2
    for outer, pieces in layout.segments:
        for _ in range(outer):
            for s, n, inner in pieces:
                if s == a:
                    first += range(pos, pos + half * inner)
                    second += range(pos + half * inner, pos + n * inner)
                pos += n * inner
    return torch.tensor(first), torch.tensor(second)


def _under(name: str, old: str, new: str) -> str:
    return new + name[len(old) :] if name == old or name.startswith(old + ".") else name


def _make_room(gm: torch.fx.GraphModule, path: str) -> str:
    """The copy's path: the next index among the block's siblings, which move up by one."""
    parent_path, _, last = path.rpartition(".")
    parent = gm.get_submodule(parent_path) if parent_path else gm
    match = re.fullmatch(r"(.*?)(\d+)", last)
    if not match:
        name, k = f"{last}_copy", 1
        while name in parent._modules:
            k += 1
            name = f"{last}_copy{k}"
        return f"{parent_path}.{name}" if parent_path else name
    base, index = match.group(1), int(match.group(2))
    later = sorted(
        (int(m.group(2)), n)
        for n in parent._modules
        if (m := re.fullmatch(r"(.*?)(\d+)", n)) and m.group(1) == base and int(m.group(2)) > index
    )
    moves = {n: f"{base}{i + 1}" for i, n in reversed(later)}
    join = (lambda n: f"{parent_path}.{n}") if parent_path else (lambda n: n)
    for old, new in moves.items():
        _rename(gm, join(old), join(new))
    parent._modules = {moves.get(n, n): m for n, m in parent._modules.items()}
    return join(f"{base}{index + 1}")


def _rename(gm: torch.fx.GraphModule, old: str, new: str) -> None:
    """Module ``old`` is now called ``new``: node targets, module stacks and the records' parameter names follow
    (the pass records the renaming itself: ``GrowthRecord.renamed``)."""
    for node in gm.graph.nodes:
        if node.op in ("call_module", "get_attr"):
            node.target = _under(str(node.target), old, new)
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {k: (_under(str(v[0]), old, new), *v[1:]) for k, v in stack.items()}
    history = gm.meta.get("r2r_record") or getattr(gm, "r2r_record", None)
    for entry in history or ():
        for change in entry.get("params", ()):
            change["param"] = _under(change["param"], old, new)
        entry["new_params"] = [_under(p, old, new) for p in entry.get("new_params", ())]
        for insert in entry.get("blocks", ()):
            for key in ("no_grad", "reset"):
                insert[key] = [_under(p, old, new) for p in insert.get(key, ())]
            for key in ("at", "module"):
                insert[key] = _under(insert.get(key, ""), old, new)


def _copy_modules(gm: torch.fx.GraphModule, path: str, new_path: str, nodes) -> dict[str, str]:
    """Put a deep copy of module ``path`` at ``new_path`` (right after it); layers and parameters the block
    uses from outside its module get copies of their own. Returns {outside name: copy's name}."""
    parent_path, _, last = path.rpartition(".")
    parent = gm.get_submodule(parent_path) if parent_path else gm
    twin = copy.deepcopy(gm.get_submodule(path))
    new_last = new_path.rpartition(".")[2]
    modules = {}
    for name, module in parent._modules.items():
        modules[name] = module
        if name == last:
            modules[new_last] = twin
    parent._modules = modules
    renames = {}
    for node in nodes:
        target = str(node.target)
        if node.op not in ("call_module", "get_attr") or target.startswith(path + ".") or target in renames:
            continue
        value = gm.get_submodule(target) if node.op == "call_module" else attr_or_none(gm, target)
        if node.op == "get_attr" and not isinstance(value, nn.Parameter):
            continue  # constants and buffers outside the block are shared
        name = _free_name(gm, target)
        owner, _, attr = name.rpartition(".")
        holder = gm.get_submodule(owner) if owner else gm
        if node.op == "call_module":
            holder.add_module(attr, copy.deepcopy(value))
        else:
            holder.register_parameter(attr, nn.Parameter(value.detach().clone(), value.requires_grad))
        renames[target] = name
    return renames


def _free_name(gm: torch.fx.GraphModule, target: str) -> str:
    owner, _, attr = target.rpartition(".")
    holder = gm.get_submodule(owner) if owner else gm
    match = re.fullmatch(r"(.*?)(\d+)", attr)
    base, k = (match.group(1), int(match.group(2)) + 1) if match else (f"{attr}_", 1)
    while hasattr(holder, f"{base}{k}"):
        k += 1
    return f"{owner}.{base}{k}" if owner else f"{base}{k}"


def _copy_nodes(gm: torch.fx.GraphModule, nodes, block: RepeatedBlock, new_path: str, renames) -> dict:
    """Copy the block's nodes after it, reading its output; the block's outside users read the copy's.
    Returns {node: its copy}."""
    graph = gm.graph
    inside = set(nodes)
    exit_ = next(n for n in nodes if n.name == block.output)
    order = {n: i for i, n in enumerate(graph.nodes)}
    sides = [a for n in nodes for a in n.all_input_nodes if a not in inside and a.name != block.input]
    anchor = max([exit_, *sides], key=order.__getitem__)
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    entry = next(a for n in nodes for a in n.all_input_nodes if a.name == block.input)
    env[entry] = exit_
    users = [u for u in exit_.users if u not in inside]
    previous = anchor
    for node in nodes:
        with graph.inserting_after(previous):
            new = graph.node_copy(node, lambda a: env.get(a, a))
        if node.op in ("call_module", "get_attr"):
            target = str(node.target)
            new.target = renames.get(target) or _under(target, block.path, new_path)
        stack = new.meta.get("nn_module_stack")
        if stack:
            new.meta["nn_module_stack"] = {
                k: (_under(str(v[0]), block.path, new_path), *v[1:]) for k, v in stack.items()
            }
        env[node] = previous = new
    output = env[exit_]
    for user in users:
        if order.get(user, len(order)) <= order[anchor]:
            raise GrowthError(f"{block.path}: the block's output is used before its inputs are all computed")
        user.replace_input_with(exit_, output)
    return env
