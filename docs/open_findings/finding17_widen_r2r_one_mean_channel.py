# r2r_fx fuzz finding: tools/fuzz.py --kind blocks, seed 18700135 (both capture paths), deepen/own/net2net/widen:
# internal. widen(method="r2r", extra=1) of a stream that a LayerNorm reads raises a RuntimeError.
#
# Expected: the stream of d = 8 channels grows to D = 9 (one whole copy, r = 1 mean channel), or an R2RError.
# Happened: RuntimeError "start (0) + length (1) exceeds dimension size (0)" in R2R.stream_tail
# (r2r_fx/methods.py): on a mean tail it draws r // 2 = 0 columns V and takes the odd channel's zero
# column as ``torch.zeros_like(v.narrow(axis, 0, 1))``, a slice of the empty V. Any odd r works for
# r >= 3; net2net and netmorph are fine; the deepen before the widen in the fuzz call plays no part.
import torch
from torch import nn

import r2r_fx


class PreNorm(nn.Module):
    """x + fc(LayerNorm(x)): the stream x is normalised."""

    def __init__(self, c):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(c), nn.Linear(c, c)

    def forward(self, x):
        return x + self.fc(self.norm(x))


if __name__ == "__main__":
    model = nn.Sequential(nn.Linear(3, 8), PreNorm(8), nn.Linear(8, 5))
    gm = r2r_fx.capture(model, (torch.randn(2, 3),))
    for method, extra in (("r2r", 3), ("net2net", 1), ("netmorph", 1)):
        r2r_fx.widen(gm, extra=extra, method=method, seed=0)  # fine
    r2r_fx.widen(gm, extra=1, method="r2r", seed=0)  # RuntimeError: start (0) + length (1) exceeds dimension size (0)
