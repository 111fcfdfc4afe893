"""Checkpoints of the training application: DeepSpeed's, plus the loop's own state.

``engine.save_checkpoint`` stores model, optimizer and (if DeepSpeed owns one) LR scheduler
state; the LDB engine adds its own (epoch, mode, the mask generator, step counters). This module
adds the loop's :class:`TrainState` as client state: the next epoch, the TensorBoard x axis
(samples seen) and the per-epoch history, so a resumed run continues exactly. The epoch-wise LR
schedule needs no state of its own: it is a function of the epoch (see ``loop.create_lr_scheduler``).

Saving and loading are collectives: every rank calls them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from .options import TrainOptions


class ResumeError(RuntimeError):
    """Nothing to resume from: the message says where DeepSpeed looked."""


@dataclass
class TrainState:
    """What the loop carries from epoch to epoch, saved in every checkpoint."""

    next_epoch: int = 0
    """The first epoch still to train."""

    samples_seen: int = 0
    """Training samples seen by all ranks: the x axis of every TensorBoard tag."""

    history: list[dict[str, Any]] = field(default_factory=list)
    """One dict of figures per finished epoch (``results.json``'s ``history``)."""

    def client_state(self, opts: TrainOptions, mode: str) -> dict[str, Any]:
        return {"epoch": self.next_epoch - 1, "mode": mode, "samples_seen": self.samples_seen,
                "history": self.history, "args": opts.to_dict()}

    @classmethod
    def from_client_state(cls, client: dict[str, Any] | None) -> "TrainState":
        client = client or {}
        return cls(next_epoch=int(client.get("epoch", -1)) + 1,
                   samples_seen=int(client.get("samples_seen", 0)),
                   history=list(client.get("history", [])))


def epoch_tag(epoch: int) -> str:
    """The checkpoint tag of the end of ``epoch`` (``epoch<e>``)."""
    return f"epoch{epoch}"


def save(engine: Any, ckpt_dir: str, state: TrainState, opts: TrainOptions, mode: str,
         tag: str | None = None) -> str:
    """Save a checkpoint after the epoch ``state.next_epoch - 1``; returns the tag."""
    tag = tag or epoch_tag(state.next_epoch - 1)
    engine.save_checkpoint(ckpt_dir, tag=tag, client_state=state.client_state(opts, mode))
    return tag


def resume(engine: Any, load_dir: str) -> tuple[str, TrainState]:
    """Load the latest checkpoint in ``load_dir`` (DeepSpeed's ``latest`` file)."""
    path, client = engine.load_checkpoint(load_dir)
    if path is None:
        where = load_dir if os.path.isdir(load_dir) else f"{load_dir} (no such directory)"
        raise ResumeError(f"--resume found no checkpoint in {where}; DeepSpeed looks for the "
                          "'latest' file written by save_checkpoint")
    return path, TrainState.from_client_state(client)


__all__ = ["TrainState", "ResumeError", "epoch_tag", "save", "resume"]
