"""Code that runs inside each rank of the core distributed tests (tests/test_core_dist.py).

Real ldb_ds engines over real DeepSpeed engines on a real gloo group. The
test process gets back plain data: masks per step, final weights, bitwise
checks of dropped units, and gradient bytes counted at the collectives.
"""

from __future__ import annotations

import os
import random
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ldb_ds.bench.comm_count import ReductionCounter

IN_DIM, HIDDEN, CLASSES, LAYERS = 8, 16, 4, 6
MICRO_BATCH = 4


def make_model(depth: int = LAYERS) -> nn.Module:
    """``depth`` Linear layers, no BatchNorm (per-rank batch statistics would break exact parity)."""
    torch.manual_seed(0)
    dims = [IN_DIM] + [HIDDEN] * (depth - 1) + [CLASSES]
    layers: list[nn.Module] = []
    for i in range(depth):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < depth - 1:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def window_batch(step: int, micro: int, per_rank: int, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of micro step ``micro`` of optimizer step ``step`` (same on every rank)."""
    g = torch.Generator().manual_seed(10_000 + 100 * step + micro)
    x = torch.randn(per_rank * world_size, IN_DIM, generator=g)
    y = torch.randint(0, CLASSES, (per_rank * world_size,), generator=g)
    return x, y


def ds_config(case: dict[str, Any]) -> dict[str, Any]:
    if case["optimizer"] == "sgd":
        opt = {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01,
                                          "nesterov": case.get("nesterov", False)}}
    else:
        opt = {"type": "AdamW", "params": {"lr": 0.01, "weight_decay": 0.01, "betas": [0.9, 0.999], "eps": 1e-8,
                                            "torch_adam": case.get("torch_adam", True)}}
    cfg = {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": case.get("gas", 1),
        "gradient_clipping": case.get("clip", 0.0),
        "zero_optimization": {"stage": case["stage"]},
        "zero_allow_untested_optimizer": True,
        "optimizer": opt,
        "steps_per_print": 10_000,
        "layer_drop_back": {"enabled": True, "drop_rate": 0.5, "sampling_rate": 2, "granularity": "module",
                            "keep_first": 1, "keep_last": 1, "kappa": 2.0, "batch_kappa": 2, "seed": 7,
                            **case.get("ldb", {})},
    }
    if case.get("bf16"):
        cfg["bf16"] = {"enabled": True}
    if case.get("offload"):  # ZeRO-Offload: the optimizer steps fp32 masters in CPU memory
        cfg["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        # DeepSpeed refuses torch optimizers with offload unless told they are wanted.
        cfg["zero_force_ds_cpu_optimizer"] = False
    if case.get("offload_param"):  # ZeRO-3 only: the parameter partitions live in CPU memory
        cfg["zero_optimization"]["offload_param"] = {"device": "cpu"}
    if case.get("fp16"):  # a low initial loss scale: the only overflows are the forced ones
        cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 8, "loss_scale_window": 1000}
    if case.get("unmanaged"):  # the loop owns the accumulation boundary (DeepSpeed 0.19.8 config key)
        cfg["managed_gradient_accumulation"] = False
    if case.get("warmup"):  # DeepSpeed's own scheduler; the LDB factor must compose with it
        cfg["scheduler"] = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.02, "warmup_max_lr": 0.1,
                                                            "warmup_num_steps": 4, "warmup_type": "linear"}}
    return cfg


# --------------------------------------------------------------------------- inspection


def gathered_params(engine, params):
    """Full values of ``params``; at ZeRO-3 they are gathered (a collective: all ranks call it)."""
    import deepspeed

    if engine.zero_optimization_stage() == 3:
        with deepspeed.zero.GatheredParameters(list(params)):
            return [p.detach().float().clone() for p in params]
    return [p.detach().float().clone() for p in params]


def master_tensors(engine, group_index: int) -> list[torch.Tensor]:
    """The fp32 tensors the basic optimizer steps for param group ``group_index``, per stage."""
    zopt = engine.ds_engine.optimizer
    if hasattr(zopt, "sub_group_to_group_id"):  # ZeRO-3
        return [flat for sg, flat in enumerate(zopt.fp32_partitioned_groups_flat)
                if zopt.sub_group_to_group_id[sg] == group_index]
    if hasattr(zopt, "single_partition_of_fp32_groups"):  # ZeRO-1/2
        return [zopt.single_partition_of_fp32_groups[group_index]]
    if hasattr(zopt, "fp32_groups_flat_partition"):  # BF16_Optimizer
        return [zopt.fp32_groups_flat_partition[group_index]]
    if hasattr(zopt, "fp32_groups_flat"):  # FP16_Optimizer (fp16 at stage 0 with fused Adam)
        return [zopt.fp32_groups_flat[group_index]]
    if hasattr(zopt, "fp32_groups"):  # FP16_UnfusedOptimizer (bf16 at stage 0)
        return list(zopt.fp32_groups[group_index])
    return list(engine.controller.group_dicts[group_index]["params"])


def offload_tensors(engine, group_index: int) -> dict[str, torch.Tensor]:
    """The CPU-side copies ZeRO-Offload keeps of param group ``group_index`` besides its fp32 masters.

    ZeRO-1/2 offload copies the stepped fp32 partition into a 16-bit CPU buffer and from there
    into the model's partition (``param_buffer_of_bit16_for_cpu_offload_groups``); ZeRO-3 copies
    each sub-group's fp32 partition into its low-precision flat partition
    (``fp16_partitioned_groups_flat``, in CPU memory with ``offload_param``). A dropped unit's
    copies must not change either.
    """
    zopt = engine.ds_engine.optimizer
    out: dict[str, torch.Tensor] = {}
    if getattr(zopt, "cpu_offload", False):  # ZeRO-1/2
        out["bit16_cpu_buffer"] = zopt.param_buffer_of_bit16_for_cpu_offload_groups[group_index]
    if getattr(zopt, "offload_optimizer", False) or getattr(zopt, "offload_param", False):  # ZeRO-3
        for sg, flat in enumerate(zopt.fp16_partitioned_groups_flat):
            if zopt.sub_group_to_group_id[sg] == group_index and flat is not None:
                out[f"lp_partition{sg}"] = flat
    return out


def offload_state(engine) -> dict[str, Any]:
    """What the engine really runs: offload on or off, where the masters live, which optimizer."""
    zopt = engine.ds_engine.optimizer
    masters = master_tensors(engine, 0)
    return {"optimizer_offload": bool(getattr(zopt, "cpu_offload", False) or getattr(zopt, "offload_optimizer", False)),
            "param_offload": bool(getattr(zopt, "offload_param", False)),
            "master_device": str(masters[0].device),
            "basic_optimizer": type(engine.ds_engine.basic_optimizer).__name__}


def unit_snapshot(engine, unit_index: int) -> dict[str, torch.Tensor]:
    """Everything a step could change for one unit: full params, fp32 masters, optimizer state."""
    unit = engine.controller.units[unit_index]
    snap: dict[str, Any] = {}
    for name, value in zip(unit.param_names, gathered_params(engine, unit.params)):
        snap[f"param/{name}"] = value
    for gi, ui in enumerate(engine.controller.unit_of_group):
        if ui != unit_index:
            continue
        group = engine.controller.group_dicts[gi]
        for k, v in group.items():
            if k not in ("params", "lr") and isinstance(v, (int, float)) and not isinstance(v, bool):
                snap[f"group{gi}/{k}"] = torch.tensor(float(v), dtype=torch.float64)
        for mi, master in enumerate(master_tensors(engine, gi)):
            snap[f"group{gi}/master{mi}"] = master.detach().clone()
            for k, v in engine.ds_engine.basic_optimizer.state.get(master, {}).items():
                snap[f"group{gi}/master{mi}/state/{k}"] = (v.detach().clone() if torch.is_tensor(v)
                                                          else torch.tensor(float(v), dtype=torch.float64))
        for name, tensor in offload_tensors(engine, gi).items():
            snap[f"group{gi}/offload/{name}"] = tensor.detach().clone()
    return snap


def bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- the worker


def train_case(rank: int, case: dict[str, Any]) -> dict[str, Any]:
    """Train ``case`` for a few FULL and DROP epochs and record everything the tests check."""
    import deepspeed.comm as dist

    import ldb_ds

    world = dist.get_world_size()
    cfg = ds_config(case)
    if case.get("rank_seeds"):  # ranks with different seeds and RNG states must still agree
        cfg["layer_drop_back"]["seed"] = 1000 + 17 * rank
        random.seed(rank)
        torch.manual_seed(100 + rank)
    model = make_model()
    dtype = torch.bfloat16 if case.get("bf16") else torch.float16 if case.get("fp16") else None
    if dtype is not None:
        model = model.to(dtype)
    engine, _, _, _ = ldb_ds.initialize(model=model, config=cfg)
    counter = ReductionCounter() if case.get("count_bytes") else None
    records: list[dict[str, Any]] = []
    step = 0
    for epoch in range(case.get("epochs", 3)):
        engine.set_epoch(epoch)
        for _ in range(case.get("steps_per_epoch", 3)):
            per_rank = engine.micro_batch_size
            gas = engine.gradient_accumulation_steps()  # grows in DROP epochs with batch_scaling="accumulation"
            if counter:
                counter.reset()
            micro_masks, micro_flags = [], []
            scheduler_lr = engine.get_lr()[0]
            for micro in range(gas):
                x, y = window_batch(step, micro, per_rank, world)
                x, y = x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]
                x, y = x.to(engine.device), y.to(engine.device)  # a GPU under accelerator="cuda"
                if dtype is not None:
                    x = x.to(dtype)
                loss = F.cross_entropy(engine(x).float(), y)
                if step in case.get("overflow_steps", ()):
                    loss = loss * float("inf")  # every gradient inf/NaN: DeepSpeed must skip this step
                micro_masks.append(engine.ldb.dropped_units)
                micro_flags.append([p.requires_grad for p in engine.module.parameters()])
                engine.backward(loss)
                if micro == gas - 1:
                    dropped = engine.ldb.dropped_units
                    kept = [i for i in range(len(engine.ldb.units)) if i not in dropped][:2]
                    before = {u: unit_snapshot(engine, u) for u in dropped + tuple(kept)} \
                        if case.get("snapshots") else {}
                if micro == gas - 1 or not case.get("unmanaged"):  # unmanaged: one step() per window
                    engine.step()
            record = {"epoch": epoch, "mode": engine.ldb.mode.value, "dropped": engine.ldb.dropped_units,
                      "applied": engine.was_step_applied(),
                      # After the step: the groups' lr must be the scheduler's again (no factor left).
                      "group_lrs_after": sorted({g["lr"] for g in engine.controller.group_dicts}),
                      "scheduler_lr_after": engine.get_lr()[0],
                      "per_rank_batch": per_rank, "scheduler_lr": scheduler_lr, "micro_masks": micro_masks, "micro_flags": micro_flags,
                      "grad_bytes_expected": engine.ldb.grad_bytes_step,
                      "kept_param_fraction": engine.ldb.kept_param_fraction}
            if counter:
                record["grad_bytes_counted"] = counter.bytes
                record["reduction_calls"] = list(counter.calls)
            if before:
                after = {u: unit_snapshot(engine, u) for u in before}
                record["dropped_untouched"] = {u: bitwise_equal(before[u], after[u]) for u in dropped}
                record["kept_changed"] = {u: not bitwise_equal(before[u], after[u]) for u in kept}
                record["kept_untouched"] = {u: bitwise_equal(before[u], after[u]) for u in kept}
                record["snapshot_keys"] = {u: sorted(before[u]) for u in dropped}
            records.append(record)
            step += 1
    if counter:
        counter.close()
    units = engine.ldb.units
    final = dict(zip([n for n, _ in engine.module.named_parameters()],
                     [p.cpu() for p in gathered_params(engine, list(engine.module.parameters()))]))
    own_draw = None
    if case.get("rank_seeds"):
        from ldb_ds.schedule import draw_dropped
        own_draw = draw_dropped(random.Random(cfg["layer_drop_back"]["seed"]), len(units), engine.ldb.config)
    result = {"records": records, "final": final, "units": units, "own_first_draw": own_draw,
              "engine": offload_state(engine),
              "counts": (engine.ldb.steps, engine.ldb.drop_steps, engine.ldb.dropped_unit_steps),
              "skipped": (engine.ldb.skipped_steps, engine.ds_engine.skipped_steps)}
    engine.destroy()
    return result


def run_cases(rank: int, cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Several cases in one process group: process start-up dominates these tiny runs."""
    return [train_case(rank, case) for case in cases]


def offload_suite(rank: int, cases: list[dict[str, Any]], control_stages: list[int]) -> dict[str, Any]:
    """The ZeRO-Offload cases and their naive-freeze controls, in one process group."""
    return {"cases": run_cases(rank, cases),
            "controls": {stage: naive_freeze_case(rank, stage, offload=True)["moved"] for stage in control_stages}}


def _train_epochs(engine, epochs, rank, world, masks):
    import torch.nn.functional as F

    for epoch in epochs:
        engine.set_epoch(epoch)
        for _ in range(2):
            per_rank = engine.micro_batch_size
            x, y = window_batch(engine.ldb.steps, 0, per_rank, world)
            x, y = x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]
            engine.backward(F.cross_entropy(engine(x), y))
            engine.step()
            masks.append(engine.ldb.dropped_units)


def checkpoint_case(rank: int, stage: int, ckpt_dir: str) -> dict[str, Any]:
    """Uninterrupted 4 epochs vs. 2 epochs + save + fresh engine + load + 2 epochs."""
    import deepspeed.comm as dist

    import ldb_ds

    world = dist.get_world_size()
    case = {"stage": stage, "optimizer": "sgd", "ldb": {"sampling_rate": 1}}

    engine, _, _, _ = ldb_ds.initialize(model=make_model(), config=ds_config(case))
    masks_a: list = []
    _train_epochs(engine, range(2), rank, world, masks_a)
    mask_at_save = engine.ldb.dropped_units
    engine.save_checkpoint(ckpt_dir, tag="epoch1")
    # The save made every unit trainable for DeepSpeed and then put the mask back.
    flags_after_save = [p.requires_grad for u in engine.controller.units for p in u.params]
    _train_epochs(engine, range(2, 4), rank, world, masks_a)
    final_a = gathered_params(engine, list(engine.module.parameters()))
    engine.destroy()

    engine, _, _, _ = ldb_ds.initialize(model=make_model(), config=ds_config(case))
    _, client_state = engine.load_checkpoint(ckpt_dir, tag="epoch1")
    resumed_epoch = engine.ldb.epoch
    masks_b: list = []
    _train_epochs(engine, range(resumed_epoch + 1, 4), rank, world, masks_b)
    final_b = gathered_params(engine, list(engine.module.parameters()))
    counts_b = (engine.ldb.steps, engine.ldb.drop_steps)
    engine.destroy()
    return {"masks_a": masks_a, "masks_b": masks_b, "final_a": final_a, "final_b": final_b,
            "mask_at_save": mask_at_save, "flags_after_save": flags_after_save, "resumed_epoch": resumed_epoch,
            "counts_b": counts_b, "client_keys": sorted(client_state or {})}


