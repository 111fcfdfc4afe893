"""``ldb_ds.initialize`` and the LDB engine wrapper around a DeepSpeed engine.

The wrapper changes only *which units train in a step*; DeepSpeed still does
all the work. Per optimizer step (= one gradient-accumulation window):

1. At the first training forward of the window, rank 0 draws the mask from its
   seeded generator and broadcasts it (DROP mode only); every rank sets
   ``requires_grad=False`` on the dropped units' parameters. Autograd then
   computes no weight gradient for them, their DeepSpeed gradient hooks never
   fire, so they are never reduced (no bytes on the wire).
2. ``step()``: the basic optimizer's step hides the dropped groups
   (:mod:`ldb_ds.zero_hooks`), so parameters and optimizer state of dropped
   units stay bitwise unchanged, at every ZeRO stage.
3. After the step the mask stays in place until the next window opens, so
   everything between two steps (eval, logging) sees a stable state.

Masks change only at accumulation boundaries: a unit that is dropped for part
of a window would get a partial gradient (stages 1/2) or a stale one (stage 3).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

import deepspeed
from deepspeed import comm as dist
from deepspeed.accelerator import get_accelerator

from . import zero_hooks
from .config import LDBConfig, load_ds_config
from .schedule import Mode, batch_factor, draw_dropped, epoch_mode, kept_fraction, lr_factor
from .units import (Unit, UnitInfo, build_units, check_sampleable, normalise_param_groups, param_numel,
                    split_groups_by_unit, trainable_params)

CLIENT_STATE_KEY = "layer_drop_back"


# --------------------------------------------------------------------------- data


class ScalableBatchSampler(Sampler[list[int]]):
    """Batches of ``base_batch_size * factor`` indices from a (distributed) sampler.

    The factor is set by ``engine.set_epoch``: DROP epochs with
    ``batch_scaling="micro_batch"`` read ``batch_kappa`` times larger batches,
    and so take fewer steps per epoch (the paper's B' = kappa B).
    """

    def __init__(self, sampler: Sampler[int], base_batch_size: int, drop_last: bool):
        self.sampler = sampler
        self.base_batch_size = base_batch_size
        self.drop_last = drop_last
        self.factor = 1

    @property
    def batch_size(self) -> int:
        return self.base_batch_size * self.factor

    def __iter__(self) -> Iterator[list[int]]:
        batch: list[int] = []
        for index in self.sampler:
            batch.append(index)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch and not self.drop_last:
            yield batch

    def __len__(self) -> int:
        n = len(self.sampler)  # type: ignore[arg-type]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)


def _build_dataloader(dataset: Dataset, ds_engine: Any, collate_fn: Any, num_workers: int,
                      seed: int) -> DataLoader:
    # Data parallel rank/size, not global: each DP replica must see distinct samples.
    sampler = DistributedSampler(dataset, num_replicas=ds_engine.dp_world_size,
                                 rank=dist.get_rank() % ds_engine.dp_world_size, shuffle=True, seed=seed,
                                 drop_last=bool(ds_engine.dataloader_drop_last()))
    batch_sampler = ScalableBatchSampler(sampler, ds_engine.train_micro_batch_size_per_gpu(),
                                         drop_last=bool(ds_engine.dataloader_drop_last()))
    return DataLoader(dataset, batch_sampler=batch_sampler, collate_fn=collate_fn, num_workers=num_workers,
                      pin_memory=get_accelerator().device_name() != "cpu", persistent_workers=False)


# --------------------------------------------------------------------------- state view


@dataclass
class _Counters:
    steps: int = 0
    drop_steps: int = 0
    dropped_unit_steps: int = 0


class LDBState:
    """Read-only view of the LDB state (``engine.ldb``)."""

    def __init__(self, engine: "LDBEngine"):
        self._e = engine

    enabled = property(lambda self: self._e._cfg.enabled)
    config = property(lambda self: self._e._cfg, doc="the validated LDBConfig")
    epoch = property(lambda self: self._e._epoch)
    mode = property(lambda self: self._e._mode, doc="Mode.FULL or Mode.DROP for the current epoch")
    lr_factor = property(lambda self: lr_factor(self._e._mode, self._e._cfg))
    batch_factor = property(lambda self: batch_factor(self._e._mode, self._e._cfg))
    steps = property(lambda self: self._e._counters.steps, doc="optimizer steps taken")
    drop_steps = property(lambda self: self._e._counters.drop_steps, doc="optimizer steps taken in DROP mode")
    dropped_unit_steps = property(lambda self: self._e._counters.dropped_unit_steps,
                                  doc="sum over steps of the number of dropped units")

    @property
    def units(self) -> tuple[UnitInfo, ...]:
        return tuple(u.info() for u in self._e._units)

    @property
    def dropped_units(self) -> tuple[int, ...]:
        """Indices (into ``units``) of the units dropped in the current step."""
        return tuple(i for i, d in enumerate(self._e._dropped) if d)

    @property
    def kept_unit_fraction(self) -> float:
        return kept_fraction(self._e._dropped)

    @property
    def kept_param_fraction(self) -> float:
        return kept_fraction(self._e._dropped, [u.numel for u in self._e._units])

    @property
    def grad_bytes_full(self) -> int:
        """Gradient bytes one FULL step hands to the reductions, per rank (no padding)."""
        return sum(self._e._unit_grad_bytes)

    @property
    def grad_bytes_step(self) -> int:
        """Gradient bytes the current step hands to the reductions, per rank."""
        return sum(b for b, d in zip(self._e._unit_grad_bytes, self._e._dropped) if not d)

    def __repr__(self) -> str:
        return (f"LDBState(enabled={self.enabled}, epoch={self.epoch}, mode={self.mode.value}, "
                f"units={len(self._e._units)}, dropped={len(self.dropped_units)}, steps={self.steps})")


# --------------------------------------------------------------------------- engine


class LDBEngine:
    """A DeepSpeed engine with LayerDropBack.

    Behaves as the wrapped ``deepspeed.DeepSpeedEngine`` (attribute access is
    passed through), with ``set_epoch``, ``ldb`` and ``micro_batch_size`` added
    and ``forward``/``step``/``save_checkpoint``/``load_checkpoint`` extended.
    The wrapped engine is ``engine.ds_engine``.
    """

    def __init__(self, ds_engine: Any, cfg: LDBConfig, units: Sequence[Unit], unit_of_group: Sequence[int],
                 dataloader: DataLoader | None):
        self.ds_engine = ds_engine
        self.training_dataloader = dataloader
        self._cfg = cfg
        self._units = list(units)
        self._unit_of_group = list(unit_of_group)
        self._optimizer = zero_hooks.basic_optimizer(ds_engine) if cfg.enabled else None
        self._epoch = 0
        self._mode = Mode.FULL
        self._dropped = [False] * len(self._units)
        self._window_open = False
        self._epoch_mask: list[bool] | None = None
        self._counters = _Counters()
        self._rng = random.Random(cfg.seed)
        self._base_train_batch = ds_engine.train_batch_size()
        self._unit_grad_bytes = [self._grad_bytes(u) for u in self._units]
        self.ldb = LDBState(self)
        # The group dicts, captured once: ZeRO swaps optimizer.param_groups to a one-group list
        # inside its per-group step, but keeps these dict objects.
        self._group_dicts = list(self._optimizer.param_groups) if cfg.enabled else []
        self._hidden_ids: set[int] = set()  # id() of the group dicts of dropped units, set in step()
        self._skipped_groups: set[int] = set()  # their indices, set in step()
        if cfg.enabled:
            zero_hooks.install_group_step_filter(self._optimizer, lambda: self._hidden_ids,
                                                 lambda: lr_factor(self._mode, self._cfg))
            # With a group per unit, ZeRO-1/2 would all-reduce one norm scalar per group per step.
            zero_hooks.install_batched_grad_norm(ds_engine, lambda: self._skipped_groups)

    # -- pass-through ---------------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails: everything DeepSpeed has is reachable.
        if name == "ds_engine":
            raise AttributeError(name)
        return getattr(self.ds_engine, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.forward(*args, **kwargs)

    def __repr__(self) -> str:
        return f"LDBEngine({self.ldb!r}, zero_stage={zero_hooks.zero_stage(self.ds_engine)})"

    # -- training loop ------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self._window_open and self.ds_engine.module.training and torch.is_grad_enabled():
            self._open_window()
        return self.ds_engine(*args, **kwargs)

    def backward(self, loss: torch.Tensor, **kwargs: Any) -> Any:
        return self.ds_engine.backward(loss, **kwargs)

    def step(self, **kwargs: Any) -> Any:
        # DeepSpeed increments micro_steps inside step(); ask before calling it.
        boundary = self.ds_engine.is_gradient_accumulation_boundary()
        if boundary and self._cfg.enabled:
            self._refresh_group_dicts()
            # Computed once per step: DeepSpeed calls the optimizer once per group at ZeRO 1-3.
            skipped = {gi for gi, ui in enumerate(self._unit_of_group) if self._dropped[ui]}
            self._skipped_groups = skipped
            self._hidden_ids = {id(self._group_dicts[gi]) for gi in skipped}
            with zero_hooks.skip_allgather_of_dropped(self.ds_engine, skipped):
                result = self.ds_engine.step(**kwargs)
        else:
            result = self.ds_engine.step(**kwargs)
        if boundary:
            self._window_open = False
            self._counters.steps += 1
            if self._mode is Mode.DROP:
                self._counters.drop_steps += 1
                self._counters.dropped_unit_steps += sum(self._dropped)
        return result

    @property
    def micro_batch_size(self) -> int:
        """Per-rank batch size of one micro step in the current mode."""
        base = self.ds_engine.train_micro_batch_size_per_gpu()
        if self._cfg.batch_scaling == "micro_batch":
            return base * batch_factor(self._mode, self._cfg)
        return base

    def set_epoch(self, epoch: int) -> Mode:
        """Enter the mode of ``epoch`` (FULL/DROP), scale batch size, re-seed the sampler.

        Call at an accumulation boundary (between epochs). The learning-rate
        factor is applied inside each optimizer step, so LR schedulers keep
        their own values. Returns the mode.
        """
        if self._window_open:
            raise RuntimeError("set_epoch() called in the middle of a gradient-accumulation window; "
                               "call it before the first forward of the epoch")
        self._epoch = int(epoch)
        self._mode = epoch_mode(self._epoch, self._cfg)
        self._epoch_mask = None
        self._set_dropped([False] * len(self._units))
        factor = batch_factor(self._mode, self._cfg)
        if self._cfg.enabled and self._cfg.batch_scaling == "accumulation":
            self.ds_engine.set_train_batch_size(self._base_train_batch * factor)
        loader = self.training_dataloader
        if loader is not None:
            if isinstance(loader.batch_sampler, ScalableBatchSampler):
                loader.batch_sampler.factor = factor if self._cfg.batch_scaling == "micro_batch" else 1
                loader.batch_sampler.sampler.set_epoch(self._epoch)
        return self._mode

    # -- masks ----------------------------------------------------------------

    def _open_window(self) -> None:
        self._window_open = True
        if self._mode is not Mode.DROP:
            return
        if self._cfg.resample == "epoch" and self._epoch_mask is not None:
            return  # one mask for the whole DROP epoch, already applied
        mask = self._broadcast_mask_from_rank0()
        if self._cfg.resample == "epoch":
            self._epoch_mask = mask
        self._set_dropped(mask)

    def _broadcast_mask_from_rank0(self) -> list[bool]:
        # Every rank must drop the same units: different masks make the gradient
        # reductions differ in size (gloo errors, NCCL hangs) and the replicas
        # diverge. Ranks may hold different generator states (other seeds,
        # restored differently), so only rank 0's draw counts: it draws, the
        # others receive. One byte per unit, once per optimizer step.
        drawn = draw_dropped(self._rng, len(self._units), self._cfg)
        if dist.get_world_size() == 1:
            return drawn
        device = get_accelerator().current_device_name()
        mask = torch.tensor(drawn, dtype=torch.uint8, device=device)
        dist.broadcast(mask, src=0)
        return [bool(v) for v in mask.tolist()]

    def _set_dropped(self, dropped: Sequence[bool]) -> None:
        self._dropped = list(dropped)
        for unit, is_dropped in zip(self._units, self._dropped):
            for p in unit.params:
                p.requires_grad_(not is_dropped)

    def _refresh_group_dicts(self) -> None:
        # torch's Optimizer.load_state_dict (DeepSpeed's checkpoint loading calls it) replaces the
        # group dicts with new ones; the step filter recognises groups by identity, so re-capture.
        # Between steps param_groups is the full list, so this is the right moment to look.
        current = self._optimizer.param_groups
        if len(current) != len(self._group_dicts) or any(a is not b for a, b in zip(current, self._group_dicts)):
            self._group_dicts = list(current)

    def _grad_bytes(self, unit: Unit) -> int:
        # Gradients travel in DeepSpeed's communication dtype (the model dtype unless configured).
        comm_dtype = getattr(self.ds_engine, "communication_data_type", None)
        if isinstance(comm_dtype, torch.dtype):
            return unit.numel * torch.empty((), dtype=comm_dtype).element_size()
        return sum(param_numel(p) * p.element_size() for p in unit.params)

    # -- checkpoints ----------------------------------------------------------

    def ldb_state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "mode": self._mode.value, "rng_state": self._rng.getstate(),
                "epoch_mask": self._epoch_mask, "steps": self._counters.steps,
                "drop_steps": self._counters.drop_steps,
                "dropped_unit_steps": self._counters.dropped_unit_steps, "config": self._cfg.to_dict()}

    def load_ldb_state_dict(self, state: dict[str, Any]) -> None:
        self._rng.setstate(_as_rng_state(state["rng_state"]))
        self._counters = _Counters(state["steps"], state["drop_steps"], state["dropped_unit_steps"])
        self._epoch = int(state["epoch"])
        self._mode = Mode(state["mode"])
        self._epoch_mask = state.get("epoch_mask")

    def save_checkpoint(self, save_dir: str, tag: Any = None, client_state: dict | None = None,
                        save_latest: bool = True, **kwargs: Any) -> Any:
        """DeepSpeed's save_checkpoint with the LDB state in the client state.

        DeepSpeed decides what to save from the live ``requires_grad`` flags, so
        all units are made trainable for the save and the mask is put back after.
        """
        state = dict(client_state or {})
        state[CLIENT_STATE_KEY] = self.ldb_state_dict()
        dropped = list(self._dropped)
        self._set_dropped([False] * len(self._units))
        try:
            return self.ds_engine.save_checkpoint(save_dir, tag=tag, client_state=state,
                                                  save_latest=save_latest, **kwargs)
        finally:
            self._set_dropped(dropped)

    def load_checkpoint(self, load_dir: str, tag: Any = None, **kwargs: Any) -> tuple[Any, dict | None]:
        """DeepSpeed's load_checkpoint; restores the LDB state saved by save_checkpoint."""
        dropped = list(self._dropped)
        self._set_dropped([False] * len(self._units))
        try:
            path, client_state = self.ds_engine.load_checkpoint(load_dir, tag=tag, **kwargs)
        finally:
            self._set_dropped(dropped)
        if client_state and CLIENT_STATE_KEY in client_state:
            self.load_ldb_state_dict(client_state[CLIENT_STATE_KEY])
        return path, client_state


