"""Units and param groups for a Hugging Face model, shared by LDBTrainer and the Accelerate recipe.

Both go through the core's one set-up (:mod:`ldb_ds.setup`): :func:`plan_param_groups` is
``prepare`` before ``deepspeed.initialize``, :meth:`LDBPlan.attach` runs ``check_engine`` on the
engine Accelerate built, then installs LDB.

No transformers import here: a Hugging Face model is an ``nn.Module``, and the core reads its
``_no_split_modules`` (``ViTLayer``, ``BertLayer``) for ``granularity: "block"``
(docs/design.md, section 3, step 2).
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import torch
from torch import nn

from ...attach import Attachment, attach
from ...config import LDBConfig, LDBConfigError, load_ds_config
from ...setup import LDBSetup, prepare


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


class LDBPlan(LDBSetup):
    """A model's LDB units and the optimizer param groups built over them (:class:`ldb_ds.setup.LDBSetup`).

    ``groups`` are what the optimizer (or DeepSpeed's, via ``model_parameters``) must be built
    with: one group per (unit, given group), each keeping the given group's hyperparameters.
    """

    def attach(self, ds_engine: Any) -> Attachment:
        """Install LDB on the DeepSpeed engine built over :attr:`groups` (``ldb_ds.attach.attach``).

        The set-up's refusals run again on the engine as built (resolved ``"auto"`` values, a
        model compiled after ``deepspeed.initialize``): :func:`ldb_ds.setup.check_engine`.
        """
        return attach(ds_engine, self.cfg, self.units, self.unit_of_group,
                      self.params_of_group if self.cfg.enabled else None)


def plan_param_groups(model: nn.Module, ds_config: str | os.PathLike | Mapping[str, Any],
                      param_groups: Any = None, optimizer: Any = None) -> LDBPlan:
    """Cut ``model`` into LDB units and ``param_groups`` into one param group per unit.

    ``ds_config``: the DeepSpeed JSON (path or dict) with the ``layer_drop_back`` section.
    ``param_groups``: what an optimizer takes (None: every trainable parameter; tensors; or
    group dicts such as the Trainer's weight-decay split). ``optimizer``: the optimizer the
    groups are for, if it exists already. The refusals are ``ldb_ds.initialize``'s
    (:func:`ldb_ds.setup.prepare`) plus this integration's own (:func:`check_supported`). With
    LDB disabled the groups are returned as given.
    """
    ds = load_ds_config(ds_config)
    check_supported(LDBConfig.from_ds_config(ds))
    return LDBPlan(**vars(prepare(model, ds, param_groups, optimizer=optimizer)))


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
