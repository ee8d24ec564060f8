"""Growing during training: the optimizer is carried over, the loss does not jump, training goes on."""

from __future__ import annotations

import copy

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


SCALE_KEYS = {"exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum", "exp_inf"}


def _check_new_entries(name: str, key: str, value: torch.Tensor, old_value: torch.Tensor, change) -> None:
    """New entries: zero for momentum-like state; for scale statistics, inside the old entries' range, and
    along a parameter grown on one axis exactly the mean of the old slices."""
    new = value[new_entry_mask(change)]
    if key not in SCALE_KEYS:
        assert new.eq(0).all(), f"{name}: new entries of {key} not zero"
        return
    assert new.ge(old_value.min() * (1 - 1e-6)).all() and new.le(old_value.max() * (1 + 1e-6)).all(), (name, key)
    if len(change.axes) == 1:
        ((axis, info),) = change.axes.items()
        old = old_positions(info.old_runs)
        fresh = torch.ones(value.shape[axis], dtype=torch.bool)
        fresh[old] = False
        expected = old_value.mean(axis, keepdim=True).expand_as(value.index_select(axis, fresh.nonzero().flatten()))
        torch.testing.assert_close(value.index_select(axis, fresh.nonzero().flatten()), expected, msg=name)


def _copy_source(grown: nn.Module, name: str, since) -> str | None:
    """The parameter (in ``grown``'s names) that a copy of the model's own block copies: the same name in
    the block ``at`` before the pass, followed through that pass's renaming."""
    for record in since:
        for block in record.blocks:
            if block.kind.startswith("own:") and name.startswith(block.module + "."):
                before = block.at + name[len(block.module) :]
                return next((n for n, _ in grown.named_parameters() if record.renamed.get(n, n) == before), None)
    return None


def assert_state_carried(opt, old_model: nn.Module, new_opt, grown: nn.Module) -> tuple[int, int]:
    """Every parameter of ``grown`` is in ``new_opt``; the state of a parameter that existed is the old
    state on its old entries, of the new parameter's shape, with new entries zero (momentum) or taken from
    the old entries (scale statistics); a parameter that did not exist starts fresh, or, when it copies a
    parameter of the model's own block, with that parameter's scale statistics and step and zero momentum;
    other state (``step``) is copied. Returns (parameters grown, parameters new)."""
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
            source = _copy_source(grown, name, since)
            source_state = new_opt.state.get(grown.get_parameter(source), {}) if source else {}  # carried
            if state:
                assert source_state and set(state) == set(source_state), f"{name}: seeded without a source"
                for key, value in state.items():
                    if isinstance(value, torch.Tensor) and value.dim() > 0:
                        expected = source_state[key] if key in SCALE_KEYS else torch.zeros_like(value)
                        torch.testing.assert_close(value, expected, rtol=0, atol=0, msg=f"{name} {key}")
                    else:
                        assert value == source_state[key]
            else:
                assert not SCALE_KEYS & set(source_state), f"{name}: a copy's scale statistics were not seeded"
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
                if len(history) == 1:
                    _check_new_entries(name, key, value, old_value, history[0])
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
                _check_new_entries(name, key, state[key], old_state[key], changes[name][-1])
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


def _adamw_split(model: nn.Module) -> torch.optim.AdamW:
    """The common decay / no-decay split: weight decay on matrices, none on biases and norms."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}])


def _step(model: nn.Module, opt: torch.optim.Optimizer, inputs, steps: int = 2) -> None:
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(*random_batch(inputs, 8)).float().pow(2).mean().backward()
        opt.step()


def _groups_by_name(opt: torch.optim.Optimizer, model: nn.Module) -> dict[str, int]:
    index = {id(p): i for i, g in enumerate(opt.param_groups) for p in g["params"]}
    return {n: index[id(p)] for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", ["mlp", "vit"])
def test_new_parameters_join_the_group_of_their_kind(name):
    """A generic block's (mlp) and a copied block's (vit) new matrices go where the model's matrices are
    (weight decay), their biases and norms where the model's biases and norms are."""
    model, inputs = ZOO[name]()
    gm = r2r_fx.capture(model, inputs)
    opt = _adamw_split(gm)
    _step(gm, opt, inputs)
    grown = r2r_fx.deepen(gm.eval(), seed=0)
    new = set(growth_history(grown)[-1].new_params)
    assert new, "nothing was inserted"
    carried = r2r_fx.carry_optimizer(opt, gm, grown)
    groups = _groups_by_name(carried, grown)
    params = dict(grown.named_parameters())
    for n in new:
        assert groups[n] == (0 if params[n].dim() >= 2 else 1), (n, groups[n])
    assert [g["weight_decay"] for g in carried.param_groups] == [0.1, 0.0]