def _train_windows(engine, rank: int, world: int, epochs, masks: list, first_window: int = 0,
                   set_first_epoch: bool = True, save: tuple[int, int, str] | None = None) -> None:
    """3 windows per epoch; window w of epoch e trains the same data in every run. ``first_window``:
    where the first epoch starts (a resumed one); ``set_first_epoch=False``: no set_epoch for it;
    ``save=(epoch, window, dir)``: a checkpoint after that window."""
    import torch.nn.functional as F

    for k, epoch in enumerate(epochs):
        if set_first_epoch or k > 0:
            engine.set_epoch(epoch)
        for window in range(first_window if k == 0 else 0, 3):
            per_rank = engine.micro_batch_size
            for micro in range(engine.gradient_accumulation_steps()):
                x, y = window_batch(10 * epoch + window, micro, per_rank, world)
                x, y = x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]
                engine.backward(F.cross_entropy(engine(x), y))
                engine.step()
            masks.append((epoch, window, engine.ldb.dropped_units, engine.micro_batch_size,
                          engine.gradient_accumulation_steps()))
            if save is not None and (epoch, window) == save[:2]:
                engine.save_checkpoint(save[2], tag="mid")


def mid_epoch_resume_case(rank: int, ckpt_dir: str, variants: list[dict[str, Any]]) -> dict[str, Any]:
    """Per variant: 3 epochs (FULL, DROP, DROP) uninterrupted, saving after window 0 of epoch 1 (a
    DROP epoch), against a fresh engine that loads that checkpoint and trains on as a user's resumed
    loop does: set_epoch(1) (none with ``set_epoch: False``), windows 1-2, then epoch 2."""
    import deepspeed.comm as dist

    import ldb_ds

    world = dist.get_world_size()
    out: dict[str, Any] = {}
    for v in variants:
        case = {"stage": 2, "optimizer": "sgd", "ldb": {"sampling_rate": 1, "resample": v["resample"],
                                                        "batch_scaling": v["scaling"]}}
        name = f"{v['resample']}-{v['scaling']}" + ("" if v["set_epoch"] else "-no-set-epoch")
        directory = os.path.join(ckpt_dir, name)
        engine, _, _, _ = ldb_ds.initialize(model=make_model(), config=ds_config(case))
        masks_a: list = []
        _train_windows(engine, rank, world, [0, 1, 2], masks_a, save=(1, 0, directory))
        final_a = gathered_params(engine, list(engine.module.parameters()))
        samples_a = engine.global_samples
        engine.destroy()
        engine, _, _, _ = ldb_ds.initialize(model=make_model(), config=ds_config(case))
        engine.load_checkpoint(directory, tag="mid")
        masks_b: list = []
        _train_windows(engine, rank, world, [1, 2], masks_b, first_window=1, set_first_epoch=v["set_epoch"])
        final_b = gathered_params(engine, list(engine.module.parameters()))
        engine.destroy()  # global_samples is still readable
        out[name] = {"masks_a": masks_a, "masks_b": masks_b, "samples": (samples_a, engine.global_samples),
                     "bitwise": all(torch.equal(a, b) for a, b in zip(final_a, final_b))}
    return out


