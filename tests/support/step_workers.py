"""Code that runs inside each rank of the step-loop tests (tests/dist/test_zero_step_dist.py).

ldb_ds's own ZeRO step loops (``ldb_ds.zero_hooks``) against DeepSpeed's, on the same gradients:
two LDB engines built from the same weights and config, one with ldb_ds's loops and one with
its step-loop patches removed (``engine.patches.remove("step loop")``: DeepSpeed's own ``step()``,
``_get_norm_groups``, ``_optimizer_step``),
trained side by side on the same batches and masks; after every step everything a step can change
is compared bitwise. The collectives of each step are counted at DeepSpeed's communication backend.
"""

from __future__ import annotations

import collections
import copy
from typing import Any

import torch
import torch.nn.functional as F

from tests.support.core_workers import bitwise_equal, ds_config, make_model, unit_snapshot, window_batch

COLLECTIVES = ("all_reduce", "all_gather_into_tensor", "all_gather", "reduce_scatter_tensor", "reduce_scatter",
               "broadcast", "all_reduce_coalesced", "all_gather_coalesced", "reduce", "barrier")


class CollectiveCounter:
    """Counts every collective DeepSpeed issues through ``deepspeed.comm.comm.cdb``, by name."""

    def __init__(self) -> None:
        from deepspeed.comm import comm as ds_comm

        self.calls: collections.Counter = collections.Counter()
        self._backend = ds_comm.cdb
        self._names = [n for n in COLLECTIVES if hasattr(self._backend, n)]
        for name in self._names:
            setattr(self._backend, name, self._wrap(name, getattr(self._backend, name)))

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            self.calls[name] += 1
            return fn(*args, **kwargs)
        return counted

    def close(self) -> None:
        for name in self._names:
            delattr(self._backend, name)


def _snapshot(engine) -> dict[str, torch.Tensor]:
    snap = {}
    for u in range(len(engine.ldb.units)):
        snap.update({f"unit{u}/{k}": v for k, v in unit_snapshot(engine, u).items()})
    return snap


def _model_dtype(case: dict[str, Any]) -> torch.dtype | None:
    return torch.bfloat16 if case.get("bf16") else torch.float16 if case.get("fp16") else None


def allow_cpu_fp16() -> None:
    """Let DeepSpeed build its fp16 optimizers on the CPU accelerator (fp16 cases only).

    DeepSpeed's CPU accelerator reports fp16 as supported only where oneDNN has fast fp16
    kernels (``cpu_accelerator.py:228``), and ``engine._do_sanity_check`` refuses fp16 otherwise.
    torch computes in fp16 on any CPU, only slower, and the code paths under test are the same
    Python as on a GPU, so the probe is answered yes in this worker process.
    """
    from deepspeed.accelerator import get_accelerator

    type(get_accelerator()).is_fp16_supported = lambda self: True


def _train_step(engine, rank: int, world: int, step: int, dtype: torch.dtype | bool | None,
                poison: bool = False) -> None:
    per_rank = engine.micro_batch_size
    x, y = window_batch(step, 0, per_rank, world)
    x, y = x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]
    if dtype is True:  # the ZeRO-1/2/3 cases' bf16 flag
        dtype = torch.bfloat16
    if dtype:
        x = x.to(dtype)
    loss = F.cross_entropy(engine(x).float(), y)
    if poison:  # an inf loss: every gradient inf/NaN, the step must be skipped as an overflow
        loss = loss * float("inf")
    engine.backward(loss)
    engine.step()


def _block_model() -> torch.nn.Module:
    """make_model's shape in 4 blocks of 2 Linear layers (``0.0.weight`` ... ``3.2.bias``)."""
    from torch import nn

    from tests.support.core_workers import CLASSES, HIDDEN, IN_DIM

    torch.manual_seed(0)
    dims = [IN_DIM] + [HIDDEN] * 7 + [CLASSES]
    return nn.Sequential(*[nn.Sequential(nn.Linear(dims[2 * b], dims[2 * b + 1]), nn.Tanh(),
                                         nn.Linear(dims[2 * b + 1], dims[2 * b + 2]), nn.Tanh())
                           for b in range(4)])


