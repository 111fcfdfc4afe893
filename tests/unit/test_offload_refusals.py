"""ldb_ds.initialize refuses, before DeepSpeed builds anything, the offload variants whose step bypasses its hooks.

Each refused setting is one DeepSpeed accepts; the error names the setting, why it is refused and
what to use instead (ldb_ds/zero_hooks/step_paths.py, ``refuse_unverified_step_paths``, has the DeepSpeed
file:line of each path). Plain ZeRO-Offload is supported and tested on 2 ranks in
tests/dist/test_offload_dist.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ldb_ds
from ldb_ds import zero_hooks


def _config(zero: dict, optimizer: dict | None = None) -> dict:
    return {"train_micro_batch_size_per_gpu": 2, "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False, "zero_optimization": zero,
            "optimizer": optimizer or {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}},
            "layer_drop_back": {"enabled": True, "keep_first": 1, "keep_last": 1}}


CPU = {"device": "cpu"}
REFUSED = {
    "nvme-optimizer": (_config({"stage": 3, "offload_optimizer": {"device": "nvme", "nvme_path": "/tmp"}}),
                       r"offload_optimizer\.device = 'nvme'"),
    "nvme-param": (_config({"stage": 3, "offload_optimizer": CPU, "offload_param": {"device": "nvme",
                                                                                    "nvme_path": "/tmp"}}),
                   r"offload_param\.device = 'nvme'"),
    "nvme-zero2": (_config({"stage": 2, "offload_optimizer": {"device": "nvme", "nvme_path": "/tmp"}}),
                   r"offload_optimizer\.device = 'nvme'"),
    "partial-offload": (_config({"stage": 3, "offload_optimizer": {"device": "cpu", "ratio": 0.5}}),
                        r"ratio = 0\.5 \(partial offload\).*backup optimizer"),
    "super-offload": (_config({"stage": 3, "offload_optimizer": {"device": "cpu", "super_offload": True}}),
                      r"super_offload = true \(SuperOffload\).*step_subgroup"),
    "zenflow": (_config({"stage": 2, "offload_optimizer": CPU, "zenflow": {"topk_ratio": 0.1}}),
                r"zenflow \(ZenFlow\)"),
    "muon": (_config({"stage": 2}, {"type": "Muon", "params": {"lr": 0.01}}), r"the Muon optimizer"),
    "ignore-unused-false": (_config({"stage": 2, "offload_optimizer": CPU, "ignore_unused_parameters": False}),
                            r"ignore_unused_parameters = false.*unused parameter"),
}


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_initialize_refuses_with_the_setting_named(single_rank_env, name):
    cfg, message = REFUSED[name]
    with pytest.raises(ValueError, match=message) as err:
        ldb_ds.initialize(model=_model(), config=cfg)
    assert "does not support" in str(err.value) and "disable layer_drop_back" in str(err.value)


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon is new in torch 2.9")
def test_a_muon_optimizer_instance_is_refused(single_rank_env):
    model = _model()
    muon = torch.optim.Muon([p for p in model.parameters() if p.ndim == 2], lr=0.01)
    with pytest.raises(ValueError, match="the Muon optimizer"):
        ldb_ds.initialize(model=model, optimizer=muon, config=_config({"stage": 2}))


def test_auto_values_do_not_hide_a_refused_setting():
    # Hugging Face's DeepSpeed config templates leave "auto" for the trainer to fill in.
    cfg = _config({"stage": 3, "reduce_bucket_size": "auto", "offload_optimizer": {"device": "nvme", "nvme_path": "/x"}})
    with pytest.raises(ValueError, match="nvme"):
        zero_hooks.refuse_unverified_step_paths(cfg)


def test_every_problem_is_named_at_once():
    cfg = _config({"stage": 3, "offload_optimizer": {"device": "cpu", "ratio": 0.3}, "ignore_unused_parameters": False},
                  {"type": "Muon"})
    with pytest.raises(ValueError) as err:
        zero_hooks.refuse_unverified_step_paths(cfg)
    assert all(s in str(err.value) for s in ("partial offload", "ignore_unused_parameters", "Muon"))


@pytest.mark.parametrize("zero", [
    {"stage": 1, "offload_optimizer": CPU},
    {"stage": 2, "offload_optimizer": CPU},
    {"stage": 2, "cpu_offload": True},  # DeepSpeed's deprecated spelling of the same
    {"stage": 3, "offload_optimizer": CPU, "offload_param": CPU},
    {"stage": 3, "offload_optimizer": {"device": "cpu", "ratio": 1.0}},
    # ZeRO-1/2 ignore ratio (only ZeRO-3 splits sub-groups by it): full offload, supported.
    {"stage": 2, "offload_optimizer": {"device": "cpu", "ratio": 0.5}},
    {"stage": 3, "offload_optimizer": {"device": "none"}},
])
def test_plain_cpu_offload_is_accepted(zero):
    zero_hooks.refuse_unverified_step_paths(_config(zero))
    zero_hooks.refuse_unverified_step_paths(_config(zero, {"type": "AdamW", "params": {"lr": 0.01}}))
