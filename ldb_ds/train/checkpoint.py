"""Checkpoints of the training application: DeepSpeed's, made atomic and verified, plus the loop's state.

``engine.save_checkpoint`` stores model, optimizer and (if DeepSpeed owns one) LR scheduler
state; the LDB engine adds its own (epoch, mode, the mask generator, step counters). This module
adds the loop's :class:`TrainState` as client state (the next epoch and, for a checkpoint taken in
the middle of an epoch, the micro step reached and the epoch's running sums; the TensorBoard x
axis; the per-epoch history; the best checkpoint) and each rank's BatchNorm buffers in a file of
its own (DeepSpeed keeps rank 0's module only). The epoch-wise LR schedule needs no state: it is
a function of the epoch (see ``loop.create_lr_scheduler``).

Saving goes through :func:`ldb_ds.checkpointing.save`: ``latest`` moves only once every rank's
files are written and a manifest with their sizes and SHA-256 is on disk. Resuming
(:func:`choose_resume`) verifies the tag against its manifest on all ranks before anything is
loaded and compares it with this run (model, ZeRO stage, world size, ``layer_drop_back``); a
ZeRO 1-3 checkpoint with Adam-family state at another world size goes through DeepSpeed's
universal checkpoint.

Saving and loading are collectives: every rank calls them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable

from ldb_ds import checkpoint_fit, checkpointing
from ldb_ds.checkpointing import CheckpointError

from .options import TrainOptions


class ResumeError(CheckpointError):
    """Nothing to resume from, or a checkpoint that cannot be resumed: one line naming why."""


@dataclass
class TrainState:
    """What the loop carries from step to step, saved in every checkpoint."""

    next_epoch: int = 0
    """The first epoch not finished."""

    step_in_epoch: int = 0
    """Micro steps of ``next_epoch`` already trained (a checkpoint taken in the middle of it)."""

    samples_seen: int = 0
    """Training samples seen by all ranks: the x axis of every TensorBoard tag."""

    history: list[dict[str, Any]] = field(default_factory=list)
    """One dict of figures per finished epoch (``results.json``'s ``history``)."""

    epoch_partial: dict[str, Any] | None = None
    """The monitor's running sums of the unfinished epoch (with ``step_in_epoch``)."""

    best: dict[str, Any] | None = None
    """``{"tag", "epoch", "top1"}`` of the checkpoint with the highest evaluation top-1."""

    last_tag: str | None = None
    """The newest checkpoint written or loaded."""

    counters: dict[str, int] = field(default_factory=dict)
    """Skipped steps by cause, unreadable images skipped (results.json, TensorBoard)."""

    def client_state(self, opts: TrainOptions, mode: str) -> dict[str, Any]:
        return {"epoch": self.next_epoch - 1, "next_epoch": self.next_epoch, "step_in_epoch": self.step_in_epoch,
                "mode": mode, "samples_seen": self.samples_seen, "history": self.history,
                "epoch_partial": self.epoch_partial, "best": self.best, "counters": self.counters,
                "args": opts.to_dict()}

    @classmethod
    def from_client_state(cls, client: dict[str, Any] | None) -> "TrainState":
        client = client or {}
        return cls(next_epoch=int(client.get("next_epoch", int(client.get("epoch", -1)) + 1)),
                   step_in_epoch=int(client.get("step_in_epoch", 0)),
                   samples_seen=int(client.get("samples_seen", 0)),
                   history=list(client.get("history", [])), epoch_partial=client.get("epoch_partial"),
                   best=client.get("best"), counters=dict(client.get("counters") or {}))


def epoch_tag(epoch: int) -> str:
    """The checkpoint tag of the end of ``epoch`` (``epoch<e>``)."""
    return f"epoch{epoch}"


def step_tag(global_step: int) -> str:
    """The tag of a checkpoint after optimizer step ``global_step`` (``step<n>``)."""
    return f"step{global_step}"


def save(engine: Any, ckpt_dir: str, state: TrainState, opts: TrainOptions, mode: str,
         tag: str | None = None, *, kind: str = "epoch", metric: float | None = None,
         group: Any = None) -> str:
    """Save a checkpoint (atomically, with a manifest); returns the tag. Every rank calls it.

    ``kind``: ``epoch`` (after ``state.next_epoch - 1``), ``step`` (``--ckpt-every-steps``) or
    ``preempt``. ``metric``: the evaluation top-1 just measured, which decides the best
    checkpoint that ``--checkpoint-hist`` keeps.
    """
    import torch.distributed as dist

    tag = tag or epoch_tag(state.next_epoch - 1)
    # Checked on every rank and agreed before anything is written: a non-finite checkpoint must
    # never become `latest` (the one --resume auto and requeue scripts trust).
    if not weights_finite(engine, group):
        raise NonFiniteWeightsError(nonfinite_weights_message(engine, state.last_tag, tag))
    if metric is not None and (state.best is None or metric > state.best["top1"]):
        state.best = {"tag": tag, "epoch": state.next_epoch - 1, "top1": float(metric)}
    rank = dist.get_rank() if dist.is_initialized() else 0
    # DeepSpeed saves rank 0's module; each rank's BatchNorm statistics differ between
    # distribute_bn calls, and a resumed run needs its own back to be exact.
    buffers = {name: b.detach().cpu().clone() for name, b in engine.module.named_buffers()}
    meta = {"kind": kind, "next_epoch": state.next_epoch, "step_in_epoch": state.step_in_epoch,
            "top1": metric, "samples_seen": state.samples_seen}
    checkpointing.save(engine, ckpt_dir, tag, client_state=state.client_state(opts, mode),
                       rank_state={"buffers": buffers}, meta=meta, group=group)
    state.last_tag = tag
    if rank == 0 and opts.checkpoint_hist:
        checkpointing.prune(ckpt_dir, opts.checkpoint_hist, keep=[state.best["tag"]] if state.best else [])
    return tag


class NonFiniteWeightsError(CheckpointError):
    """The model's weights hold NaN or infinity: nothing was saved (exit code 3)."""


def weights_finite(engine: Any, group: Any = None) -> bool:
    """Whether every rank's parameters and floating buffers are finite (all ranks get the same answer).

    Each rank checks what it holds (its ZeRO-3 partition, ``ds_tensor``, else the full tensor),
    then one MIN all-reduce of a flag over ``group`` (the gloo control group: host-side, no device
    synchronisation beyond the checks themselves) makes it a single verdict.
    """
    import torch
    import torch.distributed as dist

    ok = True
    with torch.no_grad():
        tensors = [getattr(p, "ds_tensor", p) for p in engine.module.parameters()]
        tensors += [b for b in engine.module.buffers() if b.is_floating_point()]
        for t in tensors:
            if t.numel() and not bool(torch.isfinite(t).all()):
                ok = False
                break
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        flag = torch.tensor([1 if ok else 0], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
        ok = bool(int(flag.item()))
    return ok


def nonfinite_weights_message(engine: Any, last_tag: str | None, tag: str | None = None) -> str:
    """The one line for weights that became non-finite (exit code 3)."""
    step = int(getattr(engine, "global_steps", 0))
    skipped = f"checkpoint {tag} was not saved; " if tag else ""
    return (f"the weights became non-finite after optimizer step {step} (the gradients were finite: the update "
            f"itself overflowed); {skipped}" + (f"the last good checkpoint is {last_tag} and 'latest' still names it"
                                                  if last_tag else "no checkpoint was saved") +
            ". Lower the learning rate or the weight decay")


# --------------------------------------------------------------------------- resume


@dataclass
class ResumePoint:
    """Where to resume from, decided before the engine exists (the universal checkpoint needs a config key)."""

    load_dir: str
    tag: str
    manifest: dict[str, Any]
    universal: bool = False
    notes: list[str] = field(default_factory=list)
    weights_only: bool = False
    """``--eval`` at another world size from a ZeRO 1-2 checkpoint: the module's weights only."""

    @property
    def where(self) -> str:
        return os.path.join(self.load_dir, self.tag)


def _locate(spec: str, run_checkpoints: str) -> tuple[str, str | None]:
    """``(checkpoint directory, tag or None)`` named by ``--resume``."""
    path = os.path.abspath(spec)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, checkpointing.MANIFEST)) or \
                os.path.isfile(os.path.join(path, "mp_rank_00_model_states.pt")):
            return os.path.dirname(path), os.path.basename(path)
        return path, None
    if os.sep not in spec and "/" not in spec:
        return run_checkpoints, spec
    raise ResumeError(f"--resume {spec}: no such directory")


