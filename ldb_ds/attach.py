"""LayerDropBack on a DeepSpeed engine that another loop drives: hooks instead of a wrapper.

``ldb_ds.initialize`` returns an :class:`~ldb_ds.engine.LDBEngine` that the user's loop calls
instead of the DeepSpeed engine. The Hugging Face Trainer and Accelerate call
``deepspeed.initialize`` themselves and then the raw engine's ``forward``, ``backward`` and
``step``. :func:`attach` gives such an engine the same behaviour as hooks on that engine
*instance* (the class and other engines are untouched):

* a forward pre-hook opens the accumulation window at the first training forward: rank 0
  draws the mask and broadcasts it, every rank applies it (docs/design.md, section 3, step 4);
* the instance's ``step`` runs :func:`run_step` (section 3, step 5): at the accumulation
  boundary the dropped groups are hidden inside the basic optimizer's step and left out of
  ZeRO-1/2's all-gather;
* the instance's ``save_checkpoint``/``load_checkpoint`` run with every unit trainable
  (DeepSpeed reads the live ``requires_grad``, section 4) and carry the LDB state in its own
  file inside the checkpoint's tag folder, because the Hugging Face Trainer's loader discards
  DeepSpeed's ``client_state``.

:func:`new_controller` and :func:`run_step` are what :class:`~ldb_ds.engine.LDBEngine` is
built on as well, so both paths share one step protocol.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as torch_dist

from deepspeed.accelerator import get_accelerator

from . import zero_hooks
from .config import LDBConfig
from .controller import LDBController, LDBState, mask_group
from .schedule import Mode, check_epoch
from .units import Unit, param_numel

STATE_FILE = "ldb_state.pt"
"""Name of the LDB state file written into a checkpoint's tag folder by an attached engine."""


def unit_grad_bytes(ds_engine: Any, unit: Unit) -> int:
    """Bytes ``unit``'s gradient occupies in the reductions, per rank."""
    # Gradients travel in DeepSpeed's communication dtype (the model dtype unless configured).
    comm_dtype = getattr(ds_engine, "communication_data_type", None)
    if isinstance(comm_dtype, torch.dtype):
        return unit.numel * torch.empty((), dtype=comm_dtype).element_size()
    return sum(param_numel(p) * p.element_size() for p in unit.params)


def new_controller(ds_engine: Any, cfg: LDBConfig, units: Sequence[Unit],
                   unit_of_group: Sequence[int]) -> LDBController:
    """The controller of one run on ``ds_engine``, with the step filter and batched norm installed.

    ``unit_of_group[i]`` is the unit of the basic optimizer's param group ``i``. With LDB
    disabled nothing is installed on DeepSpeed's objects.
    """
    optimizer = zero_hooks.basic_optimizer(ds_engine) if cfg.enabled else None
    # The group dicts, captured once: ZeRO swaps optimizer.param_groups to a one-group list
    # inside its per-group step, but keeps these dict objects.
    group_dicts = list(optimizer.param_groups) if optimizer is not None else []
    controller = LDBController(cfg, units, unit_of_group, group_dicts,
                               [unit_grad_bytes(ds_engine, u) for u in units],
                               device=get_accelerator().current_device_name())
    if cfg.enabled:
        c = controller
        if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
            mask_group()  # made now, at set-up, on every rank (a collective), not in a step
        zero_hooks.install_group_step_filter(optimizer, lambda: c.plan.hidden_groups, lambda: c.lr_factor)
        # With a group per unit, ZeRO-1/2 would all-reduce one norm scalar per group per step.
        zero_hooks.install_batched_grad_norm(ds_engine, lambda: c.plan.skipped_groups)
        # ...and would do the rest of its step, the ZeRO-3 norm and optimizer call per group too.
        zero_hooks.install_step_loops(ds_engine, lambda: c.plan.skipped_groups)
        # With LDB on, a step with a non-finite gradient is skipped at every stage (ZeRO 1-3 and
        # the fp16/bf16 optimizers do it themselves; stage 0 in fp32 gets it here), so run_step
        # sees it as was_step_applied() False and counts it once, in counters.skipped_steps. With
        # LDB off nothing is installed: the engine costs what plain DeepSpeed costs (the skip's
        # norm needs a host sync per step), and DeepSpeed's own stage-0 behaviour applies.
        zero_hooks.install_nonfinite_skip(ds_engine)
        # fp16 at ZeRO-0: DeepSpeed 0.19.8 never multiplies the loss by the loss scale there but
        # its fp16 step divides by it (every update loss_scale times too small; the GPU parity
        # test found it): with LDB on, backward scales the loss as the step expects.
        zero_hooks.install_fp16_loss_scaling(ds_engine)
    elif zero_hooks.fp16_unscaled_at_zero0(ds_engine):
        warnings.warn("ldb_ds: fp16 at ZeRO stage 0 with DeepSpeed 0.19.8 never scales the loss but divides the "
                      "gradients by the loss scale, so every update is loss_scale times too small (plain "
                      "DeepSpeed's behaviour, kept with LDB off: deepspeedai/DeepSpeed pull request 8393). Use "
                      "bf16 or ZeRO stage >= 1 for a baseline", RuntimeWarning, stacklevel=3)
    return controller


