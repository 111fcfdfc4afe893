"""The application's per-step checks, as one step hook (:class:`StepChecks`), and the DROP-batch pre-check.

At every optimizer step (the end of an accumulation window, the only moment a checkpoint may be
taken), in this order:

1. **Numerical faults.** Every ZeRO stage skips a step whose gradient norm is not finite (stage 0
   in fp32 through ``ldb_ds.zero_hooks.install_nonfinite_skip``); ``Installation.run_step``
   counts it once, in ``engine.ldb.skipped_steps`` (from DeepSpeed's ``was_step_applied()``; the
   skipped window's mask draw is consumed). The decision is taken on reduced values, so all
   ranks see the same. With fp16 that is the loss scaler at work (counted as an overflow); else
   ``--on-nonfinite stop`` ends the run (exit code 3) without saving anything over the last good
   checkpoint, and ``skip`` goes on, putting back the BatchNorm statistics the skipped forward
   changed. ``--max-consecutive-skips`` bounds a run that only skips.
2. **Replica check** every ``--verify-every`` steps (:func:`ldb_ds.runtime_checks.check_replicas`).
3. **Stop requests** (preemption): the ranks agree (:class:`ldb_ds.train.faults.StopAgreement`),
   save a checkpoint of this point of the epoch and end with exit code 75.
4. **Step checkpoints** every ``--ckpt-every-steps`` optimizer steps.
"""

from __future__ import annotations

import time

import torch

from . import checkpoint
from .console import log
from .faults import EXIT_DIVERGED, EXIT_MEMORY, EXIT_NONFINITE, EXIT_PREEMPTED, StopAgreement
from .loop import StepEvent, TrainContext, paused


class StepChecks:
    """Step hook for the checks above; counts go to ``ctx.state.counters`` and TensorBoard."""

    def __init__(self, ctx: TrainContext, agreement: StopAgreement | None = None):
        self.ctx, self.agreement = ctx, agreement
        engine = ctx.engine
        self.fp16 = bool(engine.fp16_enabled())
        self._skipped = int(engine.ldb.skipped_steps)  # the one count (run_step)
        self.consecutive = 0
        for key in ("nonfinite_steps", "overflow_steps"):
            ctx.state.counters.setdefault(key, 0)
        # Skipping a step does not undo its forward's BatchNorm updates; keep a copy to put back.
        self._keep_buffers = ctx.opts.on_nonfinite == "skip" and not self.fp16
        self._buffers = self._snapshot()

    def _snapshot(self) -> list[torch.Tensor] | None:
        if not self._keep_buffers:
            return None
        return [b.detach().clone() for b in self.ctx.engine.module.buffers()]

    def __call__(self, event: StepEvent) -> bool:
        if not event.boundary:
            return False
        ctx, engine, opts = self.ctx, self.ctx.engine, self.ctx.opts
        step = int(engine.global_steps)
        skipped = int(engine.ldb.skipped_steps)
        if skipped > self._skipped:
            self._skipped = skipped
            self.consecutive += 1
            key = "overflow_steps" if self.fp16 else "nonfinite_steps"
            ctx.state.counters[key] += 1
            self._write_counts()
            if not self.fp16:
                if opts.on_nonfinite == "stop":
                    ctx.stop(EXIT_NONFINITE, self._nonfinite_message(event, step))
                    return True
                if self._buffers is not None:
                    with torch.no_grad():
                        for b, saved in zip(engine.module.buffers(), self._buffers):
                            b.copy_(saved)
            if opts.max_consecutive_skips and self.consecutive >= opts.max_consecutive_skips:
                ctx.stop(EXIT_NONFINITE, f"{self.consecutive} optimizer steps in a row were skipped (non-finite "
                         f"gradients{' or fp16 overflows' if self.fp16 else ''}), the last at epoch {event.epoch}, "
                         f"micro step {event.step}, optimizer step {step}; stopping (--max-consecutive-skips). "
                         f"The last checkpoint is {ctx.state.last_tag or 'none'}")
                return True
        else:
            self.consecutive = 0
        self._buffers = self._snapshot()
        if step % opts.log_interval == 0:
            self._write_counts()
        if opts.verify_every and step % opts.verify_every == 0:
            from ldb_ds.runtime_checks import ReplicaDivergence, check_replicas

            try:
                check_replicas(engine, group=ctx.control_group,
                               where=f"at epoch {event.epoch}, optimizer step {step}")
            except ReplicaDivergence as err:
                ctx.stop(EXIT_DIVERGED, str(err))
                return True
            # Counted (results.json "counters"), so a run can show that its replicas were checked.
            ctx.state.counters["replica_checks"] = ctx.state.counters.get("replica_checks", 0) + 1
        signal_name = self.agreement.check(step) if self.agreement is not None else None
        try:
            return self._signal_and_checkpoint(event, step, signal_name)
        except checkpoint.NonFiniteWeightsError as err:  # every rank: the verdict is agreed
            ctx.stop(EXIT_NONFINITE, str(err))
            return True

    def _signal_and_checkpoint(self, event: StepEvent, step: int, signal_name: str | None) -> bool:
        """Steps 3 and 4 above: the preemption checkpoint, or a step checkpoint when due."""
        ctx, opts = self.ctx, self.ctx.opts
        if signal_name:
            t0 = time.perf_counter()
            tag = self.save(event, "preempt")
            ctx.stop(EXIT_PREEMPTED, f"stopped by {signal_name} after optimizer step {step} (epoch {event.epoch}, "
                     f"micro step {event.step} of {event.steps_in_epoch}); checkpoint {tag} saved in "
                     f"{time.perf_counter() - t0:.2f} s. Start the same command with --resume auto to continue")
            return True
        if opts.ckpt_every_steps and step % opts.ckpt_every_steps == 0:
            self.save(event, "step")
        return False

    def save(self, event: StepEvent, kind: str) -> str:
        """A checkpoint of this point of the epoch (after micro step ``event.step``)."""
        ctx, engine = self.ctx, self.ctx.engine
        st = ctx.state
        st.next_epoch, st.step_in_epoch = event.epoch, event.step
        st.samples_seen, st.epoch_partial = ctx.monitor.samples_seen, ctx.monitor.epoch_partial()
        with paused(ctx.heartbeat, f"checkpoint save ({kind})"):
            return checkpoint.save(engine, ctx.run.checkpoints, st, ctx.opts, engine.ldb.mode.value,
                                   tag=checkpoint.step_tag(int(engine.global_steps)), kind=kind,
                                   group=ctx.control_group)

    def _nonfinite_message(self, event: StepEvent, step: int) -> str:
        ldb = self.ctx.engine.ldb
        dropped = [ldb.units[i].name for i in ldb.dropped_units]
        shown = ", ".join(dropped[:6]) + (f" and {len(dropped) - 6} more" if len(dropped) > 6 else "")
        return (f"non-finite gradient norm at epoch {event.epoch} ({ldb.mode.value}), micro step {event.step}, "
                f"optimizer step {step} (this rank's loss {float(event.loss.detach()):.4g}); dropped units: "
                f"{shown or 'none'}. The step was skipped and nothing was saved after checkpoint "
                f"{self.ctx.state.last_tag or '(none)'}. Lower the learning rate, or pass --on-nonfinite skip")

    def _write_counts(self) -> None:
        c, x = self.ctx.state.counters, self.ctx.monitor.samples_seen
        self.ctx.monitor.write([("Reliability/skipped_steps", float(self._skipped), x),
                                ("Reliability/nonfinite_steps", float(c["nonfinite_steps"]), x),
                                ("Reliability/overflow_steps", float(c["overflow_steps"]), x),
                                ("Reliability/consecutive_skips", float(self.consecutive), x)])


