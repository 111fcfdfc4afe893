"""``LDBTrainer``: LayerDropBack in Hugging Face ``transformers.Trainer`` on DeepSpeed.

The Trainer builds the optimizer, hands it to Accelerate, which calls ``deepspeed.initialize``
and from then on calls the raw DeepSpeed engine's forward, ``backward`` and ``step``. So LDB
comes in through the Trainer's public override points and callbacks, and as hooks on the engine
(:func:`ldb_ds.attach.attach`):

* ``create_optimizer``: the Trainer's optimizer (its weight-decay split: no decay for biases
  and norms) is regrouped into one param group per (unit, Trainer group) before DeepSpeed sees
  it. With an ``optimizer`` section in the DeepSpeed JSON, transformers hands DeepSpeed a flat
  parameter list (``accelerate.utils.DummyOptim``); it is replaced by one group per unit and
  DeepSpeed builds its optimizer over those, with the JSON's hyperparameters for every group
  (plain transformers applies them to every parameter too).
* ``on_train_begin``: LDB is attached to the DeepSpeed engine, after the set-up's refusals ran
  again on what the engine really uses (:func:`ldb_ds.setup.check_engine`: the resolved
  ``"auto"`` values, a model Accelerate compiled for ``torch_compile=True``); when resuming,
  the LDB state is read from the checkpoint.
* ``on_epoch_begin``: the epoch's mode (FULL/DROP). LDB's epoch is the index of the Trainer's
  epoch loop (its passes over the train dataloader), counted from the ``epochs_trained`` that
  ``_init_training_state`` returns, not ``floor(state.epoch)``: that is fractional at an epoch's
  start when the previous pass ended early (``control.should_epoch_stop``, or an
  ``IterableDataset`` with ``max_steps``, whose ``state.epoch`` counts ``max_steps`` batches per
  epoch), and LDB's schedule would then lag the Trainer's by one epoch or more.
* the engine's forward pre-hook opens a window (mask drawn on rank 0, broadcast, applied) at
  the first training forward of each accumulation window; the engine's ``step`` (which
  Accelerate calls at the Trainer's accumulation boundaries) hides the dropped groups inside
  DeepSpeed's step and applies the DROP learning-rate factor there, so the Trainer's
  scheduler keeps owning the LR.
* ``save_model`` and the engine's ``save_checkpoint`` run with every unit trainable; the LDB
  state goes into its own file in the checkpoint folder (``ldb_ds.attach.STATE_FILE`` in the
  DeepSpeed tag folder), because the Trainer's loader discards DeepSpeed's ``client_state``.
* ``log``: LDB's figures join the Trainer's training logs (:mod:`.logs`).

One private Trainer method is overridden, ``_init_training_state`` (see
:meth:`LDBTrainer._init_training_state`); no other is overridden or called. What this file
relies on in the Trainer's own flow, checked against transformers 5.24.0 / accelerate 1.15.0 and
transformers 5.25.0 / accelerate 1.16.0 (:data:`VERIFIED_TRANSFORMERS`; line numbers from 5.25.0
/ 1.16.0; the tests in tests/dist/test_hf_trainer.py fail if any of it changes):

* ``_inner_training_loop`` runs ``for epoch in range(epochs_trained, num_train_epochs)`` with
  ``epochs_trained`` from ``_init_training_state`` (trainer.py:1627, 1673), calling
  ``on_epoch_begin`` once per iteration;
* ``deepspeed_init`` calls ``create_optimizer`` when the JSON has no optimizer section
  (integrations/deepspeed.py:589), and ``_prepare_for_training`` calls ``create_optimizer``
  again right after ``deepspeed_init`` (trainer.py:1756), which is where a ``DummyOptim`` is
  regrouped; LDBTrainer raises at ``on_train_begin`` if it saw no optimizer;
* Accelerate calls ``engine.step()`` after ``set_gradient_accumulation_boundary`` in
  ``DeepSpeedEngineWrapper.backward`` (accelerate/utils/deepspeed.py:267-281);
* the Trainer resumes with ``engine.load_checkpoint`` before ``on_train_begin``
  (trainer.py:1848), when no mask is applied yet, so the LDB state is read at ``on_train_begin``;
* checkpoints go through ``model_wrapped.save_checkpoint(output_dir)`` (trainer.py:3605), and
  ``save_model`` at ZeRO-3 excludes parameters that do not require grad (trainer.py:4164);
* ``evaluate()`` before ``train()`` at ZeRO-3 builds an engine without an optimizer
  (``deepspeed_init(..., inference=True)``, trainer.py:2967) that ``train()`` then reuses.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import get_last_checkpoint

from deepspeed.accelerator import get_accelerator

from ... import state_file
from ...attach import Attachment
from ...config import LDBConfig
from ...controller import LDBState
from ...schedule import first_drop_epoch
from .logs import LogWindow
from .plan import LDBPlan, check_supported, plan_param_groups, split_optimizer_in_place

VERIFIED_TRANSFORMERS = ("5.24.0", "5.25")
"""transformers releases the flow above was checked against, inclusive: 5.24.0 to every 5.25.x.

