"""``ldb_ds.initialize`` and the LDB engine wrapper around a DeepSpeed engine.

The wrapper changes only *which units train in a step*; DeepSpeed still does
all the work. Per optimizer step (= one gradient-accumulation window):

1. At the first training forward of the window, rank 0 draws the mask from its
   seeded generator and broadcasts it (DROP mode only); every rank sets
   ``requires_grad=False`` on the dropped units' parameters. Autograd then
   computes no weight gradient for them, their DeepSpeed gradient hooks never
   fire, so they are never reduced (no bytes on the wire).
2. ``step()``: the basic optimizer's step hides the dropped groups
   (:mod:`ldb_ds.zero_hooks`), so parameters and optimizer state of dropped
   units stay bitwise unchanged, at every ZeRO stage.
3. After the step the mask stays in place until the next window opens, so
   everything between two steps (logging, checkpoints) sees a stable state.
   ``engine.eval()``, ``engine.finish()`` and ``engine.destroy()`` make every
   unit trainable again (the end of training); the next training window
   applies a mask again.

The state and its rules live in :class:`ldb_ds.controller.LDBController`, the step protocol and
every patch on DeepSpeed in :class:`ldb_ds.installation.Installation` (shared with engines driven
by other loops); this
module connects it to a DeepSpeed engine. docs/design.md, section 3,
follows one mask from the config to the optimizer step.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import deepspeed
from deepspeed import comm as dist
from deepspeed.accelerator import get_accelerator

from . import refusals, state_file, zero_hooks
from .initialize_args import (check_initialize_args, explain_scheduler_errors, params_of, rebuild_optimizer,
                              refuse_bound_scheduler, resolve_config, without_config_args)
from .installation import install
from .config import LDBConfig, load_ds_config
from .controller import LDBState
from .refusals import LDBUnsupportedError
from .sampler import ScalableBatchSampler, build_dataloader
from .schedule import Mode, check_epoch
from .setup import check_engine, prepare
from .state_file import CLIENT_STATE_KEY  # re-exported: ldb_ds.engine.CLIENT_STATE_KEY is public
from .units import Unit


class DropBatchWarning(UserWarning):
    """A DROP epoch's micro batch is not ``engine.micro_batch_size`` (a category of its own, so that a
    caller who does that on purpose, such as a benchmark, can filter exactly this warning)."""


class LDBEngine:
    """A DeepSpeed engine with LayerDropBack.

    Behaves as the wrapped ``deepspeed.DeepSpeedEngine`` (attribute access is
    passed through), with ``set_epoch``, ``ldb``, ``micro_batch_size`` and
    ``finish`` added and ``forward``/``step``/``train``/``eval``/``destroy``/
    ``save_checkpoint``/``load_checkpoint`` extended.
    The wrapped engine is ``engine.ds_engine``; the LDB state is ``engine.controller``.
    """

    def __init__(self, ds_engine: Any, cfg: LDBConfig, units: Sequence[Unit], unit_of_group: Sequence[int],
                 dataloader: DataLoader | None):
        self.ds_engine = ds_engine
        self.training_dataloader = dataloader
        self.installation = install(ds_engine, cfg, units, unit_of_group)
        self.controller = self.installation.controller
        self.patches = self.installation.patches  # every change to DeepSpeed's objects (describe(), remove())
        self.ldb: LDBState = self.controller.state
        self._base_train_batch = ds_engine.train_batch_size()
        self._batch_checked = True   # set False by set_epoch in DROP epochs with micro_batch scaling
        self._batch_warned = False
        self._backward_since_step = False  # step() without backward() fails deep inside DeepSpeed
        # DeepSpeed runs a torch-style loss.backward() through its hooks at ZeRO 1-3 (ZeRO-0 refuses it).
        self._torch_style_backward = zero_hooks.zero_stage(ds_engine) > 0
        self._resumed_epoch: int | None = None  # the epoch a checkpoint restored, until the next set_epoch
        # A loop that never calls set_epoch trains epoch 0 (FULL) forever: LDB silently does nothing.
        self._epoch_given = not cfg.enabled

    # -- pass-through ---------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails: everything DeepSpeed has is reachable.
        if name in ("ds_engine", "controller"):
            raise AttributeError(name)
        return getattr(self.ds_engine, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def __repr__(self) -> str:
        return f"LDBEngine({self.ldb!r}, zero_stage={zero_hooks.zero_stage(self.ds_engine)})"

    # -- training loop ------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self.controller.window_open and self.ds_engine.module.training and torch.is_grad_enabled():
            if not self._epoch_given:
                self._epoch_given = True  # warned once
                warnings.warn("ldb_ds: training started without engine.set_epoch(epoch): every step is then in "
                              "epoch 0, a FULL epoch, so no layer is ever dropped and LDB does nothing. Call "
                              "engine.set_epoch(epoch) at the start of each epoch", RuntimeWarning, stacklevel=2)
            self.controller.open_window()
            if not self._batch_checked:
                self._check_micro_batch(args, kwargs)
        return self.ds_engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> Any:
        result = self.ds_engine.backward(loss, **kwargs)
        self._backward_since_step = True
        return result

    def step(self, **kwargs: Any) -> Any:
        """DeepSpeed's ``step()`` with LDB's step protocol; needs a backward since the last one.

        Without one DeepSpeed fails inside its optimizer wrappers (an ``IndexError`` at ZeRO-0, a
        ``KeyError`` at ZeRO 1-3, LDB on or off), so it is refused here with what to do. The
        backward is ``engine.backward(loss)``, or at ZeRO 1-3 DeepSpeed 0.19.8's torch-style
        ``loss.backward()`` (its hooks run DeepSpeed's backward; ZeRO-0 refuses it itself): that is
        assumed when a training forward went through the engine since the last step.
        """
        if not self._backward_since_step and not (self._torch_style_backward and self.controller.window_open):
            raise RuntimeError("ldb_ds: engine.step() was called with no engine.backward(loss) since the last "
                               "step(); call engine.backward(loss) first (each micro step: loss = "
                               "criterion(engine(x), y); engine.backward(loss); engine.step()).")
        result = self.installation.run_step(self.ds_engine.step, **kwargs)
        self._backward_since_step = False
        return result

    def train(self, mode: bool = True) -> "LDBEngine":
        """DeepSpeed's ``train(mode)``; ``train(False)`` is :meth:`eval`."""
        self.ds_engine.train(mode)
        if not mode:
            self._release_between_windows()
        return self

    def eval(self) -> "LDBEngine":
        """DeepSpeed's ``eval()``, with every unit made trainable again.

        Evaluation (or fine-tuning code that collects ``requires_grad`` parameters)
        sees the whole model; the next training window applies a mask again.
        """
        return self.train(False)

    def finish(self) -> None:
        """End of training: every unit ``requires_grad=True`` again, as before ``initialize``.

        Call after the last ``step()``; ``eval()`` and ``destroy()`` do the same. The
        weights, the optimizer and checkpoints are not touched. Raises in the middle of
        an accumulation window (forward/backward since the last ``step()``).
        """
        if self.controller.cfg.enabled:  # disabled: plain DeepSpeed, the flags are the user's
            self.controller.release_mask(caller="engine.finish()")

    def destroy(self) -> Any:
        """DeepSpeed's ``destroy()``, after making every unit trainable (abandoning an open window)
        and taking every ldb_ds patch off DeepSpeed's objects (``installation.remove()``)."""
        self.installation.remove()
        return self.ds_engine.destroy()

    def compile(self, *args: Any, **kwargs: Any) -> Any:
        """DeepSpeed's ``compile()``: refused with LDB on (it compiles the whole model; see refusals)."""
        if self.controller.cfg.enabled:
            refusals.refuse_engine_compile()
        return self.ds_engine.compile(*args, **kwargs)

    def _release_between_windows(self) -> None:
        # In the middle of a window the mask must stay (a unit dropped for part of a window would
        # get a partial or stale gradient); the window's own step() ends it.
        if self.controller.cfg.enabled and not self.controller.window_open:
            self.controller.release_mask(caller="engine.eval()")

    @property
    def micro_batch_size(self) -> int:
        """Per-rank batch size of one micro step in the current mode."""
        base = self.ds_engine.train_micro_batch_size_per_gpu()
        if self.controller.cfg.batch_scaling == "micro_batch":
            return base * self.controller.batch_factor
        return base

    def set_epoch(self, epoch: int) -> Mode:
        """Enter the mode of ``epoch`` (FULL/DROP), scale batch size, re-seed the sampler.

        Call at an accumulation boundary (between epochs). The learning-rate
        factor is applied inside each optimizer step, so LR schedulers keep
        their own values. Returns the mode.
        """
        c = self.controller
        epoch = check_epoch(epoch, "engine.set_epoch(epoch)")
        self._epoch_given = True
        if epoch == self._resumed_epoch and not c.window_open:
            # The first set_epoch after load_checkpoint, for the epoch the checkpoint was taken in:
            # the resumed loop (for epoch in range(saved_epoch, epochs): engine.set_epoch(epoch)).
            # The restored mode and mask stream go on where the interrupted run was, with
            # resample "epoch" the epoch's one mask too; starting the epoch afresh would draw
            # another mask than the uninterrupted run drew.
            mode = c.mode
        else:
            mode = c.set_epoch(epoch)
        self._resumed_epoch = None
        self._follow_mode(mode)
        return mode

    def _follow_mode(self, mode: Mode) -> None:
        """The batch of ``mode`` (gradient accumulation or the returned loader's batch), the loader's
        sampler at the controller's epoch, and the DROP-batch check of a user's own loader."""
        c = self.controller
        factor = c.batch_factor
        if c.cfg.enabled and c.cfg.batch_scaling == "accumulation":
            # The DROP epoch's windows start at its first micro step, whatever the FULL epoch's
            # number of micro steps (zero_hooks.accumulation says why that needs help).
            zero_hooks.set_accumulation_steps(self.ds_engine, self._base_train_batch * factor)
        loader = self.training_dataloader
        if loader is not None and isinstance(loader.batch_sampler, ScalableBatchSampler):
            loader.batch_sampler.factor = factor if c.cfg.batch_scaling == "micro_batch" else 1
            # Whole accumulation windows per epoch with LDB on (a mask covers a window; set_epoch
            # refuses to start an epoch inside one); with LDB off every batch, as DeepSpeed's.
            loader.batch_sampler.window = self.ds_engine.gradient_accumulation_steps() if c.cfg.enabled else 1
            loader.batch_sampler.sampler.set_epoch(c.epoch)
        # A loader of the user's own cannot follow the DROP batch: check the first batch.
        self._batch_checked = not (c.cfg.enabled and mode is Mode.DROP and c.cfg.batch_scaling == "micro_batch"
                                   and factor != 1)

    def _check_micro_batch(self, args: tuple, kwargs: dict) -> None:
        """Warn once if a DROP epoch's first micro batch is not ``micro_batch_size``.

        Only the first window of each DROP epoch is checked: a smaller last batch
        (``drop_last=False``) is normal and must not warn.
        """
        self._batch_checked = True
        observed = _leading_batch_size(args, kwargs)
        expected = self.micro_batch_size
        if observed is None or observed == expected or self._batch_warned:
            return
        self._batch_warned = True
        base = self.ds_engine.train_micro_batch_size_per_gpu()
        warnings.warn(
            f"ldb_ds: DROP epoch {self.controller.epoch} with batch_scaling 'micro_batch' expects micro batches of "
            f"engine.micro_batch_size = {expected} per rank (batch_kappa {self.controller.batch_factor} x "
            f"{base}), but the engine got a batch of {observed}. The DROP epoch then trains at another batch size "
            f"than LayerDropBack's schedule with the DROP learning rate. Fixes: use the dataloader ldb_ds.initialize "
            f"returns (training_data=...), whose batch follows the mode; or size your loader's batches from "
            f"engine.micro_batch_size after each engine.set_epoch(); or set layer_drop_back.batch_scaling = "
            f"'accumulation' (DROP batches grow through gradient accumulation; your loader stays as it is).",
            DropBatchWarning, stacklevel=3)


    # -- checkpoints ----------------------------------------------------------

    def ldb_state_dict(self) -> dict[str, Any]:
        return self.controller.state_dict()

    def load_ldb_state_dict(self, state: dict[str, Any]) -> None:
        self.controller.load_state_dict(state)

    def save_checkpoint(self, save_dir: str, tag: Any = None, client_state: dict | None = None,
                        save_latest: bool = True, **kwargs: Any) -> Any:
        """DeepSpeed's save_checkpoint with the LDB state in the tag folder's ``ldb_state.pt``.

        The same save as an attached engine's (:func:`ldb_ds.state_file.save_checkpoint`): every unit
        trainable for DeepSpeed's call (it saves what requires grad), the mask put back after.
        """
        return state_file.save_checkpoint(self.ds_engine, self.controller, self.ds_engine.save_checkpoint, save_dir,
                                          tag, client_state=client_state or {}, save_latest=save_latest, **kwargs)

    def load_checkpoint(self, load_dir: str, tag: Any = None, **kwargs: Any) -> tuple[Any, dict | None]:
        """DeepSpeed's load_checkpoint; restores the LDB state saved with the checkpoint.

        The state comes from ``ldb_state.pt`` (or the client state of a checkpoint written before
        it) and is also returned in the client state, under ``CLIENT_STATE_KEY``.
        Resuming: the restored mode's batch applies at once, and the next ``set_epoch`` of the
        epoch the checkpoint was taken in continues that epoch (mode, mask stream, and with
        ``resample: "epoch"`` its one mask) instead of starting it afresh; so the loop
        ``for epoch in range(saved_epoch, epochs): engine.set_epoch(epoch); ...`` (skipping the
        batches already trained) draws what the uninterrupted run drew.
        Warm start from a checkpoint with another param-group layout (plain DeepSpeed, LDB off,
        or another granularity): ``load_checkpoint(dir, load_module_only=True)`` loads the module
        weights only; optimizer, scheduler and LDB state stay fresh. A full load of such a
        checkpoint is refused before anything is loaded, naming that call (DeepSpeed would fail
        with a param-group or ZeRO-layout error that does not say why).
        """
        module_only = bool(kwargs.get("load_module_only", False))
        if not module_only and kwargs.get("load_optimizer_states", True) \
                and not self.ds_engine.load_universal_checkpoint():  # universal: remapped per parameter
            self._refuse_other_layout(load_dir, tag)
        (path, client_state), restored = state_file.load_checkpoint(
            self.ds_engine, self.controller, self.ds_engine.load_checkpoint, load_dir, tag, **kwargs)
        if restored is not None:  # callers that read it from the client state (ldb-train's resume) keep working
            client_state = {**(client_state or {}), CLIENT_STATE_KEY: restored}
            # The restored mode's batch at once (a loop that resumes without set_epoch trains the
            # DROP batch, not the FULL one), and set_epoch of this same epoch continues it.
            self._resumed_epoch = self.controller.epoch
            self._epoch_given = True  # a resumed loop may go on in the restored epoch without set_epoch
            self._follow_mode(self.controller.mode)
        return path, client_state

    def _refuse_other_layout(self, load_dir: str, tag: Any) -> None:
        """Raise if checkpoint ``tag`` holds optimizer state for other param groups than this engine's."""
        tag = state_file.latest_tag(load_dir, self.ds_engine.load_universal_checkpoint()) if tag is None else tag
        state_file.refuse_other_layout(
            load_dir, tag, self.controller.cfg.to_dict(),
            warm_start=f"call engine.load_checkpoint({load_dir!r}, tag={tag!r}, load_module_only=True)")


# --------------------------------------------------------------------------- initialize


def initialize(args: Any = None, model: nn.Module | None = None, optimizer: Any = None,
               model_parameters: Any = None, training_data: Dataset | None = None, lr_scheduler: Any = None,
               config: Any = None, collate_fn: Any = None, num_workers: int = 0,
               persistent_workers: bool = False, multiprocessing_context: Any = None, **ds_kwargs: Any
               ) -> tuple[LDBEngine, Any, DataLoader | None, Any]:
    """Like ``deepspeed.initialize``; returns ``(engine, optimizer, dataloader, lr_scheduler)``.

    The LDB settings are read from the ``layer_drop_back`` section of the same
    DeepSpeed config, given exactly one way: ``config`` (a path or a dict),
    ``args.deepspeed_config`` (DeepSpeed's ``--deepspeed_config``, with
    ``args`` from a parser that ``deepspeed.add_config_arguments`` extended),
    or the deprecated ``config_params``. Two of them at once is an error (as in
    DeepSpeed). Setups ldb_ds cannot keep exact are refused with
    :class:`ldb_ds.refusals.LDBUnsupportedError` (pipeline/tensor/sequence
    parallelism, MoE, compiled modules spanning units, ...), before
    ``deepspeed.initialize`` and again on the engine it built (:mod:`ldb_ds.setup`, as at
    every entry point). With LDB enabled, the trainable parameters are cut into units and given one param group per
    (unit, user param group); every unit is trainable at initialize, because
    DeepSpeed fixes the set of optimized parameters there.

    ``optimizer`` may be None (config ``optimizer`` section), a callable
    ``params -> Optimizer`` or a torch optimizer instance; an instance is rebuilt
    over the per-unit groups with its class and settings, which
    must be done before it has state. ``lr_scheduler``, with LDB on, is a callable
    ``optimizer -> scheduler`` (DeepSpeed calls it with the optimizer it steps) or None: a
    scheduler object made beforehand is bound to another optimizer and is refused. The returned dataloader (when
    ``training_data`` is given) is a ``DistributedSampler`` loader whose batch
    size follows the LDB mode; ``num_workers``, ``persistent_workers`` and
    ``multiprocessing_context`` are passed to its ``DataLoader``. Without a context its workers
    start with torch's default (fork on Linux before Python 3.14); a process with communication
    threads running may prefer ``"forkserver"``, as ldb-train does (``--worker-start-method``;
    the dataset must then pickle, and persistent workers pickle it once per run, not per epoch).
    """
    check_initialize_args(model, optimizer, model_parameters, collate_fn, num_workers, persistent_workers)
    ds_config = load_ds_config(resolve_config(args, config, ds_kwargs.pop("config_params", None)))

    if model_parameters is not None and not isinstance(model_parameters, (list, tuple)):
        # model.parameters() is a generator: read it once, hand the same list to DeepSpeed.
        model_parameters = list(model_parameters)
    # The refusals visible before DeepSpeed runs, the units and one param group per (unit, user group).
    setup = prepare(model, ds_config, model_parameters if model_parameters is not None else params_of(optimizer),
                    optimizer=optimizer, ds_kwargs=ds_kwargs)
    cfg = setup.cfg  # the section parsed once, by prepare
    if cfg.enabled:
        refuse_bound_scheduler(lr_scheduler)
        lr_scheduler = explain_scheduler_errors(lr_scheduler)
        optimizer = rebuild_optimizer(optimizer, setup.groups)
        model_parameters = setup.groups
    # Disabled: DeepSpeed gets exactly what the user gave, for a like-for-like baseline.

    # DeepSpeed gets the config we validated, as a dict; args still carries local_rank & co.
    with without_config_args(args):
        ds_engine, ds_optimizer, _, ds_scheduler = deepspeed.initialize(
            args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
            lr_scheduler=lr_scheduler, config=ds_config, **ds_kwargs)
    try:  # the same refusals on what DeepSpeed resolved; its groups are ours, in our order
        check_engine(ds_engine, cfg, setup.units, setup.params_of_group)
    except Exception:
        ds_engine.destroy()
        raise
    loader = None
    if training_data is not None:
        drop_last = bool(ds_engine.dataloader_drop_last())
        loader = build_dataloader(training_data, dp_rank=dist.get_rank() % ds_engine.dp_world_size,
                                  dp_world_size=ds_engine.dp_world_size,
                                  micro_batch_size=ds_engine.train_micro_batch_size_per_gpu(), drop_last=drop_last,
                                  seed=cfg.seed, collate_fn=collate_fn, num_workers=num_workers,
                                  pin_memory=get_accelerator().device_name() != "cpu",
                                  persistent_workers=persistent_workers,
                                  multiprocessing_context=multiprocessing_context)
    engine = LDBEngine(ds_engine, cfg, setup.units, setup.unit_of_group, loader)
    return engine, ds_optimizer, loader, ds_scheduler


def _leading_batch_size(args: tuple, kwargs: dict) -> int | None:
    """Length of the first dimension of the first tensor among the forward's inputs."""
    for value in list(args) + list(kwargs.values()):
        items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else [value]
        for item in items:
            if isinstance(item, torch.Tensor) and item.dim() > 0:
                return int(item.shape[0])
    return None


__all__ = ["initialize", "LDBEngine", "DropBatchWarning", "LDBState", "LDBUnsupportedError", "CLIENT_STATE_KEY"]
