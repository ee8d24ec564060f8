"""Width-group analysis: which channel axes of a captured model must grow together.

A *slot* is one axis of one tensor: ``(node name, axis)``; parameter axes are slots too
(``("param:conv1.weight", 0)``), so tied weights couple their users for free. Each op's rule
(``r2r_fx.rules``) adds couplings; a union-find merges slots that hold the same channels, and the
coupling graph is kept as a networkx graph for inspection (``Analysis.coupling_graph``).

Classes of slots are then resolved to *layouts*: ``outer x [(channel_set, width, inner), ...]``,
where a *channel set* is a set of channels no op splits further (numbered in graph order).
Concatenation makes a layout of several channel sets, split/chunk refines a class into channel sets,
flatten multiplies ``inner`` (each channel brings H*W features). Index maps stay symbolic: a layout
is a handful of integers per channel set, never a per-channel list. Channel sets tied by equal-size
splits form one :class:`WidthGroup`.

Fail closed: a slot frozen by a rule (unknown op, model input/output, ...) freezes every channel
set in its layout, and the group records the first reason.

Normalised streams. A LayerNorm/RMSNorm over the last axis (or one written out as ops,
``r2r_fx.rules.norm_idioms``) does not freeze its input: its rule calls ``normalize`` and the channel
set becomes a *stream* (the group's ``norms``), which grows by whole copies plus mean channels where
exact (``r2r_fx.streams``; a tied embedding/head: ``r2r_fx.stream_ties``). A stream must be one channel
set with the plain layout (outer 1, one piece, inner 1) at every slot and parameter axis.
Attention heads: a reshape that splits a channel axis grows along the member an attention rule named
as heads (``heads``; ``r2r_fx.heads`` follows them through ``repeat_kv`` and ``batch * heads``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import networkx as nx
import torch
import torch.fx

from r2r_fx import rules as _rules
from r2r_fx.graph import describe, hidden_weights, tensor_shapes
from r2r_fx.heads import contract_ties, head_roots, query_group_size
from r2r_fx.layout import Layout, Piece
from r2r_fx.rules import Slot, freeze_all, rule_for
from r2r_fx.rules.common import freeze_hidden_uses
from r2r_fx.rules.norm_idioms import RMSIdiom
from r2r_fx.stream_ties import fill_roles, find_tied_heads
from r2r_fx.streams import StreamForms, find_streams, stream_forms

__all__ = ["Analysis", "Binding", "Layout", "NormSite", "WidthGroup", "analyze", "hidden_weights", "width_groups"]


ROLES = ("out", "in", "channel", "data")


@dataclass(frozen=True)
class Binding:
    """A parameter axis indexing a class of channels, as seen by one node."""

    param: str
    axis: int
    role: str  # "out": producer rows, "in": consumer columns, "channel": per-channel values,
    # "data": a parameter read as an activation (class token, positional embedding)
    node: str


@dataclass(frozen=True)
class NormSite:
    """A normalisation over the last axis of ``in_slot`` (``kind``: "layer" or "rms") by node ``node``,
    its output at ``out_slot``; ``affine`` says whether it scales by a weight."""

    node: str
    kind: str
    in_slot: Slot
    out_slot: Slot
    affine: bool
    idiom: RMSIdiom | None = None  # a decomposed RMSNorm's ops (r2r_fx.rules.norm_idioms)


@dataclass
class WidthGroup:
    """Channel slots that must grow together, with what produces and consumes them."""

    id: int
    width: int
    channel_sets: list[int]
    slots: list[Slot]
    producers: list[str]
    consumers: list[str]
    granularity: int = 2
    widenable: bool = True
    reason: str = ""
    norms: tuple[str, ...] = ()  # the norms reading this group: a normalised stream (r2r_fx.streams)
    integer_only: str = ""  # a stream that only whole copies keep exact: why (r2r_fx.streams)
    heads: bool = False  # its channels are attention heads (each a block of head-size positions)
    head_size: bool = False  # its channels are positions within attention heads (a head-size analysis)
    group_size: int = 1  # heads: query heads per channel (key/value head) of the group; 0: the products disagree

    @property
    def query_heads(self) -> int:
        """Heads: the query heads the group's channels stand for (grouped-query attention: each channel is
        a key/value head shared by ``group_size`` query heads); 0 where attention products disagree."""
        return self.width * self.group_size

    @property
    def stream(self) -> bool:
        """Whether the group is a normalised stream (see the module docstring)."""
        return bool(self.norms)

    @property
    def kind(self) -> str:
        """ "stream" (normalised residual stream), "heads" (attention heads), "head_size" (positions in
        each head, from ``analyze(gm, head_size=True)``) or "channels" (the rest: MLP hidden widths,
        convolution channels)."""
        if self.norms:
            return "stream"
        return "head_size" if self.head_size else "heads" if self.heads else "channels"

    def __repr__(self) -> str:
        state = "widenable" if self.widenable else f"frozen: {self.reason}"
        if self.norms:
            state += f", stream normalised by {', '.join(self.norms)}"
        elif self.heads:
            state += ", attention heads" + (f" ({self.query_heads} query heads)" if self.group_size > 1 else "")
        if self.integer_only:
            state += f", whole copies only: {self.integer_only}"
        return (
            f"WidthGroup(id={self.id}, width={self.width}, producers={self.producers}, "
            f"consumers={self.consumers}, {state})"
        )


class _UnionFind:
    def __init__(self) -> None:
        self.parent: dict[Slot, Slot] = {}

    def add(self, x: Slot) -> None:
        self.parent.setdefault(x, x)

    def find(self, x: Slot) -> Slot:
        # A root maps to itself as the very same object (``parent[x] = x``; unions store roots), so
        # identity tests suffice, and the common case (x's parent is a root) costs two lookups.
        parent = self.parent
        p = parent.get(x)
        if p is None:
            parent[x] = x
            return x
        root = p
        while (up := parent[root]) is not root:
            root = up
        if root is not p:
            while x is not root:  # path compression
                parent[x], x = root, parent[x]
        return root

    def union(self, a: Slot, b: Slot) -> bool:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return False
        self.parent[rb] = ra
        return True


class _Builder:
    """Collects couplings from the rules (implements ``r2r_fx.rules.Couplings``).

    Every slot a rule mentions enters the union-find; the coupling edges are recorded in a list, and
    the networkx graph is built from them when first asked for (the analysis itself only needs the
    union-find).
    """

    def __init__(self, gm: torch.fx.GraphModule, head_size: bool = False) -> None:
        self.gm = gm
        self.head_size_mode = head_size
        self._uf = _UnionFind()
        self.edges: list[tuple[Slot, Slot, str]] = []
        self.sizes: dict[Slot, int] = {}
        self.concats: list[tuple[Slot, list[Slot], bool]] = []
        self.merges: list[tuple[Slot, list[Slot]]] = []
        self.bindings: dict[tuple[str, int], list[Binding]] = defaultdict(list)
        self.frozen: dict[Slot, str] = {}
        self.granularities: list[tuple[Slot, int, str]] = []
        self.param_users: set[tuple[str, str]] = set()
        self.norms: list[NormSite] = []
        self.head_slots: list[Slot] = []
        self.head_size_slots: list[Slot] = []
        self.contracts: list[tuple[Slot, Slot, str]] = []  # (q side, k side, node) of a product
        # Qualified name -> submodule, gathered once rather than one get_submodule walk per lookup.
        self.modules: dict[str, torch.nn.Module] = dict(gm.named_modules(remove_duplicate=False))
        self._slots_seen: list[Slot] = []
        # Tied tensors (``b.weight = a.weight``) are one parameter: bound under the first name, grown once.
        self.canonical: dict[str, str] = {}
        self.aliases: dict[str, list[str]] = defaultdict(list)
        first: dict[int, str] = {}
        named = list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False))
        for name, tensor in named:
            self.canonical[name] = first.setdefault(id(tensor), name)
            self.aliases[first[id(tensor)]].append(name)

    # -- the Couplings protocol
    def same(self, a: Slot, b: Slot) -> None:
        self.edges.append((a, b, "same"))
        self._uf.union(a, b)  # adds unseen slots, a first

    def concat(self, whole: Slot, parts: Sequence[Slot], *, equal: bool = False) -> None:
        self._touch(whole, *parts)
        self.edges.extend((whole, p, "concat") for p in parts)
        self.concats.append((whole, list(parts), equal))

    def merge(self, whole: Slot, members: Sequence[Slot]) -> None:
        self._touch(whole, *members)
        self.edges.extend((whole, m, "merge") for m in members)
        self.merges.append((whole, list(members)))

    def bind(self, param: str, axis: int, slot: Slot, role: str, node: torch.fx.Node) -> None:
        assert role in ROLES, role
        param = self.canonical.get(param, param)
        pslot = (f"param:{param}", axis)
        if pslot not in self.sizes:
            self.sizes[pslot] = int(self._tensor(param).shape[axis])
        self.same(pslot, slot)
        self.bindings[(param, axis)].append(Binding(param, axis, role, node.name))

    def granularity(self, slot: Slot, k: int, node: torch.fx.Node) -> None:
        self._touch(slot)
        self.granularities.append((slot, k, node.name))

    def freeze(self, slot: Slot, reason: str) -> None:
        self._touch(slot)
        self.frozen.setdefault(slot, reason)

    def normalize(
        self, x: Slot, out: Slot, node: torch.fx.Node, kind: str, affine: bool, idiom: RMSIdiom | None = None
    ) -> None:
        """``node`` normalises axis ``x`` (its statistics read every channel) into ``out`` (``idiom``: the
        ops of a decomposed RMSNorm ending at ``node``)."""
        assert kind in ("layer", "rms"), kind
        self._touch(x, out)
        self.norms.append(NormSite(node.name, kind, x, out, affine, idiom))

    def heads(self, slot: Slot, node: torch.fx.Node) -> None:
        """``slot`` holds attention heads: a reshape splitting a channel axis into it grows along it."""
        self._touch(slot)
        self.head_slots.append(slot)

    def head_size(self, slot: Slot, node: torch.fx.Node) -> None:
        """``slot`` is the head size of an attention output (grows only in head-size analyses)."""
        self._touch(slot)
        self.head_size_slots.append(slot)

    def contract(self, a: Slot, b: Slot, node: torch.fx.Node, reason: str) -> None:
        """``node`` contracts axis ``a`` with axis ``b`` (``q`` with ``k``): frozen with ``reason``,
        except in a head-size analysis, where they grow together (``r2r_fx.heads``)."""
        if not self.head_size_mode:
            for slot in (a, b):
                self.freeze(slot, f"{reason} (a head size grows only when asked for: kind:head_size)")
            return
        self._touch(a, b)
        self.contracts.append((a, b, node.name))
        self.head_size_slots.extend((a, b))

    def uses_param(self, get_attr: torch.fx.Node, user: torch.fx.Node) -> None:
        self.param_users.add((get_attr.name, user.name))

    def add_slot(self, slot: Slot, size: int) -> None:
        """A tensor axis and its size, from shape propagation."""
        self.sizes[slot] = size
        self._uf.add(slot)

    def _touch(self, *slots: Slot) -> None:
        for s in slots:
            self._uf.add(s)

    def module(self, target: str) -> torch.nn.Module:
        module = self.modules.get(target)
        return module if module is not None else self.gm.get_submodule(target)

    def _tensor(self, target: str) -> torch.Tensor:
        owner, _, name = target.rpartition(".")
        return getattr(self.module(owner), name)

    def finish(self) -> None:
        """End of collection: the slots seen so far are the coupling graph's nodes."""
        self._slots_seen = list(self._uf.parent)

    @cached_property
    def graph(self) -> nx.MultiGraph:
        """The coupling graph: every slot the rules mentioned (in first-seen order) and every coupling
        (edge attribute ``kind``: ``"same"``, ``"concat"`` or ``"merge"``)."""
        graph = nx.MultiGraph()
        graph.add_nodes_from(self._slots_seen)
        for a, b, kind in self.edges:
            graph.add_edge(a, b, kind=kind)
        return graph