def run_step(ds_engine: Any, controller: LDBController, step_fn: Callable[..., Any], **kwargs: Any) -> Any:
    """One call of DeepSpeed's ``step`` (``step_fn``) with LDB's step protocol around it.

    Inside a window (not the accumulation boundary) DeepSpeed's step only counts the micro
    step. At the boundary: the group dicts are re-captured (a checkpoint load may have replaced
    them), the plan is computed once (DeepSpeed calls the optimizer once per group at ZeRO
    1-3), ZeRO-1/2 skip the all-gather of the dropped groups, and the window closes. A step
    DeepSpeed skipped (fp16 loss-scale overflow, inf/NaN gradient) is counted apart.
    """
    # DeepSpeed increments micro_steps inside step(); ask before calling it. With
    # managed_gradient_accumulation = false the caller owns the boundary: every step() is one
    # (DeepSpeed's is_gradient_accumulation_boundary() is True only while its step() runs).
    if not ds_engine.is_gradient_accumulation_boundary() and ds_engine.managed_gradient_accumulation():
        return step_fn(**kwargs)
    c = controller
    if c.cfg.enabled:
        c.refresh_group_dicts(zero_hooks.basic_optimizer(ds_engine).param_groups)
        plan = c.begin_step()
        with zero_hooks.skip_allgather_of_dropped(ds_engine, plan.skipped_groups):
            result = step_fn(**kwargs)
    else:
        result = step_fn(**kwargs)
    # False when DeepSpeed skipped the update (fp16 loss-scale overflow, an inf/NaN norm in
    # bf16). The overflow flag is reduced over the ranks, so every rank skips together and
    # closes this window: the next window draws the next mask everywhere. The basic optimizer
    # was not called, so the step filter never hid a group or applied the LR factor.
    applied = bool(ds_engine.was_step_applied())
    if not applied and c.cfg.enabled:
        zero_hooks.clear_stale_gradient_partitions(ds_engine)
    c.end_step(applied=applied)
    return result


class Attachment:
    """LDB attached to one DeepSpeed engine (see :func:`attach`).

    The loop that drives the engine calls :meth:`set_epoch` at the start of every epoch;
    everything else happens in the engine's own calls.
    """

    def __init__(self, ds_engine: Any, controller: LDBController, state_file: str):
        self.ds_engine = ds_engine
        self.controller = controller
        self.state_file = state_file
        self.ldb: LDBState = controller.state

    def set_epoch(self, epoch: int) -> Mode:
        """Enter the mode of ``epoch`` (between windows, before its first forward)."""
        return self.controller.set_epoch(check_epoch(epoch, "set_epoch(epoch)"))

    # -- the LDB state file ---------------------------------------------------

    def state_path(self, directory: str, tag: Any = None) -> str | None:
        """Where the state of checkpoint ``tag`` (None: the latest one) in ``directory`` lives."""
        tag = _latest_tag(self.ds_engine, directory) if tag is None else tag
        return None if tag is None else os.path.join(directory, str(tag), self.state_file)

    def save_state(self, directory: str, tag: Any) -> str:
        """Write the LDB state next to DeepSpeed's files of checkpoint ``tag`` (rank 0 writes)."""
        path = os.path.join(directory, str(tag), self.state_file)
        # Every rank holds the same epoch, mode and counters; only rank 0's generator draws the
        # masks (broadcast), so rank 0's state is the run's state.
        if not torch_dist.is_initialized() or torch_dist.get_rank() == 0:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            tmp = path + ".tmp"
            torch.save(self.controller.state_dict(), tmp)
            os.replace(tmp, path)  # a crash mid-write never leaves a torn state file
        return path

    def load_state(self, directory: str, tag: Any = None) -> bool:
        """Restore the LDB state of checkpoint ``tag`` (None: ``latest``); False if it has none.

        Rank 0 reads the file and broadcasts it, so every rank resumes rank 0's mask stream
        even where only rank 0 sees the checkpoint folder.
        """
        state = None
        if not torch_dist.is_initialized() or torch_dist.get_rank() == 0:
            path = self.state_path(directory, tag)
            if path is not None and os.path.isfile(path):
                state = torch.load(path, map_location="cpu", weights_only=False)
        if torch_dist.is_initialized() and torch_dist.get_world_size() > 1:
            box = [state]
            torch_dist.broadcast_object_list(box, src=0, device=torch.device(self.controller.device))
            state = box[0]
        if state is None:
            warnings.warn(f"ldb_ds: checkpoint {directory} (tag {tag or 'latest'}) has no LDB state "
                          f"({self.state_file}); LDB continues from its current state (epoch "
                          f"{self.controller.epoch}, {self.controller.counters.steps} steps)", RuntimeWarning,
                          stacklevel=2)
            return False
        self.controller.load_state_dict(state)
        return True

    def __repr__(self) -> str:
        return f"Attachment({self.ldb!r})"


