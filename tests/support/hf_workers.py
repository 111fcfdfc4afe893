"""Code that runs inside each rank of the Hugging Face integration tests (tests/dist/test_hf_*.py).

Real ``transformers.Trainer`` / Accelerate over real DeepSpeed engines on a real gloo group. The
model is a tiny ViT built from a config (no download) on the bundled digits data; every model
instance of a rank is built first, before any DeepSpeed config exists in the process, so all
runs start from the same weights. The test process gets back plain data: masks per step,
final weights, bitwise checks of dropped units, gradient bytes counted at the collectives.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch.utils.data import Dataset, IterableDataset

from ldb_ds.bench.comm_count import ReductionCounter
from tests.support.core_workers import bitwise_equal, gathered_params, unit_snapshot

SAMPLES = 64          # 4 optimizer steps per epoch at 8 per rank on 2 ranks
PER_RANK = 8
LDB = {"enabled": True, "sampling_rate": 1, "drop_rate": 0.5, "keep_first": 1, "keep_last": 1,
       "granularity": "block", "batch_kappa": 1, "seed": 7}


def make_vit():
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    # Dropout off: the two training paths draw different random numbers.
    cfg = ViTConfig(image_size=32, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=3,
                    num_attention_heads=2, intermediate_size=64, num_labels=10, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0)
    return ViTForImageClassification(cfg)


class Digits(Dataset):
    """The first ``n`` bundled digits as the Trainer's dict samples."""

    def __init__(self, n: int = SAMPLES):
        from ldb_ds.workloads.data import build_datasets

        self.base = build_datasets("digits", augment=False).train
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        x, y = self.base[i]
        return {"pixel_values": x, "labels": y}


class DigitStream(IterableDataset):
    """The first ``n`` digits as a stream without a length (a ``datasets`` stream): the Trainer
    then needs ``max_steps`` and counts ``max_steps`` batches per epoch in ``state.epoch``."""

    def __init__(self, n: int):
        self.samples = Digits(n)

    def __iter__(self):
        return (self.samples[i] for i in range(len(self.samples)))


def ds_config(stage: int, ldb: dict | None = None, optimizer_section: bool = False) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
        "zero_optimization": {"stage": stage}, "steps_per_print": 10_000,
        "layer_drop_back": {**LDB, **(ldb or {})},
    }
    if stage == 3:  # the Trainer's save_model then writes full weights: what the save test reads
        cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    if optimizer_section:
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "weight_decay": "auto", "torch_adam": True}}
    return cfg


def training_args(out: str, ds: dict, **kw: Any):
    from transformers import TrainingArguments

    base = dict(output_dir=out, per_device_train_batch_size=PER_RANK, num_train_epochs=2, deepspeed=ds,
                report_to=[], logging_steps=2, use_cpu=True, save_strategy="no", learning_rate=1e-3,
                weight_decay=0.01, lr_scheduler_type="constant", optim="adamw_torch", seed=0,
                disable_tqdm=True, dataloader_drop_last=True)
    base.update(kw)
    return TrainingArguments(**base)


def _shim(trainer) -> Any:
    """What tests/support/core_workers' snapshot helpers expect of an engine."""
    from types import SimpleNamespace

    att = trainer.ldb_attachment
    return SimpleNamespace(controller=att.controller, ds_engine=att.ds_engine,
                           zero_optimization_stage=att.ds_engine.zero_optimization_stage)


def final_weights(engine_like: Any, module) -> dict[str, torch.Tensor]:
    names, params = zip(*module.named_parameters())
    return dict(zip(names, gathered_params(engine_like, list(params))))


