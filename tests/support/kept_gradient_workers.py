"""Inside each rank of tests/dist/test_kept_gradient_dist.py: a first kept unit without a gradient
behind a dropped first unit, on real ldb_ds engines over real DeepSpeed engines (gloo, 2 ranks)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

MICRO, WIDTH, CLASSES, BLOCKS = 4, 8, 4, 4


class CheckpointedNet(nn.Module):
    """stem, 4 blocks (each its own checkpointed segment, or plain), head: six units in a chain.

    ``skip_first_block``: the first block is left out of the forward (a unit this rank's model does
    not use, as a data-dependent branch would).
    """

    def __init__(self, checkpointing: str, skip_first_block: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.checkpointing = checkpointing  # "none", "non-reentrant", "reentrant"
        self.skip_first_block = skip_first_block
        self.stem = nn.Linear(WIDTH, WIDTH)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh()) for _ in range(BLOCKS))
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for i, block in enumerate(self.blocks):
            if i == 0 and self.skip_first_block:
                continue
            if self.checkpointing == "none":
                x = block(x)
            else:
                x = checkpoint(block, x, use_reentrant=self.checkpointing == "reentrant")
        return self.head(x)


def hook_count(model: nn.Module) -> int:
    """Post-accumulate-grad hooks on ``model``'s parameters (torch keeps them in a private dict)."""
    return sum(len(getattr(p, "_post_accumulate_grad_hooks", None) or {}) for p in model.parameters())


def run(rank: int, stage: int, checkpointing: str, gas: int = 1, torch_style: bool = False,
        skip_first_block_on_rank1: bool = False, drop_steps: int = 6) -> dict[str, Any]:
    """A FULL epoch, then DROP steps with keep_first=0 until ``drop_steps`` or an error.

    After an error the window's step() is called again (what a loop that catches errors does):
    it must raise again and change nothing.
    """
    import ldb_ds
    from ldb_ds.kept_gradient import KeptUnitWithoutGradientError
    from tests.support.core_workers import gathered_params

    model = CheckpointedNet(checkpointing, skip_first_block=skip_first_block_on_rank1 and rank == 1)
    cfg = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": gas,
           "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True, "steps_per_print": 10_000,
           "optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.1}},
           "layer_drop_back": {"enabled": True, "drop_rate": 0.5, "sampling_rate": 1, "keep_first": 0,
                               "keep_last": 1, "granularity": "module", "batch_kappa": 1, "seed": 3}}
    engine, _, _, _ = ldb_ds.initialize(model=model, model_parameters=list(model.parameters()), config=cfg)
    hooks_at_start = hook_count(model)
    out: dict[str, Any] = {"masks": [], "error": None, "first_dropped_windows": 0}

    def one_step(step: int) -> None:
        for micro in range(gas):
            g = torch.Generator().manual_seed(1000 * step + 10 * micro + rank)
            x, y = torch.randn(MICRO, WIDTH, generator=g), torch.randint(0, CLASSES, (MICRO,), generator=g)
            loss = F.cross_entropy(engine(x), y)
            if torch_style:
                loss.backward()  # DeepSpeed 0.19.8's torch-style backward (ZeRO 1-3)
            else:
                engine.backward(loss)
            if micro < gas - 1:
                engine.step()  # a micro step inside the window: DeepSpeed only counts it
        out["masks"].append(engine.ldb.dropped_units)
        engine.step()

    engine.set_epoch(0)  # FULL
    for step in range(2):
        one_step(step)
    engine.set_epoch(1)  # DROP
    for step in range(2, 2 + drop_steps):
        before = gathered_params(engine, list(model.parameters()))
        try:
            one_step(step)
        except KeptUnitWithoutGradientError as e:
            out["error"], out["error_step"] = str(e), step
            try:
                engine.step()
                out["retry"] = "stepped"
            except KeptUnitWithoutGradientError:
                out["retry"] = "refused"
            after = gathered_params(engine, list(model.parameters()))
            out["unchanged_by_failed_step"] = all(torch.equal(a, b) for a, b in zip(before, after))
            break
        out["first_dropped_windows"] += 0 in out["masks"][-1]
    out["weights"] = gathered_params(engine, list(model.parameters()))
    out["hooks_left"] = hook_count(model) - hooks_at_start  # DeepSpeed's own hooks go at destroy()
    engine.destroy()
    return out


def run_cases(rank: int, cases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Several :func:`run` calls in one process (start-up dominates)."""
    return [run(rank, **case) for case in cases]
