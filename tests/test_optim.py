"""Growing during training: the optimizer is carried over, the loss does not jump, training goes on."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import r2r_fx

from helpers import random_batch
from zoo import ZOO

TRANSFORMS = {
    "widen-r2r": lambda gm: r2r_fx.widen(gm, factor=2.0, seed=0),
    "widen-net2net": lambda gm: r2r_fx.widen(gm, factor=2.0, seed=0, method="net2net"),
    "widen-netmorph": lambda gm: r2r_fx.widen(gm, factor=2.0, seed=0, method="netmorph"),
    "deepen-r2r": lambda gm: r2r_fx.deepen(gm, seed=0),
    "deepen-netmorph": lambda gm: r2r_fx.deepen(gm, seed=0, method="netmorph"),
    "widen-then-deepen": lambda gm: r2r_fx.deepen(r2r_fx.widen(gm, factor=2.0, seed=0), seed=1),
}
OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-3),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01),
}


def _loss(model: nn.Module, batch, target) -> torch.Tensor:
    return nn.functional.cross_entropy(model(*batch), target)


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("transform", sorted(TRANSFORMS))
@pytest.mark.parametrize("name", ["resnet", "mobilenetv2"])
def test_carry_optimizer_keeps_loss_and_trains_on(name, transform, optimizer):
    model, inputs = ZOO[name]()
    gm = r2r_fx.capture(model, inputs)
    gm.train()
    opt = OPTIMIZERS[optimizer](gm.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    batch, target = random_batch(inputs, 16), torch.randint(0, 10, (16,))
    for _ in range(3):
        opt.zero_grad()
        _loss(gm, batch, target).backward()
        opt.step()
        scheduler.step()
    gm.eval()
    with torch.no_grad():
        before = _loss(gm, batch, target)
    grown = TRANSFORMS[transform](gm)
    new_opt = r2r_fx.carry_optimizer(opt, gm, grown)
    r2r_fx.carry_scheduler(scheduler, new_opt)
    assert type(new_opt) is type(opt)
    assert new_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    grown.eval()
    with torch.no_grad():
        after = _loss(grown, batch, target)
    assert abs(float(after - before)) <= 1e-5 * abs(float(before))
    # old entries keep their state
    old_params = dict(gm.named_parameters())
    for name_, p in grown.named_parameters():
        state = new_opt.state.get(p)
        if name_ in old_params and state:
            key = next(iter(k for k in state if k in ("momentum_buffer", "exp_avg")), None)
            if key and p.shape == old_params[name_].shape:
                torch.testing.assert_close(state[key], opt.state[old_params[name_]][key])
    grown.train()
    losses = []
    for _ in range(3):
        new_opt.zero_grad()
        loss = _loss(grown, batch, target)
        loss.backward()
        new_opt.step()
        scheduler.step()
        losses.append(float(loss))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert scheduler.get_last_lr()[0] < OPTIMIZERS[optimizer]([torch.zeros(1, requires_grad=True)]).defaults["lr"]


def test_param_groups_are_kept():
    model, inputs = ZOO["mlp"]()
    gm = r2r_fx.capture(model, inputs)
    opt = torch.optim.SGD(
        [
            {"params": gm.fc1.parameters(), "lr": 0.1},
            {"params": list(gm.fc2.parameters()) + list(gm.fc3.parameters()), "lr": 0.01, "weight_decay": 0.5},
        ],
        momentum=0.9,
    )
    grown = r2r_fx.widen(gm, factor=2.0, seed=0)
    new_opt = r2r_fx.carry_optimizer(opt, gm, grown)
    assert [g["lr"] for g in new_opt.param_groups] == [0.1, 0.01]
    assert new_opt.param_groups[1]["weight_decay"] == 0.5
    assert new_opt.param_groups[0]["params"][0] is grown.fc1.weight


def test_carry_from_the_eager_model_of_an_exported_capture():
    """Optimizer built on the eager model, capture through torch.export (BatchNorm renamed)."""
    model, inputs = ZOO["resnet"]()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    opt.zero_grad()
    model(*random_batch(inputs, 8)).sum().backward()
    opt.step()
    model.eval()
    gm = r2r_fx.capture(model, inputs, via="export")
    grown = r2r_fx.widen(gm, factor=2.0, seed=0)
    new_opt = r2r_fx.carry_optimizer(opt, model, grown)
    assert sum(len(g["params"]) for g in new_opt.param_groups) == len(list(grown.parameters()))
    assert len(new_opt.state) == len(opt.state)