def resume_target_problem(spec: str | None, run_checkpoints: str) -> str:
    """Why ``--resume SPEC`` names no checkpoint directory that exists (``""`` if it may, or for ``auto``).

    Checked before the run folder is made or written, so that a mistyped tag (``--resume
    README.md``) leaves nothing behind; :func:`choose_resume` verifies the checkpoint itself later.
    Every rank finds the same (a shared file system, as for the checkpoints themselves).
    """
    if spec is None or spec == "auto":
        return ""
    try:
        load_dir, tag = _locate(spec, run_checkpoints)
    except ResumeError as err:
        return str(err)
    target = load_dir if tag is None else os.path.join(load_dir, tag)
    if os.path.isdir(target):
        return ""
    return (f"--resume {spec}: checkpoint {target} does not exist (--resume takes auto, a tag of this run's "
            "checkpoints/ folder, or a checkpoint directory)")


def choose_resume(opts: TrainOptions, run_checkpoints: str, current: dict[str, Any], *, group: Any = None,
                  warn: Callable[[str], None] | None = None) -> ResumePoint | None:
    """Resolve ``--resume``; ``None`` means start afresh. Every rank calls it and gets the same answer.

    ``current`` is :func:`ldb_ds.checkpointing.describe_run` of the run about to start. Raises
    :class:`CheckpointError` (the same one-line message on every rank) when the named checkpoint is
    bad or does not fit this run.
    """
    spec = opts.resume
    if spec is None:
        return None
    if spec == "auto":
        load_dir, tag = run_checkpoints, None
    else:
        load_dir, tag = _locate(spec, run_checkpoints)
    if tag is None:
        found = checkpointing.find_resumable(load_dir, group=group, warn=warn)
        if found is None:
            if spec == "auto":
                return None  # requeue-safe: the first start of the run
            where = load_dir if os.path.isdir(load_dir) else f"{load_dir} (no such directory)"
            raise ResumeError(f"--resume {spec}: no checkpoint in {where}")
        tag, manifest = found
    else:
        manifest = checkpointing.verify(load_dir, tag, group=group)
    mid_epoch = int(manifest.get("meta", {}).get("step_in_epoch", 0)) > 0
    verdict = checkpoint_fit.check_compatible(manifest, current, where=f"checkpoint {os.path.join(load_dir, tag)}",
                                             allow_ldb_change=not mid_epoch, weights_only=bool(opts.eval))
    return ResumePoint(load_dir, tag, manifest, verdict["universal"], verdict["notes"], verdict["weights_only"])


