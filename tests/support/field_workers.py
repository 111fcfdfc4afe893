"""Code that runs inside the ranks of tests/dist/test_field_dist.py: the setups users bring.

Real ldb_ds engines over real DeepSpeed engines on a real gloo group: the user's own
DataLoader, the end of training (``eval``/``finish``/``destroy``), and the setups refused
at initialize that need a process group to be built (a PipelineModule, DeepSpeed's ZenFlow
wrapper).
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from tests.support.core_workers import IN_DIM, CLASSES, MICRO_BATCH, ds_config, make_model, window_batch


def _flags(engine) -> list[bool]:
    return [p.requires_grad for p in engine.module.parameters()]


def own_loader_case(rank: int, scaling: str, follow: bool) -> dict[str, Any]:
    """The user's own DataLoader over FULL and DROP epochs; which warnings the engine gives.

    ``follow``: the loop rebuilds its loader from ``engine.micro_batch_size`` after each
    ``set_epoch`` (one of the fixes the warning names).
    """
    import ldb_ds

    cfg = ds_config({"stage": 1, "optimizer": "sgd", "ldb": {"sampling_rate": 1, "batch_scaling": scaling}})
    engine, _, _, _ = ldb_ds.initialize(model=make_model(), config=cfg)
    g = torch.Generator().manual_seed(rank)
    data = TensorDataset(torch.randn(60, IN_DIM, generator=g), torch.randint(0, CLASSES, (60,), generator=g))
    seen = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for epoch in range(4):  # FULL, DROP, DROP, DROP
            engine.set_epoch(epoch)
            batch = engine.micro_batch_size if follow else MICRO_BATCH
            # drop_last=False: the epoch's last batch is smaller, which must not warn.
            loader = DataLoader(data, batch_size=batch, shuffle=False, drop_last=False)
            for i, (x, y) in enumerate(loader):
                if i >= 3 and i != len(loader) - 1:
                    continue
                engine.backward(F.cross_entropy(engine(x), y))
                engine.step()
                seen.append(len(x))
    messages = [str(w.message) for w in caught if "micro_batch" in str(w.message)]
    result = {"messages": messages, "expected": engine.micro_batch_size, "seen": seen}
    engine.destroy()
    return result


def _step(engine, rank: int, step: int) -> None:
    per_rank = engine.micro_batch_size
    x, y = window_batch(step, 0, per_rank, 2)
    x, y = x[rank * per_rank:(rank + 1) * per_rank], y[rank * per_rank:(rank + 1) * per_rank]
    engine.backward(F.cross_entropy(engine(x), y))
    engine.step()


def _exports(engine, rank: int, directory: str, tag: str) -> dict[str, Any]:
    """The names in ``save_16bit_model`` (rank 0 writes the file) and ``module_state_dict``, both
    with ``exclude_frozen_parameters=True``, and the model's parameter names."""
    saved = engine.save_16bit_model(directory, f"export_{tag}.bin", exclude_frozen_parameters=True)
    torch.distributed.barrier()  # rank 0's file is complete
    path = os.path.join(directory, f"export_{tag}.bin")
    return {"saved": saved, "file": sorted(torch.load(path, map_location="cpu")) if rank == 0 else None,
            "module_state_dict": sorted(engine.module_state_dict(exclude_frozen_parameters=True)),
            "parameters": sorted(n for n, _ in engine.module.named_parameters())}


