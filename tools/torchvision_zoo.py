"""Shared helpers for tools and tests that use torchvision's classification models (CPU shim aware)."""

from __future__ import annotations

import importlib
import os
import sys

import torch

__all__ = ["SHIM_DIR", "build", "classification_models", "import_torchvision", "input_shape", "randomize"]

SHIM_DIR = os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "zoo"))

# Models whose architecture fixes the input size run at 224; the others at 128x128, big enough for
# train-mode BatchNorm statistics over the last feature maps (at 64x64 a 2x2 map makes float32 rounding
# visible, see README) and small enough for a 2-core CPU.
_FIXED = {"vit": 224, "swin": 224, "maxvit": 224}
_MIN: dict[str, int] = {}


def import_torchvision():
    """Import torchvision, loading the CPU-ops shim from ../shared/zoo first when it is there."""
    if os.path.isdir(SHIM_DIR) and SHIM_DIR not in sys.path:
        sys.path.insert(0, SHIM_DIR)
    try:
        importlib.import_module("torchvision_cpu_ops")
    except ImportError:
        pass
    return importlib.import_module("torchvision")


def classification_models() -> list[str]:
    tv = import_torchvision()
    return sorted(tv.models.list_models(module=tv.models))


def input_shape(name: str, batch: int = 2) -> tuple[int, int, int, int]:
    size = next((s for prefix, s in _FIXED.items() if name.startswith(prefix)), _MIN.get(name, 128))
    return (batch, 3, size, size)


def build(name: str, batch: int = 2, seed: int = 0) -> tuple[torch.nn.Module, tuple[torch.Tensor]]:
    """A randomly initialised model in eval mode and seeded example inputs (no weight downloads)."""
    tv = import_torchvision()
    torch.manual_seed(seed)
    kwargs = {"aux_logits": False, "init_weights": False} if name in ("googlenet", "inception_v3") else {}
    model = tv.models.get_model(name, weights=None, **kwargs).eval()
    randomize(model)
    return model, (torch.randn(*input_shape(name, batch)),)


def randomize(model: torch.nn.Module) -> None:
    """Make a freshly initialised model a meaningful test: zero-initialised weights (ViT heads,
    zero-init residual gammas) become small random values, and norm layers get non-trivial
    statistics and affine parameters, as a trained model would have."""
    with torch.no_grad():
        for module in model.modules():
            for name, p in module.named_parameters(recurse=False):
                if not p.any():
                    p.normal_(0.0, 0.02)
                    if name == "weight" and p.dim() == 1:
                        p.add_(1.0)
            if isinstance(module, torch.nn.modules.batchnorm._NormBase) and module.running_mean is not None:
                module.running_mean.normal_(0.0, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                if module.weight is not None:
                    module.weight.uniform_(0.5, 1.5)
                    module.bias.normal_(0.0, 0.1)
