"""The three small models and shipped datasets of ``tools/growth_experiment.py``.

* ``SmallResNet``: two residual stages on scikit-learn's digits (8x8 images, 10 classes).
* ``TinyViT``: a pre-LN vision transformer on the same digits (2x2 patches, class token).
* ``CharDecoder``: a pre-norm decoder-only language model (RMSNorm, causal attention, SwiGLU) on the
  characters of Python's own source files (``textwrap`` and ``this``'s Zen), next-character loss.

Nothing is downloaded: the digits ship with scikit-learn, the text with the Python standard library.
Each task is a ``Task``: a model builder, training batches and a fixed evaluation set.
"""

from __future__ import annotations

import codecs
import contextlib
import inspect
import io
import textwrap
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class SmallResNet(nn.Module):
    """Two residual stages on 8x8 digits: stem, block, downsample block, pool, head."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        w = width
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.block1 = nn.Sequential(
            nn.Conv2d(w, w, 3, padding=1, bias=False),
            nn.BatchNorm2d(w),
            nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1, bias=False),
            nn.BatchNorm2d(w),
        )
        self.down = nn.Sequential(nn.Conv2d(w, 2 * w, 1, stride=2, bias=False), nn.BatchNorm2d(2 * w))
        self.block2 = nn.Sequential(
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * w),
            nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * w),
        )
        self.head = nn.Linear(2 * w, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.block1(x))
        x = torch.relu(self.down(x) + self.block2(x))
        return self.head(x.mean((2, 3)))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, causal: bool) -> None:
        super().__init__()
        self.heads, self.head_dim, self.causal = heads, dim // heads, causal
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = (f(x).view(b, t, self.heads, self.head_dim).transpose(1, 2) for f in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.o(out.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class ViTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, causal=False)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyViT(nn.Module):
    """Pre-LN ViT on 8x8 digits: 2x2 patches (16 tokens), class token, position embedding, LN, head."""

    def __init__(self, dim: int = 32, heads: int = 2, hidden: int = 64, depth: int = 2) -> None:
        super().__init__()
        self.patch = nn.Conv2d(1, dim, 2, stride=2)
        self.cls = nn.Parameter(0.02 * torch.randn(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, 17, dim))
        self.blocks = nn.Sequential(*(ViTBlock(dim, heads, hidden) for _ in range(depth)))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        return self.head(self.norm(self.blocks(x))[:, 0])


class DecoderBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.n1, self.n2 = nn.RMSNorm(dim, eps=1e-6), nn.RMSNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads, causal=True)
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.n1(x))
        h = self.n2(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class CharDecoder(nn.Module):
    """Pre-norm decoder-only LM over characters: embedding, blocks, final RMSNorm, untied head."""

    def __init__(self, vocab: int, dim: int = 32, heads: int = 2, hidden: int = 64, depth: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.Sequential(*(DecoderBlock(dim, heads, hidden) for _ in range(depth)))
        self.norm = nn.RMSNorm(dim, eps=1e-6)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(self.blocks(self.embed(ids))))


@dataclass
class Task:
    """A model builder, training data, a fixed evaluation set and the loss."""

    name: str
    build: Callable[[], nn.Module]
    example: torch.Tensor  # a small input for capture
    batch: Callable[[torch.Generator, int], tuple[torch.Tensor, torch.Tensor]]  # training minibatch
    eval_set: tuple[torch.Tensor, torch.Tensor]  # the "full data" the loss curve is measured on
    val_set: tuple[torch.Tensor, torch.Tensor] | None  # held out, for accuracy (classification only)

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.flatten(0, -2), target.flatten())


def digits(train: int = 1400) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 1797 digits in [0, 1], shuffled once: (train x, train y, validation x, validation y);
    the validation split is always the last 397 images."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
    x, y = x[order], y[order]
    return x[:train], y[:train], x[1400:], y[1400:]


def _image_task(name: str, build: Callable[[], nn.Module], train: int) -> Task:
    xtr, ytr, xva, yva = digits(train)

    def batch(generator: torch.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = torch.randint(0, len(ytr), (size,), generator=generator)
        return xtr[index], ytr[index]

    return Task(name, build, xtr[:4], batch, (xtr, ytr), (xva, yva))


def python_text() -> str:
    """Text the standard library ships: the source of ``textwrap`` and the Zen of Python (``this``)."""
    with contextlib.redirect_stdout(io.StringIO()):  # importing ``this`` prints the Zen
        import this

    zen = codecs.decode(this.s, "rot13")
    return inspect.getsource(textwrap) + "\n" + zen


def _text_task(context: int = 32) -> Task:
    text = python_text()
    chars = sorted(set(text))
    ids = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    train = ids
    starts = torch.linspace(0, len(train) - context - 2, 256).long()  # a fixed sample of training windows
    eval_x = torch.stack([train[s : s + context] for s in starts])
    eval_y = torch.stack([train[s + 1 : s + context + 1] for s in starts])

    def batch(generator: torch.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = torch.randint(0, len(train) - context - 1, (size,), generator=generator)
        window = s[:, None] + torch.arange(context + 1)
        return train[window[:, :-1]], train[window[:, 1:]]

    return Task("lm", lambda: CharDecoder(len(chars)), eval_x[:2], batch, (eval_x, eval_y), None)


def task(name: str, train: int = 1400) -> Task:
    """``cnn`` (``cnn-sgd``: the same with SGD), ``vit`` or ``lm``; ``train`` limits the digits' training split
    (the harder Table 2 variant)."""
    if name in ("cnn", "cnn-sgd"):
        return _image_task(name, lambda: SmallResNet(8), train)
    if name == "vit":
        return _image_task("vit", lambda: TinyViT(), train)
    if name == "lm":
        return _text_task()
    raise ValueError(f"unknown task {name!r} (cnn, cnn-sgd, vit or lm)")
