"""Seeded random residual-block models for fuzzing ``r2r_fx.deepen(block="own")``, judged by tests/fuzzgen.py.

:func:`generate` builds a :class:`BlockProgram`: a stem, 1 to 3 stages, each an ``nn.Sequential`` or an
``nn.ModuleList`` (called in a loop, ``self.blocks[1:]`` after a first block that changes the width) of 1 to 4
instances of a generated ``Block`` class, and a head (pooled Linear, the stream itself, or both). Images
(N, C, H, W) or tokens (N, T, C). A block is one residual branch, two in a row or two in parallel, each an
MLP / conv MLP / depthwise / grouped / channel shuffle / softmax / GLU / Conv1d / multi-head attention
(packed or separate q, k, v, grouped-query heads, masks, causal, hand-written softmax attention), under a
pre-norm (BatchNorm, GroupNorm, LayerNorm, LayerNorm2d, RMSNorm and a hand-written one) or none, with
squeeze-excitation, LayerScale, a final BatchNorm or activation, dropout layers and functional dropout;
the residual is written five ways (one of them ``x += b``); after it may come a post-norm or an
activation. Across blocks: a width or stride change in the first block of a stage or a transition between
stages, a module shared by all blocks of a stage (first or last layer of the branch), a shared buffer, a
tied parameter, a block's own buffer, tied weights between blocks, one block instance listed twice, a
block called again, a skip around a stage, a side input (positions, a mask) passed to every block, in-place
activations, in-place activations of the block's input. float32 or float64.

A :class:`BlockProgram` is a :class:`fuzzgen.Program` (its :meth:`source` is a standalone file with
``Model``, ``make_model`` and ``make_inputs``), so :func:`fuzzgen.check_program` judges it with the same
independent checker and tolerances; only the transforms differ (:meth:`BlockProgram.transforms`): deepen
with ``block="own"`` for each method (``"random"`` run only) by default, with ``count=``, ``where="end"``,
``after=`` one or two block paths (now and then one the library refuses), ``init="copy"``, a second
deepen of the deepened model and a widen of it.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import fuzzgen

__all__ = ["BlockProgram", "generate"]

_PRELUDE = '''

class RMSNormX(nn.Module):
    """A hand-written RMSNorm over the last axis or (channels_first) axis 1."""

    def __init__(self, dim, channels_first=False, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones((1, dim, 1, 1) if channels_first else (dim,)))
        self.axis = 1 if channels_first else -1
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(self.axis, keepdim=True) + self.eps) * self.weight


class LayerNorm2d(nn.LayerNorm):
    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _perturb(model, seed):
    """Move norms, biases, LayerScales and running statistics off their initial values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() <= 1 or name.endswith("gamma"):
                p.add_(0.2 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))


def _convert(model, dtype):
    """``model.to(dtype)``, keeping a buffer that several modules share shared (``Module.to`` copies each)."""
    owners = {}
    for name, b in model.named_buffers(remove_duplicate=False):
        owners.setdefault(id(b), []).append(name)
    model.to(dtype)
    for names in owners.values():
        first = model.get_buffer(names[0])
        for name in names[1:]:
            path, _, attr = name.rpartition(".")
            model.get_submodule(path)._buffers[attr] = first
