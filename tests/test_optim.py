"""Growing during training: the optimizer is carried over, the loss does not jump, training goes on."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import r2r_fx
from r2r_fx.record import growth_history, new_entry_mask, old_positions, param_changes

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


def _old_entries(state: torch.Tensor, changes) -> torch.Tensor:
    """The entries of a grown state tensor at the old positions, undoing the recorded changes newest first."""
    for change in reversed(changes):
        assert tuple(state.shape) == change.shape_after
        for axis, info in change.axes.items():
            state = state.index_select(axis, old_positions(info.old_runs))
        assert tuple(state.shape) == change.shape_before
    return state


def assert_state_carried(opt, old_model: nn.Module, new_opt, grown: nn.Module) -> tuple[int, int]:
    """Every parameter of ``grown`` is in ``new_opt``; the state of a parameter that existed is the old
    state on its old entries and zeros on its new ones, of the new parameter's shape; a parameter that
    did not exist (an inserted block's) has fresh (empty) state; other state (``step``) is copied.
    Returns (parameters grown, parameters new)."""
    old_params = dict(old_model.named_parameters())
    optimised = {id(p) for g in new_opt.param_groups for p in g["params"]}
    changes = param_changes(grown)
    grown_count = fresh_count = 0
    since = growth_history(grown)[len(growth_history(old_model)) :]
    for name, p in grown.named_parameters():
        assert id(p) in optimised, f"{name} is not optimised"
        state = new_opt.state.get(p, {})
        old = name  # a copied block pushes the later ones one index up: the records say so
        for record in reversed(since):
            old = record.renamed.get(old, old) if old else old
        if old not in old_params:
            assert any(name in r.new_params for r in growth_history(grown)), f"{name}: neither old nor recorded new"
            assert not state, f"{name}: a new parameter must start with fresh state, got {sorted(state)}"
            fresh_count += 1
            continue
        old_state = opt.state[old_params[old]]
        assert old_state, f"{name}: the old optimizer has no state for it (the test must step first)"
        assert set(state) == set(old_state), name
        history = changes.get(name, [])
        if tuple(p.shape) != tuple(old_params[old].shape):
            assert history, f"{name} changed shape without a recorded change"
            grown_count += 1
        for key, old_value in old_state.items():
            value = state[key]
            if isinstance(old_value, torch.Tensor) and old_value.dim() > 0:
                assert value.shape == p.shape, (name, key, value.shape, p.shape)
                torch.testing.assert_close(_old_entries(value, history), old_value, rtol=0, atol=0, msg=name)
                if history:
                    assert value[new_entry_mask(history[-1])].eq(0).all(), f"{name}: new entries of {key} not zero"
            else:
                assert value == old_value, (name, key)
    assert grown_count or fresh_count, "nothing was grown"
    return grown_count, fresh_count


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
    grown_count, fresh_count = assert_state_carried(opt, gm, new_opt, grown)
    assert grown_count > 0 if "widen" in transform else grown_count == 0
    assert fresh_count > 0 if "deepen" in transform else fresh_count == 0
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
    gm(*random_batch(inputs)).sum().backward()
    opt.step()
    grown = r2r_fx.widen(gm, factor=2.0, seed=0)
    new_opt = r2r_fx.carry_optimizer(opt, gm, grown)
    assert [g["lr"] for g in new_opt.param_groups] == [0.1, 0.01]
    assert new_opt.param_groups[1]["weight_decay"] == 0.5
    assert new_opt.param_groups[0]["params"] == list(grown.fc1.parameters())
    assert new_opt.param_groups[1]["params"] == list(grown.fc2.parameters()) + list(grown.fc3.parameters())
    assert grown.fc1.weight.shape != gm.fc1.weight.shape  # the first group's parameters did grow
    grown_count, fresh_count = assert_state_carried(opt, gm, new_opt, grown)
    assert grown_count > 0 and fresh_count == 0


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
    assert len(new_opt.state) == len(opt.state) == len(list(grown.parameters()))
    old_shapes = sorted(tuple(p.shape) for p in model.parameters())
    assert sorted(tuple(p.shape) for p in grown.parameters()) != old_shapes  # something grew
    changes = param_changes(grown)
    grown_count = 0
    for old_p, new_p in zip(opt.param_groups[0]["params"], new_opt.param_groups[0]["params"]):
        state, old_state = new_opt.state[new_p], opt.state[old_p]
        assert int(state["step"]) == int(old_state["step"]) == 1
        for key in ("exp_avg", "exp_avg_sq"):
            assert state[key].shape == new_p.shape, key
            if new_p.shape != old_p.shape:
                (name,) = [n for n, q in grown.named_parameters() if q is new_p]
                torch.testing.assert_close(_old_entries(state[key], changes[name]), old_state[key], rtol=0, atol=0)
                assert state[key][new_entry_mask(changes[name][-1])].eq(0).all()
        grown_count += new_p.shape != old_p.shape
    assert grown_count > 0


@pytest.mark.parametrize("kind", ["heads", "head_size"])
def test_carry_optimizer_through_packed_projections(kind):
    """q, k and v packed in one in_proj (three segments per axis): each segment's old rows keep their state,
    each segment's new rows start at zero."""
    model, inputs = ZOO["encoder_pre_ln"]()
    gm = r2r_fx.capture(model, inputs, via="symbolic_trace")
    gm.train()
    opt = torch.optim.Adam(gm.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        gm(*random_batch(inputs, 4)).float().pow(2).mean().backward()
        opt.step()
    grown = r2r_fx.widen(gm.eval(), factor=2.0, seed=0, groups=[f"kind:{kind}"])
    packed = [n for n, changes in param_changes(grown).items() if "in_proj_weight" in n]
    assert packed and all(len(param_changes(grown)[n][-1].axes[0].old_runs) >= 3 for n in packed), packed
    assert_state_carried(opt, gm, r2r_fx.carry_optimizer(opt, gm, grown), grown)
