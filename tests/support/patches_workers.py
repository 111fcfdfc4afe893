"""Workers for tests/dist/test_patches_dist.py: every ldb_ds patch comes off, and then the engine is DeepSpeed's.

* :func:`leftovers` - every ldb_ds callable (or ``_ldb_*`` marker) still reachable from a
  DeepSpeed engine's own attributes, its optimizer wrapper, its basic optimizer, its modules'
  hooks, and the DeepSpeed module-level functions ldb_ds may swap;
* :func:`removal_case` - one engine with LDB on (every patch installed), ``destroy()``: nothing
  left; and one whose patches are removed after two FULL steps, trained on beside plain
  DeepSpeed built over the same param groups from the same weights: bitwise the same after
  every step (a patch-free engine is DeepSpeed's).
"""

from __future__ import annotations

import copy
import functools
import sys
from typing import Any

import torch
import torch.nn.functional as F

from tests.support.core_workers import ds_config, make_model, window_batch
from ldb_ds.schedule import first_drop_epoch


def _is_ldb(value: Any) -> bool:
    fn = getattr(value, "__func__", value)  # a bound method: its function
    if isinstance(fn, functools.partial):
        fn = fn.func
    return callable(fn) and str(getattr(fn, "__module__", "") or "").startswith("ldb_ds")


def leftovers(ds_engine: Any) -> list[str]:
    """What of ldb_ds is still on ``ds_engine`` and the DeepSpeed objects and modules it holds."""
    found = []
    objects = {"engine": ds_engine, "optimizer": getattr(ds_engine, "optimizer", None),
               "basic_optimizer": getattr(ds_engine, "basic_optimizer", None)}
    for label, obj in objects.items():
        if obj is None:
            continue
        for name, value in vars(obj).items():
            if name.startswith("_ldb") or _is_ldb(value):
                found.append(f"{label}.{name}")
    for mname, module in [("engine", ds_engine), *ds_engine.module.named_modules()]:
        for hooks in ("_forward_pre_hooks", "_forward_hooks", "_backward_hooks", "_backward_pre_hooks"):
            for hook in getattr(module, hooks, {}).values():
                if _is_ldb(hook):
                    found.append(f"{mname or 'model'}.{hooks}")
    for modname in ("deepspeed.runtime.zero.stage_1_and_2", "deepspeed.runtime.bf16_optimizer"):
        module = sys.modules.get(modname)
        if module is not None and _is_ldb(getattr(module, "all_gather_dp_groups", None)):
            found.append(f"{modname}.all_gather_dp_groups")
    return found


def _step(engine: Any, rank: int, world: int, step: int) -> None:
    per_rank = 4
    x, y = window_batch(step, 0, per_rank, world)
    x, y = x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]
    loss = F.cross_entropy(engine(x.to(next(engine.module.parameters()).dtype)).float(), y)
    engine.backward(loss)
    engine.step()


def _full_params(engine: Any) -> list[torch.Tensor]:
    import deepspeed

    params = list(engine.module.parameters())
    if engine.zero_optimization_stage() == 3:
        with deepspeed.zero.GatheredParameters(params):
            return [p.detach().float().clone() for p in params]
    return [p.detach().float().clone() for p in params]


def removal_case(rank: int, case: dict[str, Any]) -> dict[str, Any]:
    import deepspeed
    import ldb_ds
    from ldb_ds import functional

    world = torch.distributed.get_world_size()
    cfg = ds_config(case)
    out: dict[str, Any] = {}

    # 1. Every patch installed (a DROP step taken, so the step state was used), then destroy().
    engine, _, _, _ = ldb_ds.initialize(model=make_model(), config=copy.deepcopy(cfg))
    engine.set_epoch(first_drop_epoch(engine.ldb.config))
    out["mode"] = engine.ldb.mode.value
    _step(engine, rank, world, 0)
    out["installed"] = engine.installation.describe()
    out["before_destroy"] = leftovers(engine.ds_engine)
    engine.destroy()
    out["after_destroy"] = leftovers(engine.ds_engine)
    out["all_trainable_after"] = all(p.requires_grad for p in engine.ds_engine.module.parameters())

    # 2. Patches removed mid-run: the same engine steps as plain DeepSpeed over the same groups.
    ours, _, _, _ = ldb_ds.initialize(model=make_model(), config=copy.deepcopy(cfg))
    plain_model = make_model()  # the same weights (make_model seeds)
    units = functional.build_units(plain_model, "module")
    groups, _ = functional.build_param_groups(units, [{"params": list(plain_model.parameters())}])
    plain_cfg = copy.deepcopy(cfg)
    plain_cfg.pop("layer_drop_back")
    plain, _, _, _ = deepspeed.initialize(model=plain_model, model_parameters=groups, config=plain_cfg)
    same = []
    for step in range(4):
        if step == 2:
            ours.installation.remove()  # mid-run: from here on DeepSpeed's own code only
            out["after_remove"] = leftovers(ours.ds_engine)
        _step(ours.ds_engine if step >= 2 else ours, rank, world, step)
        _step(plain, rank, world, step)
        same.append(all(torch.equal(a, b) for a, b in zip(_full_params(ours), _full_params(plain))))
    out["bitwise_each_step"] = same
    ours.ds_engine.destroy()
    plain.destroy()
    return out


def attach_case(rank: int, stage: int) -> dict[str, Any]:
    """ldb_ds.attach on a raw engine (the Trainer's path): its methods and hook come off at destroy()."""
    import deepspeed
    from ldb_ds import LDBConfig, functional
    from ldb_ds.attach import attach

    cfg = ds_config({"stage": stage, "optimizer": "sgd"})
    model = make_model()
    ldb_cfg = LDBConfig.from_ds_config(cfg)
    units = functional.build_units(model, ldb_cfg.granularity)
    groups, unit_of_group = functional.build_param_groups(units, [{"params": list(model.parameters())}])
    plain_cfg = copy.deepcopy(cfg)
    plain_cfg.pop("layer_drop_back")
    ds_engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=plain_cfg)
    att = attach(ds_engine, ldb_cfg, units, unit_of_group)
    att.set_epoch(first_drop_epoch(ldb_cfg))
    _step(ds_engine, rank, torch.distributed.get_world_size(), 0)
    out = {"before": leftovers(ds_engine), "installed": att.installation.describe(), "mode": att.controller.mode.value}
    ds_engine.destroy()  # attach's destroy: every patch off, then DeepSpeed's own destroy
    out["after"] = leftovers(ds_engine)
    return out


def run(rank: int, cases: list[dict[str, Any]], attach_stages: list[int]) -> dict[str, Any]:
    return {"cases": [removal_case(rank, c) for c in cases], "attach": [attach_case(rank, s) for s in attach_stages]}
