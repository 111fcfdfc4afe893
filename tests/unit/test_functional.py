"""The functional layer in a plain PyTorch loop, one process, no DeepSpeed (docs/design.md, section 3)."""

from __future__ import annotations

import contextlib
import copy
import random

import pytest
import torch
from torch import nn

from ldb_ds import LDBConfig, Mode
from ldb_ds import functional as ldb


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
                         nn.Linear(8, 3))


def test_units_and_groups_keep_user_hyperparameters():
    model = _model()
    units = ldb.build_units(model, "module")
    assert [u.name for u in units] == ["0", "2", "4", "6"]
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
    groups, unit_of_group = ldb.build_param_groups(
        units, [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}])
    assert unit_of_group == [0, 0, 1, 1, 2, 2, 3, 3]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0] * 4
    assert all(len(g["params"]) == 1 for g in groups)


def test_apply_mask_sets_requires_grad_and_checks_length():
    model = _model()
    units = ldb.build_units(model, "module")
    ldb.apply_mask(units, [False, True, False, True])
    assert [p.requires_grad for p in model.parameters()] == [True, True, False, False, True, True, False, False]
    with pytest.raises(ValueError, match="3 entries for 4 units"):
        ldb.apply_mask(units, [False] * 3)


def test_hide_groups_restores_groups_and_exact_lr():
    model = _model()
    units = ldb.build_units(model, "module")
    groups, unit_of_group = ldb.build_param_groups(units, [{"params": list(model.parameters())}])
    opt = torch.optim.SGD(groups, lr=0.3)
    all_groups = opt.param_groups
    hidden = ldb.dropped_groups(opt.param_groups, unit_of_group, [False, True, False, False])
    with ldb.hide_groups(opt, hidden, lr_factor=1 / 3) as visible:
        assert len(opt.param_groups) == 3 and all(g is not hidden[0] for g in opt.param_groups)
        assert visible == opt.param_groups
        assert all(g["lr"] == 0.3 * (1 / 3) for g in visible)
    assert opt.param_groups is all_groups
    assert all(g["lr"] == 0.3 for g in opt.param_groups)  # the value, bitwise, not 0.1 * 3


def test_plain_pytorch_ldb_loop_leaves_dropped_units_and_state_untouched():
    """The README/functional docstring loop: momentum and weight decay do not move dropped units."""
    cfg = LDBConfig(enabled=True, keep_first=1, keep_last=1, drop_rate=0.5, sampling_rate=1)
    model = _model()
    units = ldb.build_units(model, cfg.granularity)
    groups, unit_of_group = ldb.build_param_groups(units, [{"params": list(model.parameters())}])
    opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=0.01)
    rng = random.Random(cfg.seed)
    data = torch.Generator().manual_seed(1)
    seen_drop = 0
    for epoch in range(3):
        mode = ldb.epoch_mode(epoch, cfg)
        for _ in range(4):
            dropped = ldb.draw_mask(rng, len(units), cfg) if mode is Mode.DROP else [False] * len(units)
            ldb.apply_mask(units, dropped)
            x = torch.randn(8, 4, generator=data)
            y = torch.randint(0, 3, (8,), generator=data)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            before = {i: ([p.detach().clone() for p in units[i].params],
                          [copy.deepcopy(opt.state.get(p, {})) for p in units[i].params])
                      for i, d in enumerate(dropped) if d}
            with ldb.hide_groups(opt, ldb.dropped_groups(groups, unit_of_group, dropped),
                                 lr_factor=ldb.lr_factor(mode, cfg)):
                opt.step()
            opt.zero_grad()
            for i, (params, states) in before.items():
                seen_drop += 1
                assert all(torch.equal(a, b) for a, b in zip(params, units[i].params))
                for old, p in zip(states, units[i].params):
                    new = opt.state.get(p, {})
                    assert old.keys() == new.keys()
                    assert all(torch.equal(old[k], new[k]) for k in old)
    assert seen_drop > 0  # the check above ran on real dropped units
    ldb.apply_mask(units, [False] * len(units))
    assert all(p.requires_grad for p in model.parameters())


def _grouped(opt_type, **kwargs):
    """A model with one group per (unit, user group): weights decay, biases do not."""
    model = _model()
    units = ldb.build_units(model, "module")
    decay = [p for n, p in model.named_parameters() if n.endswith("weight")]
    no_decay = [p for n, p in model.named_parameters() if n.endswith("bias")]
    groups, _ = ldb.build_param_groups(units, [{"params": decay, "weight_decay": 0.1},
                                               {"params": no_decay, "weight_decay": 0.0}])
    return model, opt_type(groups, **kwargs)


