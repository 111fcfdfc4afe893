"""Pure LDB schedule logic: epoch mode, LR and batch factors, mask draws.

No torch and no torch.distributed here, so every rule of the method is a plain
function that a unit test can call. The distributed agreement (rank 0 draws,
everybody receives) lives in :mod:`ldb_ds.engine`.
"""

from __future__ import annotations

import enum
import numbers
import random
from typing import Sequence

from .config import LDBConfig


class Mode(str, enum.Enum):
    FULL = "FULL"
    DROP = "DROP"


def check_epoch(epoch: object, where: str = "set_epoch(epoch)") -> int:
    """``epoch`` as an int, or a clear error: an integer >= 0 (not a bool, a float or a string).

    A float such as 1.5 is refused, not truncated: the mode depends on ``epoch % sampling_rate``.
    """
    if isinstance(epoch, bool) or not isinstance(epoch, numbers.Integral):
        raise TypeError(f"{where}: epoch must be an integer >= 0, got {type(epoch).__name__} {epoch!r}")
    if epoch < 0:
        raise ValueError(f"{where}: epoch must be an integer >= 0, got {epoch}")
    return int(epoch)


def first_drop_epoch(cfg: LDBConfig) -> int:
    """The first DROP epoch of ``cfg``'s schedule (``sampling_rate``; 1 if LDB is off: no DROP epoch)."""
    return next((e for e in range(1, 10 * cfg.sampling_rate + 2) if epoch_mode(e, cfg) is Mode.DROP), 1)


def epoch_mode(epoch: int, cfg: LDBConfig) -> Mode:
    """Paper, Eq. (3): epoch e is DROP when ``e % s == 0 and e > 0``; FULL otherwise."""
    epoch = check_epoch(epoch, "epoch_mode(epoch, cfg)")
    if cfg.enabled and epoch > 0 and epoch % cfg.sampling_rate == 0:
        return Mode.DROP
    return Mode.FULL


def lr_factor(mode: Mode, cfg: LDBConfig) -> float:
    """Learning-rate multiplier for a step in ``mode`` (1 in FULL mode)."""
    if mode is Mode.FULL or cfg.lr_policy == "none":
        return 1.0
    if cfg.lr_policy == "kappa":
        return float(cfg.kappa)
    # inverse_keep: the expected fraction of units updated is (1 - p); scale by its inverse.
    return 1.0 / (1.0 - float(cfg.drop_rate))


def batch_factor(mode: Mode, cfg: LDBConfig) -> int:
    """Batch-size multiplier for a step in ``mode`` (1 in FULL mode)."""
    return cfg.batch_kappa if mode is Mode.DROP else 1


def sampleable_range(num_units: int, cfg: LDBConfig) -> range:
    """Indices of the units that may be dropped (all but keep_first and keep_last)."""
    return range(min(cfg.keep_first, num_units), max(num_units - cfg.keep_last, 0))


def draw_dropped(rng: random.Random, num_units: int, cfg: LDBConfig) -> list[bool]:
    """One DROP-step mask: ``dropped[i]`` is True when unit i gets no update.

    Each sampleable unit is dropped independently with probability p, drawn as
    ``u < p`` like the authors' code. The draw count is fixed (one number per
    sampleable unit), so the generator's stream does not depend on the outcome.
    """
    dropped = [False] * num_units
    for i in sampleable_range(num_units, cfg):
        dropped[i] = rng.random() < cfg.drop_rate
    return dropped


def kept_fraction(dropped: Sequence[bool], weights: Sequence[int] | None = None) -> float:
    """Fraction of units (or of ``weights``, e.g. parameter counts) that are kept."""
    if weights is None:
        weights = [1] * len(dropped)
    total = sum(weights)
    if total == 0:
        return 1.0
    return sum(w for w, d in zip(weights, dropped) if not d) / total


__all__ = ["Mode", "check_epoch", "epoch_mode", "lr_factor", "batch_factor", "sampleable_range",
           "draw_dropped", "kept_fraction", "first_drop_epoch"]
