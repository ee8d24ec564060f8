"""Seeded random-architecture fuzzer for r2r_fx: a model generator and an independent checker.

:func:`generate` builds a :class:`Program`: a random DAG of ops over a broad vocabulary (every conv
flavour and padding mode, transposed and functional convs, Linear over leading dims, every norm,
activations incl. in-place ones, broadcasting arithmetic against values, parameters and buffers,
cat/split/chunk/stack, reshapes, slicing, reductions, pooling, interpolation, padding,
matmul/einsum/attention, tied modules and parameters, sizes used as numbers, embeddings, dropout,
ops that move or mix channels (flip, roll, cumsum, sort, repeat, pixel_shuffle, ...), in-place
patterns on views, composite residual/MLP/SE blocks, several inputs and outputs, float64). The
program *is* Python source: ``Program.source()`` is a standalone file defining ``Model`` and
``make_inputs``, and :meth:`Program.build` executes exactly that text, so a repro file is the model.
Every op is executed on example tensors while it is generated (which is how shapes are tracked), and
a finished program must run forward and backward in eval and train mode.

:func:`check_program` captures a program's model (``via="symbolic_trace"`` or ``"export"``), applies
every transform (widen factor 2 and ``extra=N`` with each method, deepen with each method at the
default points and at each insertion point, grow_kernel on every conv node) with the library's
safety net off, and compares each grown model with a deep copy of the eager model kept before
anything ran, on fresh seeded inputs (another batch size where the captured graph allows), without
``r2r_fx.verify``: relative error ``max|d| / max|y|`` per output leaf in float64, 1e-5 for float32
models (an error above it is re-measured with both models in float64, same 1e-5, to separate float32
rounding from a real change; an output leaf that is rounding noise in float32, such as a BatchNorm of a
constant, is measured there against the size of that noise) and 1e-9 for float64 models (whose noise
leaves, smaller than the eager model's own float32-vs-float64 difference, may differ by 1e-5 of it).
Outcomes: "preserved", "refused" (an ``R2RError`` or ``ValueError``), "wrong" (runs but differs or
changes shape), "broken" (the grown model raises in eval/train mode or in a train-mode backward, or
gives non-finite gradients), "internal" (any other exception from the transform) and, for the
non-preserving ``method="random"`` baseline, "ran" (not broken; values not compared). A transform that
changes the captured model it was given is "wrong" too (even one that then refuses), and the model is put
back for the next. Which transforms run is the program's (:meth:`Program.transforms`; the residual-block
models of tests/fuzzgen_blocks.py have their own). After a preserved widen/deepen/grow_kernel,
``carry_optimizer`` is checked too (label ``carry_optimizer/<transform>``).

Dropout: ``nn.Dropout*`` layers (and the ones capture makes from ATen dropouts) get ``p = 0`` in both
models for the train-mode comparison. Functional ``F.dropout(x, P, self.training)`` is generated with
``P = 0`` or ``P > 0``; with ``P > 0`` the model is random in train mode, so instead of values the
check requires the grown model to be random in train mode exactly when the eager model is.
:func:`minimize` shrinks a failing program (greedy statement deletion) for repro files.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import math
import random
import re
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "OUTCOMES",
    "CheckResult",
    "ModelReport",
    "Program",
    "check_program",
    "compare_outputs",
    "failures_report",
    "generate",
    "minimize",
    "normalize_reason",
    "repro_source",
]

OUTCOMES = ("preserved", "refused", "wrong", "broken", "internal", "ran")
FAILURES = ("wrong", "broken", "internal")
TOL = {torch.float32: 1e-5, torch.float64: 1e-9}
F64_RECHECK_TOL = 1e-5  # float32 weights re-run in float64: only the float32 rounding of the transform remains
MAX_NUMEL = 4096
MAX_ABS = 1e4

_HEADER = """import math

import torch
import torch.nn.functional as F
from torch import nn
"""


# ----------------------------------------------------------------------------------------------- program


@dataclass
class Program:
    """A generated model as source text: ``__init__`` statements, ``forward`` statements, inputs, outputs."""

    seed: int
    dtype: str
    inputs: list[tuple[str, tuple[int, ...], int]]  # name, shape with batch at 0, vocabulary (0: float input)
    init: list[str]
    lines: list[str]
    outputs: list[str]
    output_style: str  # "single" | "tuple" | "dict"
    features: Counter = field(default_factory=Counter)
    random_train: bool = False  # functional dropout with p > 0: random in train mode

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float64 if self.dtype == "float64" else torch.float32

    @property
    def batch(self) -> int:
        return self.inputs[0][1][0]

    def source(self) -> str:
        """The model as a standalone Python file (``Model``, ``make_inputs``, ``DTYPE``, ``SEED``)."""
        args = ", ".join(name for name, _, _ in self.inputs)
        init = "\n".join(f"        {s}" for s in self.init) or "        pass"
        body = "\n".join(f"        {s}" for s in self.lines)
        if self.output_style == "single":
            ret = self.outputs[0]
        elif self.output_style == "dict":
            ret = "{" + ", ".join(f"'out{i}': {o}" for i, o in enumerate(self.outputs)) + "}"
        else:
            ret = "(" + ", ".join(self.outputs) + ",)"
        makers = []
        for _name, shape, vocab in self.inputs:
            dims = ", ".join(["batch"] + [str(s) for s in shape[1:]])
            if vocab:
                makers.append(f"torch.randint(0, {vocab}, ({dims},), generator=g)")
            else:
                makers.append(f"torch.randn({dims}, generator=g).to(DTYPE)")
        return (
            f"{_HEADER}\nSEED = {self.seed}\nDTYPE = torch.{self.dtype}\nBATCH = {self.batch}\n\n\n"
            f"class Model(nn.Module):\n    def __init__(self):\n        super().__init__()\n{init}\n\n"
            f"    def forward(self, {args}):\n{body}\n        return {ret}\n\n\n"
            f"def make_model():\n    torch.manual_seed(SEED)\n    return Model().to(DTYPE)\n\n\n"
            f"def make_inputs(batch=BATCH, seed=0):\n    g = torch.Generator().manual_seed(seed)\n"
            f"    return ({', '.join(makers)},)\n"
        )

    def namespace(self) -> dict[str, Any]:
        ns: dict[str, Any] = {"__name__": f"fuzz_model_{self.seed}"}
        exec(compile(self.source(), f"<fuzz model {self.seed}>", "exec"), ns)  # noqa: S102 - our own generated code
        return ns

    def build(self) -> tuple[nn.Module, Callable[..., tuple[Any, ...]]]:
        """(model with seeded weights, ``make_inputs(batch, seed)``), from :meth:`source`."""
        ns = self.namespace()
        return ns["make_model"](), ns["make_inputs"]

    def transforms(
        self, gm: Any, r2r_fx: Any, rng: random.Random, points: int | None
    ) -> list[tuple[str, str, Callable]]:
        """(label, call source, thunk) of every transform to check on ``gm``, the capture of this program's model."""
        return _transforms(gm, r2r_fx, rng, points)


# --------------------------------------------------------------------------------------------- generator


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


