"""torch's transformer layers captured through a forward written in plain ops.

``nn.MultiheadAttention``, ``nn.TransformerEncoderLayer`` and ``nn.TransformerEncoder`` have forwards
that neither ``torch.fx.symbolic_trace`` (mask canonicalisation, fast-path checks) nor the width analysis
(a packed ``(3, E)`` unflatten, ``batch * heads`` sizes computed at run time) can follow. Both capture paths
trace these layers through the equivalents below instead: the projections as ``F.linear`` on the layer's
own parameters, q/k/v as three chunks of the packed projection, heads split by ``view(b, t, heads,
head_dim)``, attention by SDPA (or softmax when the weights are returned or dropped out). The graph then
holds the same ops a hand-written attention has, so the stream, the heads and the MLP widths are
analysed like any other; the captured model reads the same parameters under the same names.

Only what the equivalents reproduce exactly is traced through; anything else (attention masks,
cross-attention with packed weights, ``bias_k``/``add_zero_attn``, unbatched inputs, half-precision
weights, whose rounding would differ from torch's fused kernels) keeps the layer as one
``call_module`` node, whose widths stay (``r2r_fx.rules.layers``), or for the encoder layers their own
forward.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from r2r_fx.compat import has_forward_hooks, has_global_forward_hooks

__all__ = ["INLINED", "equivalent", "inlined_forwards", "unsupported"]


def _bound(names: tuple[str, ...], args: tuple, kwargs: dict) -> dict[str, Any]:
    """The call's arguments by name (positions first, then keywords)."""
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


_MHA_ARGS = (
    "query",
    "key",
    "value",
    "key_padding_mask",
    "need_weights",
    "attn_mask",
    "average_attn_weights",
    "is_causal",
)


def _masked(a: dict[str, Any], *masks: str) -> str:
    """Why a call with these arguments is not traced through: a mask given, or ``is_causal`` (which torch
    accepts only with the mask); "" otherwise."""
    if any(a.get(name) is not None for name in masks):
        return "it is called with an attention mask"
    return "it is called with is_causal (torch needs the mask then)" if a.get("is_causal") else ""


def _mha_unsupported(m: nn.MultiheadAttention, args: tuple, kwargs: dict) -> str:
    a = _bound(_MHA_ARGS, args, kwargs)
    if why := _masked(a, "key_padding_mask", "attn_mask"):
        return why
    if not (a.get("query") is a.get("key") is a.get("value")):
        return "it is called for cross-attention (the query is not the key and the value)"
    if not m._qkv_same_embed_dim or m.in_proj_weight is None:
        return "its key and value sizes differ from its embedding size"
    if m.bias_k is not None or m.add_zero_attn:
        return "it has bias_k/bias_v or add_zero_attn"
    if any(has_forward_hooks(s) for s in m.modules()):  # out_proj is not called as a layer
        return "forward hooks would not run in the equivalent"
    dtype = m._parameters["in_proj_weight"].dtype  # the tensor itself (attribute reads are proxies in a trace)
    if dtype not in (torch.float32, torch.float64):
        return f"its weights are {dtype}, where the equivalent would round otherwise than torch's kernels"
    shape = getattr(a["query"], "shape", None)
    if isinstance(a["query"], torch.Tensor) and shape is not None and len(shape) != 3:
        return "its input is not batched"
    return ""