def _train(model, opt, merged: bool, steps: int = 3) -> None:
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        model(torch.randn(5, 4, generator=g)).pow(2).mean().backward()
        if merged:
            with ldb.merged_groups(opt) as groups:
                assert len(groups) == 2  # one per distinct weight decay, not one per (unit, user group)
                opt.step()
        else:
            opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("opt_type,kwargs", [
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "foreach": True}),
    (torch.optim.Adam, {"lr": 0.01, "foreach": True}),
    (torch.optim.Adam, {"lr": 0.01, "foreach": False}),
    (torch.optim.AdamW, {"lr": 0.01, "foreach": True}),
    (torch.optim.AdamW, {"lr": 0.01, "fused": True}),
], ids=["sgd-nesterov", "sgd-foreach", "adam-foreach", "adam-loop", "adamw-foreach", "adamw-fused"])
def test_merged_groups_step_is_bitwise_the_per_group_step(opt_type, kwargs):
    model_a, opt_a = _grouped(opt_type, **kwargs)
    model_b, opt_b = _grouped(opt_type, **kwargs)
    _train(model_a, opt_a, merged=True)
    _train(model_b, opt_b, merged=False)
    for pa, pb in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(pa, pb)
        for k, v in opt_b.state[pb].items():
            assert torch.equal(opt_a.state[pa][k], v), k
    assert len(opt_a.param_groups) == 8 and all(len(g["params"]) == 1 for g in opt_a.param_groups)


def test_merged_groups_runs_the_foreach_kernels_once():
    from torch.profiler import ProfilerActivity, profile

    counts = {}
    for merged in (True, False):
        model, opt = _grouped(torch.optim.SGD, lr=0.1, momentum=0.9, foreach=True)
        _train(model, opt, merged=merged, steps=1)  # momentum buffers exist from here on
        model(torch.ones(2, 4)).sum().backward()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            with ldb.merged_groups(opt) if merged else contextlib.nullcontext():
                opt.step()
        counts[merged] = {e.key: e.count for e in prof.key_averages() if e.key.startswith("aten::_foreach")}
    # Each foreach kernel runs once per group stepped: 2 hyperparameter sets merged, 8 groups not.
    assert counts[True] and counts[False].keys() == counts[True].keys(), counts
    assert all(counts[False][k] == 4 * counts[True][k] for k in counts[True]), counts


def test_merged_groups_leaves_other_optimizers_and_writes_back_changed_hyperparameters():
    _, rms = _grouped(torch.optim.RMSprop, lr=0.1)
    with ldb.merged_groups(rms) as groups:
        assert groups is rms.param_groups and len(groups) == 8
    # ZeRO-3 shows one non-empty group at a time: nothing to merge, the list is left alone.
    p = nn.Parameter(torch.ones(2))
    sgd = torch.optim.SGD([{"params": [p]}] + [{"params": []} for _ in range(5)], lr=0.1)
    with ldb.merged_groups(sgd) as groups:
        assert groups is sgd.param_groups and len(groups) == 6
    model, opt = _grouped(torch.optim.SGD, lr=0.1)
    before = opt.param_groups
    # A step hook that changes a hyperparameter of the (merged) group it sees.
    opt.register_step_post_hook(lambda o, args, kwargs: o.param_groups[0].__setitem__("lr", 0.5))
    model(torch.ones(2, 4)).sum().backward()
    with ldb.merged_groups(opt):
        opt.step()
    assert opt.param_groups is before
    assert [g["lr"] for g in opt.param_groups] == [0.5, 0.1] * 4  # the merged group held the decayed weights


def test_merged_groups_key_reads_values_every_step_and_unhashable_values_by_identity():
    params = [nn.Parameter(torch.ones(2)) for _ in range(4)]
    shared = ["a"]
    opt = torch.optim.SGD([{"params": [params[0]], "tag": shared}, {"params": [params[1]], "tag": shared},
                           {"params": [params[2]], "tag": ["a"]}, {"params": [params[3]], "tag": ["a"]}], lr=0.1)
    cache: dict = {}
    with ldb.merged_groups(opt, cache) as groups:  # equal lists: merged only where the same object
        assert [len(g["params"]) for g in groups] == [2, 1, 1]
    entries = dict(cache)
    assert len(entries) == 4  # the key names of each group dict, read once and kept by the caller
    opt.param_groups[1]["lr"] = 0.2  # a scheduler's write after the names were cached
    with ldb.merged_groups(opt, cache) as groups:
        assert [len(g["params"]) for g in groups] == [1, 1, 1, 1]
    assert all(cache[k] is entries[k] for k in entries)  # same dicts, same keys: nothing rebuilt
    opt.param_groups[1]["lr"] = 0.1
    opt.param_groups[3]["tag"] = shared
    with ldb.merged_groups(opt, cache) as groups:
        assert sorted(len(g["params"]) for g in groups) == [1, 3]
