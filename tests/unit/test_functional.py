"""The functional layer in a plain PyTorch loop, one process, no DeepSpeed (docs/design.md, section 3)."""

from __future__ import annotations

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
