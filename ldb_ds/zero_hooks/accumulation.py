"""DeepSpeed's accumulation boundary when ldb_ds changes the number of accumulation steps.

With ``batch_scaling: "accumulation"`` a DROP epoch takes ``batch_kappa`` times DeepSpeed's
gradient-accumulation steps (``engine.set_train_batch_size``, ``engine.py:1320``: it rewrites the
config only). DeepSpeed's managed boundary is ``(micro_steps + 1) % gradient_accumulation_steps()
== 0`` over the whole run (``engine.py:3463``; ``micro_steps`` counts every micro step since the
engine was built and is read nowhere else in 0.19.8, ZenFlow aside, which LDB refuses). An epoch
whose micro steps are not a multiple of the new count (a FULL epoch of 3 windows, then a DROP
epoch of windows of 2) would shift every window: the DROP epoch's first window one micro batch
long, the others straddling two batches, the last one left open at the next ``set_epoch``.
:func:`set_accumulation_steps` starts a window at the epoch's first micro step instead.
"""

from __future__ import annotations

from typing import Any

from .patches import require_verified

BOUNDARY_SOURCES = ["engine.DeepSpeedEngine.is_gradient_accumulation_boundary",
                    "engine.DeepSpeedEngine.set_train_batch_size"]
"""The DeepSpeed functions :func:`set_accumulation_steps` relies on (keys of ``version.MIRRORED_SOURCES``)."""


def check_accumulation_boundary() -> None:
    """At set-up, with ``batch_scaling: "accumulation"``: refuse a DeepSpeed whose boundary rule changed."""
    require_verified("batch_scaling 'accumulation' (the DROP epoch's accumulation windows)", BOUNDARY_SOURCES)


def set_accumulation_steps(ds_engine: Any, train_batch_size: int) -> None:
    """DeepSpeed's ``set_train_batch_size(train_batch_size)``, its next micro step the first of a window.

    Call between windows only (ldb_ds's ``set_epoch`` refuses to run inside one): the last micro step
    closed a window, so ``micro_steps`` was a multiple of the old count; rounding it up to a multiple
    of the new one moves no micro step into another window, it only says where the next one starts.
    Every rank does the same at the same epoch boundary, so their windows stay in step.
    """
    ds_engine.set_train_batch_size(train_batch_size)
    steps = ds_engine.gradient_accumulation_steps()
    ds_engine.micro_steps = -(-ds_engine.micro_steps // steps) * steps


__all__ = ["BOUNDARY_SOURCES", "check_accumulation_boundary", "set_accumulation_steps"]