'''

_ACTS_F = ["F.relu({})", "F.gelu({})", "F.silu({})", "torch.tanh({})", "torch.sigmoid({})"]
_ACTS_M = ["nn.ReLU()", "nn.GELU()", "nn.SiLU()", "nn.Tanh()", "nn.Sigmoid()"]
_METHODS = ("r2r", "net2net", "netmorph", "random")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass
class BlockProgram(fuzzgen.Program):
    """A residual-block model: :class:`fuzzgen.Program` whose ``prelude`` (helpers and the block classes)
    comes before ``Model`` and whose transforms are own-block deepens."""

    prelude: str = ""

    def source(self) -> str:
        text = super().source()
        at = text.index("\n\nclass Model(")
        return text[:at] + _PRELUDE + self.prelude + text[at:]

    def transforms(self, gm: Any, r2r_fx: Any, rng: random.Random, points: int | None) -> list:
        return _transforms(gm, r2r_fx, rng, points)


class _Block:
    """One generated ``Block`` class: ``__init__`` lines and ``forward`` lines (width ``c`` after ``proj``)."""

    def __init__(self, rng: random.Random, name: str, kind: str, spatial: tuple[int, int], program: _Model) -> None:
        self.rng, self.name, self.kind, self.spatial, self.program = rng, name, kind, spatial, program
        self.init: list[str] = []
        self.fwd: list[str] = []
        self.count = 0
        self.features: set[str] = set()
        self.side = ""  # "" | "pos" | "mask": the side input every block gets
        self.shared = False  # a module of the stage's, called by every block
        self.shared_last = rng.random() < 0.2  # ... as the branch's last layer (else its first)
        self.table = ""  # "" | "shared_buffer" | "own_buffer" | "tied_param"
        self.table_shape = ""
        self.width = 0

    def mod(self, ctor: str, prefix: str = "m") -> str:
        self.count += 1
        name = f"self.{prefix}{self.count}"
        self.init.append(f"{name} = {ctor}")
        return name

    def op(self, expr: str) -> str:
        self.count += 1
        self.fwd.append(f"v{self.count} = {expr}")
        return f"v{self.count}"

    def act(self, v: str) -> str:
        r = self.rng
        if r.random() < 0.08:
            self.features.add("inplace_act")
            return self.op(
                f"{self.mod('nn.ReLU(inplace=True)', 'act')}({v})" if r.random() < 0.5 else f"F.relu({v}, inplace=True)"
            )
        i = r.randrange(len(_ACTS_F))
        return self.op(_ACTS_F[i].format(v) if r.random() < 0.5 else f"{self.mod(_ACTS_M[i], 'act')}({v})")

    def dropout(self, v: str, prob: float = 0.3) -> str:
        r = self.rng
        if r.random() >= prob:
            return v
        p = r.choice([0.0, 0.1, 0.25])
        if r.random() < 0.2:
            fp = r.choice([0.0, 0.0, p])
            self.features.add("F.dropout" + ("_random" if fp else "_p0"))
            self.program.random_train |= fp > 0
            return self.op(f"F.dropout({v}, {fp}, self.training)")
        self.features.add(f"dropout{p}")
        return self.op(f"{self.mod(f'nn.Dropout({p})', 'drop')}({v})")

    def norm(self, v: str) -> str:
        r = self.rng
        choice = r.choice(["bn", "gn", "ln", "rms", "nnrms", "none", "none"])
        if choice == "nnrms" and self.kind == "img":
            choice = "none"
        if choice == "none":
            return v
        self.features.add(f"norm:{choice}")
        t = self.kind == "tok"
        ctor = {
            "bn": "nn.BatchNorm1d(c)" if t else "nn.BatchNorm2d(c)",
            "gn": "nn.GroupNorm(self._groups(c), c)",
            "ln": "nn.LayerNorm(c)" if t else "LayerNorm2d(c)",
            "rms": "RMSNormX(c)" if t else "RMSNormX(c, channels_first=True)",
            "nnrms": "nn.RMSNorm(c)",
        }[choice]
        m = self.mod(ctor, "norm")
        if t and choice in ("bn", "gn"):
            return self.op(f"{m}({v}.transpose(1, 2)).transpose(1, 2)")
        return self.op(f"{m}({v})")

    def hidden(self, c: int) -> int:
        return max(2, min(24, c * self.rng.choice([1, 1, 2]) + self.rng.choice([0, 0, 0, 1, 2])))

    def shared_call(self, v: str, last: bool) -> str:
        """The stage's shared module as the branch's first or last layer (once per block)."""
        if self.shared and self.shared_last == last and "shared_used" not in self.features:
            self.features |= {"shared_used", "shared_is_last" if last else "shared_is_first"}
            return self.op(f"self.shared({v})")
        return v

    def last_bn(self, v: str, c: int, channels_last: bool = False) -> str:
        if self.rng.random() >= 0.35:
            return v
        self.features.add("last_bn")
        m = self.mod(f"nn.BatchNorm{2 if self.kind == 'img' else 1}d({c})", "bn")
        return self.op(f"{m}({v}.transpose(1, 2)).transpose(1, 2)" if channels_last else f"{m}({v})")

    # branches: input v of the stream's shape (c channels), output the same shape

    def branch(self, v: str, c: int) -> str:
        r = self.rng
        if self.side == "pos" and r.random() < 0.7:
            v = self.op(f"{v} + side")
        if v == "x" and r.random() < 0.06:
            self.features.add("inplace_on_stream")
            v = self.op(f"{self.mod('nn.ReLU(inplace=True)', 'preact')}({v})" if r.random() < 0.5 else f"F.relu_({v})")
        if self.table and "table_used" not in self.features:
            self.features.add("table_used")
            v = self.op(f"{v} + self.pe" if r.random() < 0.7 else f"{v} * (1 + self.pe)")
        if self.side == "mask":
            kind = "attn"
        elif self.kind == "img":
            kind = r.choice(["convmlp", "convmlp", "dw", "grouped", "shuffle", "softmax", "attn"])
        else:
            kind = r.choice(["mlp", "mlp", "glu", "attn", "attn", "conv1d", "softmax", "shuffle"])
        self.features.add(f"branch:{kind}")
        out = self.shared_call(getattr(self, f"_{self.kind}_{kind}")(v, c), last=True)
        if r.random() < 0.2:
            out = self.squeeze_excite(out, c)
        if r.random() < 0.15:
            self.features.add("tail_act")
            out = self.act(out)
        out = self.dropout(out, 0.2)
        if r.random() < 0.25:
            self.features.add("layerscale")
            gamma = self.mod(
                f"nn.Parameter(0.1 * torch.ones({c}, 1, 1))"
                if self.kind == "img"
                else f"nn.Parameter(0.1 * torch.ones({c}))",
                "gamma",
            )
            out = self.op(f"{gamma} * {out}" if r.random() < 0.5 else f"{out} * {gamma}")
        return out

    def _img_convmlp(self, v: str, c: int) -> str:
        r = self.rng
        v = self.shared_call(v, last=False)
        hid = self.hidden(c)
        h = self.op(f"{self.mod(f'nn.Conv2d({c}, {hid}, 1)')}({v})")
        if r.random() < 0.5:
            h = self.op(f"{self.mod(f'nn.BatchNorm2d({hid})', 'bn')}({h})")
        h = self.dropout(self.act(h))
        k, g = r.choice([1, 3]), r.choice(_divisors(math.gcd(hid, c)))
        conv = f"nn.Conv2d({hid}, {c}, {k}, padding={k // 2}, groups={g}, bias={r.random() < 0.5})"
        return self.last_bn(self.op(f"{self.mod(conv)}({h})"), c)

    def _img_dw(self, v: str, c: int) -> str:
        h = self.op(f"{self.mod(f'nn.Conv2d({c}, {c}, 3, padding=1, groups={c})')}({v})")
        if self.rng.random() < 0.5:
            h = self.op(f"{self.mod(f'nn.BatchNorm2d({c})', 'bn')}({h})")
        h = self.dropout(self.act(h))
        return self.last_bn(self.op(f"{self.mod(f'nn.Conv2d({c}, {c}, 1)')}({h})"), c)

    def _img_grouped(self, v: str, c: int) -> str:
        r = self.rng
        g = r.choice(_divisors(c))
        hid = g * r.choice([1, 2, 3])
        h = self.act(self.op(f"{self.mod(f'nn.Conv2d({c}, {hid}, 3, padding=1, groups={g})')}({v})"))
        g2 = r.choice(_divisors(math.gcd(hid, c)))
        return self.last_bn(self.op(f"{self.mod(f'nn.Conv2d({hid}, {c}, 1, groups={g2})')}({h})"), c)

    def _img_shuffle(self, v: str, c: int) -> str:
        (hh, ww), hid = self.spatial, self.hidden(c)
        g = self.rng.choice([d for d in _divisors(math.gcd(hid, c)) if d > 1] or [1])
        h = self.act(self.op(f"{self.mod(f'nn.Conv2d({c}, {hid}, 1, groups={g})')}({v})"))
        n = f"{h}.shape[0]"
        h = self.op(f"{h}.view({n}, {g}, {hid // g}, {hh}, {ww}).transpose(1, 2).reshape({n}, {hid}, {hh}, {ww})")
        return self.last_bn(self.op(f"{self.mod(f'nn.Conv2d({hid}, {c}, 1, groups={g})')}({h})"), c)

    def _img_softmax(self, v: str, c: int) -> str:
        hid = self.hidden(c)
        h = self.op(f"{self.mod(f'nn.Conv2d({c}, {hid}, 1)')}({v})")
        h = self.op(f"F.softmax({h}, dim=1)" if self.rng.random() < 0.5 else f"{h}.softmax(1)")
        return self.last_bn(self.op(f"{self.mod(f'nn.Conv2d({hid}, {c}, 1)')}({h})"), c)

    def _img_attn(self, v: str, c: int) -> str:
        o = self.attention(self.op(f"{v}.flatten(2).transpose(1, 2)"), c)
        if self.rng.random() < 0.5:
            return self.op(f"{o}.transpose(1, 2).reshape_as({v})")
        hh, ww = self.spatial
        return self.op(f"{o}.transpose(1, 2).reshape({v}.shape[0], {c}, {hh}, {ww})")

    def _tok_mlp(self, v: str, c: int) -> str:
        v = self.shared_call(v, last=False)
        hid = self.hidden(c)
        h = self.dropout(self.act(self.op(f"{self.mod(f'nn.Linear({c}, {hid})')}({v})")))
        h = self.op(f"{self.mod(f'nn.Linear({hid}, {c}, bias={self.rng.random() < 0.6})')}({h})")
        return self.last_bn(h, c, channels_last=True)

    def _tok_glu(self, v: str, c: int) -> str:
        hid = self.hidden(c)
        a = self.op(f"{self.mod(f'nn.Linear({c}, {hid}, bias=False)')}({v})")
        b = self.op(f"{self.mod(f'nn.Linear({c}, {hid}, bias=False)')}({v})")
        h = self.dropout(self.op(f"F.silu({a}) * {b}"))
        return self.op(f"{self.mod(f'nn.Linear({hid}, {c}, bias=False)')}({h})")

    def _tok_softmax(self, v: str, c: int) -> str:
        hid = self.hidden(c)
        h = self.op(f"F.softmax({self.mod(f'nn.Linear({c}, {hid})')}({v}), dim=-1)")
        return self.op(f"{self.mod(f'nn.Linear({hid}, {c})')}({h})")

    def _tok_shuffle(self, v: str, c: int) -> str:
        hid = self.hidden(c)
        g = self.rng.choice([d for d in _divisors(hid) if 1 < d < hid] or [1])
        h = self.act(self.op(f"{self.mod(f'nn.Linear({c}, {hid})')}({v})"))
        n, t = f"{h}.shape[0]", f"{h}.shape[1]"
        h = self.op(f"{h}.view({n}, {t}, {g}, {hid // g}).transpose(-1, -2).reshape({n}, {t}, {hid})")
        return self.op(f"{self.mod(f'nn.Linear({hid}, {c})')}({h})")

    def _tok_conv1d(self, v: str, c: int) -> str:
        hid = self.hidden(c)
        g = self.rng.choice(_divisors(math.gcd(hid, c)))
        t = self.op(f"{v}.transpose(1, 2)")
        h = self.act(self.op(f"{self.mod(f'nn.Conv1d({c}, {hid}, 3, padding=1, groups={g})')}({t})"))
        h = self.last_bn(self.op(f"{self.mod(f'nn.Conv1d({hid}, {c}, 1)')}({h})"), c)
        return self.op(f"{h}.transpose(1, 2)")

    def _tok_attn(self, v: str, c: int) -> str:
        return self.attention(v, c)

    def attention(self, t: str, c: int) -> str:
        """Multi-head self-attention over tokens ``t`` (N, T, c)."""
        r, fwd = self.rng, self.fwd
        hd = r.choice([d for d in _divisors(c) if d >= 2] or [1])
        nh = c // hd
        nh = r.choice([nh, nh, nh * 2]) if c <= 8 else nh
        nkv = r.choice(_divisors(nh)) if r.random() < 0.4 else nh
        if nkv != nh:
            self.features.add("gqa")
        inner = nh * hd
        if r.random() < 0.5:
            self.features.add("packed_qkv")
            qkv = self.op(f"{self.mod(f'nn.Linear({c}, {inner + 2 * nkv * hd}, bias={r.random() < 0.5})', 'qkv')}({t})")
            if nkv == nh and r.random() < 0.5:
                fwd.append(f"q, k, v = {qkv}.chunk(3, dim=-1)")
            else:
                fwd.append(f"q, k, v = {qkv}.split([{inner}, {nkv * hd}, {nkv * hd}], dim=-1)")
        else:
            for name, width in (("q", inner), ("k", nkv * hd), ("v", nkv * hd)):
                fwd.append(f"{name} = {self.mod(f'nn.Linear({c}, {width})', name)}({t})")
        tdim = "-1" if r.random() < 0.3 else f"{t}.shape[1]"
        view = r.random() < 0.5
        for name, heads in (("q", nh), ("k", nkv), ("v", nkv)):
            if view:
                fwd.append(f"{name} = {name}.view({t}.shape[0], {tdim}, {heads}, {hd}).transpose(1, 2)")
            else:
                fwd.append(f"{name} = {name}.reshape({t}.shape[0], {tdim}, {heads}, {hd}).permute(0, 2, 1, 3)")
        if nkv != nh:
            rep, interleave = nh // nkv, r.random() < 0.5
            for name in ("k", "v"):
                if interleave:
                    fwd.append(f"{name} = {name}.repeat_interleave({rep}, dim=1)")
                else:
                    expand = f"{name}[:, :, None].expand(-1, {nkv}, {rep}, -1, -1)"
                    fwd.append(f"{name} = {expand}.reshape({name}.shape[0], {nh}, -1, {hd})")
        if r.random() < 0.2 and self.side != "mask":
            self.features.add("manual_attn")
            fwd.append(f"att = ((q @ k.transpose(-2, -1)) * {1 / math.sqrt(hd)!r}).softmax(dim=-1)")
            o = self.op("att @ v")
        else:
            mask = ""
            if self.side == "mask":
                mask = ", attn_mask=side"
            elif r.random() < 0.3:
                mask = ", is_causal=True"
                self.features.add("causal")
            o = self.op(f"F.scaled_dot_product_attention(q, k, v{mask})")
        o = self.op(f"{o}.transpose(1, 2).reshape({t}.shape[0], {tdim}, {inner})")
        o = self.op(f"{self.mod(f'nn.Linear({inner}, {c}, bias={r.random() < 0.5})', 'o')}({o})")
        return self.dropout(o, 0.3)

    def squeeze_excite(self, v: str, c: int) -> str:
        self.features.add("se")
        red = max(1, c // 4)
        img = self.kind == "img"
        layer = "nn.Conv2d({}, {}, 1)" if img else "nn.Linear({}, {})"
        s = self.op(f"{v}.mean((2, 3), keepdim=True)" if img else f"{v}.mean(1, keepdim=True)")
        s = self.op(f"F.relu({self.mod(layer.format(c, red), 'se')}({s}))")
        s = self.op(f"torch.sigmoid({self.mod(layer.format(red, c), 'se')}({s}))")
        return self.op(f"{v} * {s}" if self.rng.random() < 0.5 else f"{s} * {v}")

    def residual(self, x: str, b: str) -> str:
        form = self.rng.choice(["{x} + {b}", "{b} + {x}", "torch.add({x}, {b})", "{x}.add({b})", "iadd"])
        if form != "iadd":
            return self.op(form.format(x=x, b=b))
        if self.rng.random() < 0.4:
            self.features.add("inplace_residual")
            self.fwd.append(f"{x} += {b}")  # in place: writes the caller's tensor
        else:
            self.fwd.append(f"{x} = {x} + {b}")
        return x

    def post(self, v: str, c: int) -> str:
        if self.rng.random() < 0.6:
            return v
        choice = self.rng.choice(
            ["relu", "relu", "relu6", "relu_mod", "gelu", "ln", "hardtanh", "contiguous", "to", "view"]
        )
        self.features.add(f"post:{choice}")
        if choice == "relu_mod":
            return self.op(f"{self.mod('nn.ReLU(inplace=True)', 'post')}({v})")
        if choice == "ln":
            return self.op(
                f"{self.mod(f'LayerNorm2d({c})' if self.kind == 'img' else f'nn.LayerNorm({c})', 'post')}({v})"
            )
        expr = {
            "relu": "F.relu({})",
            "relu6": "F.relu6({})",
            "gelu": "F.gelu({})",
            "hardtanh": "F.hardtanh({}, -2.0, 1.5)",
            "contiguous": "{}.contiguous()",
            "to": "{0}.to({0}.dtype)",
            "view": "{0}.view({0}.shape)",
        }[choice]
        return self.op(expr.format(v))

    def build(self, c: int) -> None:
        r = self.rng
        self.width = c
        structure = r.choice(["single", "single", "double", "double", "parallel"])
        self.features.add(f"struct:{structure}")
        x = "x"
        if structure == "parallel":
            h = self.norm(x)
            b1, b2 = self.branch(h, c), self.branch(h if r.random() < 0.7 else x, c)
            x = self.residual(x, self.op(f"{b1} + {b2}")) if r.random() < 0.5 else self.op(f"{x} + {b1} + {b2}")
        else:
            x = self.residual(x, self.branch(self.norm(x), c))
            if structure == "double":
                x = self.post(x, c) if r.random() < 0.3 else x
                x = self.residual(x, self.branch(self.norm(x), c))
        self.fwd.append(f"return {self.post(x, c)}")

    def source(self) -> str:
        proj = "nn.Conv2d(c, cout, 1, stride=stride)" if self.kind == "img" else "nn.Linear(c, cout)"
        lines = [
            f"class {self.name}(nn.Module):",
            "    def __init__(self, c, cout=None, stride=1, shared=None, table=None):",
            "        super().__init__()",
            "        cout = cout or c",
            f"        self.proj = {proj} if (cout != c or stride != 1) else None",
            "        c = cout",
        ]
        lines += {
            "shared_buffer": ["        self.register_buffer('pe', table)"],
            "tied_param": ["        self.pe = table"],
            "own_buffer": [f"        self.register_buffer('pe', 0.1 * torch.randn({self.table_shape}))"],
            "": [],
        }[self.table]
        lines += ["        self.shared = shared"] if self.shared else []
        lines += ["        " + s for s in self.init]
        lines += [
            "",
            "    @staticmethod",
            "    def _groups(c):",
            "        return max(g for g in (1, 2, 4) if c % g == 0)",
        ]
        lines += ["", "    def forward(self, x, side=None):" if self.side else "    def forward(self, x):"]
        lines += ["        if self.proj is not None:", "            x = self.proj(x)"]
        return "\n".join(lines + ["        " + s for s in self.fwd]) + "\n"


@dataclass
class _Model:
    """The model under construction (the top-level ``__init__`` and ``forward`` lines)."""

    rng: random.Random
    kind: str
    init: list
    fwd: list
    features: set
    random_train: bool = False


def _stage(m: _Model, i: int, n_stages: int, style: str, c: int, hw: int, t: int, prev: _Block | None) -> _Block:
    """Stage ``i``: its blocks (a new class or the previous stage's) and its lines in the model."""
    r, init, fwd = m.rng, m.init, m.fwd
    down = i > 0 and r.random() < 0.7
    cout, stride = c, 1
    if down:
        cout = min(16, c * 2) if r.random() < 0.6 else c
        stride = 2 if m.kind == "img" and hw >= 4 and r.random() < 0.6 else 1
        if cout == c and stride == 1:
            cout = c + 2 if c + 2 <= 16 else c - 2
    new_hw = (hw + 1) // 2 if stride == 2 else hw
    in_block = down and r.random() < 0.6  # the first block changes the width, else a transition layer
    if prev is not None and r.random() < 0.3 and not prev.side and (prev.width, prev.spatial) == (cout, (new_hw,) * 2):
        blk = prev
    else:
        blk = _Block(r, f"Block{i}", m.kind, (new_hw, new_hw), m)
        if r.random() < 0.25:
            blk.side = r.choice(["pos", "mask"]) if m.kind == "tok" else "pos"
            m.features.add(f"side:{blk.side}")
            in_block = False
        blk.shared = r.random() < 0.12
        if r.random() < 0.12:
            blk.table = r.choice(["shared_buffer", "own_buffer", "own_buffer", "tied_param"])
            blk.table_shape = f"1, {cout}, {new_hw}, {new_hw}" if m.kind == "img" else f"1, {t}, {cout}"
            m.features.add(blk.table)
        blk.build(cout)
    m.features.update(blk.features)
    n_blocks = r.randint(1, 4)
    use_list = bool(blk.side) or r.random() < 0.4
    twice = use_list and n_blocks >= 2 and r.random() < 0.15 and not in_block
    attr = {"layerN": f"self.layer{i + 1}", "stages": f"self.stages[{i}]"}.get(style)
    attr = attr or (f"self.blocks{i}" if n_stages > 1 else "self.blocks")
    extra = ""
    if blk.shared:
        m.features.add("shared_module")
        layer = f"nn.Conv2d({cout}, {cout}, 1)" if m.kind == "img" else f"nn.Linear({cout}, {cout})"
        init.append(f"self.shared{i} = {layer}")
        extra = f", shared=self.shared{i}"
    if down and not in_block:
        layer = f"nn.Conv2d({c}, {cout}, 1, stride={stride})" if m.kind == "img" else f"nn.Linear({c}, {cout})"
        init.append(f"self.trans{i} = {layer}")
        fwd.append(f"x = self.trans{i}(x)")
    if blk.table in ("shared_buffer", "tied_param"):
        table = f"0.1 * torch.randn({blk.table_shape})"
        init.append(f"table{i} = " + (f"nn.Parameter({table})" if blk.table == "tied_param" else table))
        extra += f", table=table{i}"
    items = [
        f"{blk.name}({c}, {cout}, {stride}{extra})" if j == 0 and in_block else f"{blk.name}({cout}{extra})"
        for j in range(n_blocks)
    ]
    built = f"nn.ModuleList([{', '.join(items)}])" if use_list else f"nn.Sequential({', '.join(items)})"
    init.append(f"self.stages.append({built})" if style == "stages" else f"{attr} = {built}")
    if twice:
        m.features.add("shared_instance")
        init.append(f"{attr}.append({attr}[0])")
    layers = [s.split(" = ")[0][len("self.") :] for s in blk.init if " = nn.Linear(" in s or " = nn.Conv" in s]
    if n_blocks >= 2 and layers and r.random() < 0.1 and not in_block:
        m.features.add("tied_weights")
        name = r.choice(layers)
        init += [f"for blk in list({attr})[1:]:", f"    blk.{name}.weight = {attr}[0].{name}.weight"]
    skip = r.random() < 0.1 and not in_block
    if skip:
        m.features.add("global_skip")
        fwd.append(f"skip{i} = x")
    side = _side(m, blk, i, cout, new_hw, t)
    if use_list:
        fwd += [f"x = {attr}[0](x)", f"for blk in {attr}[1:]:"] if in_block else [f"for blk in {attr}:"]
        fwd.append(f"    x = blk(x{side})")
    else:
        fwd.append(f"x = {attr}(x)")
    if skip:
        fwd.append(f"x = x + skip{i}")
    if use_list and not twice and n_blocks >= 2 and r.random() < 0.06 and not in_block:
        m.features.add("shared_call_twice")
        fwd.append(f"x = {attr}[0](x{side})")
    return blk


def _side(m: _Model, blk: _Block, i: int, cout: int, hw: int, t: int) -> str:
    """The side input of stage ``i``'s blocks, computed once in the model's forward (``", side"`` or "")."""
    r = m.rng
    if blk.side == "mask":
        if r.random() < 0.5:
            m.fwd.append("side = x.new_ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()")
        else:
            m.init.append(f"self.register_buffer('mask{i}', torch.triu(torch.full(({t}, {t}), -1e4), 1))")
            m.fwd.append(f"side = self.mask{i}.to(x.dtype)")
    elif blk.side == "pos":
        if r.random() < 0.67:
            shape = f"1, {cout}, {hw}, {hw}" if m.kind == "img" else f"1, {t}, {cout}"
            m.init.append(f"self.pos{i} = nn.Parameter(0.1 * torch.randn({shape}))")
            m.fwd.append(f"side = self.pos{i}")
        else:
            m.features.add("side_from_stream")
            m.fwd.append(f"side = x.mean({'(2, 3)' if m.kind == 'img' else '1'}, keepdim=True).detach() * 0.5")
    return ", side" if blk.side else ""


def _generate_once(seed: int, sub: int) -> BlockProgram:
    r = random.Random(seed * 7919 + sub)
    kind = r.choice(["img", "tok"])
    c0 = r.randint(4, 16)
    c0 = min(16, c0 + 1) if c0 % 2 and r.random() < 0.7 else c0
    hw, t, din = r.choice([4, 5, 6, 8]), r.randint(3, 8), r.randint(3, 8)
    dtype = "float64" if r.random() < 0.15 else "float32"
    m = _Model(r, kind, [], [], {kind})
    if kind == "img":
        m.init.append(f"self.stem = nn.Conv2d(3, {c0}, 3, padding=1)")
        m.fwd.append("x = self.stem(x)")
        if r.random() < 0.5:
            m.init.append(f"self.stem_bn = nn.BatchNorm2d({c0})")
            m.fwd.append("x = F.relu(self.stem_bn(x))")
    else:
        m.init.append(f"self.stem = nn.Linear({din}, {c0})")
        m.fwd.append("x = self.stem(x)")
        if r.random() < 0.3:
            m.init.append(f"self.stem_drop = nn.Dropout({r.choice([0.0, 0.1])})")
            m.fwd.append("x = self.stem_drop(x)")
    n_stages = r.choice([1, 1, 2, 2, 3])
    style = r.choice(["layerN", "stages", "blocks"])
    if style == "stages":
        m.init.append("self.stages = nn.ModuleList()")
    classes: list[str] = []
    c, size, prev = c0, hw, None
    for i in range(n_stages):
        blk = _stage(m, i, n_stages, style, c, size, t, prev)
        if blk is not prev:
            classes.append(blk.source())
        c, size, prev = blk.width, blk.spatial[0], blk
    head = r.choice(["pool", "pool", "stream", "tuple"])
    m.features.add(f"head:{head}")
    outputs = ["x"]
    if head != "stream":
        m.init.append(f"self.head = nn.Linear({c}, 5)")
        m.fwd.append(f"y = self.head({'x.mean((2, 3))' if kind == 'img' else 'x.mean(1)'})")
        outputs = ["y"] if head == "pool" else ["y", "x"]
    m.init += ["_perturb(self, SEED)", "_convert(self, DTYPE)"]
    shape = (2, 3, hw, hw) if kind == "img" else (2, t, din)
    return BlockProgram(
        seed,
        dtype,
        [("x", shape, 0)],
        m.init,
        m.fwd,
        outputs,
        "single" if len(outputs) == 1 else "tuple",
        Counter(sorted(m.features)),
        m.random_train,
        prelude="\n\n" + "\n\n".join(classes),
    )


def generate(seed: int) -> BlockProgram:
    """A random block model that runs forward and backward in eval and train mode (deterministic in ``seed``)."""
    for sub in range(50):
        program = _generate_once(seed, sub)
        if fuzzgen._validates(program):
            return program
    raise RuntimeError(f"no valid block model for seed {seed}")


# --------------------------------------------------------------------------------------------- transforms


def _placements(rng: random.Random, blocks: list[Any], n: int) -> list[tuple[str, dict[str, Any]]]:
    """``n`` (name, deepen keywords) placements of copies: ``count=``, ``where="end"``, ``after=``."""
    paths = [b.path for b in blocks]
    usable = [b.path for b in blocks if not b.refusal] or paths
    out: list[tuple[str, dict[str, Any]]] = []
    for _ in range(n):
        shape = rng.choice(["count", "end", "after", "after", "after2"] if paths else ["count", "end"])
        if shape == "count":
            kwargs: dict[str, Any] = {"count": rng.randint(1, 4)}
        elif shape == "end":
            kwargs = {"count": rng.randint(1, 2), "where": "end"}
        elif shape == "after2" and len(usable) >= 2:
            kwargs = {"after": rng.sample(usable, 2)}
        else:
            shape = "after"
            kwargs = {"after": rng.choice(usable if rng.random() < 0.85 else paths)}
            if rng.random() < 0.5:
                kwargs["count"] = rng.randint(1, 3)
        if rng.random() < 0.3:
            kwargs["init"] = "copy"
        out.append((shape, kwargs))
    return out


def _transforms(gm: Any, r2r_fx: Any, rng: random.Random, points: int | None) -> list[tuple[str, str, Callable]]:
    """(label, call source, thunk) of each own-block transform of ``gm``; ``points``: placements per method
    (default 2) besides the default one."""
    try:
        blocks = r2r_fx.repeated_blocks(gm)
    except Exception:  # noqa: BLE001 - the default deepen reports it
        blocks = []
    out: list[tuple[str, str, Callable]] = []

    def deepen(inner: str, kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        kw = fuzzgen._kwargs_with_check(r2r_fx.deepen, {"block": "own", **kwargs, "seed": 0})
        return fuzzgen._call_source("deepen", [inner], kw), kw

    for method in _METHODS:
        for shape, kwargs in [("default", {}), *_placements(rng, blocks, 2 if points is None else points)]:
            call, kw = deepen("gm", {**kwargs, "method": method})
            out.append((f"deepen/own/{method}/{shape}", call, lambda kw=kw: r2r_fx.deepen(gm, **kw)))
    for method in _METHODS[:3]:  # the deepened model deepened again, and widened
        (_, first), (_, second) = _placements(rng, blocks, 2)
        inner, kw1 = deepen("gm", {**first, "method": method})
        call, kw2 = deepen(inner, {**second, "method": rng.choice(_METHODS[:3])})
        thunk = lambda kw1=kw1, kw2=kw2: r2r_fx.deepen(r2r_fx.deepen(gm, **kw1), **kw2)  # noqa: E731
        out.append((f"deepen/own/{method}/again", call, thunk))
        growth = {"factor": 2.0} if rng.random() < 0.5 else {"extra": rng.randint(1, 3)}
        kw3 = fuzzgen._kwargs_with_check(r2r_fx.widen, {**growth, "method": rng.choice(_METHODS[:3]), "seed": 0})
        call = fuzzgen._call_source("widen", [inner], kw3)
        thunk = lambda kw1=kw1, kw3=kw3: r2r_fx.widen(r2r_fx.deepen(gm, **kw1), **kw3)  # noqa: E731
        out.append((f"deepen/own/{method}/widen", call, thunk))
    return out