def _latest_tag(ds_engine: Any, directory: str) -> str | None:
    # DeepSpeed's own rule for load_checkpoint(tag=None) (engine.py:4427 in 0.19.8): the tag
    # named in <dir>/latest (latest_universal for universal checkpoints); None if absent.
    universal = getattr(ds_engine, "load_universal_checkpoint", lambda: False)()
    latest = os.path.join(directory, "latest_universal" if universal else "latest")
    if not os.path.isfile(latest):
        return None
    with open(latest) as f:
        return f.read().strip()


def attach(ds_engine: Any, cfg: LDBConfig, units: Sequence[Unit], unit_of_group: Sequence[int],
           params_of_group: Sequence[Sequence[torch.nn.Parameter]] | None = None, *,
           state_file: str = STATE_FILE) -> Attachment:
    """Give an initialized DeepSpeed engine LDB as hooks on the instance (see the module docstring).

    ``units``/``unit_of_group`` describe the param groups the engine's optimizer was built
    with (one group per (unit, user group), every unit trainable at ``deepspeed.initialize``);
    ``params_of_group``, the groups' parameters copied before ``deepspeed.initialize``,
    lets :func:`zero_hooks.check_group_order` check that DeepSpeed kept them.
    Call before the first training forward and before loading a checkpoint.
    """
    if getattr(ds_engine, "_ldb_attachment", None) is not None:
        raise RuntimeError("this DeepSpeed engine already has LDB attached")
    if not isinstance(cfg, LDBConfig):
        raise TypeError(f"ldb_ds.attach: cfg must be an LDBConfig (LDBConfig.from_ds_config(config)), "
                        f"got {type(cfg).__name__}")
    if cfg.enabled and any(not 0 <= u < len(units) for u in unit_of_group):
        raise ValueError(f"ldb_ds.attach: unit_of_group names units outside 0..{len(units) - 1}")
    if cfg.enabled:
        zero_hooks.check_deepspeed_version()
        # The same refusals as ldb_ds.initialize (which makes them before deepspeed.initialize;
        # here the engine exists, but no step has run): offload variants that bypass the filter.
        ds_config = ds_engine.config if isinstance(getattr(ds_engine, "config", None), Mapping) else {}
        zero_hooks.refuse_unverified_step_paths(ds_config, zero_hooks.basic_optimizer(ds_engine))
        if params_of_group is not None:
            zero_hooks.check_group_order(ds_engine, params_of_group)
    controller = new_controller(ds_engine, cfg, units, unit_of_group)
    att = Attachment(ds_engine, controller, state_file)

    def open_window(module: Any, args: Any) -> None:
        # The first training forward of a window: autograd decides at forward time which weight
        # gradients to compute, so the mask must be in place before it.
        if not controller.window_open and ds_engine.module.training and torch.is_grad_enabled():
            controller.open_window()

    ds_engine.register_forward_pre_hook(open_window)
    original_step = ds_engine.step
    original_save = ds_engine.save_checkpoint
    original_load = ds_engine.load_checkpoint

    # functools.wraps keeps DeepSpeed's signatures visible: the Trainer inspects
    # save_checkpoint's parameters (exclude_frozen_parameters) before calling it.
    @functools.wraps(original_step)
    def step(**kwargs: Any) -> Any:
        return run_step(ds_engine, controller, original_step, **kwargs)

    @functools.wraps(original_save)
    def save_checkpoint(save_dir: str, tag: Any = None, *args: Any, **kwargs: Any) -> Any:
        # DeepSpeed's own default tag (engine.py:4902 in 0.19.8), fixed here so the LDB file
        # lands in the same tag folder as DeepSpeed's files.
        tag = f"global_step{ds_engine.global_steps}" if tag is None else tag
        with controller.all_trainable():  # DeepSpeed saves what requires grad (section 4)
            result = original_save(save_dir, tag, *args, **kwargs)
        att.save_state(save_dir, tag)
        return result

    @functools.wraps(original_load)
    def load_checkpoint(load_dir: str, tag: Any = None, *args: Any, **kwargs: Any) -> Any:
        tag = _latest_tag(ds_engine, load_dir) if tag is None else tag
        if tag is None:  # no 'latest' file: DeepSpeed warns and returns (None, None) itself
            return original_load(load_dir, None, *args, **kwargs)
        with controller.all_trainable():  # DeepSpeed loads what requires grad (section 4)
            result = original_load(load_dir, tag, *args, **kwargs)
        if result[0] is not None:  # DeepSpeed found and loaded the checkpoint
            att.load_state(load_dir, tag)
        return result

    # Instance attributes shadow the class's methods for this engine only; the loop's calls
    # (accelerate's engine.step(), the Trainer's model_wrapped.save_checkpoint(...)) reach them.
    ds_engine.step = step
    ds_engine.save_checkpoint = save_checkpoint
    ds_engine.load_checkpoint = load_checkpoint
    ds_engine._ldb_attachment = att
    return att


__all__ = ["STATE_FILE", "Attachment", "attach", "new_controller", "run_step", "unit_grad_bytes"]
