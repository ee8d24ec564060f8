"""Structure: cat, split/chunk/unbind, indexing, slicing, permutations, reshapes, expand, stack."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx
from torch import nn

from r2r_fx.compat import aten
from r2r_fx.graph import describe, shape_of, tensor_shapes
from r2r_fx.rules.common import broadcast_into, freeze_all, node_arg, positive_axis, same_axes
from r2r_fx.rules.registry import Couplings, Rule, WidthOf, register_layer, register_rule


@register_rule(torch.cat, torch.concat, aten.cat, aten.concat)
def _cat(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    tensors = node_arg(node, 0, "tensors")
    dim = node_arg(node, 1, "dim", 0)
    out = shape_of(node)
    if out is None or not isinstance(tensors, (list, tuple)) or not isinstance(dim, int):
        freeze_all(c, node, "concatenation without static shapes")
        return
    dim = positive_axis(dim, len(out))
    parts = []
    for t in tensors:
        shape = shape_of(t)
        if shape is None or len(shape) != len(out):
            freeze_all(c, node, "concatenation of tensors of other ranks")
            return
        same_axes(c, t, node.name, len(out), skip=[dim])
        parts.append((t.name, dim))
    c.concat((node.name, dim), parts)


def _split(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule, chunked: bool) -> None:
    """split / chunk: the pieces are a concatenation along ``dim``; every other axis is shared."""
    x = node.args[0]
    shape = shape_of(x)
    outs = tensor_shapes(node)
    if shape is None or not outs:
        freeze_all(c, node, f"{describe(node, gm)} without static shapes")
        return
    dim = node_arg(node, 2, "dim", 0)
    if not isinstance(dim, int):
        freeze_all(c, node, "split along a dynamic axis")
        return
    dim = positive_axis(dim, len(shape))
    sizes = [s[dim] for _, s in outs]
    chunks = node_arg(node, 1, "chunks") if chunked else None
    equal = chunked or isinstance(node_arg(node, 1, "split_size"), int)
    if equal and len(set(sizes)) != 1:
        freeze_all(c, node, f"{node.name} splits into unequal parts")
        return
    if chunks is not None and len(outs) != chunks:  # chunk(3) of 1 channel is one piece; of 3 it is three
        freeze_all(c, node, f"{node.name} makes {len(outs)} pieces, not {chunks}")
        return
    for out_name, _out_shape in outs:
        for a in range(len(shape)):
            if a != dim:
                c.same((x.name, a), (out_name, a))
    c.concat((x.name, dim), [(n, dim) for n, _ in outs], equal=equal)


register_rule(torch.split, "method:split", aten.split, aten.split_with_sizes)(
    lambda c, node, gm: _split(c, node, gm, chunked=False)
)
register_rule(torch.chunk, "method:chunk", aten.chunk)(lambda c, node, gm: _split(c, node, gm, chunked=True))


@register_rule(torch.unbind, "method:unbind", aten.unbind)
def _unbind(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    """``unbind(x, dim)``: one output per index of ``dim`` (which keeps its size), the other axes shared
    (timm's ``q, k, v = qkv.unbind(0)``)."""
    x, dim = node.args[0], node_arg(node, 1, "dim", 0)
    shape, outs = shape_of(x), tensor_shapes(node)
    if shape is None or not outs or not isinstance(dim, int) or len(outs) != shape[positive_axis(dim, len(shape))]:
        freeze_all(c, node, f"{describe(node, gm)} without static shapes")
        return
    dim = positive_axis(dim, len(shape))
    c.freeze((x.name, dim), f"unbound by {node.name}")
    for out_name, _ in outs:
        for a in range(len(shape)):
            if a != dim:
                c.same((x.name, a), (out_name, a if a < dim else a - 1))


@register_rule(torch.tensor_split, "method:tensor_split")
def _unsupported_split(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    freeze_all(c, node, f"{describe(node, gm)} is not supported")


@register_rule(operator.getitem)
def _getitem(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    src, index = node.args
    if not isinstance(src, torch.fx.Node):
        return
    if shape_of(src) is None:  # element of a tuple output
        if isinstance(index, int) and tensor_shapes(node):
            slots = dict(tensor_shapes(src))
            key = f"{src.name}#{index if index >= 0 else len(slots) + index}"
            if key in slots:
                _identity_named(c, key, node.name, len(slots[key]))
        return
    _index_tensor(c, node, src, index)


def _identity_named(c: Couplings, src: str, dst: str, rank: int) -> None:
    for a in range(rank):
        c.same((src, a), (dst, a))


def expand_ellipsis(items: list[Any], rank: int) -> list[Any]:
    """Index items with ``...`` replaced by the full slices it stands for."""
    if Ellipsis not in items:
        return items
    at = items.index(Ellipsis)
    fill = rank - (len(items) - 1 - sum(1 for i in items if i is None))
    return items[:at] + [slice(None)] * fill + items[at + 1 :]


def _index_tensor(c: Couplings, node: torch.fx.Node, src: torch.fx.Node, index: Any) -> None:
    shape, out = shape_of(src), shape_of(node)
    items = list(index) if isinstance(index, tuple) else [index]
    if out is None or any(isinstance(i, torch.fx.Node) for i in items):
        freeze_all(c, node, f"tensor indexing in {node.name}")
        return
    items = expand_ellipsis(items, len(shape))
    in_axis, out_axis = 0, 0
    for item in items:
        if item is None:  # a new size-1 axis: nothing could give it more channels
            c.freeze((node.name, out_axis), f"size-1 axis made by {node.name}")
            out_axis += 1
            continue
        if isinstance(item, int):
            c.freeze((src.name, in_axis), f"indexed by {node.name}")
            in_axis += 1
            continue
        if isinstance(item, slice) and any(isinstance(v, torch.fx.Node) for v in (item.start, item.stop, item.step)):
            c.freeze((src.name, in_axis), f"sliced by {node.name} at a computed position")
            c.freeze((node.name, out_axis), f"sliced by {node.name} at a computed position")
            in_axis += 1
            out_axis += 1
            continue
        if isinstance(item, slice):
            full = slice(*item.indices(shape[in_axis])) == slice(0, shape[in_axis], 1)
            if full:
                c.same((src.name, in_axis), (node.name, out_axis))
            else:
                c.freeze((src.name, in_axis), f"sliced by {node.name}")
                c.freeze((node.name, out_axis), f"sliced by {node.name}")
            in_axis += 1
            out_axis += 1
            continue
        freeze_all(c, node, f"unsupported index {item!r} in {node.name}")
        return
    while in_axis < len(shape):
        c.same((src.name, in_axis), (node.name, out_axis))
        in_axis += 1
        out_axis += 1


@register_rule(aten.slice)
def _slice(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    x = node.args[0]
    shape = shape_of(x)
    dim = node_arg(node, 1, "dim", 0)
    start, end, step = node_arg(node, 2, "start", None), node_arg(node, 3, "end", None), node_arg(node, 4, "step", 1)
    if shape is None or not isinstance(dim, int):
        freeze_all(c, node, "slice along a dynamic axis")
        return
    items = [slice(None)] * len(shape)
    items[positive_axis(dim, len(shape))] = slice(start, end, step)
    if any(isinstance(v, torch.fx.Node) for v in (start, end, step)):
        freeze_all(c, node, f"dynamic slice in {node.name}")
        return
    _index_tensor(c, node, x, tuple(items))


@register_rule(aten.select)
def _select(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    x, dim, index = node.args[:3]
    shape = shape_of(x)
    if shape is None or not isinstance(index, int):
        freeze_all(c, node, "dynamic select")
        return
    items = [slice(None)] * len(shape)
    items[positive_axis(dim, len(shape))] = index
    _index_tensor(c, node, x, tuple(items))


def _permutation(order_of: Callable[[torch.fx.Node, int], list[int]]) -> Rule:
    """A rule for an op that reorders axes: output axis ``i`` is input axis ``order_of(node, rank)[i]``."""

    def rule(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
        x = node.args[0]
        shape = shape_of(x)
        if shape is None:
            freeze_all(c, node, "permutation without a static shape")
            return
        for out_axis, in_axis in enumerate(order_of(node, len(shape))):
            c.same((x.name, in_axis), (node.name, out_axis))

    return rule


def _permute_order(node: torch.fx.Node, rank: int) -> list[int]:
    first = node_arg(node, 1, "dims")
    dims = first if isinstance(first, (list, tuple)) else node.args[1:]
    return [positive_axis(d, rank) for d in dims]


def _swap_order(node: torch.fx.Node, rank: int) -> list[int]:
    order = list(range(rank))
    a, b = positive_axis(node_arg(node, 1, "dim0"), rank), positive_axis(node_arg(node, 2, "dim1"), rank)
    order[a], order[b] = order[b], order[a]
    return order


def _movedim_order(node: torch.fx.Node, rank: int) -> list[int]:
    src, dst = node_arg(node, 1, "source"), node_arg(node, 2, "destination")
    src = [positive_axis(d, rank) for d in (src if isinstance(src, (list, tuple)) else [src])]
    dst = [positive_axis(d, rank) for d in (dst if isinstance(dst, (list, tuple)) else [dst])]
    order: list[int | None] = [None] * rank
    for s_axis, d_axis in zip(src, dst):
        order[d_axis] = s_axis
    rest = iter(a for a in range(rank) if a not in src)
    return [a if a is not None else next(rest) for a in order]


register_rule(torch.permute, "method:permute", aten.permute)(_permutation(_permute_order))
register_rule(torch.transpose, "method:transpose", aten.transpose, torch.swapaxes, "method:swapaxes")(
    _permutation(_swap_order)
)
register_rule(torch.movedim, "method:movedim", aten.movedim)(_permutation(_movedim_order))
register_rule("method:t", aten.t, torch.t)(_permutation(lambda node, rank: list(range(rank))[::-1]))


def _same_as_template(c: Couplings, node: torch.fx.Node) -> None:
    """``x.view_as(y)`` / ``expand_as(y)`` take their shape from ``y`` at run time: couple the two."""
    if node.target in ("view_as", "reshape_as", "expand_as") and len(node.args) > 1:
        template = node.args[1]
        if shape_of(template) is not None and shape_of(template) == shape_of(node):
            same_axes(c, template, node.name, len(shape_of(node)))
        else:
            freeze_all(c, node, f"{node.name} takes its shape from a tensor of another shape")


def _shapes_of_a_view(c: Couplings, node: torch.fx.Node, what: str) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """Input and output shapes of a reshape-like op, its template coupled (``view_as``); None (all
    frozen) without static shapes."""
    shape, out = shape_of(node.args[0]), shape_of(node)
    if shape is None or out is None:
        freeze_all(c, node, f"{what} without static shapes")
        return None
    _same_as_template(c, node)
    return shape, out


def _size_arguments(c: Couplings, node: torch.fx.Node, out: Sequence[int]) -> None:
    """The sizes a view/reshape/expand is given: an int is rewritten when its axis grows, ``-1`` follows;
    a size read from a tensor and passed on as it is grows with that tensor's axis (coupled to it); any
    other computed size (``b * heads``) would keep its old factors, so its axis keeps its width."""
    packet = getattr(node.target, "overloadpacket", None)
    if node.op == "call_method" and node.target in ("view", "reshape", "expand") or node.target is torch.reshape:
        dims = node.args[1:]
    elif packet in (aten.view, aten.reshape, aten.expand, aten._unsafe_view, aten.view_copy):
        dims = node.args[1:2]
    else:
        return
    sizes = list(dims[0]) if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else list(dims)
    if len(sizes) != len(out):
        return
    for i, size in enumerate(sizes):
        if not isinstance(size, torch.fx.Node):
            continue
        read = _size_read(size)
        if read is not None and shape_of(read[0]) is not None and shape_of(read[0])[read[1]] == out[i]:
            c.same((read[0].name, read[1]), (node.name, i))
        else:
            c.freeze((node.name, i), f"size computed at run time by {size.name}")


def _size_read(size: torch.fx.Node) -> tuple[torch.fx.Node, int] | None:
    """``(tensor, axis)`` when ``size`` is ``t.shape[a]``, ``t.size(a)`` or ``sym_size(t, a)``."""
    if size.target is operator.getitem and isinstance(size.args[0], torch.fx.Node) and isinstance(size.args[1], int):
        query = size.args[0]
        if query.target is getattr and query.args[1] == "shape" or (query.target == "size" and len(query.args) == 1):
            t = query.args[0]
            rank = len(shape_of(t) or ())
            return (t, size.args[1] % rank) if rank and -rank <= size.args[1] < rank else None
        return None
    is_size = size.target == "size" or getattr(size.target, "overloadpacket", None) is aten.sym_size
    if is_size and len(size.args) == 2 and isinstance(size.args[1], int) and isinstance(size.args[0], torch.fx.Node):
        rank = len(shape_of(size.args[0]) or ())
        return (size.args[0], size.args[1] % rank) if rank and -rank <= size.args[1] < rank else None
    return None


def _reshape(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    x = node.args[0]
    shapes = _shapes_of_a_view(c, node, "reshape")
    if shapes is None:
        return
    shape, out = shapes
    _size_arguments(c, node, out)
    blocks = factor_reshape(shape, out)
    if blocks is None:
        freeze_all(c, node, f"{node.name} reshapes across several axes at once")
        return
    for ins, outs in blocks:
        if len(ins) == 1 and len(outs) == 1:
            c.same((x.name, ins[0]), (node.name, outs[0]))
        elif len(outs) == 1:
            c.merge((node.name, outs[0]), [(x.name, a) for a in ins])
        elif len(ins) == 1:
            c.merge((x.name, ins[0]), [(node.name, a) for a in outs])
        else:
            for a in ins:
                c.freeze((x.name, a), f"{node.name} mixes several axes")
            for a in outs:
                c.freeze((node.name, a), f"{node.name} mixes several axes")
    mapped_in = {a for ins, _ in blocks for a in ins}
    for a, _size in enumerate(shape):
        if a not in mapped_in:
            c.freeze((x.name, a), f"size-1 axis dropped by {node.name}")
    mapped_out = {a for _, outs in blocks for a in outs}
    for a in range(len(out)):
        if a not in mapped_out:  # nothing can give a new size-1 axis more channels
            c.freeze((node.name, a), f"size-1 axis made by {node.name}")


def factor_reshape(src: Sequence[int], dst: Sequence[int]) -> list[tuple[list[int], list[int]]] | None:
    """Pair runs of source axes with runs of destination axes of equal product (size-1 axes skipped)."""
    i_axes = [a for a, s in enumerate(src) if s != 1]
    o_axes = [a for a, s in enumerate(dst) if s != 1]
    if math.prod(src) != math.prod(dst):
        return None
    blocks: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(i_axes) and j < len(o_axes):
        ins, outs = [i_axes[i]], [o_axes[j]]
        pi, po = src[i_axes[i]], dst[o_axes[j]]
        i, j = i + 1, j + 1
        while pi != po:
            if pi < po:
                if i >= len(i_axes):
                    return None
                ins.append(i_axes[i])
                pi *= src[i_axes[i]]
                i += 1
            else:
                if j >= len(o_axes):
                    return None
                outs.append(o_axes[j])
                po *= dst[o_axes[j]]
                j += 1
        blocks.append((ins, outs))
    return blocks


register_rule(
    torch.flatten,
    torch.reshape,
    "method:view",
    "method:reshape",
    "method:flatten",
    "method:squeeze",
    "method:unsqueeze",
    "method:unflatten",
    torch.squeeze,
    torch.unsqueeze,
    torch.unflatten,
    nn.Flatten,
    "method:view_as",
    "method:reshape_as",
    *(
        getattr(aten, n)
        for n in (
            "view",
            "reshape",
            "_unsafe_view",
            "flatten",
            "unflatten",
            "squeeze",
            "unsqueeze",
            "squeeze_copy",
            "view_copy",
        )
    ),
)(_reshape)


def _fix_unflatten(m: nn.Module, node: torch.fx.Node, width_of: WidthOf) -> None:
    out = shape_of(node)
    if out is not None:
        dim = m.dim if m.dim >= 0 else len(out) + m.dim
        m.unflattened_size = tuple(width_of((node.name, dim + i)) or s for i, s in enumerate(m.unflattened_size))


register_layer(nn.Unflatten, _reshape, _fix_unflatten)


@register_rule("method:expand", aten.expand, "method:expand_as")
def _expand(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    shapes = _shapes_of_a_view(c, node, "expand")
    if shapes is not None:
        shape, out = shapes
        broadcast_into(c, node.args[0], shape, node, out)
        _size_arguments(c, node, out)


@register_rule(torch.stack, aten.stack)
def _stack(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    tensors, dim = node_arg(node, 0, "tensors"), node_arg(node, 1, "dim", 0)
    out = shape_of(node)
    if out is None or not isinstance(dim, int) or not isinstance(tensors, (list, tuple)):
        freeze_all(c, node, "stack without static shapes")
        return
    dim = positive_axis(dim, len(out))
    for t in tensors:
        for a in range(len(out) - 1):
            c.same((t.name, a), (node.name, a if a < dim else a + 1))
    c.freeze((node.name, dim), f"stacked axis of {node.name}")


@register_rule(torch.roll, "method:roll", aten.roll)
def _roll(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    """``roll(x, shifts, dims)`` moves entries along ``dims`` only (Swin's shifted windows)."""
    x, dims = node.args[0], node_arg(node, 2, "dims")
    shape = shape_of(x)
    dims = [dims] if isinstance(dims, int) else dims
    if shape is None or not dims or not all(isinstance(d, int) for d in dims):
        freeze_all(c, node, f"{describe(node, gm)} over the flattened tensor or computed axes")
        return
    rolled = {positive_axis(d, len(shape)) for d in dims}
    for a in range(len(shape)):
        if a in rolled:
            c.freeze((x.name, a), f"rolled by {node.name}")
            c.freeze((node.name, a), f"rolled by {node.name}")
        else:
            c.same((x.name, a), (node.name, a))


@register_rule(aten.index)
def _gather(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    """``x[..., idx, ...]`` with one index tensor (a relative-position table looked up by a buffer):
    the indexed axis is replaced by the index's axes, the others keep their channels."""
    x, indices = node.args[0], node_arg(node, 1, "indices")
    shape, out = shape_of(x), shape_of(node)
    tensors = [i for i, t in enumerate(indices or ()) if t is not None]
    if shape is None or out is None or len(tensors) != 1 or shape_of(indices[tensors[0]]) is None:
        freeze_all(c, node, f"{describe(node, gm)} with several or unknown index tensors")
        return
    k, index = tensors[0], indices[tensors[0]]
    extra = len(shape_of(index))
    if len(out) != len(shape) - 1 + extra:
        freeze_all(c, node, f"{describe(node, gm)} with an unexpected output shape")
        return
    for a in range(len(shape)):
        if a < k:
            c.same((x.name, a), (node.name, a))
        elif a > k:
            c.same((x.name, a), (node.name, a - 1 + extra))
    c.freeze((x.name, k), f"indexed by {node.name}")
    for a in range(k, k + extra):
        c.freeze((node.name, a), f"indexed by {node.name}")
    for a in range(extra):
        c.freeze((index.name, a), f"index of {node.name}")


@register_rule(
    "method:new_zeros", "method:new_ones", "method:new_empty", "method:new_full",
    aten.new_zeros, aten.new_ones, aten.new_empty, aten.new_full,
)  # fmt: skip
def _new_tensor(c: Couplings, node: torch.fx.Node, gm: torch.fx.GraphModule) -> None:
    """``x.new_zeros(size)``: a new tensor of the given sizes (they keep their width); ``x`` gives only
    its dtype and device (Swin builds its shifted-window mask this way)."""
    for name, shape in tensor_shapes(node):
        for a in range(len(shape)):
            c.freeze((name, a), f"made by {node.name}")