def _mha_forward(
    m: nn.MultiheadAttention,
    query: Any,
    key: Any,
    value: Any,
    key_padding_mask: Any = None,
    need_weights: bool = True,
    attn_mask: Any = None,
    average_attn_weights: bool = True,
    is_causal: bool = False,
) -> tuple[Any, Any]:
    """Self-attention without masks, as ``nn.MultiheadAttention.forward`` computes it, in its memory
    layout too (sequence first inside: dropout draws its mask in memory order)."""
    x = query.transpose(0, 1) if m.batch_first else query
    t, b = x.shape[0], x.shape[1]
    heads, head_dim = m.num_heads, m.head_dim
    qkv = F.linear(x, m.in_proj_weight, m.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (qkv[i].view(t, b, heads, head_dim).permute(1, 2, 0, 3) for i in range(3))
    weights = None
    if need_weights or m.dropout > 0:
        weights = torch.softmax((q * head_dim**-0.5) @ k.transpose(-2, -1), dim=-1)
        weights = F.dropout(weights, m.dropout, training=m.training)  # returned as dropped, like torch
        y = weights @ v
    else:
        y = F.scaled_dot_product_attention(q, k, v)
    y = F.linear(y.permute(2, 0, 1, 3).flatten(2), m.out_proj.weight, m.out_proj.bias)
    if m.batch_first:
        y = y.transpose(0, 1)
    if not need_weights:
        return y, None
    return y, weights.mean(dim=1) if average_attn_weights else weights


_LAYER_ARGS = ("src", "src_mask", "src_key_padding_mask", "is_causal")


def _layer_unsupported(m: nn.TransformerEncoderLayer, args: tuple, kwargs: dict) -> str:
    a = _bound(_LAYER_ARGS, args, kwargs)
    return _masked(a, "src_mask", "src_key_padding_mask") or _mha_unsupported(
        m.self_attn, (a["src"],) * 3, {"need_weights": False}
    )


def _layer_forward(
    m: nn.TransformerEncoderLayer,
    src: Any,
    src_mask: Any = None,
    src_key_padding_mask: Any = None,
    is_causal: bool = False,
) -> Any:
    """``nn.TransformerEncoderLayer.forward`` without masks (its non-fast path)."""
    x = src
    if m.norm_first:
        x = x + m._sa_block(m.norm1(x), None, None)
        return x + m._ff_block(m.norm2(x))
    x = m.norm1(x + m._sa_block(x, None, None))
    return m.norm2(x + m._ff_block(x))


_ENCODER_ARGS = ("src", "mask", "src_key_padding_mask", "is_causal")


def _encoder_unsupported(m: nn.TransformerEncoder, args: tuple, kwargs: dict) -> str:
    return _masked(_bound(_ENCODER_ARGS, args, kwargs), "mask", "src_key_padding_mask")


def _encoder_forward(
    m: nn.TransformerEncoder, src: Any, mask: Any = None, src_key_padding_mask: Any = None, is_causal: Any = None
) -> Any:
    """``nn.TransformerEncoder.forward`` without masks: the layers in turn, then the final norm."""
    x = src
    for layer in m.layers:
        x = layer(x)
    return x if m.norm is None else m.norm(x)


# layer class -> (why a call cannot be traced through the equivalent ("" when it can), the equivalent)
INLINED: dict[type, tuple[Callable[..., str], Callable[..., Any]]] = {
    nn.MultiheadAttention: (_mha_unsupported, _mha_forward),
    nn.TransformerEncoderLayer: (_layer_unsupported, _layer_forward),
    nn.TransformerEncoder: (_encoder_unsupported, _encoder_forward),
}


def unsupported(m: nn.Module, args: tuple, kwargs: dict) -> str | None:
    """None when ``m`` is not an inlined layer class (exact type: a subclass may compute otherwise), ""
    when this call traces through the equivalent, else why not."""
    entry = INLINED.get(type(m))
    if entry is None:
        return None
    own = m.__dict__.get("forward")
    if own is not None and not getattr(own, "_r2r_inlined", False):
        return "it has a forward of its own (set on the instance)"
    if has_global_forward_hooks() or has_forward_hooks(m):
        return "forward hooks would not run in the equivalent"
    return entry[0](m, args, kwargs)


def equivalent(m: nn.Module) -> Callable[..., Any]:
    """``m``'s plain-op forward, bound to it."""
    return types.MethodType(INLINED[type(m)][1], m)


@contextlib.contextmanager
def inlined_forwards(model: nn.Module) -> Iterator[None]:
    """For ``torch.export``: every inlined layer of ``model`` runs its equivalent where the call allows
    (its own forward otherwise), restored after."""
    patched = []
    for m in model.modules():
        if type(m) not in INLINED or "forward" in m.__dict__:
            continue
        own, plain = m.forward, equivalent(m)

        def forward(*args: Any, _m: nn.Module = m, _own: Any = own, _plain: Any = plain, **kwargs: Any) -> Any:
            return _own(*args, **kwargs) if unsupported(_m, args, kwargs) else _plain(*args, **kwargs)

        forward._r2r_inlined = True  # type: ignore[attr-defined]
        m.forward = forward
        patched.append(m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward
