"""Step timing, throughput and LDB figures, written into DeepSpeed's own TensorBoard file.

:class:`TrainMonitor` wraps the phases of a training step, averages them over ``log_every``
steps and hands the scalars to ``engine.monitor.write_events`` (DeepSpeed's ``MonitorMaster``:
rank 0 writes into the event file of the config's ``"tensorboard"`` section, other ranks do
nothing). The x axis is the number of training samples seen by all ranks together, as DeepSpeed
plots its own ``Train/Samples/*`` tags.

Why not DeepSpeed's own throughput: its ``ThroughputTimer`` fixes the batch size when the engine
is built, so its samples/s is wrong once a DROP epoch changes the batch size. Here every step
counts the samples it actually processed.

Timing is wall-clock with the accelerator synchronised before and after every phase
(``get_accelerator().synchronize()``), so asynchronous kernels are charged to the phase that
launched them. The synchronisation costs a little on a GPU; pass ``sync=False`` to skip it (the
phase split is then only indicative, the step and epoch totals stay right).

The tags (all documented in docs/training.md):

per logged step: ``Train/loss`` (mean over ranks), ``Train/lr``, ``Train/samples_per_sec``,
``Train/samples_per_sec_per_rank``, ``Train/micro_batch_per_rank``, ``Time/step_ms``,
``Time/data_ms``, ``Time/forward_ms``, ``Time/backward_ms``, ``Time/optimizer_step_ms``,
``LDB/mode``, ``LDB/kept_unit_fraction``, ``LDB/kept_param_fraction``, ``LDB/lr_factor``,
``LDB/batch_factor``, ``Comm/grad_bytes``, ``Comm/grad_bytes_saved``;
per epoch: ``Time/epoch_s``, ``Train/epoch_loss``, ``Train/epoch_samples_per_sec``,
``Comm/epoch_grad_bytes``, ``Comm/epoch_grad_bytes_saved``, ``LDB/epoch_mode``,
``Eval/top1``, ``Eval/top5``, ``Eval/loss``, ``Run/world_size``, ``Run/epoch``.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from ldb_ds.schedule import Mode

PHASES = ("data", "forward", "backward", "optimizer_step")


@dataclass
class _Window:
    """Sums over the steps since the last write."""

    steps: int = 0
    samples_local: int = 0
    samples_global: int = 0
    step_s: float = 0.0
    phase_s: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    loss_sum: float = 0.0
    grad_bytes: int = 0
    grad_bytes_saved: int = 0
    kept_unit: float = 0.0
    kept_param: float = 0.0


@dataclass
class _Epoch:
    start: float = 0.0
    steps: int = 0
    samples_global: int = 0
    train_s: float = 0.0
    loss_sum: torch.Tensor | None = None
    grad_bytes: int = 0
    grad_bytes_saved: int = 0
    kept_param_sum: float = 0.0  # the steps' kept parameter fractions, summed


class TrainMonitor:
    """Times training steps of an ``ldb_ds`` engine and writes the figures to TensorBoard.

    Usage (every rank runs the same calls; only rank 0 writes)::

        mon = TrainMonitor(engine, log_every=10)
        for epoch in ...:
            engine.set_epoch(epoch)
            mon.begin_epoch(epoch)
            for x, y in loader:
                with mon.phase("forward"):
                    loss = criterion(engine(x), y)
                with mon.phase("backward"):
                    engine.backward(loss)
                with mon.phase("optimizer_step"):
                    engine.step()
                stats = mon.end_step(loss, x.size(0))     # for a progress bar
            mon.end_epoch(eval_results)

    ``end_step`` all-reduces the loss every ``log_every`` steps (a collective: every rank must
    call it for every step). ``samples_seen`` (the x axis) is part of the checkpoint's client
    state so a resumed run continues the curves where they stopped.
    """

    def __init__(self, engine: Any, log_every: int = 10, samples_seen: int = 0,
                 sync: bool = True, mask_log: str | None = None) -> None:
        import deepspeed.comm as dist
        from deepspeed.accelerator import get_accelerator

        if log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {log_every}")
        self.engine = engine
        self.dist = dist
        self.accel = get_accelerator()
        self.world_size = dist.get_world_size()
        self.rank = dist.get_rank()
        self.log_every = log_every
        self.samples_seen = int(samples_seen)
        self.sync = sync
        self.mask_log = mask_log if self.rank == 0 else None
        self.epoch = 0
        self.last: dict[str, float] = {}
        self._win = _Window()
        self._ep = _Epoch()
        self._phase_s = dict.fromkeys(PHASES, 0.0)
        self._step_start: float | None = None
        self._last_end = time.perf_counter()
        self._loss_acc: torch.Tensor | None = None
        self._epoch_step = 0

    # -- timing -------------------------------------------------------------------------------

    def _now(self) -> float:
        if self.sync:
            self.accel.synchronize()
        return time.perf_counter()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time one phase of the current step (``forward``, ``backward``, ``optimizer_step``)."""
        if name not in PHASES:
            raise ValueError(f"unknown phase {name!r}: expected one of {PHASES}")
        t0 = self._now()
        if self._step_start is None:
            # The first phase of a step: the time since the previous step ended was spent
            # waiting for the data loader (and in the script's own bookkeeping).
            self._step_start = self._last_end
            self._phase_s["data"] = t0 - self._last_end
        try:
            yield
        finally:
            self._phase_s[name] += self._now() - t0

    def begin_epoch(self, epoch: int, partial: dict[str, Any] | None = None) -> None:
        """Start an epoch; ``partial`` (from :meth:`epoch_partial`) continues an interrupted one."""
        self.epoch = int(epoch)
        self._ep = _Epoch(start=self._now())
        if partial:
            loss = partial.get("loss_sum")
            self._ep = _Epoch(start=self._ep.start - float(partial["elapsed_s"]), steps=int(partial["steps"]),
                              samples_global=int(partial["samples_global"]), train_s=float(partial["train_s"]),
                              loss_sum=None if loss is None else loss.to(self.accel.current_device_name()),
                              grad_bytes=int(partial["grad_bytes"]),
                              grad_bytes_saved=int(partial["grad_bytes_saved"]),
                              # absent from checkpoints written before the field: count those steps as kept
                              kept_param_sum=float(partial.get("kept_param_sum", partial["steps"])))
        self._win = _Window()
        self._last_end = self._now()
        self._step_start = None
        self._epoch_step = self._ep.steps
        self._phase_s = dict.fromkeys(PHASES, 0.0)

    def epoch_partial(self) -> dict[str, Any]:
        """The running sums of the current epoch, for a checkpoint taken in the middle of it."""
        ep = self._ep
        return {"steps": ep.steps, "samples_global": ep.samples_global, "train_s": ep.train_s,
                "elapsed_s": time.perf_counter() - ep.start,
                "loss_sum": None if ep.loss_sum is None else ep.loss_sum.detach().cpu().clone(),
                "grad_bytes": ep.grad_bytes, "grad_bytes_saved": ep.grad_bytes_saved,
                "kept_param_sum": ep.kept_param_sum}

    # -- per step -----------------------------------------------------------------------------

    def end_step(self, loss: torch.Tensor, local_batch: int) -> dict[str, float]:
        """Close the step: account samples and time, write the events every ``log_every`` steps.

        Returns the latest figures (``loss``, ``samples_per_sec``, ``mode``...) for display.
        """
        end = self._now()
        start = self._step_start if self._step_start is not None else self._last_end
        step_s = end - start
        self._last_end = end
        self._step_start = None
        ldb = self._ldb_figures()
        global_batch = int(local_batch) * self.world_size  # DistributedSampler: equal shares
        self.samples_seen += global_batch
        self._epoch_step += 1

        w = self._win
        w.steps += 1
        w.samples_local += int(local_batch)
        w.samples_global += global_batch
        w.step_s += step_s
        for k in PHASES:
            w.phase_s[k] += self._phase_s[k]
        self._phase_s = dict.fromkeys(PHASES, 0.0)
        w.grad_bytes += ldb["grad_bytes"]
        w.grad_bytes_saved += ldb["grad_bytes_saved"]
        w.kept_unit += ldb["kept_unit_fraction"]
        w.kept_param += ldb["kept_param_fraction"]
        detached = loss.detach().float()
        self._loss_acc = detached if self._loss_acc is None else self._loss_acc + detached

        ep = self._ep
        ep.steps += 1
        ep.samples_global += global_batch
        ep.train_s += step_s
        ep.grad_bytes += ldb["grad_bytes"]
        ep.grad_bytes_saved += ldb["grad_bytes_saved"]
        ep.kept_param_sum += ldb["kept_param_fraction"]
        ep.loss_sum = detached if ep.loss_sum is None else ep.loss_sum + detached

        if self.mask_log is not None:
            with open(self.mask_log, "a") as f:
                f.write(json.dumps({"epoch": self.epoch, "step": self._epoch_step,
                                    "mode": ldb["mode_name"],
                                    "dropped": list(ldb["dropped_units"])}) + "\n")

        if w.steps >= self.log_every:
            self._flush_window(ldb)
        return self.last

    def _flush_window(self, ldb: dict[str, Any]) -> None:
        w = self._win
        # One small collective per logged step: the loss averaged over ranks and steps.
        loss = self._all_mean(self._loss_acc) / w.steps
        sps = w.samples_global / w.step_s if w.step_s > 0 else 0.0
        sps_rank = w.samples_local / w.step_s if w.step_s > 0 else 0.0
        lr = self._lr() * ldb["lr_factor"]
        self.last = {
            "loss": loss, "lr": lr, "samples_per_sec": sps, "samples_per_sec_per_rank": sps_rank,
            "step_ms": 1e3 * w.step_s / w.steps, "mode": ldb["mode"], "mode_name": ldb["mode_name"],
            "kept_param_fraction": w.kept_param / w.steps,
        }
        x = self.samples_seen
        events = [
            ("Train/loss", loss, x),
            ("Train/lr", lr, x),
            ("Train/samples_per_sec", sps, x),
            ("Train/samples_per_sec_per_rank", sps_rank, x),
            ("Train/micro_batch_per_rank", w.samples_local / w.steps, x),
            ("Time/step_ms", 1e3 * w.step_s / w.steps, x),
        ]
        events += [(f"Time/{k}_ms", 1e3 * w.phase_s[k] / w.steps, x) for k in PHASES]
        events += [
            ("LDB/mode", float(ldb["mode"]), x),
            ("LDB/kept_unit_fraction", w.kept_unit / w.steps, x),
            ("LDB/kept_param_fraction", w.kept_param / w.steps, x),
            ("LDB/lr_factor", ldb["lr_factor"], x),
            ("LDB/batch_factor", float(ldb["batch_factor"]), x),
            ("Comm/grad_bytes", w.grad_bytes / w.steps, x),
            ("Comm/grad_bytes_saved", w.grad_bytes_saved / w.steps, x),
        ]
        self.write(events)
        self._win = _Window()
        self._loss_acc = None

    # -- per epoch ----------------------------------------------------------------------------

    def end_epoch(self, eval_results: dict[str, float] | None = None) -> dict[str, float]:
        """Flush a partial window and write the epoch figures (and the eval results, if given)."""
        if self._win.steps:
            self._flush_window(self._ldb_figures())
        ep = self._ep
        epoch_s = self._now() - ep.start
        loss = self._all_mean(ep.loss_sum) / max(ep.steps, 1) if ep.steps else math.nan
        x = self.samples_seen
        ldb = self._ldb_figures()
        out = {
            "epoch": float(self.epoch), "epoch_s": epoch_s, "train_loss": loss, "steps": ep.steps,
            "train_s": ep.train_s,
            "samples_per_sec": ep.samples_global / ep.train_s if ep.train_s > 0 else 0.0,
            "mode": ldb["mode"],
            "grad_bytes": ep.grad_bytes, "grad_bytes_saved": ep.grad_bytes_saved,
            # The epoch's own mean (a resumed epoch included), not the last log window's.
            "kept_param_fraction": ep.kept_param_sum / ep.steps if ep.steps else ldb["kept_param_fraction"],
        }
        events = [
            ("Time/epoch_s", epoch_s, x),
            ("Time/epoch_train_s", ep.train_s, x),
            ("Train/epoch_loss", loss, x),
            ("Train/epoch_samples_per_sec", out["samples_per_sec"], x),
            ("Comm/epoch_grad_bytes", float(ep.grad_bytes), x),
            ("Comm/epoch_grad_bytes_saved", float(ep.grad_bytes_saved), x),
            ("LDB/epoch_mode", float(ldb["mode"]), x),
            ("Run/world_size", float(self.world_size), x),
            ("Run/epoch", float(self.epoch), x),
        ]
        for key, value in (eval_results or {}).items():
            events.append((f"Eval/{key}", float(value), x))
            out[f"eval_{key}"] = float(value)
        self.write(events)
        return out

    # -- helpers ------------------------------------------------------------------------------

    def write(self, events: list[tuple[str, float, int]]) -> None:
        """Write ``(tag, value, step)`` events through DeepSpeed's monitor (rank 0 only)."""
        monitor = getattr(self.engine, "monitor", None)
        if monitor is not None and getattr(monitor, "enabled", False):
            monitor.write_events(events)

    def _all_mean(self, value: torch.Tensor | None) -> float:
        t = torch.zeros((), dtype=torch.float32) if value is None else value.detach().float()
        t = t.to(self.accel.current_device_name()).reshape(1).clone()
        if self.world_size > 1:
            self.dist.all_reduce(t)
            t /= self.world_size
        return float(t.item())

    def _lr(self) -> float:
        try:
            return float(self.engine.get_lr()[0])
        except Exception:  # no optimizer / no lr
            return math.nan

    def _ldb_figures(self) -> dict[str, Any]:
        ldb = getattr(self.engine, "ldb", None)
        enabled = bool(getattr(ldb, "enabled", False))
        mode = getattr(ldb, "mode", Mode.FULL)
        full = int(getattr(ldb, "grad_bytes_full", 0) or 0)
        step = int(getattr(ldb, "grad_bytes_step", full) or 0)
        return {
            "enabled": enabled,
            "mode": 1 if mode is Mode.DROP else 0,
            "mode_name": mode.value,
            "kept_unit_fraction": float(getattr(ldb, "kept_unit_fraction", 1.0)),
            "kept_param_fraction": float(getattr(ldb, "kept_param_fraction", 1.0)),
            "lr_factor": float(getattr(ldb, "lr_factor", 1.0)),
            "batch_factor": int(getattr(ldb, "batch_factor", 1)),
            "grad_bytes": step,
            "grad_bytes_saved": max(full - step, 0),
            "dropped_units": tuple(getattr(ldb, "dropped_units", ())),
        }


__all__ = ["TrainMonitor", "PHASES"]