def test_a_copied_block_joins_its_source_group_and_starts_from_its_state():
    """Groups by layer (not by kind): a copy of a block's parameter joins the group of the parameter it
    copies, with that parameter's second moments and step, and zero first moments."""
    model, inputs = ZOO["vit"]()
    gm = r2r_fx.capture(model, inputs)
    names = [n for n, _ in gm.named_parameters()]
    blocks = sorted({n.split(".")[1] for n in names if n.startswith("blocks.")})
    first = [p for n, p in gm.named_parameters() if n.startswith(f"blocks.{blocks[0]}.")]
    rest = [p for n, p in gm.named_parameters() if not n.startswith(f"blocks.{blocks[0]}.")]
    opt = torch.optim.Adam([{"params": rest, "lr": 1e-3}, {"params": first, "lr": 1e-4}])
    _step(gm, opt, inputs)
    grown = r2r_fx.deepen(gm.eval(), after=f"blocks.{blocks[0]}", seed=0)
    (block,) = growth_history(grown)[-1].blocks
    assert block.kind.startswith("own:") and block.at == f"blocks.{blocks[0]}"
    carried = r2r_fx.carry_optimizer(opt, gm, grown)
    groups = _groups_by_name(carried, grown)
    old_params = dict(gm.named_parameters())
    seeded = 0
    for n, p in grown.named_parameters():
        if not n.startswith(block.module + "."):
            continue
        source = block.at + n[len(block.module) :]
        assert groups[n] == 1, n
        state, source_state = carried.state[p], opt.state[old_params[source]]
        assert torch.equal(state["exp_avg_sq"], source_state["exp_avg_sq"]) and not state["exp_avg"].any()
        assert int(state["step"]) == int(source_state["step"]) == 2
        seeded += 1
    assert seeded
    moved = r2r_fx.carry_optimizer(opt, gm, grown, group_of=lambda name, p: 0)  # the user decides
    assert all(_groups_by_name(moved, grown)[n] == 0 for n in growth_history(grown)[-1].new_params)
    _step(grown, carried, inputs)  # and it trains


OTHER_OPTIMIZERS = {
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-3, momentum=0.9, centered=True),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-2),
    "adamax": lambda ps: torch.optim.Adamax(ps, lr=1e-3),
    "nadam": lambda ps: torch.optim.NAdam(ps, lr=1e-3),
    "radam": lambda ps: torch.optim.RAdam(ps, lr=1e-3),
    "amsgrad": lambda ps: torch.optim.Adam(ps, lr=1e-3, amsgrad=True),
    "adadelta": lambda ps: torch.optim.Adadelta(ps),
    "rprop": lambda ps: torch.optim.Rprop(ps, lr=1e-3),
    "adafactor": lambda ps: torch.optim.Adafactor(ps, lr=1e-2),
}


