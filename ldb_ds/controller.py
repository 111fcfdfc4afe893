"""The LDB state of one training run and the rules that change it.

:class:`LDBController` knows the units, the mode of the current epoch, the
mask stream and the current mask; it opens accumulation windows (drawing and
broadcasting a mask), tells the step filter which param groups to hide, and
counts steps. It does not know DeepSpeed: :class:`ldb_ds.engine.LDBEngine`
drives it from its ``forward``/``step``, the Hugging Face integration from
hooks, and :mod:`ldb_ds.zero_hooks` reads it inside DeepSpeed's step.

Lifecycle of one optimizer step (= one gradient-accumulation window)::

    controller.open_window()      # first training forward of the window: mask drawn, applied
    ... forward / backward (x gradient_accumulation_steps) ...
    controller.begin_step()       # at the boundary, right before the optimizer step: controller.step_state
    ... optimizer step, dropped groups hidden (controller.step_state.hidden_groups) ...
    controller.end_step()         # closes the window, counts the step

Masks change only between windows: a unit dropped for part of a window would
get a partial gradient (ZeRO 1/2) or a stale one (ZeRO 3).
"""

from __future__ import annotations

import contextlib
import enum
import operator
import random
import warnings
from dataclasses import dataclass
from typing import Any, Iterator, Mapping, Sequence

import torch
import torch.distributed as torch_dist

from .config import LDBConfig, changed_keys
from .functional import apply_mask, frozen_kept_parameter
from .kept_gradient import KeptGradientCheck
from .schedule import Mode, batch_factor, draw_dropped, epoch_mode, kept_fraction, lr_factor
from .units import Unit, UnitInfo


class Window(enum.Enum):
    """Where a run is in its accumulation window."""

    CLOSED = "closed"
    """Between optimizer steps: the mask of the last window stays applied (eval, logging see it)."""
    OPEN = "open"
    """Forward/backward of a window: its mask is fixed until the step."""
    STEPPING = "stepping"
    """Inside DeepSpeed's optimizer step at the window's boundary: the patches read :class:`StepState`."""


@dataclass
class StepState:
    """The one object every patch on DeepSpeed reads during a step.

    DeepSpeed calls ``optimizer.step()`` (and its norms and all-gathers) without arguments, so
    what a step must skip cannot be passed down that chain: :meth:`LDBController.begin_step`
    writes it here, every patch of :mod:`ldb_ds.zero_hooks` reads this same object, and
    :meth:`LDBController.end_step` clears it. Outside a step nothing is skipped and no factor
    applies.
    """

    window: Window = Window.CLOSED
    skipped_groups: frozenset[int] = frozenset()
    """Indices of the param groups of dropped units (for the all-gather and norm patches)."""
    hidden_groups: tuple[Mapping[str, Any], ...] = ()
    """Those groups' dicts (for the step filter, which sees dicts, not indices)."""
    lr_factor: float = 1.0
    """The DROP-epoch learning-rate factor, applied inside the optimizer step only."""

    def clear(self, window: Window) -> None:
        self.window = window
        self.skipped_groups = frozenset()
        self.hidden_groups = ()
        self.lr_factor = 1.0


@dataclass
class StepCounters:
    steps: int = 0
    """Optimizer steps applied (accumulation windows whose update DeepSpeed carried out)."""
    drop_steps: int = 0
    """Of those, steps in DROP epochs."""
    dropped_unit_steps: int = 0
    """Sum over applied steps of the number of dropped units."""
    skipped_steps: int = 0
    """Windows whose update DeepSpeed skipped (fp16 loss-scale overflow, or an inf/NaN gradient
    norm in bf16). Their mask was drawn and used, so the mask stream stays in step on every
    rank; they are not in ``steps``."""


_MASK_GROUPS: dict[Any, Any] = {}


def mask_group(process_group: Any = None) -> Any:
    """A gloo group over the ranks of ``process_group`` (None: all), for the mask broadcast.

    The mask is decided on the host (Python's generator) and used on the host
    (``requires_grad``), so it travels in host memory: over the process group itself when its
    backend is gloo (the CPU), else over one gloo group made for it. Made at the first use, which
    is ``installation.install`` on every rank (making a group is a collective: every rank
    must make the same ones in the same order, and every rank builds its engines in the same
    order), and kept for the process: a second engine over the same ranks reuses it.
    """
    if torch_dist.get_backend(process_group) == "gloo":
        return process_group
    key = None if process_group is None else tuple(torch_dist.get_process_group_ranks(process_group))
    group = _MASK_GROUPS.get(key)
    if group is None:
        ranks = None if key is None else list(key)
        group = _MASK_GROUPS[key] = torch_dist.new_group(ranks=ranks, backend="gloo")
    return group


