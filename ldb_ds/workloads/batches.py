"""Batches every rank has loaded: a batch that fails on one rank stops every rank before its step.

:func:`agreed_batches` is how ldb-train's training loop and the shared evaluation
(:func:`ldb_ds.workloads.evaluation.validate`) read their loaders. With one rank, or no group,
it passes the loader through; ldb-bench reads it that way. Pure Python at import (torch is
imported on first use): ``ldb_ds.train.faults`` re-exports it and must stay light for ``--help``.
"""

from __future__ import annotations

from typing import Any, Iterator

_OK, _END, _DATA_ERROR, _OTHER_ERROR = 0, 1, 2, 3


class PeerBatchError(RuntimeError):
    """Another rank failed to load its batch with an error that is not a data error (a bug, a killed worker)."""


def agreed_batches(loader: Any, count: int, group: Any) -> Iterator[Any]:
    """Up to ``count`` batches of ``loader``, each yielded only once every rank has fetched its own.

    Why: a rank whose batch fails to load cannot take part in the step, and the other ranks would
    already be inside its first collective (ZeRO-3's forward all-gather, the backward's gradient
    reduction) when it exits; they would fail there with a lost-peer error (ldb-train's exit 4),
    and the launcher would report whichever rank it polls first. Here batch k+1 is fetched, and its
    status all-reduced asynchronously over ``group`` (gloo: host memory, no device sync), before
    batch k is yielded; the wait happens when the caller asks for batch k+1, after step k, so the
    agreement overlaps the step instead of adding a round trip to it. If any rank failed, every
    rank raises before training the batch: the failing rank its own exception, the others a
    :class:`~ldb_ds.workloads.data.DatasetError` (or :class:`PeerBatchError`) carrying its message.

    Every rank must call this with the same ``count`` (the ranks' samplers give equal lengths),
    and the group must carry no other collective while a batch is pending. ``group=None`` (one
    rank) passes the loader through.
    """
    import torch
    import torch.distributed as dist

    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        for _, batch in zip(range(count), loader):
            yield batch
        return
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    it = iter(loader)

    def fetch() -> tuple[Any, BaseException | None, torch.Tensor, Any]:
        batch, err, code = None, None, _OK
        try:
            batch = next(it)
        except StopIteration:
            code = _END
        except Exception as e:  # noqa: BLE001 - reported to every rank, then raised here
            from .data import DatasetError

            err, code = e, _DATA_ERROR if isinstance(e, DatasetError) else _OTHER_ERROR
        status = torch.zeros(world, dtype=torch.int32)
        status[rank] = code
        return batch, err, status, dist.all_reduce(status, group=group, async_op=True)

    pending = fetch() if count > 0 else None
    try:
        for i in range(count):
            assert pending is not None
            batch, err, status, work = pending
            pending = None
            work.wait()
            if int(status.max()) != _OK:
                _raise_agreed(status, err, group, rank)
            pending = fetch() if i + 1 < count else None  # in flight while batch i trains
            yield batch
    finally:
        if pending is not None:  # the caller stopped early: complete the collective every rank issued
            pending[3].wait()


def _raise_agreed(status: Any, err: BaseException | None, group: Any, rank: int) -> None:
    import torch.distributed as dist

    from .data import DatasetError, unwrap_error

    codes = [int(c) for c in status.tolist()]
    failed = [r for r, c in enumerate(codes) if c in (_DATA_ERROR, _OTHER_ERROR)]
    if not failed:  # some ranks' loaders ended early: the samplers disagree on the epoch's length
        ended = [r for r, c in enumerate(codes) if c == _END]
        raise RuntimeError(f"the data loader of rank(s) {ended} ran out of batches before the others' "
                           "(the ranks' samplers give different lengths)")
    # ``status`` is the all-reduced vector, the same on every rank, so every rank takes this path
    # and issues this gather: the failing ranks' messages, so that every rank names the file.
    messages: list[Any] = [None] * len(codes)
    dist.all_gather_object(messages, unwrap_error(err) if err is not None else None, group=group)
    if err is not None:
        raise err
    first = failed[0]
    text = f"rank {first} could not load its batch: {messages[first]}"
    if codes[first] == _DATA_ERROR:
        raise DatasetError(text)
    raise PeerBatchError(text)


__all__ = ["agreed_batches", "PeerBatchError"]
