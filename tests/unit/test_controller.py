"""The engine's mask bookkeeping (LDBController), one process: windows, modes, counters, state."""

from __future__ import annotations

import random
import warnings

import pytest
import torch
from torch import nn

from ldb_ds import LDBConfig, Mode
from ldb_ds.controller import LDBController
from ldb_ds.functional import build_param_groups, build_units
from ldb_ds.schedule import draw_dropped


def _controller(**ldb) -> tuple[LDBController, nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(6)])
    cfg = LDBConfig(**{"enabled": True, "keep_first": 1, "keep_last": 1, "drop_rate": 0.5, "sampling_rate": 2, **ldb})
    units = build_units(model, cfg.granularity)
    groups, unit_of_group = build_param_groups(units, [{"params": list(model.parameters())}])
    opt = torch.optim.SGD(groups, lr=0.1)
    c = LDBController(cfg, units, unit_of_group, opt.param_groups, [u.numel * 4 for u in units])
    return c, model, opt


def _window(c: LDBController) -> tuple[int, ...]:
    c.open_window()
    step = c.begin_step()
    dropped = c.state.dropped_units
    assert step.skipped_groups == frozenset(dropped)  # one group per unit here
    c.end_step()
    return dropped


def test_full_epochs_drop_nothing_and_count_steps():
    c, model, _ = _controller()
    assert c.set_epoch(0) is Mode.FULL
    assert [_window(c) for _ in range(3)] == [()] * 3
    assert (c.state.steps, c.state.drop_steps, c.state.dropped_unit_steps) == (3, 0, 0)
    assert all(p.requires_grad for p in model.parameters())


def test_drop_windows_follow_the_seeded_rule_and_apply_requires_grad():
    c, model, _ = _controller()
    assert c.set_epoch(2) is Mode.DROP
    rng = random.Random(c.cfg.seed)
    for _ in range(4):
        c.open_window()
        expected = draw_dropped(rng, 6, c.cfg)
        assert list(c.dropped) == expected
        flags = [m.weight.requires_grad for m in model]
        assert flags == [not d for d in expected]
        assert c.state.grad_bytes_step == sum(4 * 20 for d in expected if not d)
        c.begin_step()
        c.end_step()
    assert c.state.drop_steps == 4
    assert c.state.lr_factor == 2.0 and c.state.batch_factor == 2


def test_mask_is_fixed_inside_a_window_and_set_epoch_refuses_mid_window():
    c, _, _ = _controller()
    c.set_epoch(2)
    c.open_window()
    first = c.state.dropped_units
    c.open_window()  # a second micro batch of the same window: no new draw
    assert c.state.dropped_units == first
    with pytest.raises(RuntimeError, match="middle of a gradient-accumulation window"):
        c.set_epoch(3)
    c.begin_step()
    c.end_step()
    c.set_epoch(3)
    assert c.state.dropped_units == ()


def test_resample_epoch_keeps_one_mask_per_drop_epoch():
    c, _, _ = _controller(resample="epoch", drop_rate=0.6)
    c.set_epoch(2)
    masks = [_window(c) for _ in range(3)]
    assert masks[0] == masks[1] == masks[2]


def test_all_trainable_and_release_mask():
    c, model, _ = _controller(drop_rate=0.9)
    c.set_epoch(2)
    c.open_window()
    assert not all(p.requires_grad for p in model.parameters())
    with c.all_trainable():
        assert all(p.requires_grad for p in model.parameters())
    assert not all(p.requires_grad for p in model.parameters())
    with pytest.raises(RuntimeError, match="middle of a gradient-accumulation window"):
        c.release_mask()
    c.begin_step()
    c.end_step()
    c.release_mask()
    assert all(p.requires_grad for p in model.parameters())


def test_state_dict_round_trip_continues_the_mask_stream():
    a, _, _ = _controller()
    a.set_epoch(2)
    _window(a)
    state = a.state_dict()
    rest_a = [_window(a) for _ in range(3)]
    b, _, _ = _controller()
    b.load_state_dict({**state, "rng_state": list(state["rng_state"])})  # as JSON-ish checkpoints store it
    assert b.state.epoch == 2 and b.state.mode is Mode.DROP and b.state.steps == 1
    assert [_window(b) for _ in range(3)] == rest_a


def test_refresh_group_dicts_follows_a_replaced_optimizer_state():
    c, _, opt = _controller()
    opt.load_state_dict(opt.state_dict())  # torch builds new group dicts
    assert c.group_dicts[0] is not opt.param_groups[0]
    c.refresh_group_dicts(opt.param_groups)
    assert all(a is b for a, b in zip(c.group_dicts, opt.param_groups))


def test_resume_inside_a_resample_epoch_drop_epoch_applies_its_mask():
    a, _, _ = _controller(resample="epoch", drop_rate=0.6)
    a.set_epoch(2)
    mask = _window(a)
    assert mask  # something is dropped, so the check below can fail
    b, model, _ = _controller(resample="epoch", drop_rate=0.6)
    b.load_state_dict(a.state_dict())
    # The epoch's one mask is in place before any window opens, and stays for the next windows.
    assert b.state.dropped_units == mask
    assert [m.weight.requires_grad for m in model] == [i not in mask for i in range(6)]
    assert _window(b) == mask


