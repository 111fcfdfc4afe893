"""A dataset that reports, from inside a DataLoader worker, which process it runs in.

Importable by name, so forkserver and spawn workers can unpickle it (tests/unit/test_reliability.py).
"""

from __future__ import annotations

import os
import signal

from torch.utils.data import Dataset


def ignored_signals(pid: int) -> set[int]:
    """The signals process ``pid`` ignores (SIG_IGN), from /proc/<pid>/status."""
    with open(f"/proc/{pid}/status") as f:
        mask = int(next(line for line in f if line.startswith("SigIgn:")).split()[1], 16)
    return {num for num in range(1, 65) if mask >> (num - 1) & 1}


class WorkerFacts(Dataset):
    """Item i: (this process's pid, its parent's pid, whether it ignores SIGTERM and SIGUSR1)."""

    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int):
        ignored = ignored_signals(os.getpid())
        return os.getpid(), os.getppid(), signal.SIGTERM in ignored and signal.SIGUSR1 in ignored
