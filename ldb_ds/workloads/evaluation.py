"""Evaluation shared by ldb-train (after every epoch, ``--eval``) and ldb-bench (``accuracy``)."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from .batches import agreed_batches
from .data import IGNORE_LABEL


def validate(engine: Any, loader: Any, input_dtype: torch.dtype | None = None,
             heartbeat: Any = None, data_group: Any = None) -> dict[str, float]:
    """Top-1/top-5 accuracy (percent, timm's ``accuracy``) and mean loss over all ranks' shards.

    Every rank evaluates its own disjoint shard (:class:`ldb_ds.workloads.data.ShardedEval`, equal
    lengths: at ZeRO-3 every forward is a collective); samples labelled
    :data:`~ldb_ds.workloads.data.IGNORE_LABEL` (the shards' padding) are not counted. The counts
    are summed with one all-reduce, so the result is exact (not an average of averages) and the
    same on every rank. ``heartbeat``: an object with ``beat(phase)`` (ldb-train's
    :class:`ldb_ds.train.faults.Heartbeat`), told the batch being evaluated. ``data_group``: a
    gloo group over which the ranks agree that each batch loaded (:func:`.batches.agreed_batches`;
    ``None``: the loader is read as it is).
    """
    import deepspeed.comm as dist
    from deepspeed.accelerator import get_accelerator
    from timm.utils import accuracy

    from ldb_ds.process import input_dtype as dtype_of

    dtype = input_dtype or dtype_of(engine)
    criterion = torch.nn.CrossEntropyLoss(reduction="sum", ignore_index=IGNORE_LABEL)
    was_training = engine.module.training
    engine.eval()
    sums = torch.zeros(4, dtype=torch.float64)  # loss, top-1 hits, top-5 hits, images
    with torch.no_grad(), contextlib.closing(agreed_batches(loader, len(loader), data_group)) as batches:
        for i, batch in enumerate(batches):
            if heartbeat is not None:
                heartbeat.beat(f"evaluation batch {i}")
            x, y = batch[0].to(engine.device, dtype=dtype), batch[1].to(engine.device)
            out = engine(x).float()  # also for a batch of padding only: at ZeRO-3 a collective
            counted = y != IGNORE_LABEL
            n = int(counted.sum())
            if n == 0:
                continue
            top1, top5 = accuracy(out[counted], y[counted], topk=(1, min(5, out.size(1))))  # percent
            sums += torch.tensor([float(criterion(out, y)), round(float(top1) * n / 100.0),
                                  round(float(top5) * n / 100.0), n], dtype=torch.float64)
    if was_training:
        engine.train()
    t = sums.to(get_accelerator().current_device_name())
    if dist.get_world_size() > 1:
        dist.all_reduce(t)
    loss, top1, top5, n = t.tolist()
    n = max(n, 1.0)
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "loss": loss / n}


__all__ = ["validate"]
