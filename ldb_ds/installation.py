"""One engine's LayerDropBack: its controller, the step state, and every patch on DeepSpeed.

:func:`install` is what every entry point runs once it has a DeepSpeed engine
(``ldb_ds.initialize`` through :class:`~ldb_ds.engine.LDBEngine`, and :func:`ldb_ds.attach.attach`
for the Hugging Face Trainer and Accelerate). It returns an :class:`Installation`, the one owner
of everything ldb_ds changed on that engine's DeepSpeed objects (a :class:`~ldb_ds.zero_hooks.PatchSet`):

* exactness patches - the step filter (dropped groups hidden inside the basic optimizer's
  step, the DROP learning-rate factor), the stage-0 fp32 non-finite skip, the all-gather skip,
  the fp16 ZeRO-0 loss scaling; if a DeepSpeed function they rely on is not the verified source,
  LDB is refused;
* optimisation patches - the batched gradient norm and ldb_ds's own step loops; if what they
  mirror changed, DeepSpeed's own code runs (with a warning);
* integration patches - what :func:`ldb_ds.attach.attach` puts on a foreign loop's engine.

:meth:`Installation.describe` lists them; :meth:`Installation.remove` takes them all off
(``destroy()`` does it), after which the engine steps as plain DeepSpeed over the same param
groups. DeepSpeed calls ``optimizer.step()`` without arguments, so what a step must skip is not
passed down that chain: the controller writes it into one :class:`~ldb_ds.controller.StepState`
at the boundary (:meth:`Installation.run_step`), and every patch reads that object.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any, Callable, Sequence

import torch
import torch.distributed as torch_dist

from deepspeed.accelerator import get_accelerator

from . import zero_hooks
from .config import LDBConfig
from .controller import LDBController, mask_group
from .process import release_shm_segment
from .schedule import Mode
from .units import Unit, param_numel


def unit_grad_bytes(ds_engine: Any, unit: Unit) -> int:
    """Bytes ``unit``'s gradient occupies in the reductions, per rank."""
    # Gradients travel in DeepSpeed's communication dtype (the model dtype unless configured).
    comm_dtype = getattr(ds_engine, "communication_data_type", None)
    if isinstance(comm_dtype, torch.dtype):
        return unit.numel * torch.empty((), dtype=comm_dtype).element_size()
    return sum(param_numel(p) * p.element_size() for p in unit.params)


