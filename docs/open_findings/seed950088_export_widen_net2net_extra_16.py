# r2r_fx fuzz repro: seed 950088, via export, widen/net2net/extra: wrong
import math

import torch
import torch.nn.functional as F
from torch import nn

SEED = 950088
DTYPE = torch.float32
BATCH = 3


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.m6 = nn.Linear(3, 6, bias=True)
        self.m11 = nn.AvgPool3d(3, stride=2, padding=1)
        self.m13 = nn.Conv3d(6, 12, 3, stride=1, padding=1, dilation=1, groups=1, bias=True, padding_mode='zeros')
        self.m16 = nn.Conv3d(12, 8, 1, stride=1, padding=0, dilation=1, groups=1, bias=False, padding_mode='zeros')
        self.m22 = nn.BatchNorm3d(8, affine=False, track_running_stats=True)
        self.m22.running_mean.uniform_(-0.5, 0.5)
        self.m22.running_var.uniform_(0.5, 2.0)

    def forward(self, x0):
        v1 = torch.tanh(x0)
        v3 = v1.logsumexp(4, keepdim=True) - v1
        v5 = v3.softmax(1)
        v7 = self.m6(v5)
        v8 = v7 - 0.5
        torch.relu_(v8)
        v10 = v8
        v12 = self.m11(v10)
        v14 = self.m13(v12)
        v15 = v14 + v14
        v17 = self.m16(v15)
        v18 = torch.cat([v17, v17], dim=4)
        t21 = v18.split([5, 1], dim=4)
        v19 = t21[0]
        v20 = t21[1]
        v23 = self.m22(v18)
        return v23


def make_model():
    torch.manual_seed(SEED)
    return Model().to(DTYPE)


def make_inputs(batch=BATCH, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 6, 4, 4, 3, generator=g).to(DTYPE),)


# ---- the failing call ------------------------------------------------------------------------------
# transform: widen/net2net/extra
# outcome:   wrong: train mode: relative error 1.66 at output 0 (tolerance 1e-05)


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
        assert x.shape == y.shape, f"shape {tuple(y.shape)} instead of {tuple(x.shape)}"
        x, y = x.detach().double(), y.detach().double()
        worst = max(worst, float((x - y).abs().max()) / max(float(x.abs().max()), 1e-300))
    return worst


RANDOM_TRAIN = False

if __name__ == "__main__":
    import copy

    import r2r_fx

    model = make_model()
    original = copy.deepcopy(model)
    gm = r2r_fx.capture(model, make_inputs(), via='export')
    grown = r2r_fx.widen(gm, extra=4, method='net2net', seed=0, check=False)
    inputs = make_inputs(5, 123)
    tol = 1e-9 if DTYPE == torch.float64 else 1e-5
    for train in (False, True):
        ref, cand = copy.deepcopy(original).train(train), copy.deepcopy(grown).train(train)
        for m in list(ref.modules()) + list(cand.modules()):
            if isinstance(m, nn.modules.dropout._DropoutNd):
                m.p = 0.0
        with torch.no_grad():
            if train and RANDOM_TRAIN:  # F.dropout(p > 0) in train mode: the grown model must stay random
                runs = [[_leaves(m(*[t.clone() for t in inputs])) for _ in range(2)] for m in (ref, cand)]
                random_ref, random_cand = (any(not torch.equal(a, b) for a, b in zip(*r)) for r in runs)
                print("train mode random: eager", random_ref, "grown", random_cand)
                assert random_ref == random_cand, "train mode: the grown model's randomness differs from eager"
                continue
            err = _rel(ref(*[t.clone() for t in inputs]), cand(*[t.clone() for t in inputs]))
        print("train" if train else "eval", "relative error", err)
        assert err <= tol, f"not function-preserving: {err:.3g} > {tol:g}"
    out = copy.deepcopy(grown).train()(*inputs)
    sum(o.sum() for o in _leaves(out)).backward()
    print("ok")