def recorder(trainer, snapshots: bool = True):
    """A TrainerCallback recording per step: mask, bytes, bitwise checks; per forward: mask and batch."""
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):
        def __init__(self):
            self.steps: list[dict[str, Any]] = []
            self.forwards: list[dict[str, Any]] = []
            self.counter = None
            self.before: dict[int, dict] = {}

        def on_train_begin(self, args, state, control, **kw):
            self.counter = ReductionCounter()
            inner = trainer.ldb_attachment.ds_engine.module

            def seen(module, a, kwargs):  # after the engine's own pre-hook opened the window
                if module.training:
                    self.forwards.append({"step": state.global_step, "dropped": trainer.ldb.dropped_units,
                                          "flags": [p.requires_grad for p in module.parameters()],
                                          "x": kwargs["pixel_values"].detach().clone(),
                                          "y": kwargs["labels"].detach().clone()})
            inner.register_forward_pre_hook(seen, with_kwargs=True)

        def on_step_begin(self, args, state, control, **kw):
            self.counter.reset()
            c = trainer.ldb_attachment.controller
            # The mask is drawn at the coming forward: snapshot every unit of a DROP step.
            self.before = {u: unit_snapshot(_shim(trainer), u) for u in range(len(c.units))} \
                if snapshots and c.mode.value == "DROP" else {}

        def on_step_end(self, args, state, control, **kw):
            ldb = trainer.ldb
            rec = {"step": state.global_step, "epoch": ldb.epoch, "mode": ldb.mode.value,
                   "dropped": ldb.dropped_units, "grad_bytes_expected": ldb.grad_bytes_step,
                   "grad_bytes_counted": self.counter.bytes, "reduction_calls": list(self.counter.calls)}
            if self.before:
                after = {u: unit_snapshot(_shim(trainer), u) for u in self.before}
                rec["dropped_untouched"] = {u: bitwise_equal(self.before[u], after[u]) for u in ldb.dropped_units}
                rec["kept_changed"] = {u: not bitwise_equal(self.before[u], after[u]) for u in self.before
                                       if u not in ldb.dropped_units}
                rec["snapshot_keys"] = sorted(next(iter(after.values())))
            self.steps.append(rec)

        def on_train_end(self, args, state, control, **kw):
            self.counter.close()

    return Recorder()


def _run_trainer(model, out: str, ds: dict, *, resume: str | None = None, snapshots: bool = True,
                 train_dataset: Any = None, callbacks: tuple = (), **kw: Any) -> tuple[Any, Any]:
    from ldb_ds.integrations.hf import LDBTrainer

    trainer = LDBTrainer(model=model, args=training_args(out, ds, **kw),
                         train_dataset=Digits() if train_dataset is None else train_dataset)
    rec = recorder(trainer, snapshots)
    trainer.add_callback(rec)
    for cb in callbacks:
        trainer.add_callback(cb)
    trainer.train(resume_from_checkpoint=resume)
    return trainer, rec


def save_at(steps: set[int]):
    """A TrainerCallback that has the Trainer checkpoint after the given optimizer steps."""
    from transformers import TrainerCallback

    class SaveAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step in steps:
                control.should_save = True

    return SaveAt()


def epoch_stops(stop_after: dict[int, int]):
    """A TrainerCallback counting the Trainer's epochs (its loop index, from 0) and ending
    epoch ``e`` after ``stop_after[e]`` optimizer steps (``control.should_epoch_stop``)."""
    from transformers import TrainerCallback

    class EpochStops(TrainerCallback):
        def __init__(self):
            self.epoch = -1
            self.steps_in_epoch = 0
            self.epoch_of_step: dict[int, int] = {}

        def on_epoch_begin(self, args, state, control, **kw):
            self.epoch += 1
            self.steps_in_epoch = 0

        def on_step_end(self, args, state, control, **kw):
            self.steps_in_epoch += 1
            self.epoch_of_step[state.global_step] = self.epoch
            if self.steps_in_epoch == stop_after.get(self.epoch):
                control.should_epoch_stop = True

    return EpochStops()