def _as_rng_state(state: Any) -> tuple:
    # random.Random state is (version, tuple_of_ints, gauss); checkpoints may turn tuples into lists.
    version, internal, gauss = state
    return version, tuple(internal), gauss


# --------------------------------------------------------------------------- initialize


def initialize(args: Any = None, model: nn.Module | None = None, optimizer: Any = None,
               model_parameters: Any = None, training_data: Dataset | None = None, lr_scheduler: Any = None,
               config: Any = None, collate_fn: Any = None, num_workers: int = 0, **ds_kwargs: Any
               ) -> tuple[LDBEngine, Any, DataLoader | None, Any]:
    """Like ``deepspeed.initialize``; returns ``(engine, optimizer, dataloader, lr_scheduler)``.

    The LDB settings are read from the ``layer_drop_back`` section of the same
    DeepSpeed config (``config`` or ``args.deepspeed_config``). With LDB enabled,
    the trainable parameters are cut into units and given one param group per
    (unit, user param group); every unit is trainable at initialize, because
    DeepSpeed fixes the set of optimized parameters there.

    ``optimizer`` may be None (config ``optimizer`` section), a callable
    ``params -> Optimizer`` or a torch optimizer instance; an instance is rebuilt
    over the per-unit groups as ``type(opt)(groups, **opt.defaults)``, which
    must be done before it has state. The returned dataloader (when
    ``training_data`` is given) is a ``DistributedSampler`` loader whose batch
    size follows the LDB mode; ``num_workers`` is its worker count.
    """
    if model is None:
        raise ValueError("ldb_ds.initialize needs a model")
    if config is None and args is not None:
        config = getattr(args, "deepspeed_config", None)
    ds_config = load_ds_config(config)
    cfg = LDBConfig.from_ds_config(ds_config)

    if model_parameters is not None and not isinstance(model_parameters, (list, tuple)):
        # model.parameters() is a generator: read it once, hand the same list to DeepSpeed.
        model_parameters = list(model_parameters)
    user_groups = normalise_param_groups(model, model_parameters if model_parameters is not None
                                         else _params_of(optimizer))
    # Every unit is trainable here (requires_grad=True by construction): DeepSpeed fixes the
    # set of optimized parameters at initialize, so masks may only be applied afterwards.
    units = build_units(model, cfg.granularity, trainable_params(user_groups))
    if cfg.enabled:
        check_sampleable(units, cfg, type(model).__name__)
        groups, unit_of_group = split_groups_by_unit(units, user_groups)
        optimizer = _rebuild_optimizer(optimizer, groups)
        model_parameters = groups
        # Copied now: DeepSpeed swaps the groups' "params" for flat partitions in place.
        params_of_group = [list(g["params"]) for g in groups]
    else:
        # Disabled: hand DeepSpeed exactly what the user gave, for a like-for-like baseline.
        unit_of_group = []

    ds_engine, ds_optimizer, _, ds_scheduler = deepspeed.initialize(
        args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
        lr_scheduler=lr_scheduler, config=ds_config, **ds_kwargs)
    if cfg.enabled:
        zero_hooks.check_group_order(ds_engine, params_of_group)
    loader = None
    if training_data is not None:
        loader = _build_dataloader(training_data, ds_engine, collate_fn, num_workers, cfg.seed)
    engine = LDBEngine(ds_engine, cfg, units, unit_of_group, loader)
    return engine, ds_optimizer, loader, ds_scheduler


def _params_of(optimizer: Any) -> Any:
    if isinstance(optimizer, torch.optim.Optimizer):
        return [dict(g) for g in optimizer.param_groups]
    return None


def _rebuild_optimizer(optimizer: Any, groups: list[dict[str, Any]]) -> Any:
    if not isinstance(optimizer, torch.optim.Optimizer):
        return optimizer  # None (config section) or a callable DeepSpeed calls with our groups
    if optimizer.state:
        raise ValueError("pass ldb_ds.initialize an optimizer that has not stepped yet (it is rebuilt over "
                         "one param group per LDB unit), or a callable params -> optimizer")
    defaults = {k: v for k, v in optimizer.defaults.items() if k not in ("params",)}
    return type(optimizer)(groups, **defaults)


__all__ = ["initialize", "LDBEngine", "LDBState", "ScalableBatchSampler", "CLIENT_STATE_KEY"]
