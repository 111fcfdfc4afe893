"""Rank code of tests/dist/test_attach_dist.py: ``ldb_ds.attach`` on a raw DeepSpeed engine.

The same model, batches and config once through ``ldb_ds.initialize`` (LDBEngine) and once
through ``deepspeed.initialize`` on ldb_ds's param groups plus :func:`ldb_ds.attach.attach`,
driven by calling the raw engine (what the Hugging Face Trainer and Accelerate do).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F

from tests.support.core_workers import (bitwise_equal, ds_config, gathered_params, make_model, unit_snapshot,
                                        window_batch)

CASE = {"optimizer": "adamw", "gas": 2}
EPOCHS, STEPS = 3, 3


def _batches(rank: int, world: int, step: int, gas: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    out = []
    for micro in range(gas):
        x, y = window_batch(step, micro, 4, world)
        out.append((x[rank * 4:(rank + 1) * 4], y[rank * 4:(rank + 1) * 4]))
    return out


def attach_case(rank: int, stage: int, workdir: str) -> dict[str, Any]:
    import deepspeed
    import deepspeed.comm as dist

    import ldb_ds
    from ldb_ds.attach import attach
    from ldb_ds.config import LDBConfig
    from ldb_ds.units import build_units, split_groups_by_unit

    world = dist.get_world_size()
    cfg = ds_config({**CASE, "stage": stage})
    cfg["layer_drop_back"].update(batch_kappa=1, sampling_rate=1)  # epochs 1 and 2 are DROP

    # Reference: LDBEngine.
    ref, _, _, _ = ldb_ds.initialize(model=make_model(), config=cfg)
    ref_masks = []
    for epoch in range(EPOCHS):
        ref.set_epoch(epoch)
        for s in range(STEPS):
            for x, y in _batches(rank, world, epoch * STEPS + s, 2):
                ref.backward(F.cross_entropy(ref(x), y))
                ref.step()
            ref_masks.append(ref.ldb.dropped_units)
    ref_final = gathered_params(ref, list(ref.module.parameters()))
    ref.destroy()

    # Hooks: deepspeed.initialize on one group per unit, then attach; the raw engine is driven.
    model = make_model()
    ldb_cfg = LDBConfig.from_ds_config(cfg)
    units = build_units(model, ldb_cfg.granularity)
    groups, unit_of_group = split_groups_by_unit(units, [{"params": list(model.parameters())}])
    params_of_group = [list(g["params"]) for g in groups]
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=cfg)
    att = attach(engine, ldb_cfg, units, unit_of_group, params_of_group)
    shim = type("Shim", (), {"controller": att.controller, "ds_engine": engine,
                             "zero_optimization_stage": engine.zero_optimization_stage})()
    masks, micro_masks, untouched = [], [], []
    ckpt = os.path.join(workdir, f"zero{stage}")
    saved_state = flags_after_save = None
    for epoch in range(EPOCHS):
        att.set_epoch(epoch)
        for s in range(STEPS):
            before = {u: unit_snapshot(shim, u) for u in range(len(units))} if att.ldb.mode.value == "DROP" else {}
            window = []
            for x, y in _batches(rank, world, epoch * STEPS + s, 2):
                loss = F.cross_entropy(engine(x), y)   # the engine's pre-hook opens the window
                window.append(att.ldb.dropped_units)
                engine.backward(loss)
                engine.step()                          # the instance's step: LDB's step protocol
            masks.append(att.ldb.dropped_units)
            micro_masks.append(window)
            if before:
                untouched += [bitwise_equal(before[u], unit_snapshot(shim, u)) for u in att.ldb.dropped_units]
            if epoch * STEPS + s == 4:  # mid DROP epoch, units dropped right now
                engine.save_checkpoint(ckpt)
                saved_state = att.controller.state_dict()
                flags_after_save = [p.requires_grad for p in engine.module.parameters()]
    final = gathered_params(shim, list(engine.module.parameters()))
    counts = (att.ldb.steps, att.ldb.drop_steps)
    engine.destroy()

    # A fresh engine resumed from the checkpoint through the raw load_checkpoint continues the run.
    model_b = make_model()
    units_b = build_units(model_b, ldb_cfg.granularity)
    groups_b, _ = split_groups_by_unit(units_b, [{"params": list(model_b.parameters())}])
    params_of_group_b = [list(g["params"]) for g in groups_b]  # before DeepSpeed flattens them
    engine_b, _, _, _ = deepspeed.initialize(model=model_b, model_parameters=groups_b, config=cfg)
    att_b = attach(engine_b, ldb_cfg, units_b, unit_of_group, params_of_group_b)
    path, _ = engine_b.load_checkpoint(ckpt)
    resumed_state = att_b.controller.state_dict()
    shim_b = type("Shim", (), {"controller": att_b.controller, "ds_engine": engine_b,
                               "zero_optimization_stage": engine_b.zero_optimization_stage})()
    masks_b = []
    for step in range(5, EPOCHS * STEPS):
        if step % STEPS == 0:
            att_b.set_epoch(step // STEPS)
        for x, y in _batches(rank, world, step, 2):
            engine_b.backward(F.cross_entropy(engine_b(x), y))
            engine_b.step()
        masks_b.append(att_b.ldb.dropped_units)
    final_b = gathered_params(shim_b, list(engine_b.module.parameters()))
    try:
        attach(engine_b, ldb_cfg, units_b, unit_of_group)
        double = None
    except RuntimeError as err:
        double = str(err)
    engine_b.destroy()
    with open(os.path.join(ckpt, "latest")) as f:
        tag = f.read().strip()
    files = sorted(os.listdir(os.path.join(ckpt, tag)))
    return {"masks": masks, "ref_masks": ref_masks, "micro_masks": micro_masks, "untouched": untouched,
            "final": final, "ref_final": ref_final, "counts": counts, "files": files, "loaded": path is not None,
            "saved_state": saved_state, "resumed_state": resumed_state, "flags_after_save": flags_after_save,
            "masks_b": masks_b, "final_b": final_b, "double_attach": double, "tag": tag}


__all__ = ["attach_case"]
