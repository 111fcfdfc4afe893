"""The training data loader whose batch size follows the LDB mode.

DROP epochs with ``batch_scaling="micro_batch"`` read ``batch_kappa`` times
larger per-rank batches and so take fewer optimizer steps per epoch (the
paper's B' = kappa B). :class:`ScalableBatchSampler` makes that a property of
the loader: ``engine.set_epoch`` sets its ``factor``; nothing else changes.

Mid-epoch resume: ``start_batch`` skips the batches an interrupted run already trained
(counted in batches of the current size, so it is exact with the DROP factor), see
:class:`ScalableBatchSampler`.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Any, Callable, Iterator

from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler


class ScalableBatchSampler(Sampler[list[int]]):
    """Batches of ``base_batch_size * factor`` indices from a (distributed) sampler.

    ``factor`` is set by ``engine.set_epoch`` (1 in FULL epochs, ``batch_kappa``
    in DROP epochs with ``batch_scaling="micro_batch"``).

    ``start_batch``: the next iteration begins after this many batches of the epoch (a
    resumed run skips what it trained before the interruption), then it is reset to 0. Set
    it after ``set_epoch`` (which fixes the order and the batch size). The skip is in batches
    of the *current* size, so a DROP epoch's position is exact. ``len()`` stays the length of
    the whole epoch.
    """

    def __init__(self, sampler: Sampler[int], base_batch_size: int, drop_last: bool):
        if base_batch_size < 1:
            raise ValueError(f"base_batch_size must be >= 1, got {base_batch_size}")
        self.sampler = sampler
        self.base_batch_size = base_batch_size
        self.drop_last = drop_last
        self.factor = 1
        self.start_batch = 0
        self.window = 1
        """Micro batches per accumulation window (set by ``engine.set_epoch`` with LDB on): an epoch
        yields whole windows only, since a DROP mask covers a whole window and the epoch's mode ends
        with it; the last ``len % window`` batches of an epoch are left out (fewer than a window)."""

    @property
    def batch_size(self) -> int:
        return self.base_batch_size * self.factor

    def __iter__(self) -> Iterator[list[int]]:
        # Read and reset here, in the process that iterates the batch sampler (the DataLoader's
        # main process, also with workers): a resume skips once, the next epoch starts at 0.
        start, self.start_batch = self.start_batch, 0
        left = len(self) - start  # whole windows only (len() counts them)
        batch: list[int] = []
        for index in itertools.islice(iter(self.sampler), start * self.batch_size, None):
            if left <= 0:
                return
            batch.append(index)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
                left -= 1
        if batch and not self.drop_last and left > 0:
            yield batch

    def __len__(self) -> int:
        n = len(self.sampler)  # type: ignore[arg-type]
        batches = n // self.batch_size if self.drop_last else -(-n // self.batch_size)
        return batches - batches % self.window


def build_dataloader(dataset: Dataset, *, dp_rank: int, dp_world_size: int, micro_batch_size: int,
                     drop_last: bool, seed: int, collate_fn: Callable[..., Any] | None = None,
                     num_workers: int = 0, pin_memory: bool = False, persistent_workers: bool = False,
                     multiprocessing_context: Any = None) -> DataLoader:
    """A shuffling ``DistributedSampler`` loader over data-parallel ranks with a scalable batch.

    The sampler is sharded by the *data-parallel* rank and size, not the global
    ones: every data-parallel replica must see distinct samples, and the ranks
    of one replica (model parallelism, if any) the same ones. ``persistent_workers`` and
    ``multiprocessing_context`` are torch's ``DataLoader`` arguments, used only with workers;
    the batch sampler runs in this process, so the DROP batch and the epoch's shuffle reach
    persistent workers as the indices they are sent.
    """
    sampler = DistributedSampler(dataset, num_replicas=dp_world_size, rank=dp_rank, shuffle=True, seed=seed,
                                 drop_last=drop_last)
    batch_sampler = ScalableBatchSampler(sampler, micro_batch_size, drop_last=drop_last)
    return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate_fn, num_workers=num_workers,
                      pin_memory=pin_memory, persistent_workers=persistent_workers and num_workers > 0,
                      multiprocessing_context=multiprocessing_context if num_workers > 0 else None)


def shut_down_workers(loader: Any) -> None:
    """End ``loader``'s persistent workers now (torch does it when the loader is collected).

    ``_iterator`` is the DataLoader's cached iterator (torch keeps one with persistent workers);
    its ``_shutdown_workers`` is what its own ``__del__`` calls. A run that ends its process with
    ``os._exit`` (``process.exit_process``) never collects the loader, and its workers would
    linger until they notice the parent gone. Errors are ignored: this runs on the way out, after
    whatever ended the run.
    """
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        with contextlib.suppress(Exception):
            iterator._shutdown_workers()
        loader._iterator = None


__all__ = ["ScalableBatchSampler", "build_dataloader", "shut_down_workers"]
