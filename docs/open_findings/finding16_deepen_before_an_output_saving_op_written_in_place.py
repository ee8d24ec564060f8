# r2r_fx fuzz repro: seed 16500223, via export, deepen/netmorph/at: broken
import math

import torch
import torch.nn.functional as F
from torch import nn

SEED = 16500223
DTYPE = torch.float32
BATCH = 3


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.m4 = nn.ReLU(inplace=True)
        self.m6 = nn.Conv2d(3, 3, 3, stride=1, padding=1, dilation=1, groups=3, bias=True, padding_mode='zeros')
        self.m9 = nn.Conv2d(3, 4, 3, stride=2, padding=1, dilation=1, groups=1, bias=False, padding_mode='zeros')
        self.m11 = nn.ReLU(inplace=True)
        self.m13 = nn.Linear(3, 10, bias=False)
        self.m15 = nn.InstanceNorm2d(4, affine=True, track_running_stats=False)
        nn.init.uniform_(self.m15.weight, 0.5, 1.5)
        nn.init.uniform_(self.m15.bias, -0.5, 0.5)

    def forward(self, x0):
        v1 = F.dropout(x0, 0.0, self.training)
        v2 = torch.matmul(v1, v1.transpose(-1, -2)) * 0.25
        v3 = v2.sigmoid()
        v5 = self.m4(v3)
        v7 = self.m6(v5)
        v8 = v7.relu_()
        v10 = self.m9(v8)
        v12 = self.m11(v10)
        v14 = self.m13(v12)
        v16 = self.m15(v14)
        return v16


def make_model():
    torch.manual_seed(SEED)
    return Model().to(DTYPE)


def make_inputs(batch=BATCH, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 3, 5, 4, generator=g).to(DTYPE),)


# ---- the failing call ------------------------------------------------------------------------------
# transform: deepen/netmorph/at
# outcome:   broken: backward in train mode raises: RuntimeError: one of the variables needed for gradient computation has been modified by an inplace operation: [torch.FloatTensor [5, 3, 5, 5]], which is output 0 of Sigmoid, is at version 1; expected version 0 instead. Hint: enable anomaly detection to find the operation that failed to compute its gradient, with torch.autograd.set_detect_anomaly(True, check_nan=False).


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
    grown = r2r_fx.deepen(gm, at='mul', method='netmorph', seed=0, check=False)
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