class LDBController:
    """Mode, mask stream, current mask and counters of one LDB run.

    ``group_dicts`` are the optimizer's param-group dicts in ldb_ds's order
    (``unit_of_group[i]`` is the unit of group i); ``unit_grad_bytes[u]`` the
    bytes unit u's gradient occupies in the reductions, per rank.
    """

    def __init__(self, cfg: LDBConfig, units: Sequence[Unit], unit_of_group: Sequence[int],
                 group_dicts: Sequence[Mapping[str, Any]], unit_grad_bytes: Sequence[int],
                 device: torch.device | str = "cpu", process_group: Any = None):
        self.cfg = cfg
        self.units = list(units)
        self.unit_of_group = list(unit_of_group)
        self.groups_of_unit: list[list[int]] = [[] for _ in self.units]
        for gi, ui in enumerate(self.unit_of_group):
            self.groups_of_unit[ui].append(gi)
        self.group_dicts = list(group_dicts)
        self.unit_grad_bytes = list(unit_grad_bytes)
        self.device = device
        self.process_group = process_group
        self.epoch = 0
        self.mode = Mode.FULL
        self.dropped: list[bool] = [False] * len(self.units)
        self.epoch_mask: list[bool] | None = None
        self.counters = StepCounters()
        self.rng = random.Random(cfg.seed)
        self.step_state = StepState()
        self.kept_gradient_check = KeptGradientCheck()
        self.state = LDBState(self)

    @property
    def window_open(self) -> bool:
        """Whether a window is open (forward/backward since the last step, or its step running)."""
        return self.step_state.window is not Window.CLOSED

    # -- mode -----------------------------------------------------------------

    def set_epoch(self, epoch: int) -> Mode:
        """Enter the mode of ``epoch``; all units trainable until the first window opens.

        With LDB on, refused inside an accumulation window: a mask covers whole windows, so an
        epoch ends at a window boundary (the loader ``ldb_ds.initialize`` returns yields whole
        windows only). With LDB off a window may run on into the next epoch, as in DeepSpeed.
        """
        if self.window_open and self.cfg.enabled:
            raise RuntimeError("set_epoch() called in the middle of a gradient-accumulation window: the epoch's "
                               "micro batches were not a multiple of gradient_accumulation_steps, or a forward "
                               "came before set_epoch with no step after it (a validation forward in training "
                               "mode with gradients on opens a window: run it after engine.eval(), or under "
                               "torch.no_grad()). A DROP mask covers whole windows, so each epoch must end "
                               "at a window boundary: train floor(batches / gradient_accumulation_steps) * "
                               "gradient_accumulation_steps micro batches per epoch (the loader "
                               "ldb_ds.initialize returns does), and call set_epoch before the epoch's first forward")
        self._refuse_a_freeze_since_the_mask("set_epoch()")  # before the epoch or mode changes
        self.epoch = int(epoch)
        self.mode = epoch_mode(self.epoch, self.cfg)
        self.epoch_mask = None
        self._set_dropped([False] * len(self.units), where=None)
        return self.mode

    @property
    def lr_factor(self) -> float:
        return lr_factor(self.mode, self.cfg)

    @property
    def batch_factor(self) -> int:
        return batch_factor(self.mode, self.cfg)

    # -- windows --------------------------------------------------------------

    def open_window(self) -> None:
        """Start an accumulation window: in DROP mode, draw (rank 0), broadcast and apply a mask."""
        if self.window_open:
            return
        self.step_state.window = Window.OPEN
        if self.mode is not Mode.DROP:
            return
        if self.cfg.resample == "epoch" and self.epoch_mask is not None:
            # One mask for the whole DROP epoch: no draw, but put it back if release_mask()
            # (engine.eval(), finish()) made every unit trainable since the last window.
            if self.dropped != self.epoch_mask:
                self._set_dropped(self.epoch_mask, where="a DROP window")
            else:
                self._refuse_a_freeze_since_the_mask("a DROP window")
        else:
            mask = self._broadcast_mask_from_rank0()
            if self.cfg.resample == "epoch":
                self.epoch_mask = mask
            self._set_dropped(mask, where="a DROP window")
        # A dropped first unit: watch that the first kept one gets a gradient (kept_gradient).
        self.kept_gradient_check.arm(self.units, self.dropped)

    def begin_step(self) -> StepState:
        """At the accumulation boundary, before the optimizer step: fill :attr:`step_state` for the patches."""
        # Before anything is hidden or stepped: a kept unit without a gradient stops the run here.
        self.kept_gradient_check.verify(self._on_every_rank)
        step = self.step_state
        step.window = Window.STEPPING
        step.lr_factor = self.lr_factor
        if not any(self.dropped):  # a FULL step: nothing to hide, no per-group work
            step.skipped_groups, step.hidden_groups = frozenset(), ()
            return step
        # The dropped units' groups, from the unit -> groups map made at set-up: work in the
        # number of dropped groups, not a scan of every group.
        skipped = frozenset(gi for ui, dropped in enumerate(self.dropped) if dropped
                            for gi in self.groups_of_unit[ui])
        step.skipped_groups = skipped
        step.hidden_groups = tuple(self.group_dicts[gi] for gi in sorted(skipped))
        return step

    def end_step(self, applied: bool = True) -> None:
        """After the optimizer step of a window: close it and count the step.

        ``applied=False``: DeepSpeed skipped the update (loss-scale overflow). Every
        rank skips together (DeepSpeed reduces the overflow flag over the ranks), so the
        window is closed on every rank and the next one draws the next mask: the mask
        stream stays in step. The mask stays applied until the next window opens, so
        everything between two steps (eval, logging) sees a stable state.
        """
        self.step_state.clear(Window.CLOSED)
        if not applied:
            self.counters.skipped_steps += 1
            return
        self.counters.steps += 1
        if self.mode is Mode.DROP:
            self.counters.drop_steps += 1
            self.counters.dropped_unit_steps += sum(self.dropped)

    def _broadcast_mask_from_rank0(self) -> list[bool]:
        # Every rank must drop the same units: different masks make the gradient reductions
        # differ in size (gloo errors, NCCL hangs) and the replicas diverge. Ranks may hold
        # different generator states (other seeds, restored differently), so only rank 0's draw
        # counts: every rank draws (keeping the streams in step), rank 0's values are broadcast.
        # One byte per unit, once per optimizer step.
        # The broadcast goes over a gloo group in host memory (mask_group, below): no copy to the
        # device and no wait for it, and being a collective it still makes every rank agree.
        drawn = draw_dropped(self.rng, len(self.units), self.cfg)
        if not torch_dist.is_initialized() or torch_dist.get_world_size(self.process_group) == 1:
            return drawn
        group = mask_group(self.process_group)
        # From a byte buffer, not torch.tensor(list): a host tensor either way, but this one is made
        # without an op that on a device would be a blocking copy (what ldb-bench host counts).
        mask = torch.frombuffer(bytearray(drawn), dtype=torch.uint8)
        src = 0 if self.process_group is None else torch_dist.get_global_rank(self.process_group, 0)
        torch_dist.broadcast(mask, src=src, group=group)
        return [bool(v) for v in mask.tolist()]

    def _on_every_rank(self, value: bool) -> bool:
        """Whether ``value`` holds on every rank: one byte, all-reduced (min) in host memory.

        Over the mask's gloo group, like the mask broadcast: no device work and no device sync.
        """
        if not torch_dist.is_initialized() or torch_dist.get_world_size(self.process_group) == 1:
            return value
        flag = torch.frombuffer(bytearray([int(value)]), dtype=torch.uint8)
        torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MIN, group=mask_group(self.process_group))
        return bool(flag.tolist()[0])

    def _refuse_a_freeze_since_the_mask(self, where: str) -> None:
        """Raise if a kept unit's parameter was frozen since ldb_ds last set the flags.

        With LDB on every mask sets its units' ``requires_grad`` (``apply_mask``), so a layer the
        user froze after ``initialize`` would silently train again at the next change of flags
        (and at ZeRO 1-3 DeepSpeed's optimizer keeps stepping it anyway). Checked before every
        change of flags but the destroy path's (``_set_dropped``): a DROP window, ``set_epoch``,
        a checkpoint save or load, ``engine.eval()``, ``finish()``. That is O(parameters) per
        DROP window, next to ``apply_mask``'s own pass over them; a FULL window changes no flag
        and checks nothing. A unit dropped by the current mask is ``requires_grad=False``
        already, so freezing it cannot be seen (docs/usage.md says so); unfreezing one is
        harmless (its next mask sets it).
        """
        if not self.cfg.enabled:
            return  # the flags are the user's, as in plain DeepSpeed
        found = frozen_kept_parameter(self.units, self.dropped)
        if found is not None:
            unit_name, param_name = found
            raise RuntimeError(
                f"ldb_ds: parameter {param_name!r} (unit {unit_name!r}) was frozen (requires_grad=False) after "
                f"ldb_ds.initialize, found at {where}. With LDB on, ldb_ds sets its units' requires_grad for "
                "every mask, which would silently train it again. Freeze layers before ldb_ds.initialize: a "
                "parameter frozen then belongs to no unit and stays frozen. To freeze more layers mid-run, save a "
                "checkpoint and warm-start a new engine built with them frozen "
                "(engine.load_checkpoint(dir, load_module_only=True): the weights only, the optimizer state and "
                "the LDB schedule start afresh)")

    def _set_dropped(self, dropped: Sequence[bool], where: str | None) -> None:
        """Apply ``dropped``; ``where`` names the call for the freeze check (None: no check)."""
        if where is not None:
            self._refuse_a_freeze_since_the_mask(where)
        self.dropped = list(dropped)
        # With LDB off the flags are the user's (plain DeepSpeed behind the same API): a layer
        # frozen after initialize must stay frozen through set_epoch, checkpoints and eval().
        # With LDB on, ldb_ds owns its units' requires_grad (a parameter the user froze before
        # initialize is in no unit).
        if self.cfg.enabled:
            apply_mask(self.units, self.dropped)

    # -- whole-model states ---------------------------------------------------

    @contextlib.contextmanager
    def all_trainable(self) -> Iterator[None]:
        """Every unit ``requires_grad=True`` inside the block, the mask put back after.

        DeepSpeed's checkpointing reads the live ``requires_grad`` to decide what
        to save and load (``engine.py:4869``, ``:5433`` in 0.19.8).
        """
        dropped = list(self.dropped)
        self._set_dropped([False] * len(self.units), where="a checkpoint save or load (or a model export)")
        try:
            yield
        finally:
            # Only DeepSpeed ran inside, on flags ldb_ds set: nothing to check, and an exception
            # from the block must not be replaced by one from here.
            self._set_dropped(dropped, where=None)

    def release_mask(self, force: bool = False, caller: str = "release_mask()") -> None:
        """Make every unit trainable now (the end of training, evaluation).

        The next window applies a mask again (a new draw; with ``resample="epoch"`` the
        epoch's mask). In the middle of an accumulation window this raises, naming ``caller``
        (the public call the user made), unless ``force`` (the engine is being destroyed): the
        window is then abandoned.
        """
        if self.window_open and not force:
            raise RuntimeError(f"{caller} called in the middle of a gradient-accumulation window "
                               "(forward/backward since the last step()); call step() first")
        self.step_state.clear(Window.CLOSED)
        self.kept_gradient_check.disarm()
        # destroy() (force) only restores the flags: a cleanup path must not raise.
        self._set_dropped([False] * len(self.units), where=None if force else caller)

    def refresh_group_dicts(self, current: Sequence[Mapping[str, Any]]) -> None:
        """Re-capture the group dicts if the optimizer replaced them.

        torch's ``Optimizer.load_state_dict`` (which DeepSpeed's checkpoint loading
        calls) builds new group dicts; the step filter recognises groups by identity.
        Call between steps, when ``param_groups`` is the full list.
        """
        # By identity, element by element in C (map(operator.is_): about 4x cheaper per group than
        # a generator); not ``==``, which would take new dicts with equal contents for the old ones.
        if len(current) != len(self.group_dicts) or not all(map(operator.is_, current, self.group_dicts)):
            self.group_dicts = list(current)

    # -- checkpoints ----------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "mode": self.mode.value, "rng_state": self.rng.getstate(),
                "epoch_mask": self.epoch_mask, "steps": self.counters.steps,
                "drop_steps": self.counters.drop_steps, "dropped_unit_steps": self.counters.dropped_unit_steps,
                "skipped_steps": self.counters.skipped_steps, "config": self.cfg.to_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._refuse_a_freeze_since_the_mask("a checkpoint load")
        changed = changed_keys(state.get("config"), self.cfg.to_dict())
        if changed and self.cfg.enabled:
            # Allowed (a schedule may change between runs), but never silent: the restored generator
            # goes on with the saved stream whatever seed this engine reports, and a changed drop_rate
            # or kappa applies from the next window, inside the restored epoch.
            warnings.warn(f"ldb_ds: the checkpoint's layer_drop_back section differs from this engine's in "
                          f"{', '.join(changed)}: the run goes on with this engine's values, from the next window "
                          f"(the restored mask generator continues the saved stream, whatever 'seed' says)",
                          RuntimeWarning, stacklevel=3)
        version, internal, gauss = state["rng_state"]  # checkpoints may turn tuples into lists
        self.rng.setstate((version, tuple(internal), gauss))
        self.counters = StepCounters(state["steps"], state["drop_steps"], state["dropped_unit_steps"],
                                     state.get("skipped_steps", 0))  # absent in older checkpoints
        self.epoch = int(state["epoch"])
        self.mode = Mode(state["mode"])
        mask = state.get("epoch_mask")
        # Checkpoints may turn the bools into other types; keep the controller's own list type.
        self.epoch_mask = None if mask is None else [bool(v) for v in mask]
        # Resumed inside a DROP epoch with resample "epoch": open_window keeps the epoch's one
        # mask without redrawing it, so it must be applied here. Otherwise all units are trainable
        # until the next window draws.
        resumed_mask = self.epoch_mask if self.mode is Mode.DROP and self.epoch_mask is not None else None
        self._set_dropped(resumed_mask or [False] * len(self.units), where=None)  # checked on entry