class Installation:
    """LDB on one DeepSpeed engine: ``controller`` (the run's state), ``step_state`` (what the
    patches read during a step) and ``patches`` (every change to DeepSpeed's objects, removable)."""

    def __init__(self, ds_engine: Any, controller: LDBController, patches: zero_hooks.PatchSet):
        self.ds_engine = ds_engine
        self.controller = controller
        self.patches = patches

    def describe(self) -> list[str]:
        """One line per patch: what it is, its kind, where."""
        return self.patches.describe()

    def remove(self) -> None:
        """Take every patch off (idempotent): DeepSpeed's own methods, hooks and functions are back.

        The controller's mask is released first, so no unit stays ``requires_grad=False``.
        """
        if self.controller.cfg.enabled:
            self.controller.release_mask(force=True)
        self.patches.remove()

    def run_step(self, step_fn: Callable[..., Any], **kwargs: Any) -> Any:
        """One call of DeepSpeed's ``step`` (``step_fn``) with LDB's step protocol around it.

        Inside a window (not the accumulation boundary) DeepSpeed's step only counts the micro
        step. At the boundary: the group dicts are re-captured (a checkpoint load may have
        replaced them), the step state is filled once (DeepSpeed calls the optimizer once per
        group at ZeRO 1-3, and every patch reads it), the all-gather skip is told this step's
        dropped groups, and the window closes. A step DeepSpeed skipped (fp16 loss-scale
        overflow, inf/NaN gradient) is counted apart.
        """
        ds_engine, c = self.ds_engine, self.controller
        # DeepSpeed increments micro_steps inside step(); ask before calling it. With
        # managed_gradient_accumulation = false the caller owns the boundary: every step() is one
        # (DeepSpeed's is_gradient_accumulation_boundary() is True only while its step() runs).
        if not ds_engine.is_gradient_accumulation_boundary() and ds_engine.managed_gradient_accumulation():
            return step_fn(**kwargs)
        if c.cfg.enabled:
            if c.mode is Mode.DROP and not c.window_open:
                # The window opens (mask drawn, broadcast, applied) at the engine's training forward;
                # a DROP step without one trained every unit, and would apply the DROP learning rate
                # and batch as if units had been dropped.
                raise RuntimeError(
                    "ldb_ds: a DROP-epoch step whose forward drew no mask: the forward did not go through "
                    "the engine in training mode (engine.module(x) or the model called directly, or the "
                    "module in eval mode), so no unit was dropped. Call engine(x) after engine.train(); "
                    "for frozen BatchNorm or dropout-free training, set those submodules' eval() yourself "
                    "and keep the engine in training mode")
            c.refresh_group_dicts(zero_hooks.basic_optimizer(ds_engine).param_groups)
            step = c.begin_step()
            try:
                with zero_hooks.skipping(step.skipped_groups):
                    result = step_fn(**kwargs)
            except BaseException:
                step.clear(step.window)  # nothing may stay hidden or scaled after a failed step
                raise
        else:
            result = step_fn(**kwargs)
        # False when DeepSpeed skipped the update (fp16 loss-scale overflow, an inf/NaN norm in
        # bf16). The overflow flag is reduced over the ranks, so every rank skips together and
        # closes this window: the next window draws the next mask everywhere. The basic optimizer
        # was not called, so the step filter never hid a group or applied the LR factor.
        applied = bool(ds_engine.was_step_applied())
        if not applied and c.cfg.enabled:
            zero_hooks.clear_stale_gradient_partitions(ds_engine)
        if c.cfg.enabled and c.cfg.batch_scaling == "micro_batch" and c.batch_factor != 1:
            # DeepSpeed counts train_batch_size() samples per step, applied or skipped (engine.py:3565),
            # from its configured micro batch; a DROP step of micro_batch scaling trained batch_factor
            # micro batches' worth per micro step. global_samples is the x-axis of DeepSpeed's
            # Train/Samples events and is saved in checkpoints: it counts what was trained.
            ds_engine.global_samples += (c.batch_factor - 1) * ds_engine.train_batch_size()
        c.end_step(applied=applied)
        return result