class _Gen:
    """Builds a program op by op; each op is executed on example tensors before it is kept."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.holder = nn.Module()
        self.scope: dict[str, Any] = {"torch": torch, "nn": nn, "F": F, "math": math, "self": self.holder}
        self.values: list[str] = []  # float tensor values, in creation order
        self.unused: list[str] = []
        self.inputs: list[tuple[str, tuple[int, ...], int]] = []
        self.ids: list[tuple[str, int]] = []
        self.init: list[str] = []
        self.lines: list[str] = []
        self.features: Counter = Counter()
        self.modules: list[tuple[str, tuple[int, ...]]] = []  # callable modules and the input shape they took
        self.count = 0
        self.random_train = False

    # helpers
    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def t(self, name: str) -> torch.Tensor:
        return self.scope[name]

    def pick(self, pred: Callable[[torch.Tensor], bool] = lambda t: True) -> str | None:
        pool = [v for v in self.unused if pred(self.t(v))] or [v for v in self.values if pred(self.t(v))]
        if not pool:
            return None
        if self.rng.random() < 0.6:
            return pool[-1] if self.rng.random() < 0.5 else self.rng.choice(pool[-3:])
        return self.rng.choice(pool)

    def try_op(self, feature: str, init: list[str], lines: list[str], outs: list[str]) -> bool:
        """Execute an op on the example tensors; keep it if it runs and its outputs are sane."""
        snap = {k: dict(getattr(self.holder, k)) for k in ("_modules", "_parameters", "_buffers")}
        plain = set(self.holder.__dict__)
        try:
            for s in init:
                exec(s, self.scope)  # noqa: S102
            for s in lines:
                exec(s, self.scope)  # noqa: S102
            for o in outs:
                v = self.scope[o]
                if not isinstance(v, torch.Tensor) or not v.dtype.is_floating_point:
                    raise TypeError("not a float tensor")
                if v.numel() == 0 or v.numel() > MAX_NUMEL or v.dim() > 6 or v.dim() < 1:
                    raise ValueError("size")
                if v.shape[0] != self.inputs[0][1][0] and self.rng.random() < 0.7:
                    raise ValueError("batch axis moved")
                d = v.detach()
                if not torch.isfinite(d).all() or d.abs().max() > MAX_ABS:
                    raise ValueError("values")
        except Exception:  # noqa: BLE001 - an op that does not fit here is simply not generated
            for k, d in snap.items():
                getattr(self.holder, k).clear()
                getattr(self.holder, k).update(d)
            for k in set(self.holder.__dict__) - plain:
                del self.holder.__dict__[k]
            return False
        self.init += init
        self.lines += lines
        for o in outs:
            self.values.append(o)
            self.unused.append(o)
        for s in lines:
            for v in list(self.unused):
                if re.search(rf"\b{v}\b", s.split("=", 1)[-1]) and v not in outs:
                    self.unused.remove(v)
        self.features[feature] += 1
        return True

    def param(self, shape: tuple[int, ...], scale: float = 1.0, prefix: str = "p") -> tuple[str, str]:
        name = self.name(prefix)
        dims = ", ".join(str(s) for s in shape)
        return name, f"self.{name} = nn.Parameter(torch.randn({dims}{',' if len(shape) == 1 else ''}) * {scale:.3g})"

    def buffer(self, shape: tuple[int, ...], expr: str | None = None) -> tuple[str, str]:
        name = self.name("b")
        dims = ", ".join(str(s) for s in shape)
        expr = expr or f"torch.randn({dims}{',' if len(shape) == 1 else ''})"
        return name, f"self.register_buffer('{name}', {expr})"

    def module(self, feature: str, ctor: str, x: str, call: str = "", extra_init: list[str] | None = None) -> bool:
        m = self.name("m")
        out = self.name("v")
        line = f"{out} = self.{m}({x}{call})"
        ok = self.try_op(feature, [f"self.{m} = {ctor}"] + [s.format(m=m) for s in extra_init or []], [line], [out])
        if ok:
            self.modules.append((m, tuple(self.t(x.split(".")[0]).shape)))
        return ok


def _spatial(t: torch.Tensor) -> list[int]:
    return list(t.shape[2:])


def _g_conv(g: _Gen) -> bool:
    r = g.rng
    x = g.pick(lambda t: 3 <= t.dim() <= 5 and t.shape[1] <= 16)
    if x is None:
        return False
    t = g.t(x)
    d, c = t.dim() - 2, t.shape[1]
    flavour = r.choice(["plain", "plain", "grouped", "depthwise", "dw_mult", "dilated", "strided", "pad_mode", "same"])
    k = r.choice([1, 3, 3]) if d < 3 else r.choice([1, 3])
    cout = r.choice([2, 4, 6, 8, 12])
    groups, stride, dil, pad, mode = 1, 1, 1, k // 2, "zeros"
    if flavour == "grouped":
        groups = r.choice([q for q in _divisors(c) if q > 1] or [1])
        cout = groups * r.choice([1, 2])
    elif flavour == "depthwise":
        groups, cout = c, c
    elif flavour == "dw_mult":
        groups, cout = c, c * r.choice([2, 3])
    elif flavour == "dilated":
        dil, k = 2, 3
        pad = r.choice([0, 2])
    elif flavour == "strided":
        stride = 2
    elif flavour == "pad_mode":
        mode, k = r.choice(["reflect", "replicate", "circular"]), 3
        pad = 1
    pad_s = "'same'" if flavour == "same" else str(pad)
    if flavour == "same":
        dil = r.choice([1, 2])
    bias = r.choice([True, False])
    ctor = (
        f"nn.Conv{d}d({c}, {cout}, {k}, stride={stride}, padding={pad_s}, dilation={dil}, groups={groups}, "
        f"bias={bias}, padding_mode='{mode}')"
    )
    return g.module(f"conv{d}d_{flavour}", ctor, x)


def _g_conv_transpose(g: _Gen) -> bool:
    r = g.rng
    x = g.pick(lambda t: 3 <= t.dim() <= 5 and t.shape[1] <= 16)
    if x is None:
        return False
    t = g.t(x)
    d, c = t.dim() - 2, t.shape[1]
    groups = r.choice([1, 1, r.choice(_divisors(c))])
    cout = groups * r.choice([1, 2])
    stride = r.choice([1, 2])
    k = r.choice([2, 3])
    ctor = f"nn.ConvTranspose{d}d({c}, {cout}, {k}, stride={stride}, padding={r.choice([0, 1])}, groups={groups})"
    return g.module(f"conv_transpose{d}d", ctor, x)


def _g_fconv(g: _Gen) -> bool:
    r = g.rng
    x = g.pick(lambda t: 3 <= t.dim() <= 5 and t.shape[1] <= 16)
    if x is None:
        return False
    t = g.t(x)
    d, c = t.dim() - 2, t.shape[1]
    groups = r.choice([1, 1, r.choice(_divisors(c))])
    cout = groups * r.choice([1, 2, 3])
    k = r.choice([1, 3])
    w, wi = g.param((cout, c // groups) + (k,) * d, 1 / math.sqrt(c // groups * k**d))
    init, bias = [wi], "None"
    if r.random() < 0.5:
        b, bi = g.param((cout,), 0.1)
        init.append(bi)
        bias = f"self.{b}"
    out = g.name("v")
    gs = f", groups={groups}" if groups > 1 or r.random() < 0.5 else ""
    line = f"{out} = F.conv{d}d({x}, self.{w}, {bias}, padding={k // 2}{gs})"
    return g.try_op(f"F.conv{d}d" + ("_groups" if gs else ""), init, [line], [out])


def _g_linear(g: _Gen) -> bool:
    r = g.rng
    x = g.pick(lambda t: t.shape[-1] <= 32)
    if x is None:
        return False
    t = g.t(x)
    dout = r.choice([2, 4, 6, 8, 10])
    style = r.choice(["module", "module", "functional", "channels_last", "matmul_param"])
    if style == "channels_last" and t.dim() >= 3:
        c = t.shape[1]
        m, out = g.name("m"), g.name("v")
        line = f"{out} = self.{m}({x}.transpose(1, -1)).transpose(1, -1)"
        return g.try_op("linear_channels_last", [f"self.{m} = nn.Linear({c}, {dout})"], [line], [out])
    din = t.shape[-1]
    if style == "functional":
        w, wi = g.param((dout, din), 1 / math.sqrt(din))
        b, bi = g.param((dout,), 0.1)
        out = g.name("v")
        return g.try_op(f"F.linear_{t.dim()}d", [wi, bi], [f"{out} = F.linear({x}, self.{w}, self.{b})"], [out])
    if style == "matmul_param":
        w, wi = g.param((din, dout), 1 / math.sqrt(din))
        out = g.name("v")
        return g.try_op("matmul_param", [wi], [f"{out} = {x} @ self.{w}"], [out])
    feature = "linear" if t.dim() == 2 else f"linear_{t.dim()}d" + ("_spatial" if t.dim() >= 3 else "")
    return g.module(feature, f"nn.Linear({din}, {dout}, bias={r.choice([True, False])})", x)


def _norm_init(m: str, affine: bool, stats: bool) -> list[str]:
    out = []
    if affine:
        out += [f"nn.init.uniform_(self.{m}.weight, 0.5, 1.5)", f"nn.init.uniform_(self.{m}.bias, -0.5, 0.5)"]
    if stats:
        out += [f"self.{m}.running_mean.uniform_(-0.5, 0.5)", f"self.{m}.running_var.uniform_(0.5, 2.0)"]
    return out


def _g_norm(g: _Gen) -> bool:
    r = g.rng
    kind = r.choice(["bn", "bn", "gn", "in", "ln", "rms", "fbn", "fln", "fgn"])
    if kind == "bn":
        x = g.pick(lambda t: 2 <= t.dim() <= 5)
        if x is None:
            return False
        t = g.t(x)
        d = {2: 1, 3: 1, 4: 2, 5: 3}[t.dim()]
        affine, track = r.random() < 0.8, r.random() < 0.85
        ctor = f"nn.BatchNorm{d}d({t.shape[1]}, affine={affine}, track_running_stats={track})"
        return g.module(
            f"batchnorm{d}d" + ("" if track else "_nostats"), ctor, x, extra_init=_norm_init("{m}", affine, track)
        )
    if kind == "gn":
        x = g.pick(lambda t: t.dim() >= 2 and t.shape[1] >= 2)
        if x is None:
            return False
        c = g.t(x).shape[1]
        groups = r.choice(_divisors(c))
        # .contiguous(): torch 2.13 segfaults in GroupNorm's channels-last backward when the input needs no
        # gradient but the weight does (fuzz finding 16, a torch bug); a fuzz run must not die of it.
        init = _norm_init("{m}", True, False)
        return g.module("groupnorm", f"nn.GroupNorm({groups}, {c})", f"{x}.contiguous()", extra_init=init)
    if kind == "in":
        x = g.pick(lambda t: 3 <= t.dim() <= 5)
        if x is None:
            return False
        t = g.t(x)
        d = t.dim() - 2
        affine, track = r.random() < 0.5, r.random() < 0.5
        ctor = f"nn.InstanceNorm{d}d({t.shape[1]}, affine={affine}, track_running_stats={track})"
        feature = f"instancenorm{d}d" + ("_tracked" if track else "")
        return g.module(feature, ctor, x, extra_init=_norm_init("{m}", affine, track))
    if kind in ("ln", "rms"):
        x = g.pick(lambda t: t.dim() >= 2)
        if x is None:
            return False
        t = g.t(x)
        shape = tuple(t.shape[-2:]) if t.dim() >= 3 and r.random() < 0.3 else (t.shape[-1],)
        if kind == "ln":
            affine = r.random() < 0.8
            init = ["nn.init.uniform_(self.{m}.weight, 0.5, 1.5)", "nn.init.uniform_(self.{m}.bias, -.5, .5)"]
            return g.module(
                "layernorm", f"nn.LayerNorm({shape}, elementwise_affine={affine})", x, extra_init=init if affine else []
            )
        return g.module(
            "rmsnorm", f"nn.RMSNorm({shape})", x, extra_init=["nn.init.uniform_(self.{m}.weight, 0.5, 1.5)"]
        )
    if kind == "fbn":
        x = g.pick(lambda t: 2 <= t.dim() <= 5)
        if x is None:
            return False
        c = g.t(x).shape[1]
        rm, rmi = g.buffer((c,), f"torch.rand({c}) - 0.5")
        rv, rvi = g.buffer((c,), f"torch.rand({c}) + 0.5")
        w, wi = g.param((c,), 0.3)
        b, bi = g.param((c,), 0.3)
        training = r.choice(["self.training", "False", "False", "True"])
        out = g.name("v")
        line = f"{out} = F.batch_norm({x}, self.{rm}, self.{rv}, self.{w} + 1, self.{b}, training={training})"
        return g.try_op(f"F.batch_norm_{training}", [rmi, rvi, wi, bi], [line], [out])
    if kind == "fln":
        x = g.pick(lambda t: t.dim() >= 2)
        if x is None:
            return False
        d = g.t(x).shape[-1]
        w, wi = g.param((d,), 0.3)
        b, bi = g.param((d,), 0.3)
        out = g.name("v")
        return g.try_op("F.layer_norm", [wi, bi], [f"{out} = F.layer_norm({x}, ({d},), self.{w}, self.{b})"], [out])
    x = g.pick(lambda t: t.dim() >= 3)
    if x is None:
        return False
    c = g.t(x).shape[1]
    groups = r.choice(_divisors(c))
    w, wi = g.param((c,), 0.3)
    b, bi = g.param((c,), 0.3)
    out = g.name("v")
    line = f"{out} = F.group_norm({x}.contiguous(), {groups}, self.{w}, self.{b})"
    return g.try_op("F.group_norm", [wi, bi], [line], [out])


_ACT_MODULES = [
    "nn.ReLU()",
    "nn.ReLU(inplace=True)",
    "nn.GELU()",
    "nn.SiLU()",
    "nn.Tanh()",
    "nn.Sigmoid()",
    "nn.LeakyReLU(0.1)",
    "nn.Hardtanh()",
    "nn.ReLU6()",
    "nn.ELU()",
    "nn.Softplus()",
]
_ACT_EXPRS = [
    "{x}.relu_()",
    "{x}.relu()",
    "torch.relu({x})",
    "F.relu({x}, inplace=True)",
    "F.relu({x})",
    "F.gelu({x})",
    "torch.tanh({x})",
    "{x}.sigmoid()",
    "F.silu({x})",
    "F.leaky_relu({x}, 0.2)",
    "torch.softmax({x}, dim={a})",
    "F.hardtanh({x})",
]


def _g_act(g: _Gen) -> bool:
    r = g.rng
    x = g.pick()
    if x is None:
        return False
    if r.random() < 0.15:
        c = g.t(x).shape[1] if g.t(x).dim() >= 2 else 1
        n = r.choice([1, c])
        return g.module("prelu", f"nn.PReLU({n})", x, extra_init=["nn.init.uniform_(self.{m}.weight, 0.0, 0.5)"])
    if r.random() < 0.4:
        ctor = r.choice(_ACT_MODULES)
        return g.module("act:" + ctor, ctor, x)
    expr = r.choice(_ACT_EXPRS)
    out = g.name("v")
    a = r.randrange(-g.t(x).dim(), g.t(x).dim())
    return g.try_op("act:" + expr.replace("{x}", "x"), [], [f"{out} = {expr.format(x=x, a=a)}"], [out])


def _broadcast_shape(shape: torch.Size, r: random.Random) -> tuple[int, ...]:
    """A shape broadcastable against ``shape`` (channel-wise, last-axis-wise or scalar)."""
    kind = r.choice(["channel", "channel_full", "last", "scalar", "full"])
    if kind == "channel" and len(shape) >= 2:
        return (shape[1],) + (1,) * (len(shape) - 2)
    if kind == "channel_full" and len(shape) >= 2:
        return (1, shape[1]) + (1,) * (len(shape) - 2)
    if kind == "full":
        return (1,) + tuple(shape[1:])
    if kind == "scalar":
        return ()
    return (shape[-1],)


def _g_binary(g: _Gen) -> bool:
    r = g.rng
    x = g.pick()
    if x is None:
        return False
    t = g.t(x)
    op = r.choice(["+", "-", "*", "/"])
    kind = r.choice(["value", "value", "param", "buffer", "scalar", "size", "inplace", "iadd"])
    out = g.name("v")
    init: list[str] = []
    if kind in ("value", "inplace", "iadd"):
        cands = []
        for v in g.values:
            try:
                if v != x and torch.broadcast_shapes(g.t(v).shape, t.shape) == t.shape:
                    cands.append(v)
            except RuntimeError:
                pass
        y = r.choice(cands) if cands else x
        other = f"({y}.abs() + 1)" if op == "/" else y
        if kind == "inplace":
            method = {"+": "add_", "-": "sub_", "*": "mul_", "/": "div_"}[op]
            return g.try_op(f"inplace_{method}", [], [f"{out} = {x}.{method}({other})"], [out])
        if kind == "iadd":
            return g.try_op("augmented_assign", [], [f"{out} = {x}", f"{out} {op}= {other}"], [out])
        form = r.choice(["op", "fn"])
        if form == "fn":
            fn = {"+": "torch.add", "-": "torch.sub", "*": "torch.mul", "/": "torch.div"}[op]
            return g.try_op(f"binary_{fn}", [], [f"{out} = {fn}({x}, {other})"], [out])
        return g.try_op(f"binary_{op}", [], [f"{out} = {x} {op} {other}"], [out])
    if kind in ("param", "buffer"):
        shape = _broadcast_shape(t.shape, r)
        if kind == "param":
            p, s = g.param(shape, 0.5) if shape else g.param((1,), 0.5)
        else:
            p, s = g.buffer(shape if shape else (1,))
        init = [s]
        other = f"(self.{p}.abs() + 0.5)" if op == "/" else f"self.{p}"
        return g.try_op(f"binary_{kind}", init, [f"{out} = {x} {op} {other}"], [out])
    if kind == "scalar":
        c = r.choice([0.5, 2.0, 1.5, 3.0])
        expr = r.choice([f"{x} {op} {c}", f"{c} {op} {x}" if op != "/" else f"{x} / {c}"])
        return g.try_op("binary_scalar", [], [f"{out} = {expr}"], [out])
    a = r.randrange(t.dim())
    expr = r.choice(
        [
            f"{x} / math.sqrt({x}.shape[{a}])",
            f"{x} * (1 / {x}.size(-1))",
            f"{x} * {x}.shape[{a}] ** -0.5",
            f"{x} / {x}.size({a})",
        ]
    )
    return g.try_op("size_as_number", [], [f"{out} = {expr}"], [out])


def _g_cat(g: _Gen) -> bool:
    r = g.rng
    x = g.pick()
    if x is None:
        return False
    t = g.t(x)
    a = r.randrange(t.dim())
    same = [
        v
        for v in g.values
        if g.t(v).dim() == t.dim() and all(g.t(v).shape[i] == t.shape[i] for i in range(t.dim()) if i != a)
    ]
    parts = [x] + r.sample(same, min(len(same), r.choice([1, 1, 2])))
    if len(parts) == 1:
        parts.append(x)
    dim = a if r.random() < 0.7 else a - t.dim()
    cat = f"torch.cat([{', '.join(parts)}], dim={dim})"
    total = sum(g.t(p).shape[a] for p in parts)
    style = r.choice(["plain", "plain", "split_across", "slice", "chunk"])
    out = g.name("v")
    if style == "plain":
        return g.try_op(f"cat_dim{a}", [], [f"{out} = {cat}"], [out])
    if style == "slice" and a == 1:
        k = r.randrange(1, total + 1)
        return g.try_op("cat_slice", [], [f"{out} = {cat}[:, :{k}]"], [out])
    # cut the concatenation at a point that need not line up with the pieces
    k = r.randrange(1, total) if total > 1 else 1
    o1, o2, tup = g.name("v"), g.name("v"), g.name("t")
    if style == "chunk":
        lines = [f"{out} = {cat}", f"{tup} = {out}.chunk(2, dim={dim})", f"{o1} = {tup}[0]", f"{o2} = {tup}[-1]"]
    else:
        lines = [
            f"{out} = {cat}",
            f"{tup} = {out}.split([{k}, {total - k}], dim={dim})",
            f"{o1} = {tup}[0]",
            f"{o2} = {tup}[1]",
        ]
    return g.try_op(f"cat_{style}", [], lines, [out, o1, o2])


def _g_split(g: _Gen) -> bool:
    r = g.rng
    x = g.pick(lambda t: max(t.shape[1:], default=0) >= 2)
    if x is None:
        return False
    t = g.t(x)
    axes = [i for i in range(1, t.dim()) if t.shape[i] >= 2]
    a = r.choice(axes)
    n = t.shape[a]
    tup = g.name("t")
    style = r.choice(["int", "list", "chunk", "size_half", "unbind"])
    if style == "int":
        expr = f"torch.split({x}, {r.randrange(1, n)}, dim={a})"
    elif style == "list":
        k = r.randrange(1, n)
        expr = f"{x}.split([{k}, {n - k}], {a})"
    elif style == "chunk":
        expr = f"{x}.chunk({r.choice([2, 3])}, dim={a})"
    elif style == "size_half":
        expr = f"torch.split({x}, {x}.size({a}) // 2, {a})"
    else:
        if n > 4:
            return False
        expr = f"{x}.unbind({a})"
    outs = [g.name("v"), g.name("v")]
    lines = [f"{tup} = {expr}", f"{outs[0]} = {tup}[0]", f"{outs[1]} = {tup}[-1]"]
    return g.try_op(f"split_{style}", [], lines, outs)


def _g_stack(g: _Gen) -> bool:
    r = g.rng
    x = g.pick(lambda t: t.dim() <= 4)
    if x is None:
        return False
    t = g.t(x)
    same = [v for v in g.values if v != x and g.t(v).shape == t.shape]
    y = r.choice(same) if same else x
    a = r.randrange(t.dim() + 1)
    out = g.name("v")
    return g.try_op(f"stack_dim{a}", [], [f"{out} = torch.stack([{x}, {y}], dim={a})"], [out])


def _g_shape(g: _Gen) -> bool:
    r = g.rng
    x = g.pick()
    if x is None:
        return False
    t = g.t(x)
    n = t.dim()
    out = g.name("v")
    kind = r.choice(["flatten", "view", "reshape_split", "permute", "transpose", "unsqueeze", "squeeze", "contiguous"])
    if kind == "flatten" and n >= 3:
        s = r.randrange(1, n - 1)
        expr = r.choice([f"{x}.flatten({s})", f"torch.flatten({x}, {s})"])
    elif kind == "view" and n >= 3:
        expr = r.choice(
            [f"{x}.view({x}.shape[0], -1)", f"{x}.reshape({x}.size(0), -1)", f"{x}.view(-1, {math.prod(t.shape[1:])})"]
        )
    elif kind == "reshape_split" and n >= 2:
        a = r.randrange(1, n)
        divs = [d for d in _divisors(t.shape[a]) if 1 < d < t.shape[a]]
        if not divs:
            return False
        d = r.choice(divs)
        dims = ["-1" if i == 0 else str(s) for i, s in enumerate(t.shape)]
        dims[a : a + 1] = [str(d), str(t.shape[a] // d)]
        expr = f"{x}.reshape({', '.join(dims)})"
    elif kind == "permute" and n >= 3:
        rest = list(range(1, n))
        r.shuffle(rest)
        expr = f"{x}.permute(0, {', '.join(map(str, rest))})"
    elif kind == "transpose" and n >= 2:
        i, j = r.sample(range(n), 2)
        expr = f"{x}.transpose({i}, {j})"
    elif kind == "unsqueeze":
        expr = f"{x}.unsqueeze({r.randrange(1, n + 1)})"
    elif kind == "squeeze" and 1 in t.shape[1:]:
        a = [i for i in range(1, n) if t.shape[i] == 1][0]
        expr = f"{x}.squeeze({a})"
    elif kind == "contiguous":
        expr = f"{x}.contiguous()"
    else:
        return False
    return g.try_op(kind, [], [f"{out} = {expr}"], [out])


def _g_slice(g: _Gen) -> bool:
    r = g.rng
    x = g.pick(lambda t: t.dim() >= 2)
    if x is None:
        return False
    t = g.t(x)
    c = t.shape[1]
    out = g.name("v")
    kind = r.choice(
        ["head", "full", "full_step", "half", "tail", "stride", "inner", "index", "narrow", "select_last", "index_buf"]
    )
    init: list[str] = []
    if kind == "head" and c >= 2:
        expr = f"{x}[:, :{r.randrange(1, c)}]"
    elif kind == "full":
        expr = f"{x}[:, :{c}]"
    elif kind == "full_step":
        expr = f"{x}[:, 0:{c}:1]"
    elif kind == "half" and c >= 2:
        expr = f"{x}[:, :{x}.shape[1] // 2]"
    elif kind == "tail" and c >= 2:
        expr = f"{x}[:, {r.randrange(1, c)}:]"
    elif kind == "stride" and c >= 2:
        expr = f"{x}[:, ::2]"
    elif kind == "inner" and t.dim() >= 3 and t.shape[-1] >= 3:
        expr = f"{x}[..., 1:-1]"
    elif kind == "index" and t.dim() >= 3:
        expr = f"{x}[:, {r.randrange(c)}]"
    elif kind == "narrow" and c >= 2:
        s = r.randrange(c - 1)
        expr = f"{x}.narrow(1, {s}, {r.randrange(1, c - s + 1)})"
    elif kind == "select_last" and t.dim() >= 3:
        expr = f"{x}[:, :, 0]"
    elif kind == "index_buf" and c >= 2:
        b, bi = g.buffer((0,), f"torch.tensor({sorted(r.sample(range(c), r.randrange(1, c + 1)))})")
        init = [bi]
        expr = f"{x}.index_select(1, self.{b})"
    else:
        return False
    return g.try_op(f"slice_{kind}", init, [f"{out} = {expr}"], [out])


def _g_reduce(g: _Gen) -> bool:
    r = g.rng
    x = g.pick(lambda t: t.dim() >= 2)
    if x is None:
        return False
    t = g.t(x)
    fn = r.choice(["mean", "sum", "amax"])
    keep = r.choice([True, False])
    if t.dim() >= 3 and r.random() < 0.5:
        dims = "(" + ", ".join(str(i) for i in range(2, t.dim())) + ")"
    else:
        dims = str(r.choice([a for a in range(1, t.dim())] + [-1]))
    out = g.name("v")
    scale = " * 0.1" if fn == "sum" else ""
    return g.try_op(f"reduce_{fn}", [], [f"{out} = {x}.{fn}({dims}, keepdim={keep}){scale}"], [out])


def _g_pool(g: _Gen) -> bool:
    r = g.rng
    x = g.pick(lambda t: 3 <= t.dim() <= 5 and min(t.shape[2:]) >= 2)
    if x is None:
        return False
    d = g.t(x).dim() - 2
    kind = r.choice(["max", "avg", "adaptive", "fmax", "favg", "fadaptive"])
    if kind == "max":
        return g.module("maxpool", f"nn.MaxPool{d}d(2)", x)
    if kind == "avg":
        return g.module("avgpool", f"nn.AvgPool{d}d(3, stride=2, padding=1)", x)
    if kind == "adaptive":
        return g.module("adaptive_avgpool", f"nn.AdaptiveAvgPool{d}d({r.choice([1, 2])})", x)
    out = g.name("v")
    expr = {
        "fmax": f"F.max_pool{d}d({x}, 2)",
        "favg": f"F.avg_pool{d}d({x}, 2)",
        "fadaptive": f"F.adaptive_avg_pool{d}d({x}, 1)",
    }[kind]
    return g.try_op(f"F.{kind}pool", [], [f"{out} = {expr}"], [out])


def _g_interp_pad(g: _Gen) -> bool:
    r = g.rng
    x = g.pick(lambda t: 3 <= t.dim() <= 5)
    if x is None:
        return False
    t = g.t(x)
    d = t.dim() - 2
    out = g.name("v")
    if r.random() < 0.5:
        mode = r.choice(["nearest", ["linear", "bilinear", "trilinear"][d - 1]])
        ac = ", align_corners=False" if mode != "nearest" else ""
        if r.random() < 0.5:
            expr = f"F.interpolate({x}, scale_factor=2, mode='{mode}'{ac})"
        else:
            size = tuple(s + 1 for s in t.shape[2:])
            expr = f"F.interpolate({x}, size={size}, mode='{mode}'{ac})"
        return g.try_op(f"interpolate_{mode}", [], [f"{out} = {expr}"], [out])
    mode = r.choice(["constant", "reflect", "replicate", "circular", "channel"])
    if mode == "channel":
        pads = (0, 0) * d + (1, 1)
        expr = f"F.pad({x}, {pads})"
    else:
        pads = tuple(1 for _ in range(2 * r.randrange(1, d + 1)))
        expr = f"F.pad({x}, {pads}, mode='{mode}')"
    return g.try_op(f"pad_{mode}", [], [f"{out} = {expr}"], [out])


def _g_matmul(g: _Gen) -> bool:
    r = g.rng
    x = g.pick(lambda t: t.dim() in (3, 4) and t.shape[-1] <= 16)
    if x is None:
        return False
    t = g.t(x)
    out = g.name("v")
    kind = r.choice(["gram", "gram_t", "bmm", "einsum", "einsum_param", "sdpa", "mha"])
    init: list[str] = []
    if kind == "gram":
        expr = f"torch.matmul({x}, {x}.transpose(-1, -2)) * {1 / t.shape[-1]:.4g}"
    elif kind == "gram_t":
        expr = f"({x}.transpose(-1, -2) @ {x}) * {1 / t.shape[-2]:.4g}"
    elif kind == "bmm" and t.dim() == 3:
        same = [v for v in g.values if g.t(v).shape == t.shape]
        y = r.choice(same)
        expr = f"torch.bmm({x}, {y}.transpose(1, 2)) * {1 / t.shape[-1]:.4g}"
    elif kind == "einsum":
        s = "abcd"[: t.dim()]
        expr = f"torch.einsum('{s},{s[:-2]}e{s[-1]}->{s[:-1]}e', {x}, {x}) * {1 / t.shape[-1]:.4g}"
    elif kind == "einsum_param" and t.dim() == 4:
        c = t.shape[1]
        w, wi = g.param((r.choice([2, 4, 6]), c), 1 / math.sqrt(c))
        init = [wi]
        expr = f"torch.einsum('nchw,dc->ndhw', {x}, self.{w})"
    elif kind == "sdpa":
        same = [v for v in g.values if g.t(v).shape == t.shape]
        k, v = r.choice(same), r.choice(same)
        expr = f"F.scaled_dot_product_attention({x}, {k}, {v})"
    elif kind == "mha" and t.dim() == 3:
        e = t.shape[-1]
        heads = r.choice(_divisors(e))
        m = g.name("m")
        init = [f"self.{m} = nn.MultiheadAttention({e}, {heads}, batch_first=True)"]
        expr = f"self.{m}({x}, {x}, {x}, need_weights=False)[0]"
    else:
        return False
    return g.try_op(f"matmul_{kind}", init, [f"{out} = {expr}"], [out])


def _g_dropout(g: _Gen) -> bool:
    r = g.rng
    x = g.pick()
    if x is None:
        return False
    p = r.choice([0.1, 0.3])
    if r.random() < 0.6:
        if g.t(x).dim() == 4 and r.random() < 0.3:
            return g.module("dropout2d", f"nn.Dropout2d({p})", x)
        return g.module("dropout", f"nn.Dropout({p})", x)
    fp = r.choice([0.0, p])
    out = g.name("v")
    ok = g.try_op(
        "F.dropout" + ("_random" if fp else "_p0"), [], [f"{out} = F.dropout({x}, {fp}, self.training)"], [out]
    )
    if ok and fp:
        g.random_train = True
    return ok


def _g_tied(g: _Gen) -> bool:
    r = g.rng
    if not g.modules:
        return False
    m, shape = r.choice(g.modules)
    same = [v for v in g.values if tuple(g.t(v).shape) == shape]
    if not same:
        return False
    x = r.choice(same)
    out = g.name("v")
    if r.random() < 0.5:
        return g.try_op("tied_module", [], [f"{out} = self.{m}({x})"], [out])
    mod = getattr(g.holder, m)
    if not isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or hasattr(mod, "parametrizations"):
        return False
    ctor = next(s.split(" = ", 1)[1] for s in g.init if s.startswith(f"self.{m} = "))
    new = g.name("m")
    init = [f"self.{new} = {ctor}", f"self.{new}.weight = self.{m}.weight"]
    return g.try_op("tied_parameter", init, [f"{out} = self.{new}({x})"], [out])


def _g_special(g: _Gen) -> bool:
    r = g.rng
    kind = r.choice(["spectral", "embedding_again"])
    if kind == "spectral":
        x = g.pick(lambda t: t.shape[-1] <= 16)
        if x is None:
            return False
        d = g.t(x).shape[-1]
        return g.module("spectral_norm", f"nn.utils.parametrizations.spectral_norm(nn.Linear({d}, {d}))", x)
    if not g.ids:
        return False
    ids, vocab = r.choice(g.ids)
    return _embedding(g, ids, vocab)


def _embedding(g: _Gen, ids: str, vocab: int) -> bool:
    r = g.rng
    dim = r.choice([4, 6, 8])
    max_norm = ", max_norm=1.0" if r.random() < 0.25 else ""
    return g.module("embedding" + ("_max_norm" if max_norm else ""), f"nn.Embedding({vocab}, {dim}{max_norm})", ids)


def _g_block(g: _Gen) -> bool:
    """Composite blocks where widths live: residual conv blocks, MLP blocks, squeeze-excitation, heads."""
    r = g.rng
    kind = r.choice(["res", "res", "mlp", "se", "head", "spatial_linear_dw"])
    if kind in ("res", "se"):
        x = g.pick(lambda t: 3 <= t.dim() <= 5 and t.shape[1] <= 16)
        if x is None:
            return False
        t = g.t(x)
        d, c = t.dim() - 2, t.shape[1]
        a, b, n = g.name("m"), g.name("m"), g.name("m")
        out = g.name("v")
        if kind == "se":
            hidden = r.choice([2, 4])
            init = [f"self.{a} = nn.Conv{d}d({c}, {hidden}, 1)", f"self.{b} = nn.Conv{d}d({hidden}, {c}, 1)"]
            dims = "(" + ", ".join(str(i) for i in range(2, t.dim())) + ")"
            line = f"{out} = {x} * torch.sigmoid(self.{b}(torch.relu(self.{a}({x}.mean({dims}, keepdim=True)))))"
            return g.try_op("block_se", init, [line], [out])
        hidden = r.choice([4, 6, 8])
        init = [
            f"self.{a} = nn.Conv{d}d({c}, {hidden}, 3, padding=1, bias=False)",
            f"self.{n} = nn.BatchNorm{d}d({hidden})",
            *_norm_init(n, True, True),
            f"self.{b} = nn.Conv{d}d({hidden}, {c}, 3, padding=1)",
        ]
        act = r.choice(["torch.relu", "F.gelu", "F.silu"])
        line = f"{out} = {x} + self.{b}({act}(self.{n}(self.{a}({x}))))"
        return g.try_op("block_residual", init, [line], [out])
    if kind == "mlp":
        x = g.pick(lambda t: t.dim() >= 2 and t.shape[-1] <= 16)
        if x is None:
            return False
        dim = g.t(x).shape[-1]
        a, b, n = g.name("m"), g.name("m"), g.name("m")
        hidden = r.choice([4, 8, 12])
        init = [f"self.{n} = nn.LayerNorm({dim})", f"self.{a} = nn.Linear({dim}, {hidden})"]
        init.append(f"self.{b} = nn.Linear({hidden}, {dim})")
        out = g.name("v")
        pre = f"self.{n}({x})" if r.random() < 0.5 else x
        return g.try_op("block_mlp", init, [f"{out} = {x} + self.{b}(F.gelu(self.{a}({pre})))"], [out])
    if kind == "head":
        x = g.pick(lambda t: t.dim() >= 3 and math.prod(t.shape[1:]) <= 256)
        if x is None:
            return False
        m = g.name("m")
        out = g.name("v")
        flat = math.prod(g.t(x).shape[1:])
        init = [f"self.{m} = nn.Linear({flat}, {r.choice([3, 5])})"]
        return g.try_op("block_flatten_linear", init, [f"{out} = self.{m}(torch.flatten({x}, 1))"], [out])
    # Linear over the spatial last axis, then a depthwise conv with a channel multiplier
    x = g.pick(lambda t: t.dim() == 4 and t.shape[1] <= 8)
    if x is None:
        return False
    t = g.t(x)
    a, b = g.name("m"), g.name("m")
    out = g.name("v")
    c = t.shape[1]
    init = [f"self.{a} = nn.Linear({t.shape[-1]}, {r.choice([4, 6])})"]
    init.append(f"self.{b} = nn.Conv2d({c}, {2 * c}, 3, padding=1, groups={c})")
    return g.try_op("block_spatial_linear_depthwise", init, [f"{out} = self.{b}(self.{a}({x}))"], [out])


def _g_adversarial(g: _Gen) -> bool:
    """Ops that move, mix or reduce over channels, where a missing rule would silently be wrong."""
    r = g.rng
    x = g.pick(lambda t: t.dim() >= 2)
    if x is None:
        return False
    t = g.t(x)
    n = t.dim()
    a = r.randrange(1, n)
    init: list[str] = []
    forms = [
        ("flip", f"{x}.flip({a})"),
        ("roll", f"torch.roll({x}, 1, {a})"),
        ("cumsum", f"{x}.cumsum({a}) * 0.3"),
        ("normalize", f"F.normalize({x}, dim={a})"),
        ("std", f"{x}.std({a}, keepdim=True) + {x}"),
        ("logsumexp", f"{x}.logsumexp({a}, keepdim=True) - {x}"),
        ("norm", f"{x} / ({x}.norm(dim={a}, keepdim=True) + 1)"),
        ("max_values", f"{x}.max(dim={a}, keepdim=True).values * {x}"),
        ("topk", f"{x}.topk(1, dim={a}).values + {x}.mean({a}, keepdim=True)"),
        ("sort", f"{x}.sort(dim={a}).values"),
        ("where", f"torch.where({x} > 0, {x}, {x} * 0.1)"),
        ("clamp", f"{x}.clamp(-1.0, 1.0)"),
        ("abs_square", f"{x}.abs() + {x}.square() * 0.1"),
        ("ones_like", f"{x} * torch.ones_like({x}) + {x}.new_zeros({x}.shape)"),
        ("expand_repeat", f"{x}.repeat({', '.join(['1'] + ['2' if i == a else '1' for i in range(1, n)])})"),
        ("none_index", f"{x}[:, None].squeeze(1)"),
        ("list_index", f"{x}[:, [0, {t.shape[1] - 1}]]"),
        ("global_sum", f"{x} - {x}.sum() / {x}.numel()"),
        ("softmax_channels", f"{x}.softmax(1)"),
        ("transpose_mT", f"{x}.mT" if n >= 3 else f"{x}.T.T"),
    ]
    if n == 4 and t.shape[1] % 4 == 0:
        forms.append(("pixel_shuffle", f"F.pixel_shuffle({x}, 2)"))
    if n == 4 and t.shape[2] % 2 == 0 and t.shape[3] % 2 == 0:
        forms.append(("pixel_unshuffle", f"F.pixel_unshuffle({x}, 2)"))
    if n == 4 and min(t.shape[2:]) >= 3:
        forms.append(("unfold", f"F.unfold({x}, 2)"))
    if n >= 2 and t.shape[1] >= 2:
        b, bi = g.buffer((0,), f"(torch.arange({math.prod(t.shape[1:])}) % 3 == 0).reshape({tuple(t.shape[1:])})")
        forms.append(("masked_fill", f"{x}.masked_fill(self.{b}, 0.0)"))
    kind, expr = r.choice(forms)
    if kind == "masked_fill":
        init = [bi]
    out = g.name("v")
    return g.try_op(f"adv_{kind}", init, [f"{out} = {expr}"], [out])


def _g_inplace(g: _Gen) -> bool:
    """In-place patterns: views of a tensor changed in place later, setitem, dropout then add_."""
    r = g.rng
    x = g.pick(lambda t: t.dim() >= 2 and t.shape[1] >= 2)
    if x is None:
        return False
    t = g.t(x)
    h, v, out = g.name("v"), g.name("v"), g.name("v")
    kind = r.choice(["view_then_relu_", "slice_then_mul_", "setitem", "dropout_add_", "clone_add_", "relu_fn_"])
    init: list[str] = []
    if kind == "view_then_relu_":
        lines = [f"{h} = {x} * 1.0", f"{v} = {h}.view({h}.shape[0], -1)", f"{h}.relu_()", f"{out} = {v}"]
        outs = [h, out]
    elif kind == "slice_then_mul_":
        k = r.randrange(1, t.shape[1])
        lines = [f"{h} = {x} + 0.0", f"{v} = {h}[:, :{k}]", f"{h}.mul_(2.0)", f"{out} = {v} + 1.0"]
        outs = [h, out]
    elif kind == "setitem":
        lines = [f"{h} = {x}.clone()", f"{h}[:, :1] = 0.0", f"{out} = {h}"]
        outs = [out]
    elif kind == "dropout_add_":
        m = g.name("m")
        init = [f"self.{m} = nn.Dropout({r.choice([0.1, 0.3])})"]
        lines = [f"{h} = {x} * 1.0", f"{v} = self.{m}({h})", f"{h}.add_({v})", f"{out} = {h}"]
        outs = [out]
    elif kind == "clone_add_":
        lines = [f"{h} = {x}.clone()", f"{h} += {x}", f"{out} = {h}"]
        outs = [out]
    else:
        lines = [f"{h} = {x} - 0.5", f"torch.relu_({h})", f"{out} = {h}"]
        outs = [out]
    return g.try_op(f"inplace_{kind}", init, lines, outs)


_OPS: list[tuple[Callable[[_Gen], bool], float]] = [
    (_g_conv, 5),
    (_g_conv_transpose, 1),
    (_g_fconv, 1),
    (_g_linear, 3),
    (_g_norm, 4),
    (_g_act, 4),
    (_g_binary, 4),
    (_g_cat, 2),
    (_g_split, 1.5),
    (_g_stack, 0.5),
    (_g_shape, 2),
    (_g_slice, 1.5),
    (_g_reduce, 1),
    (_g_pool, 1),
    (_g_interp_pad, 1),
    (_g_matmul, 1),
    (_g_dropout, 1),
    (_g_tied, 1),
    (_g_special, 0.2),
    (_g_block, 3),
    (_g_adversarial, 2),
    (_g_inplace, 1),
]


def _random_input_shape(r: random.Random, batch: int) -> tuple[int, ...]:
    rank = r.choices([2, 3, 4, 5], weights=[2, 3, 5, 1])[0]
    c = r.choice([2, 3, 4, 6, 8])
    if rank == 2:
        return (batch, r.choice([4, 6, 8, 12]))
    if rank == 3:
        return (batch, c, r.choice([4, 5, 8]))
    if rank == 4:
        h = r.choice([4, 5, 6, 8])
        return (batch, c, h, r.choice([h, 4, 6]))
    return (batch, c, r.choice([3, 4]), 4, r.choice([3, 4]))


def _generate_once(seed: int, sub: int, n_ops: int | None) -> Program | None:
    g = _Gen(seed * 7919 + sub)
    r = g.rng
    batch = r.choice([2, 3])
    dtype = "float64" if r.random() < 0.2 else "float32"
    n_inputs = r.choices([1, 2, 3], weights=[7, 2, 1])[0]
    gen = torch.Generator().manual_seed(seed)
    for i in range(n_inputs):
        shape = _random_input_shape(r, batch)
        name = f"x{i}"
        g.inputs.append((name, shape, 0))
        g.scope[name] = torch.randn(*shape, generator=gen)
        g.values.append(name)
        g.unused.append(name)
    if r.random() < 0.15:
        vocab, length = r.choice([10, 20]), r.choice([3, 5])
        g.inputs.append(("ids", (batch, length), vocab))
        g.scope["ids"] = torch.randint(0, vocab, (batch, length), generator=gen)
        g.ids.append(("ids", vocab))
        if not _embedding(g, "ids", vocab):
            return None
    target = n_ops or r.randint(3, 14)
    ops, weights = zip(*_OPS)
    tries = 0
    while sum(g.features.values()) < target and tries < target * 12:
        tries += 1
        r.choices(ops, weights=weights)[0](g)
    floats = [v for v in g.values if not v.startswith("x")]
    if not floats:
        return None
    outs = [floats[-1]]
    sinks = [v for v in g.unused if v not in outs and not v.startswith("x")]
    outs += r.sample(sinks, min(len(sinks), r.choice([0, 0, 1, 2])))
    style = "single" if len(outs) == 1 and r.random() < 0.8 else r.choice(["tuple", "tuple", "dict"])
    return Program(seed, dtype, g.inputs, g.init, g.lines, outs, style, g.features, g.random_train)


def generate(seed: int, n_ops: int | None = None) -> Program:
    """A random program that runs forward and backward in eval and train mode (deterministic in ``seed``)."""
    for sub in range(50):
        program = _generate_once(seed, sub, n_ops)
        if program is not None and _validates(program):
            return program
    raise RuntimeError(f"no valid program for seed {seed}")


def _validates(program: Program) -> bool:
    try:
        model, make_inputs = program.build()
        for batch in (program.batch,):
            model.eval()
            with torch.no_grad():
                outs = _leaves(model(*make_inputs(batch, 1)))
            if not outs or not all(torch.isfinite(o).all() for o in outs):
                return False
            model.train()
            outs = _leaves(model(*make_inputs(batch, 2)))
            loss = sum(o.sum() for o in outs)
            if isinstance(loss, torch.Tensor) and loss.requires_grad:
                loss.backward()
            if not all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters()):
                return False
    except Exception:  # noqa: BLE001 - the generator drops programs that do not run (e.g. in-place vs autograd)
        return False
    return True


# ------------------------------------------------------------------------------------------------ checker


def _leaves(tree: Any) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [x for k in sorted(tree, key=str) for x in _leaves(tree[k])]
    if isinstance(tree, (list, tuple)):
        return [x for v in tree for x in _leaves(v)]
    if hasattr(tree, "values") and callable(tree.values):
        return [x for v in tree.values() for x in _leaves(v)]
    return []


def compare_outputs(reference: Any, candidate: Any, noise: Any = None) -> tuple[float, str]:
    """Worst relative error ``max|d| / max|y|`` over output leaves, computed in float64; inf on a shape change.

    ``noise``: the eager model's float32 outputs when ``reference`` is its float64 run; a leaf's scale is
    then the larger of ``max|y|`` and ``max|y32 - y|``, so an output that is float32 rounding noise (a
    normalisation of a constant) is judged against the size of that noise, not against itself."""
    ref, cand = _leaves(reference), _leaves(candidate)
    floors = _leaves(noise) if noise is not None else [None] * len(ref)
    if len(ref) != len(cand):
        return math.inf, f"{len(cand)} output leaves instead of {len(ref)}"
    worst, where = 0.0, ""
    for i, (a, b, f) in enumerate(zip(ref, cand, floors)):
        if a.shape != b.shape:
            return math.inf, f"output {i} has shape {tuple(b.shape)} instead of {tuple(a.shape)}"
        a64, b64 = a.detach().double(), b.detach().double()
        if a64.numel() == 0:
            continue
        if not torch.isfinite(b64).all() and torch.isfinite(a64).all():
            return math.inf, f"output {i} has non-finite values"
        scale = float(a64.abs().max())
        if f is not None and f.shape == a.shape:
            scale = max(scale, float((f.detach().double() - a64).abs().max()))
        err = float((a64 - b64).abs().max()) / (scale if scale > 0 else 1.0)
        if not err <= worst:
            worst, where = err, f"output {i}"
    return worst, where


def _zero_dropout(model: nn.Module) -> list[tuple[nn.Module, float]]:
    """Set every dropout layer's rate to 0; returns the old rates for :func:`_restore_dropout`."""
    saved = [(m, m.p) for m in model.modules() if isinstance(m, nn.modules.dropout._DropoutNd)]
    for m, _ in saved:
        m.p = 0.0
    return saved


