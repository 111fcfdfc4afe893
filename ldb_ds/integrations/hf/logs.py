"""LDB's figures for the Trainer's (or Accelerate's) logging, under the TensorBoard monitor's tag names.

The keys are the tags of ``ldb_ds.train.monitor`` (docs/training.md, "TensorBoard tags"): ``LDB/mode``,
``LDB/kept_unit_fraction``, ``LDB/kept_param_fraction``, ``LDB/lr_factor``, ``LDB/batch_factor``,
``Comm/grad_bytes``, ``Comm/grad_bytes_saved``, ``Train/lr``, ``Train/samples_per_sec``,
``Train/samples_per_sec_per_rank``, ``Time/step_ms``. Per logged step, as the monitor: fractions,
bytes and times are means over the steps since the last log; mode and factors are the last
step's. Hugging Face's TensorBoard and wandb reporters put every training key under ``train/``
(``train/LDB/mode``), as they do with the Trainer's own ``loss``; the logs dict, the Trainer's
``log_history`` and ``trainer_state.json`` hold the names unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...controller import LDBState
from ...schedule import Mode


def ldb_log_values(state: LDBState) -> dict[str, float]:
    """The current step's LDB figures (no averaging): for a hand-written Accelerate loop's ``accelerator.log``."""
    return {
        "LDB/mode": float(state.mode is Mode.DROP),
        "LDB/kept_unit_fraction": state.kept_unit_fraction,
        "LDB/kept_param_fraction": state.kept_param_fraction,
        "LDB/lr_factor": state.lr_factor,
        "LDB/batch_factor": float(state.batch_factor),
        "Comm/grad_bytes": float(state.grad_bytes_step),
        "Comm/grad_bytes_saved": float(state.grad_bytes_full - state.grad_bytes_step),
    }


@dataclass
class LogWindow:
    """Sums over the optimizer steps since the last log."""

    steps: int = 0
    samples: int = 0
    """This rank's training samples."""
    step_s: float = 0.0
    sums: dict[str, float] | None = None
    last: dict[str, float] | None = None

    def add_samples(self, n: int) -> None:
        self.samples += int(n)

    def step_end(self, state: LDBState, step_s: float) -> None:
        """After an optimizer step: the mask of that step is still applied (it changes at the next window)."""
        values = ldb_log_values(state)
        self.steps += 1
        self.step_s += step_s
        self.sums = {k: (self.sums or {}).get(k, 0.0) + v for k, v in values.items()}
        self.last = values

    def flush(self, dp_world_size: int, learning_rate: float | None = None) -> dict[str, Any]:
        """The window's figures (empty if no step was taken), then start a new window."""
        if not self.steps or self.sums is None or self.last is None:
            return {}
        n = self.steps
        out: dict[str, Any] = {k: self.sums[k] / n for k in ("LDB/kept_unit_fraction", "LDB/kept_param_fraction",
                                                             "Comm/grad_bytes", "Comm/grad_bytes_saved")}
        out.update({k: self.last[k] for k in ("LDB/mode", "LDB/lr_factor", "LDB/batch_factor")})
        if learning_rate is not None:
            out["Train/lr"] = float(learning_rate) * self.last["LDB/lr_factor"]  # the LR the step applied
        if self.step_s > 0:
            # Every data-parallel rank processes as many samples as this one (the Trainer's
            # distributed sampler pads to equal shards).
            out["Train/samples_per_sec_per_rank"] = self.samples / self.step_s
            out["Train/samples_per_sec"] = self.samples * dp_world_size / self.step_s
        out["Time/step_ms"] = 1000.0 * self.step_s / n
        self.steps, self.samples, self.step_s, self.sums, self.last = 0, 0, 0.0, None, None
        return out


__all__ = ["ldb_log_values", "LogWindow"]
