"""Grow a bundled example model with R2WiderR, verify it in PyTorch and ONNX Runtime, save both.

Run: python examples/quickstart.py [OUTPUT_DIR]
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

import r2r_fx


class SmallResNet(nn.Module):
    """A tiny residual CNN: stem, two residual blocks (one with a projection shortcut), head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.block1 = nn.Sequential(
            nn.Conv2d(16, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
        )
        self.block2 = nn.Sequential(
            nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1, bias=False),
            nn.BatchNorm2d(32),
        )
        self.shortcut = nn.Sequential(nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32))
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.block1(x))
        x = torch.relu(self.shortcut(x) + self.block2(x))
        return self.head(x.mean((2, 3)))


def main(out_dir: str) -> int:
    torch.manual_seed(0)
    model = SmallResNet().eval()
    inputs = (torch.randn(4, 3, 32, 32),)
    gm = r2r_fx.capture(model, inputs)
    print(f"captured via {gm.meta['r2r_graph_level']}-level graph")
    for g in r2r_fx.width_groups(gm):
        state = "widenable" if g.widenable else f"frozen ({g.reason})"
        print(f"  group {g.id}: width {g.width:3d}  producers {', '.join(g.producers) or '-'}  {state}")
    grown = r2r_fx.widen(gm, factor=2.0, seed=0)
    os.makedirs(out_dir, exist_ok=True)
    onnx_path = os.path.join(out_dir, "small_resnet.grown.onnx")
    report = r2r_fx.verify(model, grown, inputs, onnx=True, onnx_path=onnx_path)
    before = sum(p.numel() for p in model.parameters())
    after = sum(p.numel() for p in grown.parameters())
    print(f"parameters {before} -> {after}")
    print(
        f"relative error: eval {report.eval_rel_error:.1e}, train {report.train_rel_error:.1e}, "
        f"ONNX Runtime {report.onnx_max_rel_error:.1e} -> {'function preserved' if report.ok else 'NOT preserved'}"
    )
    torch.save(grown, os.path.join(out_dir, "small_resnet.grown.pt"))
    print(f"wrote {out_dir}/small_resnet.grown.pt and {onnx_path}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "out"))