def baseline_case(rank: int) -> dict[str, Any]:
    """LDB disabled: plain DeepSpeed behind the same API, with model.parameters() as a generator."""
    import ldb_ds

    cfg = ds_config({"stage": 2, "optimizer": "sgd"})
    cfg["layer_drop_back"] = {"enabled": False}
    model = make_model()
    engine, _, _, _ = ldb_ds.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    groups = len(engine.ds_engine.basic_optimizer.param_groups)
    modes = []
    for epoch in range(3):
        engine.set_epoch(epoch)
        x, y = window_batch(epoch, 0, engine.micro_batch_size, 2)
        engine.backward(torch.nn.functional.cross_entropy(engine(x), y))
        engine.step()
        modes.append((engine.ldb.mode.value, engine.ldb.dropped_units, engine.micro_batch_size))
    engine.destroy()
    return {"groups": groups, "modes": modes}


def grad_norm_case(rank: int) -> dict[str, Any]:
    """ZeRO-2: ldb_ds's batched group-norm equals DeepSpeed's per-group method, in 1 collective."""
    import ldb_ds

    # 10 layers at param granularity: 20 groups, so the batched norm vector is as long as a small
    # gradient bucket and only its marker keeps the byte counter from taking it for one.
    config = ds_config({"stage": 2, "optimizer": "sgd", "clip": 0.05, "ldb": {"granularity": "param"}})
    engine, _, _, _ = ldb_ds.initialize(model=make_model(depth=10), config=config)
    assert len(engine.controller.group_dicts) >= ReductionCounter.MIN_NUMEL
    z = engine.ds_engine.optimizer
    deepspeed_method = type(z).scaled_global_norm.__get__(z)  # the class's own, unpatched
    out = []
    for epoch in (0, 2):  # a FULL and a DROP epoch
        engine.set_epoch(epoch)
        x, y = window_batch(epoch, 0, engine.micro_batch_size, 2)
        per_rank = engine.micro_batch_size
        x, y = x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]
        engine.backward(torch.nn.functional.cross_entropy(engine(x), y))
        # What step() sets up before DeepSpeed's step, then both norms on the same gradients.
        engine.controller.begin_step()
        # DeepSpeed's backward epilogue has filled averaged_gradients (zeros for dropped groups).
        with ReductionCounter() as counter:
            ours = z.scaled_global_norm()
        theirs = deepspeed_method()
        # all_calls: every reduction; bytes: gradient traffic only (the norm vector is not).
        out.append((float(ours), float(theirs), len(counter.all_calls), engine.ldb.dropped_units, counter.bytes))
        engine.step()
    engine.destroy()
    return {"norms": out}


