"""The training loop: :func:`train_one_epoch`, and :func:`fit` over the epochs (evaluating with
:func:`ldb_ds.workloads.evaluation.validate`, shared with ldb-bench).

Extending the loop
------------------
Two kinds of hooks, both run on every rank (``TrainContext.step_hooks``/``epoch_hooks``):

* a **step hook** ``hook(event: StepEvent) -> bool | None`` runs after every micro step, with
  the epoch, the step index, whether the step closed an accumulation window (only then may a
  checkpoint be saved: DeepSpeed's gradient buffers are empty) and the step's loss. Return
  ``True`` to end the epoch after this step: :func:`fit` then returns at once, without the
  end-of-epoch evaluation and checkpoint (a hook that stops mid-epoch saves what it needs first,
  e.g. with :func:`ldb_ds.train.checkpoint.save` and a tag of its own);
* an **epoch hook** ``hook(epoch: int, figures: dict) -> bool | None`` runs after an epoch's
  figures, summary row and checkpoint; ``True`` ends the run there.

Every rank must return the same answer (the next step is a collective): a hook that looks at
rank-local state (a signal, a non-finite local loss) has to agree with the others through a
collective first. The application's own checks (numerical faults, replica hashes, preemption,
``--ckpt-every-steps``) are one such hook, :class:`ldb_ds.train.step_checks.StepChecks`; a hook that
ends the run sets ``ctx.exit_code``/``ctx.exit_message`` with :meth:`TrainContext.stop`.

Reproducibility: before every micro step torch's RNG (dropout, drop-path) is seeded from
(seed, epoch, micro step, rank), and :class:`ldb_ds.train.data.SeededDataset` seeds each
sample's augmentation from (seed, epoch, index). A run resumed from a checkpoint taken in the
middle of an epoch (``ctx.state.step_in_epoch``) skips the batches already trained
(``ScalableBatchSampler.start_batch``), restores the LDB mask stream and the epoch's running
sums, and continues bitwise as the uninterrupted run (on the CPU, or with deterministic
algorithms on a GPU).
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

from ldb_ds.process import batch_to_device
from ldb_ds.workloads.batches import agreed_batches
from ldb_ds.workloads.evaluation import validate  # shared with ldb-bench; importable from here too

from . import checkpoint
from .console import log
from .monitor import TrainMonitor
from .options import TrainOptions
from .rundir import RunDir


@dataclass
class StepEvent:
    """What a step hook sees after a micro step."""

    epoch: int
    step: int
    """Micro steps done in this epoch, this one included."""
    steps_in_epoch: int
    boundary: bool
    """The step closed an accumulation window (``engine.step()`` ran the optimizer)."""
    loss: torch.Tensor
    """This rank's loss of the micro step (not reduced over ranks)."""
    batch_size: int
    stats: dict[str, Any]
    """The monitor's latest window figures (empty until the first window is written)."""


StepHook = Callable[[StepEvent], Optional[bool]]
EpochHook = Callable[[int, dict], Optional[bool]]


@dataclass
class EpochOutcome:
    steps: int
    """Micro steps run by this call."""
    stopped: bool = False
    """A step hook ended the epoch early."""
    bad_images: int = 0
    """Unreadable images skipped on this rank (``--skip-bad-images``)."""


@dataclass
class TrainContext:
    """Everything :func:`fit` needs; built by :func:`ldb_ds.train.main.main`."""

    opts: TrainOptions
    engine: Any
    train_loader: Any
    eval_loader: Any
    monitor: TrainMonitor
    run: RunDir
    rank: int
    input_dtype: torch.dtype
    scheduler: Any = None
    state: checkpoint.TrainState = field(default_factory=checkpoint.TrainState)
    criterion: Any = field(default_factory=torch.nn.CrossEntropyLoss)
    step_hooks: list[StepHook] = field(default_factory=list)
    epoch_hooks: list[EpochHook] = field(default_factory=list)
    heartbeat: Any = None
    """A :class:`ldb_ds.train.faults.Heartbeat` the loop beats (epoch, micro step, phase)."""
    control_group: Any = None
    """A gloo group for host-side agreement (checkpoint manifests, stop flags, hashes)."""
    data_group: Any = None
    """A gloo group that carries only the per-batch load agreement (:func:`ldb_ds.workloads.batches.agreed_batches`)."""
    precheck: Callable[["TrainContext"], None] | None = None
    """Run before the first epoch (the DROP-batch memory check)."""
    exit_code: int = 0
    exit_message: str = ""

    def stop(self, code: int, message: str) -> None:
        """End the run with ``code`` (the hook that calls this returns True)."""
        if not self.exit_code:
            self.exit_code, self.exit_message = code, message