def test_skipped_step_is_counted_apart_and_the_stream_goes_on():
    c, _, _ = _controller(drop_rate=0.6)
    ref, _, _ = _controller(drop_rate=0.6)
    c.set_epoch(2)
    ref.set_epoch(2)
    masks = []
    for applied in (True, False, True):
        c.open_window()
        c.begin_step()
        masks.append(c.state.dropped_units)
        c.end_step(applied=applied)
    assert masks == [_window(ref) for _ in range(3)]  # the skipped window's draw was used
    assert (c.state.steps, c.state.drop_steps, c.state.skipped_steps) == (2, 2, 1)
    assert c.state.dropped_unit_steps == len(masks[0]) + len(masks[2])
    state = c.state_dict()
    assert state["skipped_steps"] == 1
    old = {k: v for k, v in state.items() if k != "skipped_steps"}  # a checkpoint from before the counter
    c.load_state_dict(old)
    assert c.state.skipped_steps == 0 and c.state.steps == 2


def test_release_between_windows_then_the_epoch_mask_comes_back():
    c, model, _ = _controller(resample="epoch", drop_rate=0.9)
    c.set_epoch(2)
    first = _window(c)
    assert first
    c.release_mask()  # engine.eval() / finish()
    assert all(p.requires_grad for p in model.parameters())
    assert _window(c) == first  # one mask per DROP epoch, applied again, not redrawn
    assert not all(p.requires_grad for p in model.parameters())
    c.open_window()
    c.release_mask(force=True)  # engine.destroy(): an open window is abandoned
    assert not c.window_open and all(p.requires_grad for p in model.parameters())


def _hooks(model: nn.Module) -> int:
    from tests.support.kept_gradient_workers import hook_count

    return hook_count(model)


@pytest.mark.parametrize("keep_first", [0, 1])
def test_kept_gradient_check_watches_one_unit_only_behind_a_dropped_first_unit(keep_first):
    c, model, _ = _controller(keep_first=keep_first)
    c.set_epoch(2)
    armed = []
    for _ in range(10):
        c.open_window()
        first_kept = c.dropped.index(False)
        # Hooks on the first kept unit's parameters only, and only when the first unit is dropped.
        assert _hooks(model) == (len(c.units[first_kept].params) if c.dropped[0] else 0)
        armed.append(c.dropped[0])
        model(torch.randn(2, 4)).sum().backward()  # a plain forward: every kept unit gets a gradient
        c.begin_step()
        c.end_step()
        assert _hooks(model) == 0
        model.zero_grad()
    assert (any(armed) and not all(armed)) if keep_first == 0 else not any(armed)


def _open_a_window_that_drops_the_first_unit(c: LDBController) -> None:
    while True:  # the seed's first such window; the ones before are stepped as usual
        c.open_window()
        if c.dropped[0]:
            return
        c.begin_step()
        c.end_step()


def test_kept_gradient_check_stops_a_step_whose_first_kept_unit_got_no_gradient():
    from torch.utils.checkpoint import checkpoint

    from ldb_ds.kept_gradient import KeptUnitWithoutGradientError

    c, model, _ = _controller(keep_first=0)
    c.set_epoch(2)
    _open_a_window_that_drops_the_first_unit(c)
    # Reentrant checkpointing of everything after the dropped first unit: no input requires grad.
    first_kept = c.dropped.index(False)
    x = model[:first_kept](torch.randn(2, 4))
    with pytest.warns(UserWarning, match="None of the inputs have requires_grad=True"):
        out = checkpoint(model[first_kept:], x, use_reentrant=True)
    assert not out.requires_grad  # nothing to call backward on: the unit can get no gradient
    with pytest.raises(KeptUnitWithoutGradientError, match=rf"unit '{c.units[first_kept].name}'.*use_reentrant=False"):
        c.begin_step()
    assert _hooks(model) == 0
    c.release_mask(force=True)


def test_release_mask_removes_the_kept_gradient_hooks():
    c, model, _ = _controller(keep_first=0)
    c.set_epoch(2)
    _open_a_window_that_drops_the_first_unit(c)
    assert _hooks(model) > 0
    c.release_mask(force=True)  # what destroy() does to a window it abandons
    assert _hooks(model) == 0 and not any(c.dropped)


def test_a_freeze_after_initialize_is_refused_before_a_mask_or_a_load_undoes_it():
    c, model, _ = _controller()
    c.set_epoch(2)
    _window(c)
    dropped = c.dropped.index(True)
    model[dropped].weight.requires_grad_(True)  # unfreezing a dropped unit: its next mask sets it, harmless
    state = c.state_dict()
    c.load_state_dict(state)
    kept = c.dropped.index(False)
    model[kept].weight.requires_grad_(False)
    with pytest.raises(RuntimeError, match=rf"'{kept}.weight' \(unit '{kept}'\) was frozen.*at a checkpoint load"):
        c.load_state_dict(state)
    assert not model[kept].weight.requires_grad  # refused before the load reset the flags


def test_a_checkpoint_with_another_schedule_loads_with_a_warning_naming_the_keys():
    saver, _, _ = _controller()
    saver.set_epoch(2)
    _window(saver)
    same, _, _ = _controller()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        same.load_state_dict(saver.state_dict())  # the same section: silent
    other, _, _ = _controller(seed=99, drop_rate=0.2)
    with pytest.warns(RuntimeWarning, match=r"differs from this engine's in drop_rate, seed: .*saved stream"):
        other.load_state_dict(saver.state_dict())
    assert other.cfg.seed == 99 and other.rng.getstate() == saver.rng.getstate()  # the saved stream goes on
