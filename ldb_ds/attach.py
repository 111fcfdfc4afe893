"""LayerDropBack on a DeepSpeed engine that another loop drives: hooks instead of a wrapper.

``ldb_ds.initialize`` returns an :class:`~ldb_ds.engine.LDBEngine` that the user's loop calls
instead of the DeepSpeed engine. The Hugging Face Trainer and Accelerate call
``deepspeed.initialize`` themselves and then the raw engine's ``forward``, ``backward`` and
``step``. :func:`attach` gives such an engine the same behaviour as hooks on that engine
*instance* (the class and other engines are untouched):

* a forward pre-hook opens the accumulation window at the first training forward: rank 0
  draws the mask and broadcasts it, every rank applies it (docs/design.md, section 3, step 4);
* the instance's ``step`` runs ``Installation.run_step`` (section 3, step 5): at the accumulation
  boundary the dropped groups are hidden inside the basic optimizer's step and left out of
  ZeRO-1/2's all-gather;
* the instance's ``save_checkpoint``/``load_checkpoint`` are LDBEngine's (:mod:`ldb_ds.state_file`):
  every unit trainable around DeepSpeed's call (it reads the live ``requires_grad``, section 4),
  and the LDB state in its own file inside the checkpoint's tag folder, because the Hugging Face
  Trainer's loader discards DeepSpeed's ``client_state``.

:func:`ldb_ds.installation.install` (and its ``run_step``) is what :class:`~ldb_ds.engine.LDBEngine`
is built on as well, so both paths share one step protocol; attach's own methods and hook are
patches of the same installation, so ``destroy()`` (or :meth:`Attachment.detach`) takes every
one of them off.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Sequence

import torch

from . import refusals
from . import state_file as ldb_state_file
from . import zero_hooks
from .config import LDBConfig
from .controller import LDBState
from .installation import Installation, install
from .schedule import Mode, check_epoch
from .setup import check_engine
from .state_file import STATE_FILE  # re-exported: ldb_ds.attach.STATE_FILE is public
from .units import Unit


class Attachment:
    """LDB attached to one DeepSpeed engine (see :func:`attach`).

    The loop that drives the engine calls :meth:`set_epoch` at the start of every epoch;
    everything else happens in the engine's own calls.
    """

    def __init__(self, installation: Installation, state_file: str):
        self.installation = installation
        self.ds_engine = installation.ds_engine
        self.controller = installation.controller
        self.state_file = state_file
        self.ldb: LDBState = self.controller.state

    def detach(self) -> None:
        """Take every ldb_ds patch off the engine (idempotent); its ``destroy()`` does this too."""
        self.installation.remove()

    def set_epoch(self, epoch: int) -> Mode:
        """Enter the mode of ``epoch`` (between windows, before its first forward)."""
        return self.controller.set_epoch(check_epoch(epoch, "set_epoch(epoch)"))

    # -- the LDB state file (ldb_ds.state_file) ----------------------------

    def state_path(self, directory: str, tag: Any = None) -> str | None:
        """Where the state of checkpoint ``tag`` (None: the latest one) in ``directory`` lives."""
        tag = ldb_state_file.latest_tag(directory, self.ds_engine.load_universal_checkpoint()) if tag is None else tag
        return None if tag is None else os.path.join(directory, str(tag), self.state_file)

    def save_state(self, directory: str, tag: Any) -> str:
        """Write the LDB state next to DeepSpeed's files of checkpoint ``tag`` (rank 0 writes)."""
        return ldb_state_file.write(self.controller, directory, tag, self.state_file)

    def load_state(self, directory: str, tag: Any = None) -> bool:
        """Restore the LDB state of checkpoint ``tag`` (None: ``latest``); False if it has none.

        Rank 0 reads the file and broadcasts it, so every rank resumes rank 0's mask stream
        even where only rank 0 sees the checkpoint folder.
        """
        where = f"{directory} (tag {tag or 'latest'})"
        return ldb_state_file.restore(self.controller, self.state_path(directory, tag), where=where) is not None

    def __repr__(self) -> str:
        return f"Attachment({self.ldb!r})"