def create_lr_scheduler(opts: TrainOptions, optimizer: Any) -> Any:
    """timm's ``CosineLRScheduler``, stepped once per epoch (``None`` for ``--sched none``).

    Warm-up for ``--warmup-epochs`` from ``--warmup-lr`` (default base / (warmup + 1), so the
    first epoch already trains), then a cosine from the base LR to ``--min-lr`` over the
    remaining epochs. The scheduler owns each group's ``lr`` between steps; LDB multiplies it by
    its DROP factor only inside the optimizer step and puts the scheduled value back
    (``ldb_ds.functional.hide_groups``), so the two compose. Create it before resuming: it
    takes the base LRs from the config, and the schedule is a function of the epoch alone.
    """
    if opts.sched == "none":
        return None
    from timm.scheduler import CosineLRScheduler

    base = optimizer.param_groups[0]["lr"]
    warmup_lr = opts.warmup_lr if opts.warmup_lr is not None else base / (opts.warmup_epochs + 1)
    # timm warns that a one-epoch cosine "has no effect"; that is what --epochs 1 asks for.
    quiet = logging.getLogger("timm.scheduler.cosine_lr")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return CosineLRScheduler(optimizer, t_initial=max(opts.epochs - opts.warmup_epochs, 1),
                                 lr_min=opts.min_lr, warmup_t=opts.warmup_epochs,
                                 warmup_lr_init=warmup_lr, warmup_prefix=True, t_in_epochs=True)
    finally:
        quiet.setLevel(level)


def seed_step(seed: int, epoch: int, step: int, rank: int) -> None:
    """Seed torch's RNG (CPU and devices) for micro step ``step`` of ``epoch`` on ``rank``.

    Dropout and drop-path draw from it: seeding per step makes a run resumed in the middle of an
    epoch draw exactly what the uninterrupted run drew (the data's augmentation is seeded per
    sample, :class:`ldb_ds.train.data.SeededDataset`).
    """
    from .data import mix_seed

    torch.manual_seed(mix_seed(seed, epoch, step, rank))


def micro_steps(loader_len: int, gas: int, max_steps_per_epoch: int = 0) -> int:
    """Micro steps of one epoch: whole accumulation windows only (``set_epoch`` needs one closed)."""
    n = loader_len // gas * gas
    if max_steps_per_epoch:
        n = min(n, max_steps_per_epoch * gas)
    return n


def train_one_epoch(engine: Any, loader: Any, epoch: int, *, monitor: TrainMonitor,
                    criterion: Any, steps: int, input_dtype: torch.dtype,
                    hooks: Sequence[StepHook] = (), progress: bool = True,
                    log_interval: int = 10, epochs: int | None = None, start: int = 0,
                    seed: int | None = None, rank: int = 0, heartbeat: Any = None,
                    data_group: Any = None) -> EpochOutcome:
    """Train micro steps ``start`` to ``steps`` of ``loader``; call after ``engine.set_epoch(epoch)``.

    With ``start > 0`` the loader must already skip the first ``start`` batches (the caller sets
    ``ScalableBatchSampler.start_batch``). ``seed``: seed torch's RNG per micro step
    (:func:`seed_step`). Batches are ``(x, y)`` or ``(x, y, n_skipped_images)``. ``data_group``:
    a gloo group over which the ranks agree that each batch loaded before any of them trains it
    (:func:`ldb_ds.workloads.batches.agreed_batches`: a file unreadable on one rank stops every rank
    with the same error, instead of leaving the others to fail in the step's collective).
    """
    from tqdm import tqdm

    engine.train()
    gas = engine.gradient_accumulation_steps()
    mode_name = engine.ldb.mode.value
    bar = tqdm(total=steps, initial=start, desc=f"epoch {epoch}" + (f"/{epochs - 1}" if epochs else "")
               + f" {mode_name}", disable=not progress, dynamic_ncols=True, leave=True,
               mininterval=1.0)
    beat = heartbeat.beat if heartbeat is not None else (lambda *a, **k: None)
    beat("data loading", epoch, start)
    batches = contextlib.closing(agreed_batches(loader, max(steps - start, 0), data_group))
    with batches as agreed:
        done, stopped, bad = _train_batches(engine, agreed, epoch, monitor=monitor, criterion=criterion,
                                            steps=steps, input_dtype=input_dtype, hooks=hooks, bar=bar,
                                            log_interval=log_interval, start=start, seed=seed, rank=rank,
                                            gas=gas, beat=beat)
    bar.close()
    return EpochOutcome(done - start, stopped, bad)


