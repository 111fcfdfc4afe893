"""Messages of the training application: rank 0 prints, the other ranks stay quiet."""

from __future__ import annotations

import sys

from ..process import launched_rank, report_agreed_error

PREFIX = "[ldb-train]"


def is_main() -> bool:
    """Rank 0. Before the process group exists every rank checks alike and finds the same, so the
    launcher's rank variable picks the one that speaks: one line per job, not one per rank."""
    dist = sys.modules.get("deepspeed.comm")  # not imported yet: no process group either
    if dist is None or not dist.is_initialized():
        return launched_rank() == 0
    return dist.get_rank() == 0


def log(msg: str) -> None:
    if is_main():
        print(f"{PREFIX} {msg}", flush=True)


def error(msg: str) -> None:
    """An error every rank found alike (bad options, missing data): printed once, to stderr, by rank 0
    (:func:`ldb_ds.process.report_agreed_error`: the other ranks let it be printed before they leave)."""
    report_agreed_error(f"{PREFIX} error: {msg}", is_main=is_main())


__all__ = ["PREFIX", "log", "error", "is_main"]