def equivalence_case(rank: int, case: dict[str, Any]) -> dict[str, Any]:
    """ldb_ds's loops vs DeepSpeed's on FULL and DROP steps; per step: bitwise equal, collectives."""
    import deepspeed.comm as dist

    import ldb_ds
    from ldb_ds import zero_hooks

    world = dist.get_world_size()
    cfg = ds_config(case)
    optimizer = None
    if case["optimizer"] == "rmsprop":  # a torch optimizer ldb_ds does not merge groups for
        del cfg["optimizer"]
        optimizer = lambda params: torch.optim.RMSprop(params, lr=0.01, momentum=0.9)  # noqa: E731
    if "sub_group_size" in case:  # ZeRO-3 splits a param group into sub-groups of this many elements
        cfg["zero_optimization"]["sub_group_size"] = case["sub_group_size"]
    model = make_model(depth=case.get("depth", 6)) if not case.get("blocks") else _block_model()
    if case.get("blocks"):  # units of 2 Linear layers: 4 gradients per group, summed in order
        cfg["layer_drop_back"].update(granularity="block", block_pattern=r"\d+\.")
    if case.get("fp16"):
        allow_cpu_fp16()
    if _model_dtype(case) is not None:
        model = model.to(_model_dtype(case))
    verified = dict(zero_hooks.MIRRORED_SOURCES)
    if case.get("stale_source"):  # as if DeepSpeed's step()s / ZeRO-3 norm had changed: no mirror of them
        zero_hooks.MIRRORED_SOURCES["stage_1_and_2.DeepSpeedZeroOptimizer.step"] = "0" * 16
        zero_hooks.MIRRORED_SOURCES["stage3.DeepSpeedZeroOptimizer_Stage3._get_norm_groups"] = "0" * 16
        zero_hooks.MIRRORED_SOURCES["stage3.DeepSpeedZeroOptimizer_Stage3.step"] = "0" * 16
        # (not FP16_UnfusedOptimizer.step itself: it calls the basic optimizer, so a change there
        # refuses LDB - step_filter.FILTER_CALLERS - instead of falling back)
        zero_hooks.MIRRORED_SOURCES["fp16.unfused_optimizer.FP16_UnfusedOptimizer.unscale_and_clip_grads"] = "0" * 16
    try:
        ours, _, _, _ = ldb_ds.initialize(model=copy.deepcopy(model), config=copy.deepcopy(cfg), optimizer=optimizer)
    finally:
        zero_hooks.MIRRORED_SOURCES.update(verified)
    theirs, _, _, _ = ldb_ds.initialize(model=copy.deepcopy(model), config=copy.deepcopy(cfg), optimizer=optimizer)
    installed = zero_hooks.installed_step_loops(ours.ds_engine)
    theirs.patches.remove("step loop")  # DeepSpeed's own loops on the other engine
    steps = []
    step = 0
    for epoch in case.get("epochs", (0, 2, 3)):  # s = 2: FULL, DROP, FULL
        for engine in (ours, theirs):
            engine.set_epoch(epoch)
        for _ in range(2):
            calls = []
            moved_off = None
            if step == case.get("move_params"):  # params moved off the flat buffers before this step
                for engine in (ours, theirs):
                    _move_params(engine)
                moved_off = (_in_flat_buffers(ours), _in_flat_buffers(theirs))  # (False, False): really moved
            for engine in (ours, theirs):
                counter = CollectiveCounter()
                try:
                    _train_step(engine, rank, world, step, _model_dtype(case),
                                poison=step == case.get("poison_step"))
                finally:
                    counter.close()
                calls.append(dict(counter.calls))
            a, b = _snapshot(ours), _snapshot(theirs)
            steps.append({"mode": ours.ldb.mode.value, "dropped": ours.ldb.dropped_units,
                          "same_mask": ours.ldb.dropped_units == theirs.ldb.dropped_units,
                          "equal": bitwise_equal(a, b), "differing": sorted(k for k in a if k in b
                                                                            and not torch.equal(a[k], b[k])),
                          "keys": len(a), "state_keys": sum("/state/" in k for k in a),
                          "norm_equal": _same(ours.ds_engine.get_global_grad_norm(),
                                              theirs.ds_engine.get_global_grad_norm()),
                          "skipped": (ours.ds_engine.skipped_steps, theirs.ds_engine.skipped_steps),
                          "loss_scale": (getattr(ours.ds_engine.optimizer, "loss_scale", None),
                                         getattr(theirs.ds_engine.optimizer, "loss_scale", None)),
                          "clipped": _clip_applied(theirs.ds_engine),
                          "in_flat_buffers": (_in_flat_buffers(ours), _in_flat_buffers(theirs)),
                          "moved_off": moved_off,
                          "calls_ours": calls[0], "calls_theirs": calls[1]})
            step += 1
    ours.destroy()
    theirs.destroy()
    return {"installed": installed, "steps": steps, "sub_groups": len(getattr(ours.ds_engine.optimizer, "fp16_groups", ())),
            "groups": len(ours.controller.group_dicts)}