def _ldb_initialize_run(model, trainer, batches: list[tuple[torch.Tensor, torch.Tensor]],
                        steps_per_epoch: int) -> dict[str, Any]:
    """The same run through ldb_ds.initialize: the Trainer's final DeepSpeed config, optimizer and batches."""
    from transformers import Trainer

    import ldb_ds

    ds = dict(trainer.accelerator.deepspeed_config)  # "auto" values resolved by the Trainer
    decay = set(trainer.get_decay_parameter_names(model))
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if n in decay], "weight_decay": trainer.args.weight_decay},
              {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
    opt_cls, opt_kwargs = Trainer.get_optimizer_cls_and_kwargs(trainer.args, model)
    engine, _, _, _ = ldb_ds.initialize(model=model, model_parameters=groups, config=ds,
                                        optimizer=lambda params: opt_cls(params, **opt_kwargs))
    masks = []
    for i, (x, y) in enumerate(batches):
        if i % steps_per_epoch == 0:
            engine.set_epoch(i // steps_per_epoch)
        loss = engine(pixel_values=x, labels=y).loss
        engine.backward(loss)
        engine.step()
        masks.append(engine.ldb.dropped_units)
    result = {"masks": masks, "final": final_weights(engine, engine.module),
              "groups": len(engine.ds_engine.basic_optimizer.param_groups)}
    engine.destroy()
    return result


# --------------------------------------------------------------------------- the workers


def trainer_cases(rank: int, stages: list[int], workdir: str) -> dict[str, Any]:
    """Per stage: an LDBTrainer run (checkpoints at the epoch boundary and mid-DROP-epoch), the
    same through ldb_ds.initialize, and a resume from each checkpoint; then the Trainer's epochs
    ended early, the optimizer-section run and the refusals."""
    import warnings

    from ldb_ds.integrations.hf import LDBTrainer

    models = {(s, k): make_vit() for s in stages for k in ("trainer", "initialize", "resume", "boundary")}
    models["dsopt"] = make_vit()
    models["checkpointed"] = make_vit()
    models["epochs"], models["epochs_resumed"] = make_vit(), make_vit()
    out: dict[str, Any] = {}
    for stage in stages:
        d = os.path.join(workdir, f"zero{stage}")
        ds = ds_config(stage)
        # checkpoint-4 ends the FULL epoch 0; checkpoint-6 is inside the DROP epoch 1.
        trainer, rec = _run_trainer(models[(stage, "trainer")], d, ds, save_strategy="steps", save_steps=6,
                                    callbacks=(save_at({4}),))
        r: dict[str, Any] = {"steps": rec.steps, "final": final_weights(_shim(trainer), trainer.model),
                             "units": [u.name for u in trainer.ldb.units], "log_history": trainer.state.log_history,
                             "groups": len(trainer.ldb_attachment.controller.group_dicts),
                             "flags_after_train": [p.requires_grad for p in trainer.model.parameters()],
                             "param_names": [n for n, _ in trainer.model.named_parameters()],
                             "counts": (trainer.ldb.steps, trainer.ldb.drop_steps)}
        forwards = rec.forwards
        r["forward_masks"] = [(f["step"], f["dropped"]) for f in forwards]
        batches = [(f["x"], f["y"]) for f in forwards]
        r["initialize"] = _ldb_initialize_run(models[(stage, "initialize")], trainer, batches, steps_per_epoch=4)
        ckpt = os.path.join(d, "checkpoint-6")
        r["checkpoint_files"] = sorted(os.path.relpath(os.path.join(dp, f), ckpt)
                                       for dp, _, fs in os.walk(ckpt) for f in fs)
        if rank == 0 and os.path.isfile(os.path.join(ckpt, "model.safetensors")):
            from safetensors.torch import load_file

            r["saved_model_keys"] = sorted(load_file(os.path.join(ckpt, "model.safetensors")))
        resumed, rec_b = _run_trainer(models[(stage, "resume")], d, ds, resume=ckpt, snapshots=False)
        r["resumed"] = {"steps": rec_b.steps, "final": final_weights(_shim(resumed), resumed.model),
                        "counts": (resumed.ldb.steps, resumed.ldb.drop_steps)}
        resumed, rec_b = _run_trainer(models[(stage, "boundary")], d, ds, resume=os.path.join(d, "checkpoint-4"),
                                      snapshots=False)
        r["resumed_at_boundary"] = {"steps": rec_b.steps, "final": final_weights(_shim(resumed), resumed.model),
                                    "counts": (resumed.ldb.steps, resumed.ldb.drop_steps)}
        out[stage] = r

    # The Trainer's epochs as its loop counts them, when they end before len(dataloader) batches:
    # a stream (state.epoch then counts max_steps batches per epoch) of 3 steps per pass, and
    # even epochs ended after 2 steps by a callback; 5 epochs in the 12 steps. Checkpoint-6 is
    # in epoch 2; the Trainer resumes it at its epoch 6 // 12 = 0.
    epochs_dir, epochs_ds = os.path.join(workdir, "epochs"), ds_config(0, {"sampling_rate": 2})
    for key, model, resume, stops in (("epochs", models["epochs"], None, epoch_stops({0: 2, 2: 2, 4: 2})),
                                      ("epochs_resumed", models["epochs_resumed"],
                                       os.path.join(epochs_dir, "checkpoint-6"), epoch_stops({}))):
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            _, epochs_rec = _run_trainer(model, epochs_dir, epochs_ds, resume=resume, snapshots=False,
                                         train_dataset=DigitStream(3 * 2 * PER_RANK), max_steps=12,
                                         callbacks=(stops, save_at({6})))
        steps = epochs_rec.steps
        out[key] = {"trainer_epochs": [stops.epoch_of_step[rec["step"]] for rec in steps],
                    "ldb_epochs": [rec["epoch"] for rec in steps], "modes": [rec["mode"] for rec in steps],
                    "dropped": [rec["dropped"] for rec in steps],
                    "warnings": [str(w.message) for w in seen if "ldb_ds" in str(w.message)]}

    # The Trainer's gradient checkpointing (transformers' default: non-reentrant) at ZeRO-2 over
    # the same FULL and DROP epochs as the stage-2 run above: the same masks and weights.
    if 2 in stages:
        trainer, rec = _run_trainer(models["checkpointed"], os.path.join(workdir, "checkpointed"), ds_config(2),
                                    snapshots=False, gradient_checkpointing=True)
        layers = [m for m in trainer.model.modules() if hasattr(m, "gradient_checkpointing")]
        out["checkpointed"] = {"final": final_weights(_shim(trainer), trainer.model),
                               "masks": [r["dropped"] for r in rec.steps],
                               "enabled": bool(layers) and all(m.gradient_checkpointing for m in layers)}

    # The JSON's optimizer section (DeepSpeed builds the optimizer), with gradient accumulation.
    trainer, rec = _run_trainer(models["dsopt"], os.path.join(workdir, "dsopt"), ds_config(2, optimizer_section=True),
                                gradient_accumulation_steps=2)
    out["dsopt"] = {"steps": rec.steps, "forward_masks": [(f["step"], f["dropped"], f["flags"]) for f in rec.forwards],
                    "groups": len(trainer.ldb_attachment.controller.group_dicts),
                    "basic_optimizer": type(trainer.ldb_attachment.ds_engine.basic_optimizer).__name__,
                    "units": len(trainer.ldb.units)}

    errors = {}
    nvme = ds_config(2)
    nvme["zero_optimization"]["offload_optimizer"] = {"device": "nvme", "nvme_path": workdir}
    for name, ds in (("batch_kappa", ds_config(2, {"batch_kappa": 2})),
                     ("block", ds_config(2, {"block_classes": ["NoSuchLayer"]})), ("nvme", nvme)):
        try:
            t = LDBTrainer(model=make_vit(), args=training_args(os.path.join(workdir, name), ds),
                           train_dataset=Digits())
            t.train()
            errors[name] = None
        except ValueError as err:  # LDBConfigError is a ValueError
            errors[name] = f"{type(err).__name__}: {err}"
    out["errors"] = errors

    # The stage-2 run's checkpoint (LDB on, block units) resumed with LDB off and at module
    # granularity: other param groups, refused before anything is built or loaded.
    layout: dict[str, Any] = {}
    if 2 in stages:
        ckpt = os.path.join(workdir, "zero2", "checkpoint-6")
        for name, ldb in (("ldb_off", {"enabled": False}), ("module", {"granularity": "module"})):
            t = LDBTrainer(model=make_vit(), args=training_args(os.path.join(workdir, f"layout_{name}"),
                                                                ds_config(2, ldb)), train_dataset=Digits())
            try:
                t.train(resume_from_checkpoint=ckpt)
                layout[name] = None
            except ValueError as err:
                layout[name] = str(err)
            layout[f"{name}_built_an_engine"] = t.model_wrapped is not t.model
    out["layout"] = layout

    # LDB off: the plain Trainer (the Trainer's own two groups, no callback, nothing attached).
    off = LDBTrainer(model=make_vit(), args=training_args(os.path.join(workdir, "off"),
                                                         ds_config(2, {"enabled": False})), train_dataset=Digits())
    out["disabled"] = {"groups": len(off.create_optimizer().param_groups),
                       "callbacks": [type(cb).__name__ for cb in off.callback_handler.callbacks]}
    return out


def accelerate_case(rank: int, workdir: str) -> dict[str, Any]:
    """The Accelerate recipe at ZeRO-2: plan_param_groups, accelerator.prepare, plan.attach, a
    hand-written loop over a FULL and a DROP epoch, save_state/load_state; then the same
    batches through ldb_ds.initialize."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DeepSpeedPlugin
    from torch.utils.data import DataLoader

    import ldb_ds
    from ldb_ds.integrations.hf import plan_param_groups

    model, twin = make_vit(), make_vit()
    cfg = {"train_micro_batch_size_per_gpu": PER_RANK, "gradient_accumulation_steps": 1, "gradient_clipping": 1.0,
           "zero_optimization": {"stage": 2}, "steps_per_print": 10_000, "zero_allow_untested_optimizer": True,
           "layer_drop_back": dict(LDB)}
    # On a CPU Accelerate's DeepSpeed path finds no backend and runs as one process, unless the
    # CPU (gloo) state comes first: what the Trainer's use_cpu=True does (docs/usage.md recipe).
    PartialState(cpu=True)
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=dict(cfg)))

    def decay_groups(m):
        named = list(m.named_parameters())
        return [{"params": [p for n, p in named if p.ndim >= 2], "weight_decay": 0.01},
                {"params": [p for n, p in named if p.ndim < 2], "weight_decay": 0.0}]

    plan = plan_param_groups(model, cfg, decay_groups(model))
    optimizer = torch.optim.AdamW(plan.groups, lr=1e-3)
    loader = DataLoader(Digits(), batch_size=PER_RANK, shuffle=False, drop_last=True)
    engine, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    ldb = plan.attach(engine)
    shim = type("Shim", (), {"controller": ldb.controller, "ds_engine": engine,
                             "zero_optimization_stage": engine.zero_optimization_stage})()
    steps, batches, saved = [], [], None
    for epoch in range(2):
        ldb.set_epoch(epoch)
        for batch in loader:
            before = {u: unit_snapshot(shim, u) for u in range(len(plan.units))} if epoch == 1 else {}
            with accelerator.accumulate(engine):
                loss = engine(**batch).loss
                accelerator.backward(loss)
                optimizer.step()
                optimizer.zero_grad()
            batches.append((batch["pixel_values"].clone(), batch["labels"].clone()))
            rec = {"mode": ldb.ldb.mode.value, "dropped": ldb.ldb.dropped_units}
            if before:
                after = {u: unit_snapshot(shim, u) for u in before}
                rec["untouched"] = all(bitwise_equal(before[u], after[u]) for u in rec["dropped"])
                rec["kept_changed"] = all(not bitwise_equal(before[u], after[u]) for u in before
                                          if u not in rec["dropped"])
            steps.append(rec)
            if len(steps) == 6:
                accelerator.save_state(os.path.join(workdir, "acc"))
                saved = ldb.controller.state_dict()
    final = final_weights(shim, engine.module)
    # load_state restores the LDB state saved with the checkpoint (it moved on since).
    moved_on = ldb.controller.state_dict()
    accelerator.load_state(os.path.join(workdir, "acc"))
    restored = ldb.controller.state_dict()
    files = sorted(os.path.relpath(os.path.join(dp, f), workdir) for dp, _, fs in os.walk(workdir) for f in fs)

    # The same batches through ldb_ds.initialize.
    ref, _, _, _ = ldb_ds.initialize(model=twin, model_parameters=decay_groups(twin), config=cfg,
                                     optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3))
    ref_masks = []
    for i, (x, y) in enumerate(batches):
        if i % 4 == 0:
            ref.set_epoch(i // 4)
        ref.backward(ref(pixel_values=x, labels=y).loss)
        ref.step()
        ref_masks.append(ref.ldb.dropped_units)
    result = {"steps": steps, "final": final, "ref_final": final_weights(ref, ref.module), "ref_masks": ref_masks,
              "saved_steps": saved["steps"], "moved_on_steps": moved_on["steps"], "restored": restored,
              "saved": saved, "files": files}
    ref.destroy()
    return result


__all__ = ["trainer_cases", "accelerate_case", "make_vit", "Digits", "ds_config", "training_args", "final_weights"]
