"""Messages of the training application: rank 0 prints, the other ranks stay quiet."""

from __future__ import annotations

import sys

PREFIX = "[ldb-train]"


def is_main() -> bool:
    """Rank 0, or any process before the process group exists (then every rank checks alike)."""
    dist = sys.modules.get("deepspeed.comm")  # not imported yet: no process group either
    return dist is None or not dist.is_initialized() or dist.get_rank() == 0


def log(msg: str) -> None:
    if is_main():
        print(f"{PREFIX} {msg}", flush=True)


def error(msg: str) -> None:
    """An error every rank found alike (bad options, missing data): printed once, to stderr."""
    if is_main():
        print(f"{PREFIX} error: {msg}", file=sys.stderr, flush=True)


__all__ = ["PREFIX", "log", "error", "is_main"]