@pytest.mark.parametrize("optimizer", sorted(OTHER_OPTIMIZERS))
def test_other_optimizers_carry_and_train_on(optimizer):
    """Every built-in optimizer with per-parameter state: the carried state has the grown shapes (Adafactor's
    factored moments their factored shapes), scale statistics stay positive, and training steps on."""
    model, inputs = ZOO["resnet"]()
    gm = r2r_fx.capture(model, inputs)
    opt = OTHER_OPTIMIZERS[optimizer](gm.parameters())
    _step(gm, opt, inputs)
    grown = r2r_fx.deepen(r2r_fx.widen(gm.eval(), factor=2.0, seed=0), seed=1)
    carried = r2r_fx.carry_optimizer(opt, gm, grown)
    assert type(carried) is type(opt)
    old = {n: opt.state[p] for n, p in gm.named_parameters()}
    changes = param_changes(grown)
    for n, p in grown.named_parameters():
        state = carried.state.get(p, {})
        for key, value in state.items():
            if not isinstance(value, torch.Tensor) or value.dim() == 0:
                continue
            assert value.dim() == p.dim() and all(s in (d, 1) for s, d in zip(value.shape, p.shape)), (n, key)
            if n in changes and n in old:
                assert value.numel() >= old[n][key].numel(), (n, key)
                if key in SCALE_KEYS | {"row_var", "col_var", "variance", "step_size"}:
                    assert value.ge(0).all() and (value.gt(0).all() or not old[n][key].gt(0).all()), (n, key)
    before = [p.detach().clone() for p in grown.parameters()]
    _step(grown, carried, inputs)
    assert all(torch.isfinite(p).all() for p in grown.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, grown.parameters()))


def test_nested_schedulers_and_grad_scaler_carry_over():
    """A warm-up + cosine SequentialLR continues its schedule exactly as on the ungrown model, and a
    GradScaler keeps its scale and steps the carried optimizer."""
    model, inputs = ZOO["mlp"]()
    gm = r2r_fx.capture(model, inputs)

    def setup(m):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
        warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=3)
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
        return opt, torch.optim.lr_scheduler.SequentialLR(opt, [warm, cosine], milestones=[3])

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    opt, scheduler = setup(gm)
    control_opt, control = setup(copy.deepcopy(gm))
    for _ in range(5):
        opt.zero_grad()
        scaler.scale(gm(*random_batch(inputs, 8)).pow(2).mean()).backward()
        scaler.step(opt)
        scaler.update()
        scheduler.step()
        control_opt.step()
        control.step()
    scale = scaler.get_scale()
    grown = r2r_fx.widen(gm.eval(), factor=2.0, seed=0)
    carried = r2r_fx.carry_optimizer(opt, gm, grown)
    r2r_fx.carry_scheduler(scheduler, carried)
    assert all(inner.optimizer is carried for inner in scheduler._schedulers)
    grown.train()
    before = [p.detach().clone() for p in grown.parameters()]
    for _ in range(8):
        carried.zero_grad()
        scaler.scale(grown(*random_batch(inputs, 8)).pow(2).mean()).backward()
        scaler.step(carried)
        scaler.update()
        scheduler.step()
        control_opt.step()
        control.step()
        assert carried.param_groups[0]["lr"] == pytest.approx(control_opt.param_groups[0]["lr"], rel=1e-12)
    assert scaler.get_scale() >= scale / 2  # the scale carried over (no overflow resets it to init)
    assert any(not torch.equal(a, b) for a, b in zip(before, grown.parameters()))


def test_new_entries_warm_up_linearly_then_the_hook_is_gone():
    """SGD without momentum: a new entry moves by lr * grad * t / warmup at step t, an old one by lr * grad;
    after ``warmup`` steps the hook removes itself; ``warmup=0`` installs none."""
    model, inputs = ZOO["mlp"]()
    gm = r2r_fx.capture(model, inputs)
    opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    grown = r2r_fx.widen(gm, factor=2.0, seed=0)
    carried = r2r_fx.carry_optimizer(opt, gm, grown, warmup=4)
    assert not r2r_fx.carry_optimizer(opt, gm, grown, warmup=0)._optimizer_step_pre_hooks
    changes = param_changes(grown)
    for t in range(1, 6):
        carried.zero_grad()
        grown(*random_batch(inputs, 8)).pow(2).mean().backward()
        before = {n: (p.detach().clone(), p.grad.clone()) for n, p in grown.named_parameters()}
        carried.step()
        for n, p in grown.named_parameters():
            value, grad = before[n]
            expected = torch.full_like(grad, 1.0)
            if n in changes and t < 4:
                expected[new_entry_mask(changes[n][-1])] = t / 4
            torch.testing.assert_close(value - p.detach(), 0.1 * grad * expected, msg=f"{n} at step {t}")
    assert not carried._optimizer_step_pre_hooks