class LDBState:
    """Read-only view of a run's LDB state (``engine.ldb``); every property is live."""

    def __init__(self, controller: LDBController):
        self._c = controller

    @property
    def enabled(self) -> bool:
        """Whether LDB is on (off: plain DeepSpeed behind the same API)."""
        return self._c.cfg.enabled

    @property
    def config(self) -> LDBConfig:
        """The validated ``layer_drop_back`` section."""
        return self._c.cfg

    @property
    def epoch(self) -> int:
        """The epoch last given to ``set_epoch``."""
        return self._c.epoch

    @property
    def mode(self) -> Mode:
        """``Mode.FULL`` or ``Mode.DROP`` for the current epoch."""
        return self._c.mode

    @property
    def lr_factor(self) -> float:
        """Learning-rate factor applied inside each optimizer step (kappa in DROP epochs, else 1)."""
        return self._c.lr_factor

    @property
    def batch_factor(self) -> int:
        """Batch-size factor of the current mode (``batch_kappa`` in DROP epochs, else 1)."""
        return self._c.batch_factor

    @property
    def steps(self) -> int:
        """Optimizer steps applied (overflow-skipped windows are counted in ``skipped_steps``)."""
        return self._c.counters.steps

    @property
    def drop_steps(self) -> int:
        """Optimizer steps taken in DROP epochs."""
        return self._c.counters.drop_steps

    @property
    def dropped_unit_steps(self) -> int:
        """Sum over applied steps of the number of dropped units."""
        return self._c.counters.dropped_unit_steps

    @property
    def skipped_steps(self) -> int:
        """Windows whose update DeepSpeed skipped (loss-scale overflow); not in ``steps``."""
        return self._c.counters.skipped_steps

    @property
    def units(self) -> tuple[UnitInfo, ...]:
        """The units, input to output: name, parameter names, element count."""
        return tuple(u.info() for u in self._c.units)

    @property
    def dropped_units(self) -> tuple[int, ...]:
        """Indices (into ``units``) of the units dropped in the current step."""
        return tuple(i for i, d in enumerate(self._c.dropped) if d)

    @property
    def kept_unit_fraction(self) -> float:
        """Fraction of units trained in the current step."""
        return kept_fraction(self._c.dropped)

    @property
    def kept_param_fraction(self) -> float:
        """Fraction of parameters (elements) trained in the current step."""
        return kept_fraction(self._c.dropped, [u.numel for u in self._c.units])

    @property
    def grad_bytes_full(self) -> int:
        """Gradient bytes one FULL step hands to the reductions, per rank (no padding)."""
        return sum(self._c.unit_grad_bytes)

    @property
    def grad_bytes_step(self) -> int:
        """Gradient bytes the current step hands to the reductions, per rank."""
        return sum(b for b, d in zip(self._c.unit_grad_bytes, self._c.dropped) if not d)

    def __repr__(self) -> str:
        return (f"LDBState(enabled={self.enabled}, epoch={self.epoch}, mode={self.mode.value}, "
                f"units={len(self._c.units)}, dropped={len(self.dropped_units)}, steps={self.steps}, "
                f"skipped_steps={self.skipped_steps})")


__all__ = ["LDBController", "LDBState", "StepState", "Window", "StepCounters", "mask_group"]