def attach(ds_engine: Any, cfg: LDBConfig, units: Sequence[Unit], unit_of_group: Sequence[int],
           params_of_group: Sequence[Sequence[torch.nn.Parameter]] | None = None, *,
           state_file: str = STATE_FILE) -> Attachment:
    """Give an initialized DeepSpeed engine LDB as hooks on the instance (see the module docstring).

    ``units``/``unit_of_group`` describe the param groups the engine's optimizer was built
    with (one group per (unit, user group), every unit trainable at ``deepspeed.initialize``);
    ``params_of_group``, the groups' parameters copied before ``deepspeed.initialize``,
    lets :func:`zero_hooks.check_group_order` check that DeepSpeed kept them.
    Call before the first training forward and before loading a checkpoint. Build the groups
    with :func:`ldb_ds.setup.prepare` (``plan_param_groups`` in the Hugging Face integration),
    which refuses before ``deepspeed.initialize`` what the config and model show; here the
    same refusals run on the built engine (:func:`ldb_ds.setup.check_engine`), and a later
    ``engine.compile()`` is refused as ``LDBEngine.compile`` refuses it.
    """
    if getattr(ds_engine, "_ldb_attachment", None) is not None:
        raise RuntimeError("this DeepSpeed engine already has LDB attached")
    if not isinstance(cfg, LDBConfig):
        raise TypeError(f"ldb_ds.attach: cfg must be an LDBConfig (LDBConfig.from_ds_config(config)), "
                        f"got {type(cfg).__name__}")
    if cfg.enabled and any(not 0 <= u < len(units) for u in unit_of_group):
        raise ValueError(f"ldb_ds.attach: unit_of_group names units outside 0..{len(units) - 1}")
    # The setup's refusals on what this engine really uses (resolved "auto" values, an mpu, a model
    # Accelerate compiled after deepspeed.initialize) and its param groups (ldb_ds.setup).
    check_engine(ds_engine, cfg, units, params_of_group)
    installation = install(ds_engine, cfg, units, unit_of_group)
    controller, patches = installation.controller, installation.patches
    att = Attachment(installation, state_file)
    kind = zero_hooks.Kind.INTEGRATION

    def open_window(module: Any, args: Any) -> None:
        # The first training forward of a window: autograd decides at forward time which weight
        # gradients to compute, so the mask must be in place before it.
        if not controller.window_open and ds_engine.module.training and torch.is_grad_enabled():
            controller.open_window()

    handle = ds_engine.register_forward_pre_hook(open_window)
    patches.add_undo("window opener", kind, "forward pre-hook", handle.remove)
    original_step = ds_engine.step
    original_save = ds_engine.save_checkpoint
    original_load = ds_engine.load_checkpoint
    original_destroy = ds_engine.destroy
    original_compile = ds_engine.compile

    # functools.wraps keeps DeepSpeed's signatures visible: the Trainer inspects
    # save_checkpoint's parameters (exclude_frozen_parameters) before calling it.
    @functools.wraps(original_step)
    def step(**kwargs: Any) -> Any:
        return installation.run_step(original_step, **kwargs)

    @functools.wraps(original_save)
    def save_checkpoint(save_dir: str, tag: Any = None, *args: Any, **kwargs: Any) -> Any:
        # The same save as LDBEngine's: the state file in DeepSpeed's tag folder, every unit trainable.
        return ldb_state_file.save_checkpoint(ds_engine, controller, original_save, save_dir, tag, *args,
                                              state_file=att.state_file, **kwargs)

    @functools.wraps(original_load)
    def load_checkpoint(load_dir: str, tag: Any = None, *args: Any, **kwargs: Any) -> Any:
        # The same load as LDBEngine's (a module-only load leaves the LDB state fresh); DeepSpeed's
        # result is returned as it is.
        return ldb_state_file.load_checkpoint(ds_engine, controller, original_load, load_dir, tag, *args,
                                              state_file=att.state_file, **kwargs)[0]

    @functools.wraps(original_destroy)
    def destroy(*args: Any, **kwargs: Any) -> Any:
        installation.remove()  # every ldb_ds patch off first (this one too), then DeepSpeed's own
        return original_destroy(*args, **kwargs)

    @functools.wraps(original_compile)
    def compile(*args: Any, **kwargs: Any) -> Any:
        if cfg.enabled:  # it compiles the whole model: every new mask would recompile it (refusals)
            refusals.refuse_engine_compile()
        return original_compile(*args, **kwargs)

    # Instance attributes shadow the class's methods for this engine only; the loop's calls
    # (accelerate's engine.step(), the Trainer's model_wrapped.save_checkpoint(...)) reach them.
    patches.set("attach: step protocol", kind, ds_engine, "step", step)
    patches.set("attach: checkpoint save with the LDB state", kind, ds_engine, "save_checkpoint", save_checkpoint)
    patches.set("attach: checkpoint load with the LDB state", kind, ds_engine, "load_checkpoint", load_checkpoint)
    patches.set("attach: destroy removes the patches", kind, ds_engine, "destroy", destroy)
    patches.set("attach: engine.compile() refused", kind, ds_engine, "compile", compile)
    patches.set("attach: the attachment", kind, ds_engine, "_ldb_attachment", att)
    return att


__all__ = ["STATE_FILE", "Attachment", "attach"]
