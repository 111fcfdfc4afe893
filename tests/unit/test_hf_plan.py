"""The Hugging Face integration's transformers-free parts, one process: plan, refusals, log window;
and LDBTrainer's verified transformers range."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from ldb_ds.config import LDBConfig, LDBConfigError
from ldb_ds.controller import LDBController
from ldb_ds.integrations.hf.logs import LogWindow
from ldb_ds.integrations.hf.plan import check_supported, plan_param_groups, split_optimizer_in_place

LDB = {"enabled": True, "keep_first": 1, "keep_last": 1, "batch_kappa": 1, "granularity": "block"}


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)


class Net(nn.Module):
    _no_split_modules = ["Block"]  # as a transformers PreTrainedModel declares it

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, 4)
        self.blocks = nn.ModuleList([Block() for _ in range(3)])
        self.head = nn.Linear(4, 2)


def _decay_split(model):
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if p.ndim >= 2], "weight_decay": 0.05},
            {"params": [p for n, p in named if p.ndim < 2], "weight_decay": 0.0}]


def test_batch_kappa_other_than_one_is_refused_naming_the_fix():
    with pytest.raises(LDBConfigError, match='Set "batch_kappa": 1'):
        check_supported(LDBConfig(enabled=True))  # the paper's default batch_kappa 2
    check_supported(LDBConfig(enabled=True, batch_kappa=1))
    check_supported(LDBConfig(enabled=False))  # LDB off: nothing to refuse
    with pytest.raises(LDBConfigError, match="batch_kappa = 2"):
        plan_param_groups(Net(), {"layer_drop_back": {**LDB, "batch_kappa": 2}})


def test_plan_groups_units_keeping_the_decay_split():
    model = Net()
    plan = plan_param_groups(model, {"layer_drop_back": LDB}, _decay_split(model))
    assert [u.name for u in plan.units] == ["embed", "block:blocks.0", "block:blocks.1", "block:blocks.2", "head"]
    # Each unit gets a decay group (its weight matrix) and a no-decay group (biases, norm).
    assert [len(g["params"]) for g in plan.groups] == [1, 1, 1, 3, 1, 3, 1, 3, 1, 1]
    assert [g["weight_decay"] for g in plan.groups] == [0.05, 0.0] * 5
    assert plan.unit_of_group == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert [list(g["params"]) for g in plan.groups] == plan.params_of_group
    assert plan.params_of_group[0] is not plan.groups[0]["params"]  # a copy DeepSpeed cannot flatten


def test_plan_with_ldb_off_returns_the_groups_as_given():
    model = Net()
    plan = plan_param_groups(model, {"layer_drop_back": {**LDB, "enabled": False}}, _decay_split(model))
    assert len(plan.groups) == 2 and plan.unit_of_group == []


def test_plan_refuses_what_initialize_refuses():
    ds = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "nvme", "nvme_path": "/tmp"}},
          "layer_drop_back": LDB}
    with pytest.raises(ValueError, match="offload_optimizer.device = 'nvme'"):
        plan_param_groups(Net(), ds)


def test_split_optimizer_in_place_keeps_the_object_and_hyperparameters():
    model = Net()
    opt = torch.optim.AdamW(_decay_split(model), lr=3e-3, betas=(0.8, 0.9))
    plan = split_optimizer_in_place(opt, lambda groups: plan_param_groups(model, {"layer_drop_back": LDB}, groups))
    assert opt.param_groups == plan.groups and all(a is b for a, b in zip(opt.param_groups, plan.groups))
    assert all(g["lr"] == 3e-3 and g["betas"] == (0.8, 0.9) for g in opt.param_groups)
    model.head(torch.ones(1, 4)).sum().backward()
    opt.step()
    with pytest.raises(ValueError, match="before its first step"):
        split_optimizer_in_place(opt, lambda groups: plan_param_groups(model, {"layer_drop_back": LDB}, groups))


def test_log_window_means_and_last_values():
    model = Net()
    plan = plan_param_groups(model, {"layer_drop_back": {**LDB, "sampling_rate": 1, "drop_rate": 0.9}})
    c = LDBController(plan.cfg, plan.units, plan.unit_of_group, plan.groups, [u.numel * 4 for u in plan.units])
    w = LogWindow()
    assert w.flush(2) == {}
    c.set_epoch(0)
    w.add_samples(8)
    w.step_end(c.state, 0.5)
    c.set_epoch(1)
    c.open_window()
    assert c.state.dropped_units  # p = 0.9: something is dropped
    w.add_samples(8)
    w.step_end(c.state, 0.5)
    out = w.flush(dp_world_size=2, learning_rate=0.1)
    assert out["LDB/mode"] == 1.0 and out["LDB/lr_factor"] == 2.0  # the last step's
    assert out["LDB/kept_unit_fraction"] == pytest.approx((1.0 + c.state.kept_unit_fraction) / 2)
    assert out["Comm/grad_bytes"] == (c.state.grad_bytes_full + c.state.grad_bytes_step) / 2
    assert out["Train/lr"] == pytest.approx(0.2)
    assert out["Train/samples_per_sec"] == 32.0 and out["Train/samples_per_sec_per_rank"] == 16.0
    assert out["Time/step_ms"] == 500.0
    assert w.flush(2) == {}  # a new window


def test_the_accelerate_recipe_imports_no_transformers():
    code = ("import sys, ldb_ds.integrations.hf as h; h.plan_param_groups; h.ldb_log_values; "
            "print(sorted(m for m in ('transformers', 'accelerate') if m in sys.modules))")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_verified_transformers_range_takes_every_patch_of_its_upper_minor():
    pytest.importorskip("transformers", reason="LDBTrainer needs transformers: pip install 'ldb_ds[hf]'")
    from ldb_ds.integrations.hf.trainer import VERIFIED_TRANSFORMERS, _is_verified_transformers

    assert VERIFIED_TRANSFORMERS == ("5.24.0", "5.25")
    for version in ("5.24.0", "5.24.2", "5.25.0", "5.25.7", "5.25.0rc1"):
        assert _is_verified_transformers(version), version
    for version in ("5.23.9", "5.26.0", "5.26.0.dev0", "6.0.0"):
        assert not _is_verified_transformers(version), version