def _restore_dropout(saved: list[tuple[nn.Module, float]]) -> None:
    for m, p in saved:
        m.p = p


def _run(model: nn.Module, inputs: tuple[Any, ...], train: bool, grad: bool = False) -> Any:
    model.train(train)
    args = tuple(t.clone() for t in inputs)
    if grad:
        return model(*args)
    with torch.no_grad():
        return model(*args)


@dataclass
class CheckResult:
    """One (model, transform) outcome."""

    transform: str
    call: str  # the r2r_fx call, as Python source (``gm`` is the captured model)
    outcome: str
    detail: str = ""
    error: float | None = None
    seconds: float = 0.0


@dataclass
class ModelReport:
    """Everything :func:`check_program` found for one program and one graph flavour."""

    seed: int
    via: str
    capture: str  # "ok" | "refused" | "internal"
    capture_detail: str = ""
    batch: int = 0
    results: list[CheckResult] = field(default_factory=list)
    groups_total: int = 0
    groups_widenable: int = 0
    frozen_reasons: Counter = field(default_factory=Counter)
    internal_frozen: int = 0  # frozen groups with producers that are not model inputs/outputs
    internal_reasons: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


def normalize_reason(reason: str) -> str:
    """A frozen reason without node names and numbers, so reasons can be counted by kind."""
    if reason.startswith(("model input", "model output")):
        return reason.split()[0] + " " + reason.split()[1]
    s = re.sub(r"'[^']*'|\"[^\"]*\"", "'#'", reason)
    s = re.sub(r"\b[A-Za-z_][A-Za-z0-9_.]*_\d+\b", "#", s)
    s = re.sub(r"\b(x\d|v\d+|m\d+|p\d+|b\d+|ids)\b", "#", s)
    s = re.sub(r"\d+", "N", s)
    return s[:120]


