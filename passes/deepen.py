"""Deepening: insert a method's block after chosen tensors; R2DeeperR's residual ``x + z(x)`` with
``z(x) = 0`` at insertion and random weights by default (the blocks themselves: ``r2r_fx.methods``).

Maths (R2R, arXiv 2410.11038, section 4.3): for a 4-D (or 3-D/5-D conv) activation ``z`` is
conv -> BatchNorm -> ReLU -> conv; for 2-D and token activations it is Linear -> ReLU -> Linear. The
first layer's output channels come in identical halves ``[U; U]`` and the BatchNorm parameters and
statistics of a pair are identical, so the hidden activation is ``[h; h]`` in eval and train mode.
The last layer's input columns come in opposite halves ``[V, -V]`` and it has no bias, so
``z(x) = V h - V h = 0`` exactly, while both layers get non-zero gradients (``+-V^T g`` reach the
two copies of ``U``). Random values are uniform with the standard deviation of the weights of the
layer that produced ``x``.

Insertion points are tensors every path from the inputs to the outputs passes through (the
dominators of the output), whose channel axis is an internal width. A *stage* is a maximal run of
such points with one activation shape apart from the channel count; by default one block goes after
the last point of each stage (for a ResNet: after the last residual block of each stage).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx
from torch import nn

from r2r_fx.aliasing import unsafe_points
from r2r_fx.analysis import Analysis, analyze, hidden_weights
from r2r_fx.blocks import RepeatedBlock, repeated_blocks
from r2r_fx.capture import example_inputs_of, record_shapes
from r2r_fx.errors import GrowthError
from r2r_fx.graph import attr_at, output_dominators, shape_of
from r2r_fx.methods import Block, BlockSite, Method, get_method
from r2r_fx.passbase import Pass, PassResult, copy_graph_module, make_generator
from r2r_fx.passes.deepen_blocks import insert_copy, plan_zero, resolve
from r2r_fx.record import BlockInsert, GrowthRecord, SkippedPoint, append_record

__all__ = ["DeepenPass", "InsertionPoint", "deepen", "insertion_points"]


_CHANNELS_FIRST_RANKS = (3, 4, 5)  # conv1d/2d/3d blocks


@dataclass(frozen=True)
class InsertionPoint:
    """A node after which a residual block can go."""

    node: str
    shape: tuple[int, ...]
    channel_axis: int
    kind: str  # "conv1d" | "conv2d" | "conv3d" | "linear"
    stage: int  # -1 off the main path
    default: bool  # the last main-path point of its stage

    @property
    def width(self) -> int:
        return self.shape[self.channel_axis]


def insertion_points(gm: torch.fx.GraphModule, analysis: Analysis | None = None) -> list[InsertionPoint]:
    """Candidate points in graph order, with their shapes and stages."""
    analysis = analysis or analyze(gm)
    dominators = output_dominators(gm)
    unsafe = unsafe_points(gm)
    points: list[tuple[torch.fx.Node, tuple[int, ...], int]] = []
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr") or node.name in unsafe:
            continue
        shape = shape_of(node)
        meta = node.meta.get("tensor_meta")
        if shape is None or len(shape) < 2 or not meta.dtype.is_floating_point or not _contiguous(meta):
            continue  # a block's sum is contiguous: after a strided tensor, a later .view() could fail
        axis = _channel_axis(analysis, node.name, shape)
        if axis == 1 and len(shape) >= 3 and all(s == 1 for s in shape[2:]):
            continue  # pooled to 1x1: a 3x3 conv block there is a Linear block in disguise
        if axis is not None and _block_kind(shape, axis) is not None:
            points.append((node, shape, axis))
    main = [p for p in points if p[0].name in dominators]
    keys = [_stage_key(shape, axis) for _, shape, axis in main]
    stages: dict[str, tuple[int, bool]] = {}
    stage = -1
    for i, (node, _, _) in enumerate(main):
        if i == 0 or keys[i] != keys[i - 1]:
            stage += 1
        stages[node.name] = (stage, i + 1 == len(main) or keys[i + 1] != keys[i])
    out = []
    for node, shape, axis in points:
        kind = _block_kind(shape, axis)
        stage, last = stages.get(node.name, (-1, False))
        out.append(InsertionPoint(node.name, shape, axis, kind, stage, last))
    return out


def _contiguous(meta: Any) -> bool:
    """Whether a recorded tensor is laid out row-major (what ShapeProp found; widening keeps the layout)."""
    return meta.memory_format is torch.contiguous_format


def _block_kind(shape: tuple[int, ...], axis: int) -> str | None:
    """conv1d/2d/3d for channels-first activations of rank 3-5, linear for channels-last ones."""
    if axis == 1 and len(shape) in _CHANNELS_FIRST_RANKS:
        return f"conv{len(shape) - 2}d"
    if axis == len(shape) - 1:
        return "linear"
    return None


def _stage_key(shape: tuple[int, ...], axis: int) -> tuple[Any, ...]:
    """Activation shape apart from batch and channel count: a stage keeps it."""
    return len(shape), axis, tuple(s for a, s in enumerate(shape) if a not in (0, axis))


def _channel_axis(analysis: Analysis, name: str, shape: tuple[int, ...]) -> int | None:
    """The axis of ``name`` that is an internal width (a group with producers, not an input/output)."""
    candidates = [1, len(shape) - 1] if len(shape) >= 3 else [1]
    for axis in candidates:
        if analysis.size((name, axis)) is None:
            continue
        groups = [analysis.group_of(s) for s in analysis.layout((name, axis)).channel_sets()]
        if not groups or None in groups:
            continue
        if all(g.producers and not g.reason.startswith("model ") for g in groups):
            return axis
    return None


def _weight_std(gm: torch.fx.GraphModule, node: torch.fx.Node) -> float | None:
    """Std of the weight of the nearest layer upstream of ``node`` (breadth-first)."""
    frontier, seen = [node], set()
    while frontier:
        current = frontier.pop(0)
        if current in seen:
            continue
        seen.add(current)
        weight = None
        if current.op == "call_module":
            module = gm.get_submodule(str(current.target))
            # a parametrized weight is computed when read (spectral norm even steps its power iteration)
            weight = None if hidden_weights(module) else getattr(module, "weight", None)
        elif current.op == "call_function":
            for arg in current.args[1:2]:
                if isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
                    weight = attr_at(gm, str(arg.target))
        if isinstance(weight, torch.Tensor) and weight.dim() >= 2 and weight.numel() > 1:
            return float(weight.detach().float().std())
        frontier.extend(current.all_input_nodes)
    return None


class DeepenPass(Pass):
    """Insert the method's blocks at chosen points (default: one per stage): R2R residual blocks, or
    Net2Net / NetMorph identity layers (see :mod:`r2r_fx.methods`)."""

    name = "deepen"

    def __init__(
        self,
        *,
        at: Sequence[str] | str | None = None,
        count: int | None = None,
        hidden: int | None = None,
        method: str | Method = "r2r",
        seed: int | None = None,
        check: bool = True,
        block: str = "auto",
        after: Sequence[str] | str | None = None,
        where: str | None = None,
        init: str = "random",
        **method_options: Any,
    ) -> None:
        self.check = check
        if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
            raise GrowthError(f"count must be an integer >= 1, got {count!r}")
        if block not in ("auto", "generic", "own"):
            raise GrowthError(f"block must be 'auto', 'own' or 'generic', got {block!r}")
        if where not in (None, "end", "spread"):
            raise GrowthError(f"where must be 'end' or 'spread', got {where!r}")
        if init not in ("random", "copy"):
            raise GrowthError(f"init must be 'random' or 'copy', got {init!r}")
        if block == "generic" and (after is not None or init != "random" or where == "spread"):
            raise GrowthError("after=, init= and where='spread' are for the model's own blocks, not block='generic'")
        if after is not None or init != "random":
            block = "own" if block == "auto" else block
        if after is not None and (where is not None or not (after if not isinstance(after, str) else [after])):
            raise GrowthError("after= names the blocks to copy (at least one), and takes no where=")
        if where == "spread" and count is None:
            raise GrowthError("where='spread' spreads count= copies over the stages: give count")
        if block == "own" and (at is not None or hidden is not None):
            raise GrowthError(
                "block='own' copies the model's blocks: it takes after= (module paths), not at= or hidden="
            )
        self.block, self.where, self.init = block, where, init
        self.after = [after] if isinstance(after, str) else (list(after) if after is not None else None)
        if hidden is not None:
            try:
                size = None if isinstance(hidden, bool) else operator.index(hidden)
            except TypeError:
                size = None
            if size is None or size < 1:
                raise GrowthError(f"hidden must be a positive integer, got {hidden!r}")
            hidden = size
        self.method = get_method(method, **method_options)
        if hidden is not None and not self.method.takes_hidden:
            raise GrowthError(
                f"{self.method.name} deepen inserts an identity layer of the stream's width; it takes no hidden"
            )
        self.at = [at] if isinstance(at, str) else (list(at) if at is not None else None)
        self.count, self.hidden, self.seed = count, hidden, seed
        if block == "own" and self.method.name not in OWN_METHODS:
            raise GrowthError(f"block='own' takes the methods {', '.join(OWN_METHODS)}, not {self.method.name!r}")
        if block == "auto" and (at is not None or hidden is not None or self.method.name not in OWN_METHODS):
            self.block = "generic"  # a node, a hidden width or a method's own block: the generic block

    def uses_own_blocks(self, blocks: list[RepeatedBlock]) -> bool:
        """Whether this pass copies the model's blocks (given ``repeated_blocks`` of its graph)."""
        return self.block == "own" or (self.block == "auto" and any(not b.refusal for b in blocks))

    def transform(self, gm: torch.fx.GraphModule) -> PassResult:
        blocks = repeated_blocks(gm) if self.block != "generic" else []
        if self.block == "own":
            return self._own_blocks(gm, blocks)
        if self.uses_own_blocks(blocks):
            result = self._own_blocks(gm, blocks)
            if result.modified:
                return result  # else (every block refused) the generic block, as for a model without blocks
        analysis = analyze(gm)
        points = insertion_points(gm, analysis)
        chosen = self._choose(gm, points)
        grown = copy_graph_module(gm)
        generator = make_generator(self.seed)
        existing = sum(1 for n, _ in grown.named_children() if n == "r2r_blocks")
        index = len(list(grown.get_submodule("r2r_blocks").children())) if existing else 0
        blocks, skipped = [], []
        nodes = {n.name: n for n in grown.graph.nodes}
        like = next(iter(grown.parameters()), torch.zeros(()))
        for point in chosen:
            x = nodes[point.node]
            refusal = self.method.refuses_point(grown, x)
            if refusal:
                if self.at is not None:
                    raise GrowthError(f"{point.node!r}: {refusal}")
                skipped.append(SkippedPoint(point.node, refusal))
                continue
            std = _weight_std(grown, x)
            for _ in range(self.count or 1):
                site = BlockSite(grown, x, point.shape, point.width, point.kind, std, like)
                block = self.method.block(site, self.hidden, generator)
                prefix = f"r2r_blocks.b{index}"
                x = _insert(grown, x, prefix, block)
                blocks.append(
                    BlockInsert(
                        at=point.node,
                        kind=point.kind,
                        width=point.width,
                        hidden=block.hidden,
                        module=prefix,
                        output_node=x.name,
                        params=sum(p.numel() for p in grown.get_submodule(prefix).parameters()),
                    )
                )
                index += 1
        grown.graph.lint()
        grown.recompile()
        record_shapes(grown, example_inputs_of(grown))  # a real run: meta kernels can differ in strides, or fail
        record = GrowthRecord(
            "deepen",
            self.method.name,
            self.method.exact,
            blocks=tuple(blocks),
            skipped=tuple(skipped),
            new_params=tuple(
                f"{b.module}.{n}" for b in blocks for n, _ in grown.get_submodule(b.module).named_parameters()
            ),
            options={"count": self.count or 1, "at": list(self.at) if self.at is not None else None},
        )
        append_record(grown, record)
        return PassResult(grown, bool(blocks), record)

    def _own_blocks(self, gm: torch.fx.GraphModule, blocks: list[RepeatedBlock]) -> PassResult:
        analysis = analyze(gm)
        chosen = self.choose(blocks)
        pairs = self.method.name == "r2r"
        plans, skipped = {}, []
        for block in dict.fromkeys(chosen):
            try:
                plans[block.path] = plan_zero(gm, analysis, block, pairs)
            except GrowthError as error:
                if self.after is not None:
                    raise GrowthError(f"{block.path!r}: {error}") from None
                skipped.append(SkippedPoint(block.path, str(error)))
        grown = copy_graph_module(gm)
        tensors = resolve(grown, analysis, list(plans.values()))
        before = {id(p): n for n, p in grown.named_parameters(remove_duplicate=False)}
        generator = make_generator(self.seed)
        order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
        inserted, ends = [], {}
        for block in sorted(chosen, key=lambda b: order[b.output], reverse=True):  # later paths move, not earlier
            if block.path not in plans:
                continue
            done = insert_copy(grown, analysis, block, plans[block.path], self.method, self.init, generator, tensors)
            ends.setdefault(block.output, done.output_node)
            inserted.append((block, done))
        grown.graph.lint()
        grown.recompile()
        if not self.check and self.method.exact:  # copies carry the originals' recorded shapes; checked: verify
            check_identities(grown, ends, gm if any(p.norms for p in plans.values()) else None)
        paths = {id(m): n for n, m in grown.named_modules()}
        names = {id(p): n for n, p in grown.named_parameters()}
        after = grown.named_parameters(remove_duplicate=False)
        renamed = {n: before.get(id(p), "") for n, p in after if before.get(id(p), "") != n}
        records = [
            BlockInsert(
                at=b.path,
                kind=f"own:{b.cls}",
                width=_stream_width(analysis, b),
                hidden=d.paired,
                module=paths[id(d.module)],
                output_node=d.output_node,
                params=d.params,
                no_grad=tuple(sorted(names[id(p)] for p in d.no_grad)),
                no_grad_why=d.no_grad_why,
                reset=tuple(sorted({names[id(p)] for p in d.reset})),
            )
            for b, d in reversed(inserted)
        ]
        exact = self.method.exact
        record = GrowthRecord(
            "deepen",
            self.method.name,
            exact,
            blocks=tuple(records),
            skipped=tuple(skipped),
            new_params=tuple(sorted(names[id(p)] for _, d in inserted for p in d.new_params)),
            options={"block": "own", "count": self.count, "after": self.after, "where": self.where, "init": self.init},
            renamed=renamed,
        )
        append_record(grown, record)
        return PassResult(grown, bool(inserted), record)

    def choose(self, blocks: list[RepeatedBlock]) -> list[RepeatedBlock]:
        """The model's blocks this pass copies, one entry per copy."""
        return choose_blocks(blocks, self.after, self.count, self.where)

    def _choose(self, gm: torch.fx.GraphModule, points: list[InsertionPoint]) -> list[InsertionPoint]:
        if self.at is None:
            return [p for p in points if p.default]
        by_name = {p.node: p for p in points}
        names = {n.name for n in gm.graph.nodes}
        chosen = []
        for name in self.at:
            if name not in by_name:
                valid = ", ".join(p.node for p in points) or "none"
                unsafe = unsafe_points(gm)
                if name not in names:
                    problem = "is not a node of this graph"
                elif name in unsafe:
                    problem = f"cannot take a block: {unsafe[name]}"
                else:
                    problem = "is not a point where a residual block can be formed"
                raise GrowthError(f"{name!r} {problem}; valid insertion points: {valid}")
            chosen.append(by_name[name])
        return chosen