def test_fresh_parameters_of_an_adaptive_optimizer_do_not_ramp():
    """Adam's fresh state would follow a ramp of its gradients (its second moment lags behind them):
    a parameter that did not exist and copies nothing takes Adam's own first step, lr * sign(grad)."""
    model, inputs = ZOO["mlp"]()
    gm = r2r_fx.capture(model, inputs)
    opt = torch.optim.Adam(gm.parameters(), lr=1e-3, eps=1e-30)
    _step(gm, opt, inputs)
    grown = r2r_fx.deepen(gm.eval(), block="generic", seed=0)
    carried = r2r_fx.carry_optimizer(opt, gm, grown)
    new = growth_history(grown)[-1].new_params
    params = dict(grown.named_parameters())
    assert new and all(params[n] not in carried.state for n in new)
    grown.train()
    carried.zero_grad()
    grown(*random_batch(inputs, 8)).pow(2).mean().backward()
    before = {n: (params[n].detach().clone(), params[n].grad.clone()) for n in new}
    carried.step()
    for n in new:
        value, grad = before[n]
        moved = grad != 0
        torch.testing.assert_close((value - params[n].detach())[moved], 1e-3 * grad.sign()[moved], msg=n)


def test_carrying_twice_keeps_the_first_growths_state():
    """grow, carry, train, grow again, carry again: the second carry follows only the second pass (the state
    of what the first pass grew is kept, not dropped, and its new entries do not warm up again)."""
    model, inputs = ZOO["mlp"]()
    gm = r2r_fx.capture(model, inputs)
    opt = torch.optim.Adam(gm.parameters(), lr=1e-3)
    _step(gm, opt, inputs)
    g1 = r2r_fx.widen(gm.eval(), factor=2.0, seed=0)
    opt1 = r2r_fx.carry_optimizer(opt, gm, g1, warmup=0)
    _step(g1, opt1, inputs)
    g2 = r2r_fx.deepen(g1.eval(), block="generic", seed=0)
    opt2 = r2r_fx.carry_optimizer(opt1, g1, g2)
    for name, p in g1.named_parameters():
        carried = opt2.state[g2.get_parameter(name)]
        assert set(carried) == {"step", "exp_avg", "exp_avg_sq"} and int(carried["step"]) == 4, name
        assert torch.equal(carried["exp_avg_sq"], opt1.state[p]["exp_avg_sq"]), name
    ramped = [mask for hook in opt2._optimizer_step_pre_hooks.values() for mask in hook.masks.values()]
    assert all(mask is None for mask in ramped)  # at most the inserted block's parameters ramp, whole


def test_an_optimizer_over_part_of_the_model_keeps_to_its_part():
    model, inputs = ZOO["mlp"]()
    gm = r2r_fx.capture(model, inputs)
    head = torch.optim.SGD(gm.fc3.parameters(), lr=0.1, momentum=0.9)
    grown = r2r_fx.widen(gm, factor=2.0, seed=0)
    carried = r2r_fx.carry_optimizer(head, gm, grown)
    assert [p for g in carried.param_groups for p in g["params"]] == list(grown.fc3.parameters())


def test_shares_of_streams_concatenated_side_by_side_carry_their_own_columns():
    """Swin's patch merging reads four samples of the stream side by side: each piece's shares carry that
    piece's old columns (not the first pieces')."""
    from test_patch_merging import C, Merging, _inputs

    torch.manual_seed(0)
    gm = r2r_fx.capture(Merging().eval(), _inputs())
    opt = torch.optim.Adam(gm.parameters(), lr=1e-3)
    _step(gm, opt, _inputs())
    grown = r2r_fx.widen(gm.eval(), factor=2.0, seed=0, groups=["kind:stream"], check=False)
    old = opt.state[gm.get_parameter("reduction.weight")]["exp_avg"]
    new = r2r_fx.carry_optimizer(opt, gm, grown).state[grown.get_parameter("reduction.weight")]["exp_avg"]
    for piece in range(4):
        column = old[:, piece * C : (piece + 1) * C]
        for share in range(2):
            start = (2 * piece + share) * C
            assert torch.equal(new[: 2 * C, start : start + C], column), (piece, share)