def _partitions(engine) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The tensors DeepSpeed points into its flat buffers after a step, and those buffers:
    ZeRO-1/2 the model parameters and ``bit16_groups_flat``, ZeRO-3 the parameters' partitions
    (``ds_tensor``) and ``fp16_partitioned_groups_flat``."""
    z = engine.ds_engine.optimizer
    if hasattr(z, "fp16_partitioned_groups_flat"):
        return [p.ds_tensor for p in engine.ds_engine.module.parameters()], list(z.fp16_partitioned_groups_flat)
    return list(engine.ds_engine.module.parameters()), list(getattr(z, "bit16_groups_flat", ()))  # ZeRO-0: none


def _move_params(engine) -> None:
    """Point every partition tensor at a copy of itself (same values, other memory), as a load
    or a user's ``p.data = ...`` may: the next step must point them back into the flat buffers."""
    for t in _partitions(engine)[0]:
        t.data = t.data.clone()


def _in_flat_buffers(engine) -> bool | None:
    """Whether every partition tensor lies in one of the flat buffers' memory (None: ZeRO-0, no buffers)."""
    tensors, flats = _partitions(engine)
    if not flats:
        return None
    storages = {f.untyped_storage().data_ptr() for f in flats}
    return all(t.untyped_storage().data_ptr() in storages for t in tensors)


def _clip_applied(ds_engine) -> bool | None:
    """ZeRO-0 mixed precision: whether the step just taken scaled its gradients down by clipping.

    ``FP16_UnfusedOptimizer.unscale_and_clip_grads`` (``unfused_optimizer.py:246``) clips where
    ``(norm / loss_scale + 1e-6) / clip > 1``; None elsewhere or after a skipped step.
    """
    z = ds_engine.optimizer
    norm = getattr(z, "_global_grad_norm", None)
    if not hasattr(z, "fp32_groups") or not getattr(z, "clip_grad", 0) or norm is None or norm == float("inf"):
        return None
    return ((norm / z.loss_scale) + 1e-6) / z.clip_grad > 1


def _same(a: Any, b: Any) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.equal(torch.as_tensor(a), torch.as_tensor(b))
    return a == b or (a != a and b != b)