The upper bound is compared on its own components only (``release[:2] <= (5, 25)``), so any
5.25 patch release is in range and 5.26.0 is not; the flow was run on 5.24.0 and 5.25.0, and
patch releases are taken to keep it. A version outside the range warns (:func:`_warn_if_unverified`).
"""


class LDBTrainer(Trainer):
    """A ``transformers.Trainer`` that runs LayerDropBack on DeepSpeed.

    Takes exactly the Trainer's arguments; ``args.deepspeed`` (or Accelerate's DeepSpeed
    plugin) must give a DeepSpeed config, whose ``layer_drop_back`` section turns LDB on.
    Without the section (or ``"enabled": false``) it is the plain Trainer. ``batch_kappa``
    must be 1 (:func:`~ldb_ds.integrations.hf.plan.check_supported`). ``granularity: "block"``
    uses the model's ``_no_split_modules`` unless the section names ``block_classes`` or
    ``block_pattern``.

    ``trainer.ldb`` is the run's :class:`~ldb_ds.controller.LDBState` once training started.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if not self.is_deepspeed_enabled:
            raise ValueError("LDBTrainer runs LayerDropBack on DeepSpeed: pass TrainingArguments(deepspeed="
                             "'ds_config.json') (or launch with Accelerate's DeepSpeed plugin); the "
                             "layer_drop_back section of that JSON configures LDB")
        self.ldb_config: LDBConfig = LDBConfig.from_ds_config(self._ldb_ds_config)
        check_supported(self.ldb_config)  # refused here, at start-up, not epochs later
        self.ldb_plan: LDBPlan | None = None
        self.ldb_attachment: Attachment | None = None
        self._ldb_resume_dir: str | None = None
        self._ldb_resumed = False
        self._ldb_next_epoch: int | None = None  # the Trainer's next epoch-loop index (_init_training_state)
        self._ldb_window = LogWindow()
        if self.ldb_config.enabled:
            _warn_if_unverified()
            if not callable(getattr(Trainer, "_init_training_state", None)):
                raise RuntimeError(
                    "LDBTrainer takes LDB's epoch from the Trainer's epoch loop, through "
                    f"Trainer._init_training_state, which transformers {_transformers_version()} does not "
                    f"have; it was checked on {_verified_range()}")
            self.add_callback(_LDBCallback(self))

    @property
    def _ldb_ds_config(self) -> dict[str, Any]:
        # Read when needed: the Trainer rebuilds the plugin's config (propagate_args_to_deepspeed).
        return self.accelerator.state.deepspeed_plugin.deepspeed_config

    @property
    def ldb(self) -> LDBState | None:
        """The LDB state of the current run (None before training starts or with LDB off)."""
        return self.ldb_attachment.ldb if self.ldb_attachment is not None else None

    # -- optimizer: one param group per (unit, Trainer group) ---------------------------------

    def create_optimizer(self, model: Any = None) -> Any:
        optimizer = super().create_optimizer(model)
        if not self.ldb_config.enabled or getattr(self.optimizer, "_ldb_plan", None) is not None:
            return optimizer
        from accelerate.utils import DummyOptim

        opt_model = self.model if model is None else model
        opt = self.optimizer
        if isinstance(opt, DummyOptim):
            # The JSON's optimizer section: DeepSpeed builds it over model_parameters, which
            # Accelerate takes from DummyOptim.params.
            plan = plan_param_groups(opt_model, self._ldb_ds_config, opt.params)
            opt.params = plan.groups
        elif isinstance(opt, torch.optim.Optimizer):
            plan = split_optimizer_in_place(
                opt, lambda groups: plan_param_groups(opt_model, self._ldb_ds_config, groups, optimizer=opt))
        else:
            raise TypeError(f"LDBTrainer regroups a torch optimizer (or DeepSpeed's, from the JSON's optimizer "
                            f"section) into one group per LDB unit; got {type(opt).__name__} "
                            f"(args.optim = {self.args.optim!r})")
        opt._ldb_plan = plan
        self.ldb_plan = plan
        return optimizer

    # -- resume, checkpoints, logging ---------------------------------------------------------

    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any, **kwargs: Any) -> Any:
        # The Trainer's own resolution of resume_from_checkpoint=True (trainer.train()).
        resume = resume_from_checkpoint
        if resume is True:
            resume = get_last_checkpoint(self.args.output_dir)
        self._ldb_resume_dir = resume or None
        self._ldb_next_epoch = None  # set again by this run's _init_training_state
        if resume and not self._ldb_ds_config.get("checkpoint", {}).get("load_universal"):
            # The Trainer resumes through the raw engine's load_checkpoint (tag None: the folder's
            # `latest`) before LDB is attached, so LDBEngine's refusal of a checkpoint with other param
            # groups (LDB off, another granularity) is made here, before anything is built or loaded;
            # DeepSpeed's own error would not say why. A universal checkpoint is remapped per parameter.
            state_file.refuse_other_layout(
                str(resume), state_file.latest_tag(str(resume)), self.ldb_config.to_dict(),
                warm_start=f"build the model from the weights in {resume} (from_pretrained, or DeepSpeed's "
                           "zero_to_fp32.py there at ZeRO-3) and call train() without resume_from_checkpoint")
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _init_training_state(self, *args: Any, **kwargs: Any) -> tuple[int, int]:
        """The Trainer's own, recording its ``epochs_trained``: the index of the first epoch it runs.

        ``_inner_training_loop`` runs ``for epoch in range(epochs_trained, num_train_epochs)`` and
        calls ``on_epoch_begin`` once per iteration, but hands callbacks only ``state.epoch``,
        which is fractional at an epoch's start whenever the previous pass ended before
        ``len(dataloader)`` batches (``control.should_epoch_stop``; an ``IterableDataset`` with
        ``max_steps``). So LDB's epoch is counted from this value, one per ``on_epoch_begin``.

        This is a private Trainer method (checked on :data:`VERIFIED_TRANSFORMERS`). On a
        transformers without it, ``LDBTrainer()`` raises, and if a transformers has it but no
        longer calls it before the epoch loop, the first ``on_epoch_begin`` raises: a wrong
        FULL/DROP schedule would train silently, so there is no fallback to ``state.epoch``.
        """
        epochs_trained, steps_trained_in_current_epoch = super()._init_training_state(*args, **kwargs)
        self._ldb_next_epoch = int(epochs_trained)
        return epochs_trained, steps_trained_in_current_epoch

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        # The Trainer's ZeRO-3 save keeps only parameters that require grad: all of them here.
        att = self.ldb_attachment
        with att.controller.all_trainable() if att is not None else contextlib.nullcontext():
            super().save_model(output_dir, _internal_call)

    def training_step(self, model: Any, inputs: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.ldb_attachment is not None:
            self._ldb_window.add_samples(_batch_size(inputs))
        return super().training_step(model, inputs, *args, **kwargs)

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self.ldb_attachment is not None and "loss" in logs:  # a training log, not eval or the final summary
            logs.update(self._ldb_window.flush(self.ldb_attachment.ds_engine.dp_world_size,
                                               logs.get("learning_rate")))
        super().log(logs, *args, **kwargs)

    # -- driven by _LDBCallback ---------------------------------------------------------------

    def _ldb_attach(self) -> None:
        engine = self.model_wrapped
        if self.ldb_attachment is not None and self.ldb_attachment.ds_engine is engine:
            return
        import deepspeed

        if not isinstance(engine, deepspeed.DeepSpeedEngine):
            raise RuntimeError(f"LDBTrainer expected a DeepSpeed engine in trainer.model_wrapped, got "
                               f"{type(engine).__name__}")
        if getattr(engine, "basic_optimizer", None) is None and engine.zero_optimization_stage() == 3:
            # Not a missing optimizer section (what ldb_ds's own check would say): evaluate() or
            # predict() before train() built a ZeRO-3 inference engine, and train() reuses it.
            raise RuntimeError(
                "LDBTrainer: the DeepSpeed engine the Trainer trains with has no optimizer: at ZeRO-3, "
                "trainer.evaluate() (or predict()) before trainer.train() builds an inference-only DeepSpeed "
                "engine (transformers' deepspeed_init(inference=True)) and train() then reuses it; the plain "
                "Trainer cannot train on it either. Call trainer.train() first; to evaluate before the first "
                "step, use TrainingArguments(eval_on_start=True), which evaluates on the training engine")
        if self.ldb_plan is None:
            raise RuntimeError("LDBTrainer did not see the Trainer create the optimizer (create_optimizer), so "
                               "DeepSpeed's param groups are not one per LDB unit; this transformers version "
                               f"differs from the ones LDBTrainer was checked on ({_verified_range()})")
        self.ldb_attachment = self.ldb_plan.attach(engine)  # also releases DeepSpeed's /dev/shm segment
        self._ldb_window = LogWindow()
        self._ldb_resumed = False
        if self._ldb_resume_dir is not None:
            # DeepSpeed's 'latest' tag of the Trainer's checkpoint folder, as the engine just loaded.
            self._ldb_resumed = self.ldb_attachment.load_state(self._ldb_resume_dir)

    def _ldb_warn_if_no_drop_epoch(self, num_train_epochs: int) -> None:
        first_drop = first_drop_epoch(self.ldb_config)
        if num_train_epochs <= first_drop:
            warnings.warn(
                f"ldb_ds: this run has {num_train_epochs} Trainer epoch(s) and LDB's first DROP epoch is epoch "
                f"{first_drop} (sampling_rate {self.ldb_config.sampling_rate}; epochs count from 0), so every "
                f"step is FULL and LDB changes nothing in this run. LDB's epochs are the Trainer's passes over "
                f"the train dataloader: raise num_train_epochs (or max_steps) to reach epoch {first_drop}",
                RuntimeWarning, stacklevel=2)

    def _ldb_epoch_begin(self) -> None:
        epoch = self._ldb_next_epoch
        if epoch is None:
            raise RuntimeError(
                "LDBTrainer: the Trainer started an epoch without calling _init_training_state, so LDB "
                f"does not know the Trainer's epoch index; transformers {_transformers_version()} differs "
                f"from the ones LDBTrainer was checked on ({_verified_range()})")
        self._ldb_next_epoch = epoch + 1
        c = self.ldb_attachment.controller
        resumed, self._ldb_resumed = self._ldb_resumed, False
        if resumed and c.epoch == epoch:
            # Resumed inside this epoch: keep the restored mode, mask stream and epoch mask.
            return
        if resumed and c.epoch != epoch - 1:
            # Not the next epoch either: the Trainer derives its resumed epoch from global_step
            # and the steps per epoch, which does not hold when epochs ended early.
            warnings.warn(
                f"ldb_ds: the Trainer resumed at its epoch {epoch} but the checkpoint's LDB state is at epoch "
                f"{c.epoch}; the Trainer computes the resumed epoch as global_step // steps per epoch, which "
                "does not match the run's epochs when they ended early (control.should_epoch_stop, an "
                "IterableDataset with max_steps). LDB follows the Trainer: this run continues with epoch "
                f"{epoch}'s mode", RuntimeWarning, stacklevel=2)
        c.set_epoch(epoch)


class _LDBCallback(TrainerCallback):
    """Forwards the Trainer's events to its LDBTrainer, and times the steps for the logs."""

    def __init__(self, trainer: LDBTrainer):
        self.trainer = trainer
        self._mark = time.perf_counter()

    def _now(self) -> float:
        get_accelerator().synchronize()  # wall clock of finished work, as the TensorBoard monitor
        return time.perf_counter()

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._ldb_attach()
        self.trainer._ldb_warn_if_no_drop_epoch(state.num_train_epochs)
        self._mark = self._now()

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.trainer._ldb_epoch_begin()
        self._mark = self._now()

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # One optimizer step ended (the engine's step ran inside the last backward); from the
        # previous step's end (or eval/save/log) to now: data, forward, backward, step.
        now = self._now()
        self.trainer._ldb_window.step_end(self.trainer.ldb_attachment.ldb, now - self._mark)
        self._mark = now

    def on_log(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._mark = self._now()

    on_evaluate = on_save = on_log

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        c = self.trainer.ldb_attachment.controller
        if not c.window_open:  # training stopped between steps: leave a normal, all-trainable model
            c.release_mask(caller="the end of Trainer.train()")


def _batch_size(inputs: Any) -> int:
    """Samples in a Trainer batch: the first dimension of its first tensor."""
    values = inputs.values() if isinstance(inputs, dict) else inputs if isinstance(inputs, (list, tuple)) else [inputs]
    for v in values:
        if torch.is_tensor(v) and v.dim() > 0:
            return int(v.shape[0])
    return 0


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _verified_range() -> str:
    low, high = VERIFIED_TRANSFORMERS
    return f"transformers {low} to {high}.x"


def _is_verified_transformers(version: str) -> bool:
    """``version`` within :data:`VERIFIED_TRANSFORMERS`: the upper bound compared on its own components."""
    from packaging.version import Version

    low, high = (Version(v).release for v in VERIFIED_TRANSFORMERS)
    release = Version(version).release
    return low <= release[:3] and release[:len(high)] <= high


def _warn_if_unverified() -> None:
    import transformers

    if not _is_verified_transformers(transformers.__version__):
        warnings.warn(f"ldb_ds: transformers {transformers.__version__} is outside the range LDBTrainer was checked "
                      f"on ({_verified_range()}); run tests/dist/test_hf_trainer.py before trusting results",
                      RuntimeWarning, stacklevel=3)


__all__ = ["LDBTrainer", "VERIFIED_TRANSFORMERS"]