def drop_precheck(ctx: TrainContext, input_shape: tuple[int, ...], num_classes: int) -> None:
    """Before the first epoch: does the DROP micro batch fit? (``ldb_ds.runtime_checks.drop_batch_precheck``).

    Only where a DROP epoch lies ahead with ``batch_scaling: micro_batch`` and ``batch_kappa > 1``
    (the only case where DROP steps need more memory than FULL ones). Random inputs from a
    generator of its own; the check restores every RNG and buffer it touches.
    """
    from ldb_ds.runtime_checks import DropBatchMemoryError, drop_batch_precheck
    from ldb_ds.schedule import Mode, epoch_mode

    engine, opts = ctx.engine, ctx.opts
    cfg = engine.ldb.config
    last = opts.epochs - 1 if opts.stop_after_epoch is None else min(opts.epochs - 1, opts.stop_after_epoch)
    if opts.no_memory_check or not cfg.enabled or cfg.batch_scaling != "micro_batch" or cfg.batch_kappa <= 1:
        return
    if not any(epoch_mode(e, cfg) is Mode.DROP for e in range(ctx.state.next_epoch, last + 1)):
        return
    n = engine.train_micro_batch_size_per_gpu() * cfg.batch_kappa
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, *input_shape, generator=g).to(engine.device, dtype=ctx.input_dtype)
    y = torch.randint(0, max(num_classes, 1), (n,), generator=g).to(engine.device)
    t0 = time.perf_counter()
    if ctx.heartbeat is not None:
        ctx.heartbeat.beat("DROP-batch memory check")
    try:
        drop_batch_precheck(engine, x, lambda out: ctx.criterion(out.float(), y))
    except DropBatchMemoryError as err:
        ctx.stop(EXIT_MEMORY, str(err))
        return
    log(f"DROP-batch memory check: a micro batch of {n} per rank fits ({time.perf_counter() - t0:.1f} s)")


__all__ = ["StepChecks", "drop_precheck"]