def naive_freeze_case(rank: int, stage: int, offload: bool = False) -> dict[str, Any]:
    """Plain DeepSpeed, the naive way: freeze a layer after initialize by requires_grad=False.

    The control experiment for the untouched tests: it shows that what ldb_ds prevents really
    happens without it (DeepSpeed zero-fills the missing gradient and steps the whole group, and
    momentum and weight decay move the frozen layer).
    """
    import deepspeed

    cfg = ds_config({"stage": stage, "optimizer": "sgd", "offload": offload})
    del cfg["layer_drop_back"]
    model = make_model()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=cfg)
    frozen = engine.module[2]  # the second Linear layer
    moved = []
    for step in range(2):
        if step == 1:
            for p in frozen.parameters():
                p.requires_grad_(False)
        x, y = window_batch(step, 0, MICRO_BATCH, 2)
        x, y = x[rank * MICRO_BATCH:(rank + 1) * MICRO_BATCH], y[rank * MICRO_BATCH:(rank + 1) * MICRO_BATCH]
        before = gathered_params(engine, list(frozen.parameters()))
        engine.backward(F.cross_entropy(engine(x), y))
        engine.step()
        after = gathered_params(engine, list(frozen.parameters()))
        moved.append(any(not torch.equal(a, b) for a, b in zip(before, after)))
    engine.destroy()
    return {"moved": moved}
