"""One set-up for every entry point: the refusals, the units and the param groups.

``ldb_ds.initialize``, :func:`ldb_ds.attach.attach`, the Accelerate recipe
(``ldb_ds.integrations.hf.plan_param_groups`` + ``plan.attach``) and ``LDBTrainer`` all set LDB
up in the same two calls, on each side of ``deepspeed.initialize`` (which the entry point, or
the loop that owns the engine, makes):

1. :func:`prepare`, before it: every refusal the config and the model show
   (:func:`ldb_ds.refusals.check_setup`: the step paths ldb_ds did not verify, a model with too
   few units, the unsupported DeepSpeed settings), the model cut into units, one param group per
   (unit, given group). DeepSpeed must
   build its optimizer over :attr:`LDBSetup.groups`.
2. :func:`check_engine`, after it: the same refusals again on what the engine really uses
   (``"auto"`` values resolved, an ``mpu``, a model compiled by ``engine.compile()`` as
   Accelerate does after ``deepspeed.initialize``), and that DeepSpeed's param groups are
   ldb_ds's, in ldb_ds's order.

Refusals that belong to one entry point stay there (``batch_kappa`` under the Trainer and
Accelerate: ``ldb_ds.integrations.hf.plan.check_supported``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from torch import nn

from . import refusals, zero_hooks
from .config import LDBConfig, LDBConfigError
from .units import (Unit, build_units, describe_tied_weights, normalise_param_groups, split_groups_by_unit,
                    tied_weights, trainable_params)


@dataclass
class LDBSetup:
    """A model's LDB units and the optimizer param groups built over them: what an installation needs.

    ``groups`` are what the optimizer (or DeepSpeed's, via ``model_parameters``) must be built
    with: one group per (unit, given group), each keeping the given group's hyperparameters;
    with LDB disabled, the given groups unchanged. ``unit_of_group[i]`` is group ``i``'s unit.
    """

    cfg: LDBConfig
    units: list[Unit]
    groups: list[dict[str, Any]]
    unit_of_group: list[int]
    params_of_group: list[list[nn.Parameter]] = field(repr=False)
    """The groups' parameters, copied now: DeepSpeed swaps a group's params for flat partitions."""


def prepare(model: nn.Module, ds_config: Mapping[str, Any], param_groups: Any = None, *, optimizer: Any = None,
            ds_kwargs: Mapping[str, Any] | None = None) -> LDBSetup:
    """Refuse what the config and the model show, cut ``model`` into units and ``param_groups`` by unit.

    ``ds_config``: the DeepSpeed config dict holding the ``layer_drop_back`` section.
    ``param_groups``: what an optimizer takes (None: every trainable parameter; tensors; or
    group dicts such as a weight-decay split). ``optimizer``: the optimizer given to
    ``deepspeed.initialize`` (an instance, a callable or None), for the refusals that depend on
    it. ``ds_kwargs``: the other keyword arguments of ``deepspeed.initialize`` (``mpu``,
    ``mesh_param``). Raises :class:`ldb_ds.refusals.LDBUnsupportedError` (or ``ValueError``,
    ``LDBConfigError``) naming the setting.
    """
    cfg = LDBConfig.from_ds_config(ds_config)
    user_groups = normalise_param_groups(model, param_groups)
    if not cfg.enabled:
        # Plain DeepSpeed: nothing is checked against the model, and the groups stay as given.
        return LDBSetup(cfg, _units_for_reports(model, cfg, trainable_params(user_groups)), user_groups, [],
                        [list(g["params"]) for g in user_groups])
    refusals.refuse_compiled_model(model)  # before the cut, which the compiled wrapper would confuse
    # Every unit is trainable here (requires_grad=True by construction): DeepSpeed fixes the
    # set of optimized parameters at initialize, so masks may only be applied afterwards.
    units = build_units(model, cfg.granularity, trainable_params(user_groups),
                        block_classes=cfg.block_classes, block_pattern=cfg.block_pattern)
    # Before DeepSpeed builds anything (offload variants whose step bypasses the filter first).
    refusals.check_setup(model, ds_config, cfg, units, ds_kwargs or {}, optimizer)
    tied = tied_weights(model, units)
    if tied:
        warnings.warn(describe_tied_weights(tied, units, cfg), UserWarning, stacklevel=3)
    groups, unit_of_group = split_groups_by_unit(units, user_groups)
    zero_hooks.check_deepspeed_version()
    return LDBSetup(cfg, units, groups, unit_of_group, [list(g["params"]) for g in groups])


def check_engine(ds_engine: Any, cfg: LDBConfig, units: Sequence[Unit],
                 params_of_group: Sequence[Sequence[nn.Parameter]] | None = None) -> None:
    """After ``deepspeed.initialize``: refuse on the engine's resolved settings; check its param groups.

    ``params_of_group`` (from :class:`LDBSetup`; None skips the check) lets
    ``zero_hooks.check_group_order`` check that DeepSpeed kept ldb_ds's groups in order.
    """
    if not cfg.enabled:
        return
    zero_hooks.check_deepspeed_version()
    refusals.check_engine(ds_engine, cfg, units)
    if params_of_group is not None:
        zero_hooks.check_group_order(ds_engine, params_of_group)


def _units_for_reports(model: nn.Module, cfg: LDBConfig, trainable: list) -> list[Unit]:
    """Units of a disabled run, only for the LDB state's figures (grad bytes, unit count).

    A disabled section is plain DeepSpeed, so a model the section could not cut (no block
    source, nothing trainable) is not an error here: fall back to one unit per tensor, or none.
    """
    for granularity in (cfg.granularity, "param"):
        try:
            return build_units(model, granularity, trainable, block_classes=cfg.block_classes,
                               block_pattern=cfg.block_pattern)
        except (LDBConfigError, ImportError):
            continue
    return []


__all__ = ["LDBSetup", "prepare", "check_engine"]