def end_of_training_case(rank: int, stage: int, ckpt_dir: str) -> dict[str, Any]:
    """After the last DROP step: eval()/finish()/destroy() make every unit trainable again."""
    import ldb_ds

    cfg = ds_config({"stage": stage, "optimizer": "sgd", "ldb": {"sampling_rate": 1, "drop_rate": 0.9,
                                                                "resample": "epoch"}})
    cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True  # else no ZeRO-3 export
    engine, _, _, _ = ldb_ds.initialize(model=make_model(), config=cfg)
    out: dict[str, Any] = {}
    engine.set_epoch(0)
    _step(engine, rank, 0)
    engine.set_epoch(1)  # DROP; one mask for the whole epoch
    _step(engine, rank, 1)
    out["dropped"] = engine.ldb.dropped_units
    out["flags_after_step"] = _flags(engine)
    # Evaluation sees the whole model trainable; training afterwards puts the epoch's mask back.
    assert engine.eval() is engine
    out["flags_in_eval"] = _flags(engine)
    with torch.no_grad():
        engine(torch.zeros(2, IN_DIM))
    out["flags_after_eval_forward"] = _flags(engine)
    engine.train()
    _step(engine, rank, 2)
    out["dropped_after_eval"] = engine.ldb.dropped_units
    out["flags_after_eval_step"] = _flags(engine)
    # finish() in the middle of a window is refused; after step() it releases the mask.
    output = engine(torch.zeros(MICRO_BATCH, IN_DIM))
    try:
        engine.finish()
        out["finish_mid_window"] = None
    except RuntimeError as err:
        out["finish_mid_window"] = str(err)
    engine.backward(output.sum() * 0)
    engine.step()
    out["flags_before_finish"] = _flags(engine)
    # The whole-model exports between the steps of a DROP epoch, asked to leave frozen parameters
    # out: every unit in them (the dropped ones are requires_grad=False right now), the mask after.
    out["exports_before"] = _exports(engine, rank, ckpt_dir, "before")
    out["flags_after_export"] = _flags(engine)
    engine.save_checkpoint(ckpt_dir, tag="before")
    engine.finish()
    out["flags_after_finish"] = _flags(engine)
    out["exports_after"] = _exports(engine, rank, ckpt_dir, "after")
    engine.save_checkpoint(ckpt_dir, tag="after")
    engine.destroy()

    # The same state saved with the mask applied and after finish(): the same checkpoint.
    def load(tag):
        files = sorted(f for f in os.listdir(os.path.join(ckpt_dir, tag)) if f.endswith(".pt"))
        return {f: torch.load(os.path.join(ckpt_dir, tag, f), weights_only=False, map_location="cpu")
                for f in files}
    out["ckpt_before"], out["ckpt_after"] = load("before"), load("after")

    # destroy() at the end of an aborted window (forward without step) still releases.
    engine, _, _, _ = ldb_ds.initialize(model=make_model(), config=cfg)
    engine.set_epoch(1)
    engine(torch.zeros(MICRO_BATCH, IN_DIM))
    out["flags_mid_window"] = _flags(engine)
    engine.destroy()
    out["flags_after_destroy"] = _flags(engine)
    return out


def refused_after_process_group_case(rank: int) -> dict[str, str]:
    """Setups whose refusal needs a process group to build them: each error message, by name."""
    import deepspeed
    from torch import nn

    import ldb_ds

    cfg = ds_config({"stage": 2, "optimizer": "sgd"})
    errors: dict[str, str] = {}

    def attempt(name, **kwargs):
        try:
            engine, _, _, _ = ldb_ds.initialize(**kwargs)
            engine.destroy()
            errors[name] = "no error"
        except Exception as err:  # noqa: BLE001 - the test reads the type and message
            errors[name] = f"{type(err).__name__}: {err}"

    layers = [nn.Linear(IN_DIM, IN_DIM) for _ in range(4)] + [nn.Linear(IN_DIM, CLASSES)]
    pipe = deepspeed.pipe.PipelineModule(layers=layers, num_stages=1, loss_fn=nn.CrossEntropyLoss())
    attempt("pipeline", model=pipe, config=cfg)

    # DeepSpeed's ZenFlow (ZeRO-2 with a selective, partly deferred optimizer step) builds its own
    # optimizer wrapper, a subclass of ZeRO-1/2's. ldb_ds.initialize refuses the config before
    # DeepSpeed runs (zero_hooks.refuse_unverified_step_paths); behind that, the group check
    # refuses any wrapper it has not verified: shown here on a real ZenFlow engine.
    zen = ds_config({"stage": 2, "optimizer": "adamw"})
    zen["zero_optimization"].update(offload_optimizer={"device": "cpu"}, zenflow={
        "topk_ratio": 0.1, "select_strategy": "step", "select_interval": 2, "update_interval": 2,
        "full_warm_up_rounds": 0, "overlap_step": False})
    zen["zero_force_ds_cpu_optimizer"] = False
    zen["optimizer"]["params"].pop("torch_adam")  # ZenFlow builds its own Adam from the params
    attempt("zenflow", model=make_model(), config=zen)
    del zen["layer_drop_back"]
    model = make_model()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=zen)
    try:
        from ldb_ds import zero_hooks

        zero_hooks.check_group_order(engine, [list(model.parameters())])
        errors["zenflow_wrapper"] = "no error"
    except Exception as err:  # noqa: BLE001 - the test reads the type and message
        errors["zenflow_wrapper"] = f"{type(err).__name__}: {err}"
    engine.destroy()
    return errors


class BlockNet(torch.nn.Module):
    """Stem, 4 blocks of two Linear layers, head; ``group_matcher`` as timm models define it."""

    def __init__(self):
        super().__init__()
        from torch import nn

        from tests.support.core_workers import HIDDEN

        torch.manual_seed(0)
        self.stem = nn.Linear(IN_DIM, HIDDEN)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(HIDDEN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN),
                                                  nn.Tanh()) for _ in range(4))
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x):
        x = torch.tanh(self.stem(x))
        for block in self.blocks:
            x = block(x)
        return self.head(x)

    def group_matcher(self, coarse: bool = False) -> dict:
        return {"stem": r"^stem", "blocks": r"^blocks\.(\d+)"}