def install(ds_engine: Any, cfg: LDBConfig, units: Sequence[Unit], unit_of_group: Sequence[int]) -> Installation:
    """LDB on ``ds_engine``: the controller, and (LDB on) every patch, checked and recorded.

    ``unit_of_group[i]`` is the unit of the basic optimizer's param group ``i``. With LDB
    disabled nothing is installed on DeepSpeed's objects: the engine costs what DeepSpeed costs.
    """
    optimizer = zero_hooks.basic_optimizer(ds_engine) if cfg.enabled else None
    # The group dicts, captured once: ZeRO swaps optimizer.param_groups to a one-group list
    # inside its per-group step, but keeps these dict objects.
    group_dicts = list(optimizer.param_groups) if optimizer is not None else []
    controller = LDBController(cfg, units, unit_of_group, group_dicts,
                               [unit_grad_bytes(ds_engine, u) for u in units],
                               device=get_accelerator().current_device_name())
    patches = zero_hooks.PatchSet()
    installation = Installation(ds_engine, controller, patches)
    # DeepSpeed's communication backend exists by now, and on the CPU accelerator it would leave a
    # 69 MB /dev/shm segment per rank behind until reboot (see the function). Released here, at
    # set-up, so that every entry point (initialize, attach, a user's own script) does it, LDB on
    # or off. A collective: every rank installs, as every rank ran deepspeed.initialize.
    release_shm_segment()
    if not cfg.enabled:
        if zero_hooks.fp16_unscaled_at_zero0(ds_engine):
            warnings.warn("ldb_ds: fp16 at ZeRO stage 0 with DeepSpeed 0.19.8 never scales the loss but divides the "
                          "gradients by the loss scale, so every update is loss_scale times too small (plain "
                          "DeepSpeed's behaviour, kept with LDB off: deepspeedai/DeepSpeed pull request 8393). Use "
                          "bf16 or ZeRO stage >= 1 for a baseline", RuntimeWarning, stacklevel=3)
        return installation
    # Exactness first: a DeepSpeed whose optimizer callers changed could move dropped units.
    zero_hooks.require_verified("the step filter", zero_hooks.filter_callers(ds_engine))
    if cfg.batch_scaling == "accumulation" and cfg.batch_kappa != 1:
        zero_hooks.check_accumulation_boundary()  # set_epoch re-aligns DeepSpeed's windows
    if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
        mask_group()  # made now, at set-up, on every rank (a collective), not in a step
    try:
        step = controller.step_state
        zero_hooks.install_group_step_filter(optimizer, step, patches)
        # With a group per unit, ZeRO-1/2 would all-reduce one norm scalar per group per step...
        zero_hooks.install_batched_grad_norm(ds_engine, step, patches)
        # ...and would do the rest of its step, the ZeRO-3 norm and optimizer call per group too.
        zero_hooks.install_step_loops(ds_engine, step, patches)
        # Where DeepSpeed's own loop all-gathers every group after the step (offload, BF16_Optimizer).
        zero_hooks.install_allgather_skip(ds_engine, patches)
        # A step with a non-finite gradient is skipped at every stage (ZeRO 1-3 and the fp16/bf16
        # optimizers do it themselves; stage 0 in fp32 gets it here), so run_step sees it as
        # was_step_applied() False and counts it once. With LDB off it is not installed: the
        # engine then costs what plain DeepSpeed costs (the skip's norm needs a host sync).
        zero_hooks.install_nonfinite_skip(ds_engine, patches)
        # fp16 at ZeRO-0: DeepSpeed 0.19.8 never multiplies the loss by the loss scale there but
        # its fp16 step divides by it (every update loss_scale times too small; the GPU parity
        # test found it): with LDB on, backward scales the loss as the step expects.
        zero_hooks.install_fp16_loss_scaling(ds_engine, patches)
        install_whole_model_exports(ds_engine, controller, patches)
    except BaseException:
        patches.remove()  # a refusal half-way leaves DeepSpeed's objects as they were
        raise
    return installation


WHOLE_MODEL_EXPORTS = ("save_16bit_model", "module_state_dict")
"""DeepSpeed engine methods that export the model and leave out parameters that do not require
grad when asked (``exclude_frozen_parameters=True``); ``save_fp16_model`` calls ``save_16bit_model``."""


def install_whole_model_exports(ds_engine: Any, controller: LDBController, patches: zero_hooks.PatchSet) -> None:
    """Every unit trainable while DeepSpeed exports the model (:data:`WHOLE_MODEL_EXPORTS`).

    Between the steps of a DROP epoch the dropped units are ``requires_grad=False`` (the mask
    stays until the next window opens), and DeepSpeed decides what a frozen parameter is from the
    live flag (``engine.py:4014``, ``:5664``): an export with ``exclude_frozen_parameters=True``
    would silently lack the units the last step dropped. A parameter the user froze is in no unit
    and stays left out. The same as ``save_checkpoint`` (``state_file.save_checkpoint``), for the
    library's engine and an attached one alike: both call DeepSpeed's methods on this instance.
    """
    for name in WHOLE_MODEL_EXPORTS:
        original = getattr(ds_engine, name)

        @functools.wraps(original)
        def export(*args: Any, _original: Callable[..., Any] = original, **kwargs: Any) -> Any:
            with controller.all_trainable():
                return _original(*args, **kwargs)

        patches.set(f"{name} with every unit in it", zero_hooks.Kind.EXACTNESS, ds_engine, name, export)


__all__ = ["Installation", "install", "install_whole_model_exports", "WHOLE_MODEL_EXPORTS", "unit_grad_bytes"]
