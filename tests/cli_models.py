"""Factories for the CLI tests (``cli_models:small_cnn``): plain torch.nn, so pickles load anywhere.

``tiny_llama`` (export-path capture) needs transformers, imported only when it is called.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "llama_like",
    "meta_residual_stack",
    "other_cnn",
    "residual_stack",
    "small_cnn",
    "tiny_llama",
    "tiny_llama_with_cache",
    "token_mlp",
]


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    ).eval()


class Residual(nn.Module):
    """``x + fc2(gelu(fc1(norm(x))))``: one pre-norm MLP block."""

    def __init__(self, width: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(width), nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))


def residual_stack() -> nn.Module:
    """Three residual blocks between an input and an output layer (inputs: 2,8)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.Sequential(*[Residual() for _ in range(3)]), nn.Linear(8, 3)).eval()


def meta_residual_stack() -> nn.Module:
    """``residual_stack`` built on the meta device: shapes and no weights, as a model too big to load."""
    with torch.device("meta"):
        return nn.Sequential(nn.Linear(8, 8), nn.Sequential(*[Residual() for _ in range(3)]), nn.Linear(8, 3)).eval()


def other_cnn() -> nn.Module:
    """Close to ``small_cnn`` but not the same layers: its state_dict does not fit ``small_cnn``."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 16 * 16, 5)).eval()


def token_mlp() -> nn.Module:
    """Token ids in, logits out: a model with a sequence axis that symbolic tracing keeps general."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(64, 16), nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 64)).eval()


def tiny_llama(use_cache: bool = False) -> nn.Module:
    """A one-layer HuggingFace Llama small enough for a test (captured through torch.export)."""
    try:  # transformers imports torchvision, whose CUDA wheels need the CPU shim of tools/torchvision_zoo.py
        from torchvision_zoo import import_torchvision

        import_torchvision()
    except Exception:  # noqa: BLE001, S110 - not installed, or not on sys.path: transformers may do without
        pass
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        use_cache=use_cache,
    )
    return LlamaForCausalLM(config).eval()


def tiny_llama_with_cache() -> nn.Module:
    return tiny_llama(use_cache=True)


def llama_like() -> nn.Module:
    """The test zoo's Llama-like decoder (4 query heads over 2 key/value heads) on int64 ids (2, 7)."""
    from zoo import ZOO

    return ZOO["llama_like"]()[0].eval()