OWN_METHODS = ("r2r", "netmorph", "net2net", "random")


def choose_blocks(
    blocks: list[RepeatedBlock], after: list[str] | None, count: int | None, where: str | None
) -> list[RepeatedBlock]:
    """The blocks to copy, one entry per copy: ``after`` (paths, ``count`` copies each), else ``count`` spread
    evenly over the stages (LLaMA-Pro's interleaving), else (``where="end"``) ``count`` after each stage's last."""
    usable = [b for b in blocks if not b.refusal]
    if after is not None:
        by_path = {b.path: b for b in blocks}
        out = []
        for path in after:
            block = by_path.get(path)
            if block is None:
                valid = ", ".join(b.path for b in usable) or "none"
                raise GrowthError(f"{path!r} is not one of the model's residual blocks; blocks: {valid}")
            if block.refusal:
                raise GrowthError(f"{path!r}: {block.refusal}")
            out += [block] * (count or 1)
        return out
    stages: dict[int, list[RepeatedBlock]] = {}
    for b in usable:
        stages.setdefault(b.stage, []).append(b)
    if not stages:
        reasons = "; ".join(dict.fromkeys(f"{b.path}: {b.refusal}" for b in blocks[:3])) or "no residual block found"
        raise GrowthError(f"this model has no block a copy of which can be inserted ({reasons})")
    runs = list(stages.values())
    if count is None or where == "end":
        return [run[-1] for run in runs for _ in range(count or 1)]
    shares = [count // len(runs)] * len(runs)
    for i in sorted(range(len(runs)), key=lambda i: -len(runs[i]))[: count % len(runs)]:
        shares[i] += 1  # the remainder goes to the longest stages
    out = []
    for run, n in zip(runs, shares):
        out += [run[math.ceil((j + 1) * len(run) / n) - 1] for j in range(n)]
    return out


def _stream_width(analysis: Analysis, block: RepeatedBlock) -> int:
    """The channel count of the stream a block reads (its output's internal width axis)."""
    axis = _channel_axis(analysis, block.output, block.shape)
    return block.shape[axis if axis is not None else -1]


def check_identities(
    gm: torch.fx.GraphModule, ends: dict[str, str], reference: torch.fx.GraphModule | None = None
) -> None:
    """Each inserted chain of copies passes its input through (eval mode, on the capture's inputs): the
    last guard against a branch the construction did not make 0. ``reference``: the graph before the pass,
    whose values at the chains' starts are compared (post-norm copies change the norm they start at)."""
    from r2r_fx.capture import eval_mode

    inputs = example_inputs_of(gm)  # random: one draw for both graphs

    def values(graph: torch.fx.GraphModule, names: set[str]) -> dict[str, torch.Tensor]:
        found: dict[str, torch.Tensor] = {}

        class Watch(torch.fx.Interpreter):
            def run_node(self, n):
                out = super().run_node(n)
                if n.name in names:
                    found[n.name] = out.clone()  # a later in-place write must not fool the comparison
                return out

        with eval_mode(graph):
            Watch(graph).run(*inputs)
        return found

    if reference is None:
        found = values(gm, set(ends) | set(ends.values()))
        starts = found
    else:
        found, starts = values(gm, set(ends.values())), values(reference, set(ends))
    for start, end in ends.items():
        x, y = starts[start].double(), found[end].double()
        scale = float(x.abs().max()) or 1.0
        if float((x - y).abs().max()) > 1e-5 * scale:
            raise GrowthError(
                f"the copy inserted after {start} does not pass its input through (an op in its branches that "
                "this construction does not cover)"
            )


def _insert(gm: torch.fx.GraphModule, x: torch.fx.Node, prefix: str, block: Block) -> torch.fx.Node:
    """Insert ``block`` after ``x`` (see :class:`~r2r_fx.methods.Block`) and route every former user
    of ``x`` to its output."""
    graph = gm.graph
    previous = x
    created = []

    def call(target, args, kind="call_function"):
        nonlocal previous
        with graph.inserting_after(previous):
            previous = graph.create_node(kind, target, args)
        created.append(previous)
        return previous

    outputs = []
    for layers in block.branches:
        h = x
        for name, module in layers.items():
            gm.add_submodule(f"{prefix}.{name}", module)
            h = call(f"{prefix}.{name}", (h,), "call_module")
        outputs.append(h)
    h = outputs[0]
    for other in outputs[1:]:
        h = call(operator.add, (h, other))
    if block.parametric:
        owner = gm.get_submodule(prefix)
        dtype = next(iter(block.branches[0].values())).weight.dtype
        owner.register_parameter("alpha", nn.Parameter(torch.ones((), dtype=dtype)))
        alpha = call(f"{prefix}.alpha", (), "get_attr")
        relu = call(torch.relu, (h,))
        keep_linear = call(operator.mul, (alpha, h))
        one_minus = call(operator.sub, (1.0, alpha))
        nonlinear = call(operator.mul, (one_minus, relu))
        h = call(operator.add, (keep_linear, nonlinear))
    total = call(operator.add, (x, h)) if block.residual else h
    keep = set(created)
    x.replace_all_uses_with(total, delete_user_cb=lambda user: user not in keep)
    return total


def deepen(
    gm: torch.fx.GraphModule,
    *,
    at: Sequence[str] | str | None = None,
    count: int | None = None,
    hidden: int | None = None,
    method: str | Method = "r2r",
    seed: int | None = None,
    check: bool = True,
    block: str = "auto",
    after: Sequence[str] | str | None = None,
    where: str | None = None,
    init: str = "random",
    **method_options: Any,
) -> torch.fx.GraphModule:
    """Return a copy of ``gm`` with blocks inserted, each an identity at insertion.

    ``block="auto"`` (default): copies of the model's own residual blocks where it has some
    (:func:`r2r_fx.repeated_blocks`; see ``passes/deepen_blocks.py``), else the method's generic block.
    ``block="own"``: only the model's blocks; ``after`` (module paths) takes ``count`` (default 1) copies
    after each, else ``count`` copies are spread over the stages (``where="spread"``, LLaMA-Pro's
    interleaving) or ``count`` (default 1) appended to each stage (``where="end"``, the default without
    ``count``); ``init="copy"`` copies the block's weights instead of drawing them at their scale.
    ``block="generic"``: the method's block (R2R: conv-BN-ReLU-conv or Linear-ReLU-Linear) after each
    stage's last point or after the nodes ``at``, ``count`` after each, of hidden width ``hidden``.

    ``method``: a name ("r2r", the default; "net2net", "netmorph", "random") or a
    :class:`~r2r_fx.methods.Method`; ``method_options`` go to its constructor (``init_scale=``, and
    ``noise=`` for Net2Net); an option it does not take is an error. ``hidden`` is the hidden width of
    R2R and random blocks (default: the stream's width). ``check`` (default on) runs the result
    against ``gm`` on the capture's example inputs (two forwards, four with batch statistics) and
    raises :class:`~r2r_fx.errors.NotPreservedError` if an exact method changed the function."""
    pass_ = DeepenPass(
        at=at,
        count=count,
        hidden=hidden,
        method=method,
        seed=seed,
        check=check,
        block=block,
        after=after,
        where=where,
        init=init,
        **method_options,
    )
    return pass_.call(gm).model