def compiled_blocks_case(rank: int) -> dict[str, Any]:
    """The documented way to compile: granularity 'block', each block compiled on its own."""
    from torch._dynamo.utils import counters

    import ldb_ds

    cfg = ds_config({"stage": 1, "optimizer": "sgd", "ldb": {"granularity": "block", "sampling_rate": 1}})
    out: dict[str, Any] = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        model = BlockNet()
        if compiled:
            for block in model.blocks:
                block.compile(backend="eager")  # Dynamo's guards as with any backend, no C++ build
        engine, _, _, _ = ldb_ds.initialize(model=model, config=cfg)
        masks = []
        for epoch in range(3):  # FULL, DROP, DROP
            engine.set_epoch(epoch)
            for step in range(4):
                _step(engine, rank, 4 * epoch + step)
                masks.append(engine.ldb.dropped_units)
        out["compiled" if compiled else "eager"] = {
            "masks": masks, "units": [u.name for u in engine.ldb.units],
            "final": [p.detach().clone() for p in engine.module.parameters()],
            "unique_graphs": counters["stats"]["unique_graphs"]}
        try:
            engine.compile()
            out["engine_compile"] = "no error"
        except Exception as err:  # noqa: BLE001 - the test reads the type and message
            out["engine_compile"] = f"{type(err).__name__}: {err}"
        engine.destroy()
    return out


def stale_partition_case(rank: int) -> dict[str, Any]:
    """ZeRO-3 keeps a dropped unit's last gradient in its partition buffer; the hook clears it."""
    import ldb_ds
    from ldb_ds import zero_hooks

    out: dict[str, Any] = {}
    for stage in (2, 3):
        cfg = ds_config({"stage": stage, "optimizer": "sgd", "ldb": {"sampling_rate": 1, "drop_rate": 0.9}})
        engine, _, _, _ = ldb_ds.initialize(model=make_model(), config=cfg)
        engine.set_epoch(0)
        _step(engine, rank, 0)  # FULL: every unit writes its gradient partition
        engine.set_epoch(1)
        per_rank = engine.micro_batch_size
        x, y = window_batch(1, 0, per_rank, 2)
        engine.backward(F.cross_entropy(engine(x[rank * per_rank:(rank + 1) * per_rank]),
                                        y[rank * per_rank:(rank + 1) * per_rank]))
        dropped = [p for i in engine.ldb.dropped_units for p in engine.controller.units[i].params]
        if stage == 3:
            zopt = engine.ds_engine.optimizer
            # DeepSpeed's own view of each parameter's region of the buffer (stage3.py:799).
            regions = zopt._DeepSpeedZeroOptimizer_Stage3__param_id_to_grad_partition
            out["dropped"] = len(dropped)
            out["stale_before"] = sum(float(regions[p.ds_id].abs().sum()) for p in dropped)
            out["cleared"] = zero_hooks.clear_stale_gradient_partitions(engine.ds_engine)
            out["buffer_after"] = float(zopt.grad_partitions_flat_buffer.abs().sum())
        else:
            out["cleared_stage2"] = zero_hooks.clear_stale_gradient_partitions(engine.ds_engine)
        engine.step()
        engine.destroy()
    return out


def config_variants_case(rank: int, path: str, hjson_path: str) -> dict[str, Any]:
    """Every way to hand ldb_ds.initialize the DeepSpeed config: LDB on in each, and what it warned."""
    import argparse

    import ldb_ds

    cfg = ds_config({"stage": 2, "optimizer": "sgd"})
    variants = {
        "path": dict(config=path),
        "dict": dict(config=cfg),
        "config_params": dict(config_params=cfg),
        "hjson_path": dict(config=hjson_path),
        "args": dict(args=argparse.Namespace(local_rank=rank, deepspeed=True, deepspeed_config=path)),
        "deepscale_args": dict(args=argparse.Namespace(local_rank=rank, deepscale_config=path)),
    }
    out: dict[str, Any] = {}
    for name, kwargs in variants.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            engine, _, _, _ = ldb_ds.initialize(model=make_model(), **kwargs)
        out[name] = {"enabled": engine.ldb.enabled, "groups": len(engine.ds_engine.basic_optimizer.param_groups),
                     "warnings": [f"{w.category.__name__}: {w.message}" for w in caught
                                  if "ldb_ds" in str(w.message) or w.category is FutureWarning]}
        if "args" in kwargs:  # DeepSpeed filled in the rank; the user's config path is put back
            out[name]["args"] = vars(kwargs["args"])
        engine.destroy()
    return out


__all__ = ["own_loader_case", "end_of_training_case", "refused_after_process_group_case", "config_variants_case",
           "compiled_blocks_case", "BlockNet", "stale_partition_case"]