def _train_batches(engine: Any, batches: Any, epoch: int, *, monitor: TrainMonitor, criterion: Any,
                   steps: int, input_dtype: torch.dtype, hooks: Sequence[StepHook], bar: Any,
                   log_interval: int, start: int, seed: int | None, rank: int, gas: int,
                   beat: Callable[..., None]) -> tuple[int, bool, int]:
    done, stopped, bad = start, False, 0
    for batch in batches:
        x, y = batch[0], batch[1]
        if len(batch) > 2:
            bad += int(batch[2])
        if seed is not None:
            seed_step(seed, epoch, done, rank)
        beat("forward", epoch, done)
        with monitor.phase("forward"):
            x, y = batch_to_device(x, engine.device, input_dtype), batch_to_device(y, engine.device)
            loss = criterion(engine(x).float(), y)
        beat("backward (gradient reduction)")
        with monitor.phase("backward"):
            engine.backward(loss)
        beat("optimizer step")
        with monitor.phase("optimizer_step"):
            engine.step()
        beat("step bookkeeping")
        stats = monitor.end_step(loss, x.size(0))
        done += 1
        bar.update(1)
        if stats and done % log_interval == 0:
            bar.set_postfix(loss=f"{stats['loss']:.3f}", sps=f"{stats['samples_per_sec']:.0f}",
                            mode=stats["mode_name"], refresh=False)
        event = StepEvent(epoch, done, steps, done % gas == 0, loss, x.size(0), stats)
        if any([bool(hook(event)) for hook in hooks]):  # every hook runs (a list, not lazy)
            stopped = True
        if stopped or done >= steps:
            break
        beat("data loading")
    return done, stopped, bad


def distribute_bn(module: torch.nn.Module, how: str) -> None:
    """Make BatchNorm running statistics equal on every rank (timm's ``distribute_bn``).

    Every rank updates its running mean/variance from its own batches and DeepSpeed never
    synchronises buffers, so without this each rank would evaluate a different model and the
    checkpoint (rank 0's module) would not reproduce the accuracy measured. timm calls
    ``torch.distributed`` directly: DeepSpeed's comm runs on the same default process group.
    """
    import deepspeed.comm as dist
    from timm.utils import distribute_bn as timm_distribute_bn

    if how != "none" and dist.get_world_size() > 1:
        timm_distribute_bn(module, dist.get_world_size(), reduce=how == "reduce")


def _due(every: int, epoch: int, last: int) -> bool:
    return bool(every and (epoch + 1) % every == 0) or epoch == last


def paused(heartbeat: Any, phase: str) -> Any:
    """The heartbeat's pause (a legitimate long wait, e.g. rank 0 writing a checkpoint), if any."""
    return heartbeat.pause(phase) if heartbeat is not None else contextlib.nullcontext()


def _all_sum(value: int, group: Any) -> int:
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64)
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    return int(t.item())