class Analysis:
    """Result of :func:`analyze`: width groups plus the layout of every slot.

    Read it through ``groups`` (the :class:`WidthGroup` list), ``layout(slot)``, ``size(slot)``,
    ``same_channels(a, b)``, ``group_of(channel_set)``, ``set_width[channel_set]``, ``bound_params()``,
    ``bindings_at(node)``, ``aliases(param)``, ``stream_forms[channel_set]``, ``tied_heads`` and
    ``coupling_graph``; everything else is private."""

    def __init__(self, gm: torch.fx.GraphModule, *, head_size: bool = False) -> None:
        self.gm = gm
        self.head_size = head_size  # head sizes grow instead of heads (``r2r_fx.heads``)
        b = self._builder = _Builder(gm, head_size)
        self._collect()
        self._uf = b._uf
        self._conflicts: dict[Slot, str] = {}
        self._unify_definitions()
        self._layouts: dict[Slot, Layout] = {}
        self._merged_fixed: list[Slot] = []  # axes a reshape merges into another one as a repeat count
        self._expanding: set[Slot] = set()
        self._set_index: dict[Slot, int] = {}
        self.set_roots: list[Slot] = []
        self.set_width: list[int] = []
        self._bound_roots = {self._uf.find((f"param:{p}", a)) for (p, a) in b.bindings}
        if head_size:  # the merges grow along the head size instead of the heads
            self._head_roots = {self._uf.find(s) for s in b.head_size_slots}
        else:
            self._head_roots = head_roots(self._uf.find, b, self._bound_roots)
        self._resolve()

    @property
    def coupling_graph(self) -> nx.MultiGraph:
        """Every slot the rules mentioned and every coupling between two slots (edge ``kind``:
        ``"same"``, ``"concat"`` or ``"merge"``), built on first use: the analysis itself works on the
        union-find, so only those who inspect the couplings pay for the networkx graph."""
        return self._builder.graph

    # ------------------------------------------------------------ the read API passes use
    def size(self, slot: Slot) -> int | None:
        """The size of a tensor axis the analysis saw (``(node name, axis)``), or None."""
        return self._builder.sizes.get(slot)

    def same_channels(self, a: Slot, b: Slot) -> bool:
        """Whether two slots hold the same channels in the same order (coupled by the rules); False
        for a slot the analysis never saw."""
        known = self._builder.sizes
        return a in known and b in known and self._uf.find(a) == self._uf.find(b)

    def group_of(self, channel_set: int) -> WidthGroup | None:
        """The width group a channel set belongs to (None: not a width, e.g. a batch or spatial axis)."""
        index = self.group_of_set.get(channel_set)
        return None if index is None else self.groups[index]

    # ------------------------------------------------------------ collection
    def _collect(self) -> None:
        b, gm = self._builder, self.gm
        nodes = list(gm.graph.nodes)
        shapes = {node: tensor_shapes(node) for node in nodes}  # read each node's tensor_meta once
        for node in nodes:
            for name, shape in shapes[node]:
                for axis, size in enumerate(shape):
                    b.add_slot((name, axis), size)
        for node in nodes:
            if node.op == "placeholder":
                for name, shape in shapes[node]:
                    for axis in range(len(shape)):
                        b.freeze((name, axis), f"model input {node.name}")
            elif node.op == "output":
                for arg in node.all_input_nodes:
                    for name, shape in shapes[arg]:
                        for axis in range(len(shape)):
                            b.freeze((name, axis), f"model output {arg.name}")
            elif node.op == "get_attr":
                continue
            elif node.op == "call_module" and hidden_weights(b.module(str(node.target))):
                freeze_all(b, node, f"{describe(node, gm)} has {hidden_weights(b.module(str(node.target)))}")
            else:
                rule = rule_for(node, gm, b.modules)
                if rule is None:
                    if shapes[node] or any(shapes[a] for a in node.all_input_nodes):
                        freeze_all(b, node, f"unsupported op {describe(node, gm)}")
                    continue
                rule(b, node, gm)
        # Parameters read as data (class tokens, positional embeddings, layer scales).
        for node in nodes:
            if node.op != "get_attr" or not shapes[node]:
                continue
            data_users = [u for u in node.users if (node.name, u.name) not in b.param_users]
            if not data_users:
                continue
            for axis, size in enumerate(shapes[node][0][1]):
                b.bind(str(node.target), axis, (node.name, axis), "data", node)
                if size == 1:
                    b.freeze((node.name, axis), "size-1 axis of a parameter")
        freeze_hidden_uses(b, nodes, gm)
        b.finish()

    # ------------------------------------------------------------ unification of definitions
    def _unify_definitions(self) -> None:
        b, uf = self._builder, self._builder._uf
        for slot_a, size in list(b.sizes.items()):
            ra = uf.find(slot_a)
            if b.sizes.get(ra, size) != size:
                self._conflicts[ra] = f"size mismatch at {slot_a}"
            b.sizes.setdefault(ra, size)
        changed = True
        while changed:
            changed = False
            for defs, kind in ((b.concats, "concat"), (b.merges, "merge")):
                by_root: dict[Slot, list[list[Slot]]] = defaultdict(list)
                for d in defs:
                    by_root[uf.find(d[0])].append(d[1])
                for root, lists in by_root.items():
                    first = lists[0]
                    for other in lists[1:]:
                        if [self._size(s) for s in first] != [self._size(s) for s in other]:
                            self._conflicts.setdefault(root, f"two incompatible {kind} structures")
                            continue
                        for x, y in zip(first, other):
                            changed |= uf.union(x, y)
        self._structures: dict[Slot, list[list[Slot]]] = defaultdict(list)  # every definition of a class
        for whole, parts, *_ in b.concats + b.merges:
            self._structures[uf.find(whole)].append(parts)
        self._concat_of: dict[Slot, tuple[list[Slot], bool]] = {}
        for whole, parts, equal in b.concats:
            r = uf.find(whole)
            prev = self._concat_of.get(r)
            self._concat_of[r] = (parts, equal or (prev[1] if prev else False))
        self._merge_of = {uf.find(w): m for w, m in b.merges}
        for r in set(self._concat_of) & set(self._merge_of):
            self._conflicts.setdefault(r, "both concatenated and reshaped")

    def _size(self, slot: Slot) -> int:
        return self._builder.sizes.get(self._uf.find(slot), self._builder.sizes.get(slot, -1))

    # ------------------------------------------------------------ layouts
    def layout(self, slot: Slot) -> Layout:
        """The channel sets a slot's positions belong to (computed once per class)."""
        root = self._uf.find(slot)
        if root in self._layouts:
            return self._layouts[root]
        if root in self._expanding:
            self._conflicts.setdefault(root, "cyclic channel structure")
            return self._set_layout(root)
        self._expanding.add(root)
        try:
            result = self._compute_layout(root)
        finally:
            self._expanding.discard(root)
        self._layouts[root] = result
        return result

    def _set_layout(self, root: Slot) -> Layout:
        if root not in self._set_index:
            self._set_index[root] = len(self.set_roots)
            self.set_roots.append(root)
            self.set_width.append(self._size(root))
        return Layout.of(1, ((self._set_index[root], self._size(root), 1),))

    def _compute_layout(self, root: Slot) -> Layout:
        if root in self._conflicts:
            return self._set_layout(root)
        if root in self._concat_of:
            parts, _ = self._concat_of[root]
            segments: list[tuple[int, tuple[Piece, ...]]] = []
            for p in parts:
                for outer, pieces in self.layout(p).segments:
                    if outer == 1 and segments and segments[-1][0] == 1:  # plain runs join one segment
                        segments[-1] = (1, segments[-1][1] + pieces)
                    else:
                        segments.append((outer, pieces))
            layout = Layout(tuple(segments))
            if layout.size != self._size(root):
                self._conflicts[root] = "concatenation sizes do not add up"
                return self._set_layout(root)
            return layout
        if root in self._merge_of:
            members = self._merge_of[root]
            bearing = [i for i, m in enumerate(members) if self._width_bearing(m)]
            if not bearing:
                # An axis split into several (heads x head_dim, ...): the channel order across the new
                # axes is not an append-at-the-end layout. Harmless for spatial axes (never widths).
                self._conflicts[root] = "reshape splits a channel axis"
                return self._set_layout(root)
            if len(bearing) > 1:
                # heads x head_dim with a table along head_dim (RoPE's cos/sin): the heads grow, the rest
                # keeps its width; otherwise which axis would grow is not known
                heads = [i for i in bearing if self._uf.find(members[i]) in self._head_roots]
                if len(heads) != 1:
                    self._conflicts[root] = "reshape merges two channel axes"
                    return self._set_layout(root)
                bearing = heads
            k = bearing[0]
            # the other members only repeat the channels (outer / inner counts): they keep their widths
            self._merged_fixed.extend(m for i, m in enumerate(members) if i != k)
            sub = self.layout(members[k])
            if len(sub.segments) != 1:
                self._conflicts[root] = "reshape of concatenated reshaped channels"
                return self._set_layout(root)
            ((sub_outer, sub_pieces),) = sub.segments
            before = math.prod(self._size(m) for m in members[:k])
            after = math.prod(self._size(m) for m in members[k + 1 :])
            return Layout.of(before * sub_outer, tuple((a, n, i * after) for a, n, i in sub_pieces))
        return self._set_layout(root)

    def _width_bearing(self, slot: Slot) -> bool:
        root = self._uf.find(slot)
        if root in self._bound_roots or root in self._head_roots:
            return True
        if root in self._concat_of:
            return any(self._width_bearing(p) for p in self._concat_of[root][0])
        if root in self._merge_of and root not in self._expanding:
            self._expanding.add(root)
            try:
                return any(self._width_bearing(m) for m in self._merge_of[root])
            finally:
                self._expanding.discard(root)
        return False

    # ------------------------------------------------------------ groups
    def _resolve(self) -> None:
        b, _uf = self._builder, self._uf
        # Layouts for every bound class first (channel sets numbered in graph order), then every slot, so
        # that all structural conflicts are known before freezing.
        for param, axis in b.bindings:
            self.layout((f"param:{param}", axis))
        by_root: dict[Slot, list[Slot]] = defaultdict(list)
        find = self._uf.find
        for slot in list(b.sizes):
            by_root[find(slot)].append(slot)
        slots_of: dict[int, list[Slot]] = defaultdict(list)
        for root, slots in by_root.items():  # first-seen order, so channel sets are numbered as before
            tensors = [s for s in slots if not s[0].startswith("param:")]
            for a in self.layout(root).channel_sets():
                slots_of[a].extend(tensors)
        frozen_sets: dict[int, str] = {}

        def freeze_layout(layout: Layout, reason: str, *, primary: bool = False) -> None:
            """Freeze every channel set of ``layout``; the first reason stays unless ``primary`` (the
            structural cause behind the op-level reasons already given)."""
            for a in layout.channel_sets():
                if primary:
                    frozen_sets[a] = reason
                else:
                    frozen_sets.setdefault(a, reason)

        for slot, reason in b.frozen.items():
            freeze_layout(self.layout(slot), reason)
        for slot in self._merged_fixed:
            freeze_layout(self.layout(slot), f"merged into another axis by a reshape ({slot[0]})")
        for root, reason in list(self._conflicts.items()):
            freeze_layout(self.layout(root), reason)
            for parts in self._structures.get(self._uf.find(root), []):
                for p in parts:
                    freeze_layout(self.layout(p), reason)

        stream_sets = self.stream_sets = find_streams(self, b, slots_of, freeze_layout)
        self.tied_heads, untied = find_tied_heads(self, b.bindings, b.norms)  # kept tied: see r2r_fx.stream_ties
        self._fill_roles = fill_roles(self.tied_heads)

        # Role conflicts on one parameter axis (e.g. a weight tied between an embedding and a head).
        self.producers: dict[int, list[str]] = defaultdict(list)
        self.consumers: dict[int, list[str]] = defaultdict(list)
        layer_sets: set[int] = set()  # channel sets some layer produces or consumes
        for (param, axis), binds in b.bindings.items():
            layout = self.layout((f"param:{param}", axis))
            roles = {x.role for x in binds}
            if len(roles) > 1 and (param, axis) not in self.tied_heads:
                reason = f"parameter {param} axis {axis} is used as {' and '.join(sorted(roles))}"
                freeze_layout(layout, reason + untied.get((param, axis), ""))
            for x in binds:
                if x.role in ("out", "in"):
                    layer_sets.update(layout.channel_sets())
                if x.role == "channel":
                    continue
                bucket = self.consumers if x.role == "in" else self.producers
                for a in layout.channel_sets():
                    if x.node not in bucket[a]:
                        bucket[a].append(x.node)

        # Ties (equal-size splits) and granularities.
        ties = nx.Graph()
        ties.add_nodes_from(layer_sets)  # a channel set no layer touches counts only when tied to one
        for parts, equal in self._concat_of.values():
            if not equal:
                continue
            layouts = [self.layout(p) for p in parts]
            shapes = {tuple((o, tuple((n, i) for _, n, i in ps)) for o, ps in lay.segments) for lay in layouts}
            if len(shapes) != 1:
                for lay in layouts:
                    freeze_layout(lay, "equal split of unequal channel structures")
                continue
            for lay in layouts[1:]:
                for (a, _, _), (b_, _, _) in zip(layouts[0].pieces, lay.pieces):
                    ties.add_edge(a, b_)
        self.key_sets: set[int] = set()  # head sizes on the k side of a product (r2r_fx.heads)
        self.contracted: list[tuple[int, int]] = []  # (q set, k set): new channels derive from the same ones
        if self.head_size:
            self.contracted, self.key_sets = contract_ties(self, b, freeze_layout)
            ties.add_edges_from(self.contracted)
        gran: dict[int, int] = defaultdict(lambda: 2)
        for slot, k, node in b.granularities:
            layout = self.layout(slot)
            if not layout.plain:
                freeze_layout(layout, f"{node} needs whole groups of one channel set")
                continue
            a = layout.pieces[0][0]
            gran[a] = math.lcm(gran[a], 2 * k)

        self.groups: list[WidthGroup] = []
        self.group_of_set: dict[int, int] = {}
        self.stream_forms: dict[int, StreamForms] = {}  # channel set -> what its tail needs
        for component in sorted(nx.connected_components(ties), key=min):
            channel_sets = sorted(component)
            if not layer_sets.intersection(channel_sets):
                continue  # batch, spatial and token axes: not widths
            reason = next((frozen_sets[a] for a in channel_sets if a in frozen_sets), "")
            if not reason and not any(self.producers.get(a) for a in channel_sets):
                reason = "no producer with parameters"
            if not reason and len({self.set_width[a] for a in channel_sets}) > 1:
                reason = "tied channel sets of different widths"
            norms = tuple(_unique(n for a in channel_sets for n in stream_sets.get(a, ())))
            if not reason and norms and len(channel_sets) > 1:
                reason = f"the stream normalised by {norms[0]} is tied to other channel sets (an equal split)"
            head_size = self.head_size and any(self.set_roots[a] in self._head_roots for a in channel_sets)
            own = [self.set_width[a] for a in channel_sets if a not in self.key_sets]  # k mirrors q
            group = WidthGroup(
                id=len(self.groups),
                width=max(own) if head_size else sum(own),  # tied head sizes (packed q/k/v) are one size
                channel_sets=channel_sets,
                slots=sorted({s for a in channel_sets for s in slots_of[a]}, key=str),
                producers=_unique(p for a in channel_sets for p in self.producers.get(a, [])),
                consumers=_unique(p for a in channel_sets for p in self.consumers.get(a, [])),
                granularity=math.lcm(*(gran[a] for a in channel_sets)),
                widenable=not reason,
                reason=reason,
                norms=norms,
                heads=not self.head_size and any(self.set_roots[a] in self._head_roots for a in channel_sets),
                head_size=head_size,
            )
            if group.heads:
                group.group_size = query_group_size(self, b.head_slots, channel_sets)
            for a in channel_sets:
                self.group_of_set[a] = group.id
            if norms and group.widenable:
                forms = self.stream_forms[channel_sets[0]] = stream_forms(self, b, group)
                group.integer_only = forms.integer_only
                if not group.integer_only and any(
                    set(self.layout((f"param:{p}", a)).channel_sets()) & set(channel_sets) for p, a in self.tied_heads
                ):
                    group.integer_only = "the embedding and the head stay one tensor (the last norm scaled by 1/k)"
            self.groups.append(group)

    def aliases(self, param: str) -> list[str]:
        """Every name under which the tensor bound as ``param`` is held (tied parameters)."""
        return self._builder.aliases.get(param) or [param]

    def bindings_at(self, node: str) -> list[Binding]:
        """The parameter axes node ``node`` binds (its weights and biases, as the rules saw them)."""
        return [b for binds in self._builder.bindings.values() for b in binds if b.node == node]

    def bound_params(self) -> dict[str, list[tuple[int, Layout, str]]]:
        """For each parameter with bindings: (axis, layout, role) per bound axis; the role is the one the
        fill follows (a tie kept on a stream: ``out`` for the tied axis, ``scaled`` for its norms' weights)."""
        out: dict[str, list[tuple[int, Layout, str]]] = defaultdict(list)
        for (param, axis), binds in self._builder.bindings.items():
            role = self._fill_roles.get((param, axis), binds[0].role)
            out[param].append((axis, self.layout((f"param:{param}", axis)), role))
        return out


def _unique(items) -> list[str]:
    return list(dict.fromkeys(items))  # first occurrences, in order


def analyze(gm: torch.fx.GraphModule, *, head_size: bool = False) -> Analysis:
    """Run the width-group analysis on a captured graph (shapes must be recorded).

    ``head_size``: attention reshapes grow along the head size instead of the heads (one or the other
    per analysis; growing both is two passes)."""
    if not any("tensor_meta" in n.meta for n in gm.graph.nodes):
        from r2r_fx.capture import example_inputs_of, record_shapes

        record_shapes(gm, example_inputs_of(gm))
    return Analysis(gm, head_size=head_size)


def width_groups(gm: torch.fx.GraphModule) -> list[WidthGroup]:
    """The width groups of a captured model, widenable or not (with the reason)."""
    return analyze(gm).groups


_ = _rules  # the registry is populated on import
