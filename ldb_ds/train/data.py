"""The training application's wrappers around the shared datasets (:mod:`ldb_ds.workloads.data`).

:class:`SeededDataset` seeds each sample's augmentation by (seed, epoch, sample index), so a run
resumed in the middle of an epoch, with any number of DataLoader workers, sees exactly the
augmentation of the uninterrupted run; :func:`mix_seed` is the hash it (and the loop's per-step
seeding) uses. :class:`SkipBadImages` with :func:`collate_skipping` drops unreadable images from
their batch and counts them instead (``--skip-bad-images``).

The datasets themselves (``build_datasets``, ``ShardedEval``, ``DatasetError``, ...) moved to
:mod:`ldb_ds.workloads.data`, which ldb-bench shares; importing them from here still works for
one release, with a ``DeprecationWarning``.
"""

from __future__ import annotations

import hashlib
import random
import sys
import warnings
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ldb_ds.workloads import data as datasets


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (a hash: nearby inputs give unrelated seeds)."""
    text = ",".join(str(int(p)) for p in parts).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") & ((1 << 63) - 1)


class SeededDataset(Dataset):
    """Seeds the augmentation of each sample by (seed, epoch, sample index).

    torch's CPU generator, Python's ``random`` and NumPy's global generator are seeded before
    ``dataset[index]``, in whichever process loads the sample. The augmentation of a sample then
    depends on nothing else: not on the worker that loads it, not on what was loaded before, so
    a run resumed in the middle of an epoch draws exactly what the uninterrupted run drew. Call
    :meth:`set_epoch` before each epoch's iterator is created.

    The epoch lives in a one-element tensor in shared memory, so persistent DataLoader workers
    (which received the dataset once, pickled or forked) read the epoch the rank set: the
    indices of an epoch reach the workers only after its iterator is created, and so after
    :meth:`set_epoch`.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset, self.seed = dataset, int(seed)
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(int(epoch))

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        s = mix_seed(self.seed, self.epoch, index)
        torch.default_generator.manual_seed(s)  # the CPU generator only: the model's device RNG is not touched
        random.seed(s)
        np.random.seed(s % (1 << 32))
        return self.dataset[index]


class SkipBadImages(Dataset):
    """Returns ``None`` (and says so once per file) for a sample whose file is unreadable."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        try:
            return self.dataset[index]
        except datasets.BadImageError as err:
            line = f"[ldb-train] warning: skipping {err}".split(". Remove or")[0]
            sys.stdout.write(line + "\n")  # one write: workers and ranks share the launcher's pipe
            sys.stdout.flush()
            return None


def collate_skipping(batch):
    """``default_collate`` of the readable samples, plus how many were skipped: ``(x, y, n_skipped)``."""
    from torch.utils.data import default_collate

    kept = [b for b in batch if b is not None]
    if not kept:
        raise datasets.DatasetError(f"every image of a batch of {len(batch)} is unreadable: the dataset is broken")
    x, y = default_collate(kept)
    return x, y, torch.tensor(len(batch) - len(kept))


def __getattr__(name: str) -> Any:
    # PEP 562: the names that moved to ldb_ds.workloads.data, served with a warning for one release.
    if name in datasets.__all__:
        warnings.warn(f"ldb_ds.train.data.{name} moved to ldb_ds.workloads.data.{name}; the old name "
                      "goes in the next release", DeprecationWarning, stacklevel=2)
        return getattr(datasets, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["mix_seed", "SeededDataset", "SkipBadImages", "collate_skipping"]
