"""Units and param groups for a Hugging Face model, shared by LDBTrainer and the Accelerate recipe.

No transformers import here: a Hugging Face model is an ``nn.Module``, and the core reads its
``_no_split_modules`` (``ViTLayer``, ``BertLayer``) for ``granularity: "block"``
(docs/design.md, section 3, step 2).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from ... import zero_hooks
from ...attach import Attachment, attach
from ...config import LDBConfig, LDBConfigError, load_ds_config
from ...units import (Unit, build_units, check_sampleable, normalise_param_groups, split_groups_by_unit,
                      trainable_params)


def check_supported(cfg: LDBConfig) -> None:
    """Refuse, at start-up, what the Trainer and Accelerate cannot do as the method says.

    DROP-epoch batch scaling: the Trainer fixes its batch size, its steps per epoch, the LR
    schedule's length and its accumulation steps when training starts, and Accelerate's
    DeepSpeed engine fixes the batch and accumulation it was prepared with; a larger DROP
    batch would silently differ from the method (or from the schedule). So ``batch_kappa``
    must be 1 here; the LR factor (``kappa``) still applies.
    """
    if cfg.enabled and cfg.batch_kappa != 1:
        raise LDBConfigError(
            f"layer_drop_back.batch_kappa = {cfg.batch_kappa} is not supported under the Hugging Face "
            "Trainer / Accelerate: they fix the batch size, the steps per epoch and the LR schedule at "
            "start, so DROP epochs cannot use larger batches. Set \"batch_kappa\": 1 in the "
            "layer_drop_back section (the learning-rate factor kappa still applies).")


@dataclass
class LDBPlan:
    """A model's LDB units and the optimizer param groups built over them.

    ``groups`` are what the optimizer (or DeepSpeed's, via ``model_parameters``) must be built
    with: one group per (unit, given group), each keeping the given group's hyperparameters.
    """

    cfg: LDBConfig
    units: list[Unit]
    groups: list[dict[str, Any]]
    unit_of_group: list[int]
    params_of_group: list[list[nn.Parameter]] = field(repr=False)
    """The groups' parameters, copied now: DeepSpeed swaps a group's params for flat partitions."""

    def attach(self, ds_engine: Any) -> Attachment:
        """Install LDB on the DeepSpeed engine built over :attr:`groups` (``ldb_ds.attach.attach``)."""
        return attach(ds_engine, self.cfg, self.units, self.unit_of_group,
                      self.params_of_group if self.cfg.enabled else None)


def plan_param_groups(model: nn.Module, ds_config: str | os.PathLike | Mapping[str, Any],
                      param_groups: Any = None, optimizer: Any = None) -> LDBPlan:
    """Cut ``model`` into LDB units and ``param_groups`` into one param group per unit.

    ``ds_config``: the DeepSpeed JSON (path or dict) with the ``layer_drop_back`` section.
    ``param_groups``: what an optimizer takes (None: every trainable parameter; tensors; or
    group dicts such as the Trainer's weight-decay split). ``optimizer``: the optimizer the
    groups are for, if it exists already (checked like ``ldb_ds.initialize`` checks it). With
    LDB disabled the groups are returned as given.
    """
    ds = load_ds_config(ds_config)
    cfg = LDBConfig.from_ds_config(ds)
    check_supported(cfg)
    if cfg.enabled:
        # Before DeepSpeed builds anything, as ldb_ds.initialize: offload variants whose step
        # bypasses the step filter are refused (docs/design.md, section 4).
        zero_hooks.refuse_unverified_step_paths(ds, optimizer)
    user_groups = normalise_param_groups(model, param_groups)
    # Every unit is trainable here: DeepSpeed fixes the set of optimized parameters at
    # initialize (docs/design.md, section 4), masks are applied afterwards.
    units = build_units(model, cfg.granularity, trainable_params(user_groups),
                        block_classes=cfg.block_classes, block_pattern=cfg.block_pattern)
    if not cfg.enabled:
        return LDBPlan(cfg, units, user_groups, [], [list(g["params"]) for g in user_groups])
    check_sampleable(units, cfg, type(model).__name__)
    groups, unit_of_group = split_groups_by_unit(units, user_groups)
    return LDBPlan(cfg, units, groups, unit_of_group, [list(g["params"]) for g in groups])


def split_optimizer_in_place(optimizer: torch.optim.Optimizer, plan_for: Any) -> LDBPlan:
    """Regroup a fresh torch optimizer into one group per unit, keeping each group's hyperparameters.

    ``plan_for(param_groups) -> LDBPlan``. The optimizer object stays the same (hooks or
    attributes set on it survive); only its ``param_groups`` are rebuilt.
    """
    if optimizer.state:
        raise ValueError("ldb_ds must regroup the optimizer before its first step; it already has state")
    plan = plan_for([dict(g) for g in optimizer.param_groups])
    optimizer.param_groups = []
    for group in plan.groups:
        optimizer.add_param_group(group)
    return plan


__all__ = ["LDBPlan", "plan_param_groups", "check_supported", "split_optimizer_in_place"]