def _kwargs_with_check(fn: Callable[..., Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    if "check" in inspect.signature(fn).parameters:
        return {**kwargs, "check": False}
    return kwargs


def _call_source(fn_name: str, args: list[str], kwargs: dict[str, Any]) -> str:
    parts = args + [f"{k}={v!r}" for k, v in kwargs.items()]
    return f"r2r_fx.{fn_name}({', '.join(parts)})"


def _transforms(gm: Any, r2r_fx: Any, rng: random.Random, points: int | None) -> list[tuple[str, str, Callable]]:
    """(label, call source, thunk) for every transform to try on ``gm``."""
    out: list[tuple[str, str, Callable]] = []

    def add(label: str, fn_name: str, args: list[str], kwargs: dict[str, Any], call_args: tuple) -> None:
        fn = getattr(r2r_fx, fn_name)
        kw = _kwargs_with_check(fn, kwargs)
        out.append((label, _call_source(fn_name, ["gm"] + args, kw), lambda: fn(gm, *call_args, **kw)))

    extra = rng.choice([1, 2, 3, 4])
    for method in ("r2r", "net2net", "netmorph", "random"):
        add(f"widen/{method}/factor2", "widen", [], {"factor": 2.0, "method": method, "seed": 0}, ())
        add(f"widen/{method}/extra", "widen", [], {"extra": extra, "method": method, "seed": 0}, ())
    try:  # head sizes grow only when asked for: a transform of their own where the program has one
        head_sizes = [g for g in r2r_fx.analyze(gm, head_size=True).groups if g.kind == "head_size" and g.widenable]
    except Exception:  # noqa: BLE001 - the transform itself reports it
        head_sizes = [None]
    for method in ("r2r", "net2net", "netmorph") if head_sizes else ():
        kwargs = {"factor": 2.0, "groups": ["kind:head_size"], "method": method, "seed": 0}
        add(f"widen/{method}/head_size", "widen", [], kwargs, ())
    try:
        ips = [p.node for p in r2r_fx.insertion_points(gm)]
    except Exception:  # noqa: BLE001 - reported by the default deepen below
        ips = []
    for method in ("r2r", "net2net", "netmorph", "random"):
        add(f"deepen/{method}/default", "deepen", [], {"method": method, "seed": 0}, ())
        chosen = ips if points is None else rng.sample(ips, min(points, len(ips)))
        for node in chosen:
            add(f"deepen/{method}/at", "deepen", [], {"at": node, "method": method, "seed": 0}, ())
    for node in gm.graph.nodes:
        size = _conv_kernel(gm, node)
        if size is not None:
            add("grow_kernel", "grow_kernel", [repr(node.name), repr(size + 2)], {}, (node.name, size + 2))
    return out


def _conv_kernel(gm: Any, node: Any) -> int | None:
    """Kernel size (first spatial axis) of a convolution node of either graph flavour, else None."""
    if node.op == "call_module":
        m = gm.get_submodule(str(node.target))
        if isinstance(m, nn.modules.conv._ConvNd):
            return int(m.kernel_size[0])
        return None
    if node.op != "call_function":
        return None
    name = getattr(node.target, "__name__", str(node.target))
    if "conv" not in name or len(node.args) < 2:
        return None
    w = node.args[1]
    val = getattr(w, "meta", {}).get("val", None)
    meta = getattr(w, "meta", {}).get("tensor_meta", None)
    shape = tuple(val.shape) if val is not None else (tuple(meta.shape) if meta is not None else None)
    if shape is None or len(shape) < 3:
        return None
    return int(shape[2])


def _is_random_in_train(model: nn.Module, inputs: tuple[Any, ...]) -> bool:
    """Whether train-mode runs under other seeds differ. Each runs on its own copy: a layer that
    changes its state per call (spectral norm's power iteration) is not randomness. Up to 16 seeds: an
    output that reads few dropout draws can come out the same for several (seed 17400883: 11 and 12;
    seed 18400943, two draws at p = 0.1: four seeds alike about one time in three)."""
    first = None
    for seed in range(11, 27):
        torch.manual_seed(seed)
        run = _leaves(_run(copy.deepcopy(model), inputs, True))
        if first is None:
            first = run
        elif any(x.shape != y.shape or not torch.equal(x, y) for x, y in zip(first, run)):
            return True
    return False


class _Reference:
    """The eager model's outputs on the check inputs, computed once per model from fresh deep copies."""

    def __init__(self, original: nn.Module, inputs: tuple[Any, ...]) -> None:
        self.original, self.inputs = original, inputs
        self._cache: dict[tuple[bool, bool, bool], Any] = {}
        self._random: bool | None = None

    def output(self, train: bool, f64: bool = False, f32: bool = False) -> Any:
        key = (train, f64, f32)
        if key not in self._cache:
            ref = copy.deepcopy(self.original)
            inputs = self.inputs
            if f64:
                ref = ref.double()
                inputs = _double(inputs)
            elif f32:
                ref = ref.float()
                inputs = tuple(t.float() if t.dtype.is_floating_point else t for t in inputs)
            if train:
                _zero_dropout(ref)
            self._cache[key] = _run(ref, inputs, train)
        return self._cache[key]

    def random_in_train(self) -> bool:
        if self._random is None:
            self._random = _is_random_in_train(copy.deepcopy(self.original), self.inputs)
        return self._random


def _double(inputs: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(t.double() if t.dtype.is_floating_point else t for t in inputs)


def _evaluate(
    original: nn.Module,
    grown: nn.Module,
    inputs: tuple[Any, ...],
    program: Program,
    compare: bool,
    reference: _Reference | None = None,
    eval_only: str | None = None,
    replay: Callable[[], bool] | None = None,
) -> tuple[str, str, float | None]:
    """(outcome, detail, error) of a grown model against the eager original (never modified).

    ``grown`` is run as it is (eval, train, backward) and changes (running statistics, gradients).
    ``eval_only``: the reason capture marked the graph eval-only (``gm.meta["r2r_eval_only"]``); the library
    said so, so a train-mode difference is a refusal, not a wrong result. ``replay``: whether the same
    transform of the program built in float64 preserves it (:func:`_f64_replay`); a float32 error that the
    float64 re-run of this grown model does not explain is accepted when the replay is exact and the error is
    within twice the model's own float32 rounding floor (its weights' rounding, amplified as much as the
    model amplifies its own)."""
    reference = reference or _Reference(original, inputs)
    tol = TOL[program.torch_dtype]
    worst: float | None = 0.0
    note = ""
    for train in (False, True):
        mode = "train" if train else "eval"
        try:
            y_ref = reference.output(train)
        except Exception as exc:  # noqa: BLE001
            return "skip", f"eager model fails in {mode} mode: {exc}", None
        if train and program.random_train:
            # random in train mode: values cannot be compared, randomness must be kept
            try:
                random_grown = _is_random_in_train(grown, inputs)
            except Exception as exc:  # noqa: BLE001
                return "broken", f"grown model raises in {mode} mode: {_short(exc)}", None
            if compare and reference.random_in_train() != random_grown:
                detail = "train mode: grown model's randomness differs from eager (dropout lost?)"
                if eval_only:
                    return "refused", f"eval-only capture ({eval_only}); {detail}", None
                return "wrong", detail, None
            continue
        rates = []
        if train:
            rates = _zero_dropout(grown)
            before = [b.clone() for b in grown.buffers()]
        try:
            y = _run(grown, inputs, train)
        except Exception as exc:  # noqa: BLE001
            return "broken", f"grown model raises in {mode} mode: {_short(exc)}", None
        finally:
            # the backward run below uses the real rates: a rate-0 dropout returns its input itself, so an
            # in-place op after it would fail in the eager model too
            _restore_dropout(rates)
        err, where = compare_outputs(y_ref, y)
        if math.isinf(err):
            return "wrong", f"{mode} mode: {where}", err
        if compare and err > tol and program.torch_dtype == torch.float32:
            err64 = _recheck_f64(reference, grown, before if train else None, inputs, train)
            if err64 is not None and err64 <= F64_RECHECK_TOL:
                err = min(err, err64)
                continue
        if compare and err > tol and program.torch_dtype == torch.float64 and _noise_only(reference, y, train, tol):
            continue
        if compare and err > tol and replay is not None and err <= 2 * _floor(reference, train) and replay():
            note = "float32 rounding of the grown weights: the same transform in float64 is exact"
            continue
        if compare and not err <= tol:
            detail = f"{mode} mode: relative error {err:.3g} at {where} (tolerance {tol:g})"
            if train and eval_only:
                return "refused", f"eval-only capture ({eval_only}); {detail}", err
            return "wrong", detail, err
        worst = max(worst or 0.0, err)
    # backward in train mode: must run and give finite gradients
    try:
        out = _leaves(_run(grown, inputs, True, grad=True))
        loss = sum(o.float().sum() for o in out if o.dtype.is_floating_point)
        if isinstance(loss, torch.Tensor) and loss.requires_grad:
            loss.backward()
        bad = [n for n, p in grown.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        if bad:
            return "broken", f"non-finite gradients in {', '.join(bad[:3])}", worst
    except Exception as exc:  # noqa: BLE001
        return "broken", f"backward in train mode raises: {_short(exc)}", worst
    return ("preserved" if compare else "ran"), note, worst


def _floor(reference: _Reference, train: bool) -> float:
    """The eager model's own float32 rounding: its float32 outputs against its float64 ones."""
    try:
        return compare_outputs(reference.output(train, f64=True), reference.output(train))[0]
    except Exception:  # noqa: BLE001 - a model that cannot run in float64 has no floor to compare with
        return 0.0


def _f64_replay(program: Program, via: str, label: str, call: str, points: int | None, inputs: tuple) -> bool:
    """Whether the transform ``(label, call)`` of ``program`` built in float64 preserves it to 1e-9."""
    import r2r_fx

    wide = dataclasses.replace(program, dtype="float64")
    model, make_inputs = wide.build()
    original = copy.deepcopy(model)
    try:
        gm = r2r_fx.capture(model, make_inputs(wide.batch, 0), via=via)
        rng = random.Random(program.seed)
        thunk = next(t for lab, c, t in wide.transforms(gm, r2r_fx, rng, points) if (lab, c) == (label, call))
        outcome, _, _ = _evaluate(original, thunk(), _double(inputs), wide, True)
    except Exception:  # noqa: BLE001 - no replay, no excuse: the float32 error stands
        return False
    return outcome == "preserved"


def _recheck_f64(
    reference: _Reference, grown: nn.Module, buffers: list[torch.Tensor] | None, inputs: tuple[Any, ...], train: bool
) -> float | None:
    """The error re-measured in float64 (``buffers``: the grown model's buffers before its train-mode run)."""
    try:
        cand = copy.deepcopy(grown)
        if buffers is not None:
            with torch.no_grad():
                for b, old in zip(cand.buffers(), buffers):
                    b.copy_(old)
        cand = cand.double()
        if train:
            _zero_dropout(cand)
        err, _ = compare_outputs(
            reference.output(train, f64=True), _run(cand, _double(inputs), train), noise=reference.output(train)
        )
        return err
    except Exception:  # noqa: BLE001 - a graph with float32 baked in cannot be re-run in float64
        return None


def _noise_only(reference: _Reference, candidate: Any, train: bool, tol: float) -> bool:
    """For a float64 model: whether every leaf either agrees to ``tol`` or is rounding noise (the eager
    model's float32 run differs from its float64 run by more than the leaf's own size) and differs by
    at most ``F64_RECHECK_TOL`` of that float32 noise: the float32 models' re-check rule, one precision down."""
    try:
        noise = _leaves(reference.output(train, f32=True))
    except Exception:  # noqa: BLE001 - a model that cannot run in float32: no excuse
        return False
    ref, cand = _leaves(reference.output(train)), _leaves(candidate)
    if not (len(ref) == len(cand) == len(noise)):
        return False
    for a, b, n in zip(ref, cand, noise):
        if a.numel() == 0:
            continue
        a64, b64 = a.detach().double(), b.detach().double()
        delta, size = float((a64 - b64).abs().max()), float(a64.abs().max())
        if delta <= tol * size:
            continue
        floor = float((n.detach().double() - a64).abs().max()) if n.shape == a.shape else 0.0
        if not (floor > size and delta <= F64_RECHECK_TOL * floor):
            return False
    return True


def _short(exc: BaseException) -> str:
    text = " | ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())
    return f"{type(exc).__name__}: {text[:400]}"


def _where(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        if "/r2r_fx/" in frame.filename or "/passes/" in frame.filename:
            return f" [{frame.filename.rsplit('/', 2)[-2]}/{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}]"
    return ""


_CARRY = ("widen/r2r/factor2", "widen/netmorph/extra", "deepen/r2r/default", "deepen/own/r2r/default", "grow_kernel")


def _check_carry_optimizer(r2r_fx: Any, gm: nn.Module, grown: nn.Module, call: str) -> tuple[str, str]:
    """carry_optimizer from an SGD-with-momentum optimizer over ``gm`` to ``grown``: it must cover exactly the
    grown parameters with state of their shapes; after grow_kernel the old momentum sits at the kernel's centre."""
    params = list(dict.fromkeys(gm.parameters()))
    if not params:
        return "refused", "no parameters"
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    for p in params:
        opt.state[p]["momentum_buffer"] = torch.randn(p.shape, generator=gen).to(p.dtype)
    try:
        new = r2r_fx.carry_optimizer(opt, gm, grown)
    except (r2r_fx.R2RError, ValueError) as exc:
        return "refused", _short(exc)
    except Exception as exc:  # noqa: BLE001
        return "internal", _short(exc) + _where(exc)
    carried = [p for group in new.param_groups for p in group["params"]]
    if {id(p) for p in carried} != {id(p) for p in grown.parameters()}:
        return "broken", "the carried optimizer does not hold exactly the grown model's parameters"
    for p in carried:
        buf = new.state.get(p, {}).get("momentum_buffer")
        if buf is not None and buf.shape != p.shape:
            return "broken", f"momentum of shape {tuple(buf.shape)} for a parameter of shape {tuple(p.shape)}"
    adam = torch.optim.Adam(params, lr=1e-3)  # and Adam's moments: the second ones seeded positive
    for p in params:
        adam.state[p] = {
            "step": torch.tensor(5.0),
            "exp_avg": torch.randn(p.shape, generator=gen).to(p.dtype),
            "exp_avg_sq": torch.rand(p.shape, generator=gen).add(0.1).to(p.dtype),
        }
    try:
        new_adam = r2r_fx.carry_optimizer(adam, gm, grown)
    except Exception as exc:  # noqa: BLE001
        return "internal", "Adam: " + _short(exc) + _where(exc)
    for p in grown.parameters():
        state = new_adam.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in state and state[key].shape != p.shape:
                return "broken", f"Adam {key} of shape {tuple(state[key].shape)} for a parameter {tuple(p.shape)}"
        if "exp_avg_sq" in state and not bool(state["exp_avg_sq"].gt(0).all()):
            return "broken", "Adam: a carried second moment is not positive"
    match = re.match(r"r2r_fx\.grow_kernel\(gm, '([^']+)'", call)
    if match:
        node = next((n for n in gm.graph.nodes if n.name == match.group(1)), None)
        if node is not None and node.op == "call_module":
            old_w = gm.get_submodule(str(node.target)).weight
            new_w = grown.get_submodule(str(node.target)).weight
            old_buf = opt.state[old_w]["momentum_buffer"]
            new_buf = new.state.get(new_w, {}).get("momentum_buffer")
            if new_buf is None:
                return "broken", "grow_kernel: the kernel's momentum was dropped"
            centre = tuple(slice(None) for _ in range(2)) + tuple(
                slice((n - o) // 2, (n - o) // 2 + o) for n, o in zip(new_buf.shape[2:], old_buf.shape[2:])
            )
            if not torch.equal(new_buf[centre], old_buf):
                return "broken", "grow_kernel: the old momentum is not at the centre of the grown kernel's momentum"
            rest = new_buf.clone()
            rest[centre] = 0
            if rest.abs().max() > 0:
                return "broken", "grow_kernel: momentum of the new taps is not zero"
    return "preserved", ""


def check_program(program: Program, via: str, *, points: int | None = None, only: str | None = None) -> ModelReport:
    """Capture ``program``'s model with ``via`` and run every transform through the independent check.

    ``points`` limits the deepen ``at=`` points per method (None: all); ``only`` keeps the transforms
    whose label starts with it.
    """
    import r2r_fx

    start = time.perf_counter()
    model, make_inputs = program.build()
    original = copy.deepcopy(model)
    example = make_inputs(program.batch, 0)
    report = ModelReport(program.seed, via, "ok", batch=program.batch)
    try:
        gm = r2r_fx.capture(model, example, via=via)
    except (r2r_fx.R2RError, ValueError) as exc:
        report.capture, report.capture_detail = "refused", _short(exc)
        report.seconds = time.perf_counter() - start
        return report
    except Exception as exc:  # noqa: BLE001
        report.capture, report.capture_detail = "internal", _short(exc) + _where(exc)
        report.seconds = time.perf_counter() - start
        return report
    # another batch size where the captured graph allows it (and agrees with eager there)
    alt = program.batch + 2
    inputs = make_inputs(alt, 123)
    try:
        err, _ = compare_outputs(_run(copy.deepcopy(original), inputs, False), _run(copy.deepcopy(gm), inputs, False))
        if not err <= TOL[program.torch_dtype]:
            report.notes.append(f"captured graph differs from eager at batch {alt} (error {err:.3g})")
            raise ValueError
        report.batch = alt
    except Exception:  # noqa: BLE001
        inputs = make_inputs(program.batch, 123)
    eval_only = gm.meta.get("r2r_eval_only")
    if eval_only:
        report.notes.append(f"capture marked the graph eval-only: {eval_only}")
    train_differs = False
    if not program.random_train:
        ref_t, gm_t = copy.deepcopy(original), copy.deepcopy(gm)
        _zero_dropout(ref_t)
        _zero_dropout(gm_t)
        try:
            err, where = compare_outputs(_run(ref_t, inputs, True), _run(gm_t, inputs, True))
            if not err <= TOL[program.torch_dtype]:
                train_differs = True
                report.notes.append(f"captured graph (no transform) differs from eager in train mode: {err:.3g}")
        except Exception as exc:  # noqa: BLE001
            report.notes.append(f"captured graph fails in train mode: {_short(exc)}")
    try:
        groups = r2r_fx.width_groups(gm)
        report.groups_total = len(groups)
        report.groups_widenable = sum(1 for g in groups if g.widenable)
        for g in groups:
            if not g.widenable:
                report.frozen_reasons[normalize_reason(g.reason)] += 1
                if g.producers and not g.reason.startswith("model "):
                    report.internal_frozen += 1
                    report.internal_reasons[normalize_reason(g.reason)] += 1
    except Exception as exc:  # noqa: BLE001
        report.notes.append(f"width_groups raises: {_short(exc)}{_where(exc)}")
    reference = _Reference(original, inputs)
    rng = random.Random(program.seed)
    given = {k: v.detach().clone() for k, v in gm.state_dict().items()}
    for label, call, thunk in program.transforms(gm, r2r_fx, rng, points):
        if only and not (label.startswith(only) or only == f"carry_optimizer/{label}"):
            continue
        t0 = time.perf_counter()
        outcome = detail = ""
        try:
            grown = thunk()
        except (r2r_fx.R2RError, ValueError) as exc:
            outcome, detail = "refused", _short(exc)
        except Exception as exc:  # noqa: BLE001
            outcome, detail = "internal", _short(exc) + _where(exc)
        changed = _restore_state(gm, given)
        if changed and outcome != "internal":  # a transform returns a new model, the one it was given unchanged
            when = " before it refused" if outcome else ""
            outcome, detail = "wrong", f"the transform changed the model it was given{when}: {', '.join(changed[:3])}"
        if outcome:
            report.results.append(CheckResult(label, call, outcome, detail, None, time.perf_counter() - t0))
            continue
        compare = "/random/" not in label
        replay = None
        if program.torch_dtype == torch.float32:
            replay = functools.cache(functools.partial(_f64_replay, program, via, label, call, points, inputs))
        outcome, detail, err = _evaluate(original, grown, inputs, program, compare, reference, eval_only, replay)
        if outcome == "wrong" and detail.startswith("train mode") and train_differs:
            detail += " [the captured graph already differs from eager in train mode]"
        report.results.append(CheckResult(label, call, outcome, detail, err, time.perf_counter() - t0))
        if outcome == "preserved" and label in _CARRY and (not only or only == f"carry_optimizer/{label}"):
            t0 = time.perf_counter()
            opt_outcome, opt_detail = _check_carry_optimizer(r2r_fx, gm, grown, call)
            opt_call = f"r2r_fx.carry_optimizer(torch.optim.SGD(gm.parameters(), 0.1, momentum=0.9), gm, {call})"
            report.results.append(
                CheckResult(
                    f"carry_optimizer/{label}", opt_call, opt_outcome, opt_detail, None, time.perf_counter() - t0
                )
            )
    report.seconds = time.perf_counter() - start
    return report


def _restore_state(gm: nn.Module, given: dict[str, torch.Tensor]) -> list[str]:
    """Names of ``gm``'s parameters and buffers that differ from ``given`` (or are gone), put back as they were."""
    state = gm.state_dict()
    changed = [k for k, v in given.items() if k not in state or not torch.equal(state[k], v)]
    changed += [k for k in state if k not in given]
    for k in changed:
        if k in state and state[k].shape == given[k].shape:
            with torch.no_grad():
                state[k].copy_(given[k])
    return changed


def failures_report(runs: Iterable[tuple[Program, str]], points: int | None = None, shown: int = 3) -> str:
    """Every wrong / broken / internal outcome (and capture internal error) of checking each (program, via),
    with its seed, transform and call, then the source of the first ``shown`` failing models; "" if none."""
    failures: list[str] = []
    sources: list[str] = []
    for program, via in runs:
        report = check_program(program, via, points=points)
        seed = program.seed
        if report.capture == "internal":
            failures.append(f"seed {seed} via {via}: capture internal error: {report.capture_detail}")
        bad = [r for r in report.results if r.outcome in FAILURES]
        for r in bad:
            failures.append(f"seed {seed} via {via}: {r.transform}: {r.outcome}: {r.detail}\n    {r.call}")
        if (bad or report.capture == "internal") and len(sources) < shown:
            sources.append(f"# ---- seed {seed}, via {via}\n{program.source()}")
    if not failures:
        return ""
    return f"{len(failures)} failing transforms:\n" + "\n".join(failures) + "\n\n" + "\n".join(sources)


_VALUE = re.compile(r"\b(?:v\d+|x\d+)\b")


def _fails_alike(program: Program, via: str, label: str, outcome: str, mode: str) -> bool:
    if not _validates(program):
        return False
    try:
        report = check_program(program, via, only=label)
    except Exception:  # noqa: BLE001 - a candidate the checker cannot even set up is not the same failure
        return False
    return any(r.outcome == outcome and mode in r.detail for r in report.results if r.transform == label)


def _without_line(program: Program, i: int) -> Program | None:
    """``program`` without forward statement ``i``; later uses of its value read its first input instead."""
    line = program.lines[i]
    lines = program.lines[:i] + program.lines[i + 1 :]
    target, sep, expr = line.partition(" = ")
    target = target.strip()
    if not sep:  # augmented assignment (``v3 += v1``): just drop it
        return replace(program, lines=lines)
    if not _VALUE.fullmatch(target):
        return None  # a tuple (split/chunk): its getitems go first
    source = _VALUE.search(expr)
    if source is None:
        return None
    pattern = re.compile(rf"\b{target}\b")
    lines = [pattern.sub(source.group(0), s) for s in lines]
    outputs = list(dict.fromkeys(source.group(0) if o == target else o for o in program.outputs))
    if any(o.startswith("x") for o in outputs):
        return None
    style = program.output_style if len(outputs) > 1 else "single"
    return replace(program, lines=lines, outputs=outputs, output_style=style)


def _attrs(statement: str) -> list[str]:
    return re.findall(r"register_buffer\('(\w+)'", statement) + re.findall(r"self\.(\w+)", statement)


def _prune_init(program: Program) -> Program:
    """Drop ``__init__`` statements of attributes ``forward`` no longer reads (tied sources are kept)."""
    used = set(re.findall(r"self\.(\w+)", "\n".join(program.lines)))
    changed = True
    while changed:
        changed = False
        for s in program.init:
            names = _attrs(s)
            if names and names[0] in used and not set(names) <= used:
                used.update(names)
                changed = True
    return replace(program, init=[s for s in program.init if (_attrs(s) or ["?"])[0] in used])


def _drop_unused_lines(program: Program) -> Program:
    """Drop forward statements whose value nothing reads (dead code)."""
    lines = list(program.lines)
    changed = True
    while changed:
        changed = False
        for i in reversed(range(len(lines))):
            target, sep, _ = lines[i].partition(" = ")
            target = target.strip()
            if not sep or not re.fullmatch(r"[vt]\d+", target) or target in program.outputs:
                continue
            if not any(re.search(rf"\b{target}\b", s) for s in lines[i + 1 :]):
                del lines[i]
                changed = True
    return replace(program, lines=lines)


def minimize(program: Program, via: str, label: str, outcome: str, mode: str = "", budget: float = 60.0) -> Program:
    """Greedy delta debugging: drop statements, dead code and outputs while the same failure (``label``,
    ``outcome``, ``mode`` text in the detail) persists; the smallest program found within ``budget`` seconds."""
    deadline = time.perf_counter() + budget
    best = program
    cand = _prune_init(_drop_unused_lines(program))
    if _fails_alike(cand, via, label, outcome, mode):
        best = cand
    progress = True
    while progress and time.perf_counter() < deadline:
        progress = False
        for o in list(best.outputs[1:]):
            outs = [x for x in best.outputs if x != o]
            cand = _prune_init(_drop_unused_lines(replace(best, outputs=outs, output_style=best.output_style)))
            if len(outs) == 1:
                cand = replace(cand, output_style="single")
            if time.perf_counter() < deadline and _fails_alike(cand, via, label, outcome, mode):
                best, progress = cand, True
        for i in reversed(range(len(best.lines))):
            if i >= len(best.lines) or time.perf_counter() > deadline:
                continue
            cand = _without_line(best, i)
            if cand is None:
                continue
            cand = _prune_init(_drop_unused_lines(cand))
            if _fails_alike(cand, via, label, outcome, mode):
                best, progress = cand, True
    return best


_REPRO_HARNESS = """

# ---- the failing call ------------------------------------------------------------------------------
# transform: {label}
# outcome:   {outcome}: {detail}


def _leaves(t):
    if isinstance(t, torch.Tensor):
        return [t]
    if isinstance(t, dict):
        return [x for k in sorted(t) for x in _leaves(t[k])]
    if isinstance(t, (list, tuple)):
        return [x for v in t for x in _leaves(v)]
    return []


def _rel(a, b):
    a, b = _leaves(a), _leaves(b)
    assert len(a) == len(b), "number of outputs differs"
    worst = 0.0
    for x, y in zip(a, b):
        assert x.shape == y.shape, f"shape {{tuple(y.shape)}} instead of {{tuple(x.shape)}}"
        x, y = x.detach().double(), y.detach().double()
        worst = max(worst, float((x - y).abs().max()) / max(float(x.abs().max()), 1e-300))
    return worst


RANDOM_TRAIN = {random_train}

if __name__ == "__main__":
    import copy

    import r2r_fx

    model = make_model()
    original = copy.deepcopy(model)
    gm = r2r_fx.capture(model, make_inputs(), via={via!r})
    grown = {call}
    inputs = make_inputs({batch}, 123)
    tol = 1e-9 if DTYPE == torch.float64 else 1e-5
    for train in (False, True):
        ref, cand = copy.deepcopy(original).train(train), copy.deepcopy(grown).train(train)
        with torch.no_grad():
            if train and RANDOM_TRAIN:  # F.dropout(p > 0) in train mode: the grown model must stay random
                # (dropout layers as they are: capture turns F.dropout into one; 16 runs, few draws repeat)
                runs = [[_leaves(m(*[t.clone() for t in inputs])) for _ in range(16)] for m in (ref, cand)]
                random_ref, random_cand = (
                    any(not torch.equal(a, b) for r1 in r[1:] for a, b in zip(r[0], r1)) for r in runs
                )
                print("train mode random: eager", random_ref, "grown", random_cand)
                assert random_ref == random_cand, "train mode: the grown model's randomness differs from eager"
                continue
            for m in list(ref.modules()) + list(cand.modules()):
                if isinstance(m, nn.modules.dropout._DropoutNd):
                    m.p = 0.0
            err = _rel(ref(*[t.clone() for t in inputs]), cand(*[t.clone() for t in inputs]))
        print("train" if train else "eval", "relative error", err)
        assert err <= tol, f"not function-preserving: {{err:.3g}} > {{tol:g}}"
    out = copy.deepcopy(grown).train()(*inputs)
    sum(o.sum() for o in _leaves(out)).backward()
    print("ok")
"""


_CARRY_HARNESS = """

# ---- the failing call ------------------------------------------------------------------------------
# transform: {label}
# outcome:   {outcome}: {detail}

if __name__ == "__main__":
    import r2r_fx

    model = make_model()
    gm = r2r_fx.capture(model, make_inputs(), via={via!r})
    opt = torch.optim.SGD(gm.parameters(), lr=0.1, momentum=0.9)
    for p in gm.parameters():
        opt.state[p]["momentum_buffer"] = torch.randn_like(p)
    grown = {call}
    new = r2r_fx.carry_optimizer(opt, gm, grown)
    carried = [p for group in new.param_groups for p in group["params"]]
    assert {{id(p) for p in carried}} == {{id(p) for p in grown.parameters()}}, "not the grown model's parameters"
    for p in carried:
        buf = new.state.get(p, {{}}).get("momentum_buffer")
        assert buf is None or buf.shape == p.shape, f"momentum {{tuple(buf.shape)}} for a parameter {{tuple(p.shape)}}"
    print("ok")
"""


def repro_source(program: Program, report: ModelReport, result: CheckResult) -> str:
    """A standalone file: the model's source plus the failing call and the check."""
    detail = result.detail.replace("\n", " ")
    if result.transform.startswith("carry_optimizer/"):
        inner = result.call[result.call.index("gm, r2r_fx.") + 4 : -1]
        harness = _CARRY_HARNESS.format(
            label=result.transform, outcome=result.outcome, detail=detail, via=report.via, call=inner
        )
        head = f"# r2r_fx fuzz repro: seed {program.seed}, via {report.via}, {result.transform}: {result.outcome}\n"
        return head + program.source() + harness
    harness = _REPRO_HARNESS.format(
        label=result.transform,
        outcome=result.outcome,
        detail=detail,
        via=report.via,
        call=result.call,
        batch=report.batch,
        random_train=program.random_train,
    )
    head = f"# r2r_fx fuzz repro: seed {program.seed}, via {report.via}, {result.transform}: {result.outcome}\n"
    return head + program.source() + harness