def fit(ctx: TrainContext) -> float:
    """Train from ``ctx.state`` (next epoch, micro step) to the last epoch; returns the seconds it took.

    Ends early when a hook stops the run (``ctx.exit_code`` says why).
    """
    opts, engine, state = ctx.opts, ctx.engine, ctx.state
    last = opts.epochs - 1
    if opts.stop_after_epoch is not None:
        last = min(last, opts.stop_after_epoch)
    t0 = time.perf_counter()
    if ctx.precheck is not None and state.next_epoch <= last:
        ctx.precheck(ctx)
        if ctx.exit_code:
            return time.perf_counter() - t0
    hb = ctx.heartbeat
    for epoch in range(state.next_epoch, last + 1):
        start = state.step_in_epoch if epoch == state.next_epoch else 0
        if ctx.scheduler is not None:
            ctx.scheduler.step(epoch)
        # After a resume, set_epoch of the checkpoint's epoch continues it (mode, mask stream, the
        # epoch's one mask with resample "epoch"): LDBEngine.load_checkpoint, as for every user.
        mode = engine.set_epoch(epoch)
        ctx.monitor.begin_epoch(epoch, state.epoch_partial if start else None)
        steps = micro_steps(len(ctx.train_loader), engine.gradient_accumulation_steps(),
                            opts.max_steps_per_epoch)
        start = min(start, steps)
        sampler = getattr(ctx.train_loader, "batch_sampler", None)
        if start and sampler is not None:
            sampler.start_batch = start
        dataset = getattr(ctx.train_loader, "dataset", None)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        outcome = train_one_epoch(
            engine, ctx.train_loader, epoch, monitor=ctx.monitor, criterion=ctx.criterion,
            steps=steps, input_dtype=ctx.input_dtype, hooks=ctx.step_hooks,
            progress=ctx.rank == 0 and not opts.no_progress, log_interval=opts.log_interval,
            epochs=opts.epochs, start=start, seed=opts.seed, rank=ctx.rank, heartbeat=hb,
            data_group=ctx.data_group)
        state.step_in_epoch, state.epoch_partial = 0, None
        if opts.skip_bad_images:  # every rank takes part, stopped or not (a collective)
            skipped = _all_sum(outcome.bad_images, ctx.control_group)
            state.counters["bad_images"] = state.counters.get("bad_images", 0) + skipped
            ctx.monitor.write([("Data/skipped_images", float(state.counters["bad_images"]),
                                ctx.monitor.samples_seen)])
        if outcome.stopped:
            break
        if hb is not None:
            hb.beat("end of epoch (BatchNorm synchronisation, evaluation)", epoch, steps)
        distribute_bn(engine.module, opts.dist_bn)
        res = validate(engine, ctx.eval_loader, ctx.input_dtype, heartbeat=hb, data_group=ctx.data_group) if _due(
            opts.eval_every, epoch, last) else None
        ep = ctx.monitor.end_epoch(res)
        # The LR applied in the epoch: the scheduled LR times LDB's factor (1 in FULL epochs).
        lr = float(engine.get_lr()[0]) * engine.ldb.lr_factor
        ep.update(mode_name=mode.value, lr=lr)
        state.history.append(ep)
        state.next_epoch, state.samples_seen = epoch + 1, ctx.monitor.samples_seen
        log(f"epoch {epoch} [{mode.value}] loss {ep['train_loss']:.4f} | "
            + (f"eval top1 {res['top1']:.2f}% loss {res['loss']:.4f} | " if res else "")
            + f"{ep['epoch_s']:.1f} s, {ep['samples_per_sec']:.1f} samples/s, {ep['steps']} "
              f"steps, kept params {ep['kept_param_fraction']:.3f}")
        if ctx.rank == 0:  # before the checkpoint: a resume trims rows it trains again
            ctx.run.append_summary(
                epoch, {"loss": ep["train_loss"], "epoch_s": ep["epoch_s"],
                        "train_s": ep["train_s"], "samples_per_sec": ep["samples_per_sec"],
                        "steps": ep["steps"], "mode": mode.value},
                {k: (res or {}).get(k) for k in ("top1", "top5", "loss")}, lr)
        if opts.ckpt_every and _due(opts.ckpt_every, epoch, last):
            try:
                with paused(hb, "checkpoint save"):
                    checkpoint.save(engine, ctx.run.checkpoints, state, opts, mode.value, kind="epoch",
                                    metric=(res or {}).get("top1"), group=ctx.control_group)
            except checkpoint.NonFiniteWeightsError as err:  # every rank: the verdict is agreed
                from .faults import EXIT_NONFINITE

                ctx.stop(EXIT_NONFINITE, str(err))
                break
        if any([bool(hook(epoch, ep)) for hook in ctx.epoch_hooks]):
            break
    return time.perf_counter() - t0


__all__ = ["StepEvent", "StepHook", "EpochHook", "EpochOutcome", "TrainContext",
           "create_lr_scheduler", "seed_step", "micro_steps", "train_one_epoch", "validate",
           "distribute_bn", "paused", "fit"]
