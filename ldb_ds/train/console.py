"""Messages of the training application: rank 0 prints, the other ranks stay quiet."""

from __future__ import annotations

import os
import sys

from ..process import wait_for_rank0_to_speak

PREFIX = "[ldb-train]"



def launched_rank() -> int:
    """The rank the launcher gave this process (RANK; mpirun: OMPI_COMM_WORLD_RANK), 0 if none."""
    for name in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        text = os.environ.get(name, "")
        if text.isdigit():
            return int(text)
    return 0


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
    """An error every rank found alike (bad options, missing data): printed once, to stderr.

    The other ranks give rank 0 time to print it before they leave
    (:func:`ldb_ds.process.wait_for_rank0_to_speak`).
    """
    if is_main():
        print(f"{PREFIX} error: {msg}", file=sys.stderr, flush=True)
    else:
        wait_for_rank0_to_speak()


__all__ = ["PREFIX", "log", "error", "is_main", "launched_rank"]
