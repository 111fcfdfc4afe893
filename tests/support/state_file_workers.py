"""Rank code of tests/dist/test_state_file_dist.py: one LDB checkpoint-state format for every entry.

The same model, batches and config through ``ldb_ds.initialize`` (an LDBEngine) and through
``deepspeed.initialize`` plus :func:`ldb_ds.attach.attach` (an attached engine, the Hugging Face
path). Checkpoints are written in today's format (``ldb_state.pt``) and in the two formats used
before it, written here the way the old code wrote them (:class:`OldFormat`), and loaded into
both entries.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F

from tests.support.core_workers import ds_config, make_model, window_batch

SAVE_AFTER = 4          # optimizer steps before the save: epoch 0 (FULL) and epoch 1 (DROP)
TOTAL = 8               # steps of the uninterrupted run
STEPS_PER_EPOCH = 2
FORMATS = ("state_file", "client_state", "attached_file")
ENTRIES = ("ldb_engine", "attached")


def config(stage: int = 2, optimizer: str = "sgd", **extra: Any) -> dict[str, Any]:
    cfg = ds_config({"stage": stage, "optimizer": optimizer})
    # Every epoch after the first is DROP; batch_kappa 1: an attached engine's loop keeps its batch.
    cfg["layer_drop_back"].update(batch_kappa=1, sampling_rate=1)
    cfg.update(extra)
    return cfg


class Run:
    """One engine, LDBEngine or attached, driven the same way: ``set_epoch``, forward, backward, step."""

    def __init__(self, entry: str, cfg: dict[str, Any]):
        import deepspeed

        import ldb_ds
        from ldb_ds.attach import attach
        from ldb_ds.config import LDBConfig
        from ldb_ds.units import build_units, split_groups_by_unit

        self.entry = entry
        if entry == "ldb_engine":
            self.engine, _, _, _ = ldb_ds.initialize(model=make_model(), config=cfg)
            self.ds_engine, self.controller, self.driver = self.engine.ds_engine, self.engine.controller, self.engine
        else:
            model = make_model()
            ldb_cfg = LDBConfig.from_ds_config(cfg)
            units = build_units(model, ldb_cfg.granularity)
            groups, unit_of_group = split_groups_by_unit(units, [{"params": list(model.parameters())}])
            params_of_group = [list(g["params"]) for g in groups]
            self.engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=cfg)
            self.driver = attach(self.engine, ldb_cfg, units, unit_of_group, params_of_group)
            self.ds_engine, self.controller = self.engine, self.driver.controller

    def train(self, steps: range, rank: int, world: int) -> list[tuple[int, ...]]:
        """Optimizer steps ``steps`` (global indices); returns the units dropped in each."""
        masks = []
        for step in steps:
            if step % STEPS_PER_EPOCH == 0 or step == steps.start:
                self.driver.set_epoch(step // STEPS_PER_EPOCH)
            x, y = window_batch(step, 0, 4, world)
            x, y = x[rank * 4:(rank + 1) * 4], y[rank * 4:(rank + 1) * 4]
            self.engine.backward(F.cross_entropy(self.engine(x), y))
            self.engine.step()
            masks.append(tuple(self.controller.state.dropped_units))
        return masks

    def params(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.ds_engine.module.parameters()]

    def destroy(self) -> None:
        self.engine.destroy()


class OldFormat:
    """An engine whose ``save_checkpoint`` writes the LDB state as ldb_ds did before ``ldb_state.pt``
    was the one format: ``"client_state"`` as LDBEngine did (an entry of DeepSpeed's client state),
    ``"attached_file"`` as an attached engine did (DeepSpeed's files, then rank 0's file).
    Everything else passes through (``ldb_ds.checkpointing.save`` takes it as an engine)."""

    def __init__(self, run: Run, kind: str):
        self.run, self.kind = run, kind

    def __getattr__(self, name: str) -> Any:
        return getattr(self.run.engine, name)

    def save_checkpoint(self, save_dir: str, tag: Any = None, client_state: dict | None = None,
                        save_latest: bool = True, **kwargs: Any) -> Any:
        ds, controller = self.run.ds_engine, self.run.controller
        save = type(ds).save_checkpoint.__get__(ds)  # DeepSpeed's own, past attach's instance method
        if self.kind == "client_state":
            state = {**(client_state or {}), "layer_drop_back": controller.state_dict()}
            with controller.all_trainable():
                return save(save_dir, tag=tag, client_state=state, save_latest=save_latest, **kwargs)
        tag = f"global_step{ds.global_steps}" if tag is None else tag
        with controller.all_trainable():
            result = save(save_dir, tag, client_state=client_state or {}, save_latest=save_latest, **kwargs)
        if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
            path = os.path.join(save_dir, str(tag), "ldb_state.pt")
            torch.save(controller.state_dict(), path + ".tmp")
            os.replace(path + ".tmp", path)
        return result


def _model_states_keys(tag_dir: str) -> list[str]:
    saved = torch.load(os.path.join(tag_dir, "mp_rank_00_model_states.pt"), map_location="cpu", weights_only=False)
    return sorted(saved)


def formats_and_entries(rank: int, root: str) -> dict[str, Any]:
    """Save at step 4 in every format, then load each into every entry and finish the run there."""
    import deepspeed.comm as dist

    world = dist.get_world_size()
    cfg = config()
    # The uninterrupted run, an LDBEngine; the checkpoint formats written at the same point.
    ref = Run("ldb_engine", cfg)
    ref_masks = ref.train(range(SAVE_AFTER), rank, world)
    saved_state = ref.controller.state_dict()
    saved_params = ref.params()
    ref.engine.save_checkpoint(os.path.join(root, "state_file"), tag="t")
    OldFormat(ref, "client_state").save_checkpoint(os.path.join(root, "client_state"), tag="t")
    ref_masks += ref.train(range(SAVE_AFTER, TOTAL), rank, world)
    ref_final = ref.params()
    ref.destroy()
    # The attached engine's old format, from an attached engine trained the same way.
    old = Run("attached", cfg)
    old.train(range(SAVE_AFTER), rank, world)
    same_as_ref = old.controller.state_dict() == saved_state
    OldFormat(old, "attached_file").save_checkpoint(os.path.join(root, "attached_file"), tag="t")
    old.destroy()
    dist.barrier()  # rank 0's state files are written

    out: dict[str, Any] = {"ref_masks": ref_masks, "saved_state": saved_state, "same_as_ref": same_as_ref,
                           "files": {f: sorted(os.listdir(os.path.join(root, f, "t"))) for f in FORMATS},
                           "model_states_keys": {f: _model_states_keys(os.path.join(root, f, "t")) for f in FORMATS},
                           "loads": {}, "module_only": {}}
    for fmt in FORMATS:
        for entry in ENTRIES:
            run = Run(entry, cfg)
            result = run.engine.load_checkpoint(os.path.join(root, fmt), tag="t")
            loaded_state = run.controller.state_dict()
            masks = run.train(range(SAVE_AFTER, TOTAL), rank, world)
            final = run.params()
            out["loads"][(fmt, entry)] = {
                "path": result[0], "client_keys": sorted(result[1] or {}), "state": loaded_state,
                "masks": masks, "final_equal": all(torch.equal(a, b) for a, b in zip(final, ref_final))}
            run.destroy()
    # Module only: the weights load, the LDB state stays fresh (a warm start), at both entries.
    for entry in ENTRIES:
        run = Run(entry, cfg)
        fresh = run.controller.state_dict()
        result = run.engine.load_checkpoint(os.path.join(root, "state_file"), tag="t", load_module_only=True)
        out["module_only"][entry] = {
            "path": result[0], "fresh": run.controller.state_dict() == fresh,
            "weights": all(torch.equal(a, b) for a, b in zip(run.params(), saved_params))}
        run.destroy()
    return out


def save_for_universal(rank: int, root: str) -> dict[str, Any]:
    """World size 2, AdamW ZeRO-2: a FULL step then a DROP step, saved atomically by each entry."""
    import deepspeed.comm as dist

    from ldb_ds import checkpointing

    out = {}
    for entry in ENTRIES:
        run = Run(entry, config(optimizer="adamw"))
        run.train(range(1, 3), rank, dist.get_world_size())  # steps 1 (FULL) and 2 (DROP, epoch 1)
        checkpointing.save(run.engine, os.path.join(root, entry), "t")
        out[entry] = run.controller.state_dict()
        run.destroy()
    return out


def load_universal(rank: int, root: str) -> dict[str, Any]:
    """World size 1: convert each entry's checkpoint and load it into the other entry too."""
    from ldb_ds import checkpoint_fit, checkpointing

    out: dict[str, Any] = {}
    for saved_by in ENTRIES:
        save_dir = os.path.join(root, saved_by)
        tag = checkpoint_fit.to_universal(save_dir, "t")
        manifest = checkpointing.verify_local(save_dir, tag)  # the copied state file is hashed too
        for entry in ENTRIES:
            run = Run(entry, config(optimizer="adamw", checkpoint={"load_universal": True}))
            path, _ = run.engine.load_checkpoint(save_dir, tag=tag)
            out[(saved_by, entry)] = {"tag": tag, "files": sorted(manifest["files"]), "path": path,
                                      "state": run.controller.state_dict()}
            run.destroy()
    return out


__all__ = ["formats_and_entries", "save_for_universal", "load_universal", "OldFormat", "Run", "FORMATS", "ENTRIES"]