def load(engine: Any, resume: ResumePoint, *, rank: int, world_size: int, group: Any = None,
         timeout_s: float | None = None) -> TrainState:
    """Load ``resume``'s checkpoint into ``engine`` (its LDB state too); returns the loop's state.

    Each rank's BatchNorm buffers come back from its own file when the world size is the same, and
    from saved rank ``rank % saved world size``'s at another world size.
    A checkpoint taken in the middle of an epoch at another world size resumes at the same
    number of samples into the epoch (rounded down): the order of the rest of that epoch then
    differs from the interrupted run's. ``group``: the gloo group the ranks wait on while rank 0
    converts to a universal checkpoint, which may take up to ``timeout_s`` (less than the
    group's timeout, so a slow conversion ends in its own message, not in a lost collective).
    """
    import torch

    tag = checkpoint_fit.to_universal(resume.load_dir, resume.tag, group=group, timeout_s=timeout_s) \
        if resume.universal else resume.tag
    path, client = engine.load_checkpoint(resume.load_dir, tag=tag, load_module_only=resume.weights_only)
    if path is None:
        raise ResumeError(f"DeepSpeed could not load {os.path.join(resume.load_dir, tag)}")
    state = TrainState.from_client_state(client)
    state.last_tag = resume.tag
    saved_world = int(resume.manifest.get("run", {}).get("world_size", world_size))
    # The module's buffers (BatchNorm's running statistics) from the rank files: each rank's own at
    # the same world size; at another one, saved rank (rank mod saved world size)'s. DeepSpeed's
    # universal load restores parameters and optimizer state only, so without this a resume at
    # another world size would evaluate and train on again with freshly initialised statistics.
    own = checkpointing.load_rank_state(resume.load_dir, resume.tag, rank % saved_world)
    if own is not None:
        named = dict(engine.module.named_buffers())
        with torch.no_grad():
            for name, value in own["buffers"].items():
                if name in named:
                    named[name].copy_(value)
    if saved_world != world_size and state.step_in_epoch:
        state.step_in_epoch = state.step_in_epoch * saved_world // world_size
        resume.notes.append(f"the checkpoint was taken in the middle of epoch {state.next_epoch} at world size "
                            f"{saved_world}: resuming {state.step_in_epoch} micro steps into it; the order of the "
                            "rest of the epoch differs from the interrupted run's")
    return state


__all__ = ["TrainState", "ResumeError", "CheckpointError", "NonFiniteWeightsError", "weights_finite",
           "nonfinite_weights_message", "ResumePoint", "epoch_tag", "step_tag", "save",
           "resume_target_problem", "choose_resume", "load"]
