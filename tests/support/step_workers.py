"""Code that runs inside each rank of the step-loop tests (tests/dist/test_zero_step_dist.py).

ldb_ds's own ZeRO step loops (``ldb_ds.zero_hooks``) against DeepSpeed's, on the same gradients:
two LDB engines built from the same weights and config, one with ldb_ds's loops and one with
``zero_hooks.uninstall_step_loops`` (DeepSpeed's own ``step()``, ``_get_norm_groups``, ``_optimizer_step``),
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


def _train_step(engine, rank: int, world: int, step: int, bf16: bool, poison: bool = False) -> None:
    per_rank = engine.micro_batch_size
    x, y = window_batch(step, 0, per_rank, world)
    x, y = x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]
    if bf16:
        x = x.bfloat16()
    loss = F.cross_entropy(engine(x).float(), y)
    if poison:  # an inf loss: every gradient inf/NaN, the step must be skipped as an overflow
        loss = loss * float("inf")
    engine.backward(loss)
    engine.step()


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
    model = make_model(depth=case.get("depth", 6))
    if case.get("bf16"):
        model = model.bfloat16()
    verified = dict(zero_hooks.MIRRORED_SOURCES)
    if case.get("stale_source"):  # as if DeepSpeed's step() / ZeRO-3 norm had changed: no mirror of them
        zero_hooks.MIRRORED_SOURCES["stage_1_and_2.DeepSpeedZeroOptimizer.step"] = "0" * 16
        zero_hooks.MIRRORED_SOURCES["stage3.DeepSpeedZeroOptimizer_Stage3._get_norm_groups"] = "0" * 16
        zero_hooks.MIRRORED_SOURCES["stage3.DeepSpeedZeroOptimizer_Stage3.step"] = "0" * 16
    try:
        ours, _, _, _ = ldb_ds.initialize(model=copy.deepcopy(model), config=copy.deepcopy(cfg), optimizer=optimizer)
    finally:
        zero_hooks.MIRRORED_SOURCES.update(verified)
    theirs, _, _, _ = ldb_ds.initialize(model=copy.deepcopy(model), config=copy.deepcopy(cfg), optimizer=optimizer)
    installed = zero_hooks.installed_step_loops(ours.ds_engine)
    zero_hooks.uninstall_step_loops(theirs.ds_engine)
    steps = []
    step = 0
    for epoch in case.get("epochs", (0, 2, 3)):  # s = 2: FULL, DROP, FULL
        for engine in (ours, theirs):
            engine.set_epoch(epoch)
        for _ in range(2):
            calls = []
            for engine in (ours, theirs):
                counter = CollectiveCounter()
                try:
                    _train_step(engine, rank, world, step, case.get("bf16", False),
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
                          "calls_ours": calls[0], "calls_theirs": calls[1]})
            step += 1
    ours.destroy()
    theirs.destroy()
    return {"installed": installed, "steps": steps, "sub_groups": len(getattr(ours.ds_engine.optimizer, "fp16_groups", ())),
            "groups": len(ours.controller.group_dicts)}


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