def run_equivalence(rank: int, cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [equivalence_case(rank, case) for case in cases]


def baseline_collectives(rank: int, stage: int) -> dict[str, Any]:
    """Collectives of one FULL step of plain DeepSpeed (LDB off) and of an LDB FULL and DROP step."""
    import deepspeed.comm as dist

    import ldb_ds

    world = dist.get_world_size()
    out = {}
    for name, enabled in (("baseline", False), ("ldb", True)):
        cfg = ds_config({"stage": stage, "optimizer": "sgd"})
        cfg["layer_drop_back"]["enabled"] = enabled
        cfg["layer_drop_back"]["sampling_rate"] = 1
        model = make_model(depth=8)
        engine, _, _, _ = ldb_ds.initialize(model=model, model_parameters=list(model.parameters()), config=cfg)
        for epoch, mode in ((0, "full"), (1, "drop")) if enabled else ((0, "full"),):
            engine.set_epoch(epoch)
            _train_step(engine, rank, world, 0, False)  # warm-up: lazy state, first all-gathers
            counter = CollectiveCounter()
            try:
                _train_step(engine, rank, world, 1, False)
            finally:
                counter.close()
            out[f"{name}_{mode}"] = dict(counter.calls)
            out[f"{name}_{mode}_dropped"] = engine.ldb.dropped_units
        out[f"{name}_groups"] = len(engine.ds_engine.basic_optimizer.param_groups)
        engine.destroy()
    return out


def allgather_case(rank: int, sizes: list[int], bucket_numel: int) -> dict[str, Any]:
    """``zero_hooks.allgather_partitions`` against DeepSpeed's one-collective-per-group all-gather."""
    import deepspeed.comm as dist
    from deepspeed.runtime.utils import all_gather_into_tensor_dp_groups

    from ldb_ds import zero_hooks

    world = dist.get_world_size()
    group = dist.get_world_group()
    results = {}
    for name in ("ours", "deepspeed"):
        flats = [torch.full((world * n,), float("nan")) for n in sizes]
        parts = [list(f.split(n)) for f, n in zip(flats, sizes)]
        for k, n in enumerate(sizes):  # rank r's partition of group k: distinct values per (k, r, element)
            parts[k][rank].copy_(torch.arange(n, dtype=torch.float32) + 1000 * k + 100_000 * rank)
        counter = CollectiveCounter()
        try:
            if name == "ours":
                returned = zero_hooks.allgather_partitions(flats, parts, group, bucket_numel)
            else:
                all_gather_into_tensor_dp_groups(flats, parts, [group] * len(flats))
                returned = None
        finally:
            counter.close()
        results[name] = {"flats": flats, "calls": dict(counter.calls), "returned": returned}
    return results


# --------------------------------------------------------------------------- ZeRO-0 host work per step


def _step_phase_counts(engine, rank: int, world: int, dtype: torch.dtype) -> dict[str, int]:
    """One profiled step (after one warm-up): ops of ``engine.step()`` and its host syncs.

    aten ops are counted as ldb_ds.bench.counts counts them, except that a foreach op over a
    list counts once: on the CPU torch runs it as one op per tensor *inside* it (its children are
    not counted), on a GPU it is one kernel per chunk of tensors. Host syncs are the
    ``aten::_local_scalar_dense`` calls (``.item()``, ``bool()``, ``float()`` of a tensor);
    blocking host-to-device copies (``torch.tensor(x, device=...)``) are ``aten::lift_fresh``.
    """
    from torch.profiler import ProfilerActivity, profile

    _train_step(engine, rank, world, 0, dtype)
    per_rank = engine.micro_batch_size
    x, y = window_batch(1, 0, per_rank, world)
    x, y = x[rank * per_rank:(rank + 1) * per_rank].to(dtype), y[rank * per_rank:(rank + 1) * per_rank]
    engine.backward(F.cross_entropy(engine(x).float(), y))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        engine.step()
    ops = syncs = copies = 0
    for ev in prof.events():
        if not ev.name.startswith("aten::"):
            continue
        node, inside_foreach = ev.cpu_parent, False
        while node is not None:
            inside_foreach |= node.name.startswith("aten::_foreach_")
            node = node.cpu_parent
        if inside_foreach:
            continue
        ops += 1
        syncs += ev.name == "aten::_local_scalar_dense"
        copies += ev.name == "aten::lift_fresh"
    return {"ops": ops, "syncs": syncs, "copies": copies}


def zero0_host_counts(rank: int, units: list[int], dtype_name: str) -> dict[str, Any]:
    """Per model of N units (N in ``units``): step-phase ops and syncs of a ZeRO-0 bf16/fp16 step.

    Three engines per N: plain DeepSpeed (LDB off: one param group), LDB FULL with ldb_ds's
    ZeRO-0 loop (one group per unit), and LDB FULL with DeepSpeed's own loop over those groups.
    """
    import deepspeed.comm as dist

    import ldb_ds
    from ldb_ds import zero_hooks

    dtype = getattr(torch, dtype_name)
    if dtype == torch.float16:
        allow_cpu_fp16()
    world = dist.get_world_size()
    out: dict[str, Any] = {}
    for n in units:
        for name in ("plain", "ours", "theirs"):
            cfg = ds_config({"stage": 0, "optimizer": "sgd", "bf16": dtype == torch.bfloat16})
            if dtype == torch.float16:
                cfg["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 8}
            cfg["optimizer"]["params"]["foreach"] = True  # as on a GPU (ldb_ds.bench.counts.force_foreach)
            cfg["layer_drop_back"]["enabled"] = name != "plain"
            engine, _, _, _ = ldb_ds.initialize(model=make_model(depth=n).to(dtype), config=cfg)
            if name == "theirs":
                engine.patches.remove("step loop")
            row = _step_phase_counts(engine, rank, world, dtype)
            row["installed"] = zero_hooks.installed_step_loops(engine.ds_engine)
            row["groups"] = len(engine.ds_engine.basic_optimizer.param_groups)
            out[f"{name}{n}"] = row
            engine.destroy()
    return out


# --------------------------------------------------------------------------- fp16 at ZeRO-0: the loss scale


def fp16_zero0_training(rank: int, case: dict[str, Any], loss_scaling: bool) -> dict[str, Any]:
    """``core_workers.train_case`` in fp16 at ZeRO-0, with or without ldb_ds's loss scaling.

    ``loss_scaling`` True: ``zero0_step.install_fp16_loss_scaling`` on the engine (a no-op where
    ldb_ds already installed it); False: DeepSpeed's own ``backward`` (the patch removed again if installed).
    """
    import ldb_ds
    from ldb_ds.zero_hooks import zero0_step
    from tests.support.core_workers import train_case

    allow_cpu_fp16()
    installed = []
    original = ldb_ds.initialize

    def initialize(*args: Any, **kwargs: Any):
        out = original(*args, **kwargs)
        if loss_scaling:
            installed.append(zero0_step.install_fp16_loss_scaling(out[0].ds_engine, out[0].patches))
        else:
            out[0].patches.remove("fp16 ZeRO-0 loss scaling")
            installed.append(False)
        return out

    ldb_ds.initialize = initialize  # train_case builds its engine through ldb_ds.initialize
    try:
        result = train_case(rank, case)
    finally:
        ldb_ds.initialize = original
    result["loss_scaling"] = installed
    return result
