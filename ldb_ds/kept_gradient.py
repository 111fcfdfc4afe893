"""A DROP step whose first kept unit got no gradient is stopped before its update.

Why it can happen. A dropped unit is ``requires_grad=False``, so when a DROP mask drops the
first units of the model (a dropped prefix: ``keep_first=0``), autograd builds no graph through
them and the first kept unit's input does not require grad. A plain forward still gives that
unit's weights a gradient, because they require grad. Reentrant activation checkpointing does
not: ``torch.utils.checkpoint(..., use_reentrant=True)`` (timm with ``TIMM_REENTRANT_CKPT=1``)
and ``deepspeed.checkpointing.checkpoint`` run the segment without autograd and attach its
backward to the segment's inputs only. With no input requiring grad, torch only warns ("None
of the inputs have requires_grad=True"), DeepSpeed says nothing, and the kept units inside get
no gradient: DeepSpeed gives them a zero one (ZeRO-0's reduction, ``engine.py:3857-3863``, and
ZeRO 1-3's flat buffers), and the step moves them by momentum and weight decay alone, a silently
different training. Non-reentrant checkpointing is exact.

Why watching one unit is enough. A chain of units (timm's and Hugging Face's models, whose units
``build_units`` orders input to output) goes wrong at the first kept unit after the dropped
prefix or not at all: if that unit gets a gradient its output requires grad, and so does every
later segment's input. With the first unit kept (``keep_first >= 1``, the default 4, or a mask
that happens to keep it) the first unit's output requires grad and nothing can go wrong: no
hook, no cost. A model with branches that bypass the first kept unit is not covered.

Cost, only in a window whose mask drops the first unit: a post-accumulate-grad hook on each
parameter of one unit (registered when the window opens, removed at its step) that sets a Python
flag, read at the step; with several ranks, one byte all-reduced over the mask's gloo group
(host memory: no device work, no device sync). Reentrant checkpointing fails alike on every rank
(same mask, same graph), but a unit the model leaves unused depending on the data may not:
the all-reduce makes every rank stop at the same step, before DeepSpeed's step and its
collectives, instead of one rank raising while the others wait in a collective.

A failed step stays failed: every later ``step()`` of that window raises again (a loop that
catches the error cannot step the window anyway); ``destroy()`` ends it.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from .units import Unit


class KeptUnitWithoutGradientError(RuntimeError):
    """A DROP step's first kept unit received no gradient (see the module docstring)."""


class KeptGradientCheck:
    """Arms on the first kept unit after a dropped prefix; :meth:`verify` at the step."""

    def __init__(self) -> None:
        self._handles: list[Any] = []
        self._unit: Unit | None = None
        self._reached = False
        self._failure: str | None = None

    def arm(self, units: Sequence[Unit], dropped: Sequence[bool]) -> None:
        """At the window's first training forward, after the mask is applied."""
        self.disarm()
        if not dropped or not dropped[0]:
            return  # the first unit is kept: every later input requires grad (module docstring)
        try:
            first_kept = dropped.index(False)
        except ValueError:
            return  # every unit dropped: nothing is stepped
        self._unit = units[first_kept]
        self._reached = False
        # Kept, so trainable (a user's freeze is refused before a mask is applied); the test is for
        # safety: torch refuses a hook on a tensor that does not require grad.
        self._handles = [p.register_post_accumulate_grad_hook(self._on_gradient)
                         for p in self._unit.params if p.requires_grad]

    def _on_gradient(self, param: Any) -> None:
        self._reached = True

    def verify(self, reached_on_every_rank: Callable[[bool], bool] | None = None) -> None:
        """At the accumulation boundary, before the optimizer step: raise if the unit got no gradient.

        ``reached_on_every_rank`` turns this rank's answer into all ranks' (a collective, so every
        rank must call it in the same windows: they do, the mask being the same everywhere).
        """
        if self._failure is not None:
            raise KeptUnitWithoutGradientError(self._failure)
        unit, reached = self._unit, self._reached
        for handle in self._handles:
            handle.remove()
        self._handles, self._unit = [], None
        if unit is None:
            return
        if reached_on_every_rank is not None:
            reached = reached_on_every_rank(reached)
        if reached:
            return
        self._failure = (
            f"ldb_ds: in this DROP step unit {unit.name!r}, the first one kept after the dropped first units, "
            "received no gradient (on this rank or another): the step would move it by momentum and weight "
            "decay alone. No update was applied. The usual cause is reentrant activation checkpointing "
            "(torch.utils.checkpoint(..., use_reentrant=True), TIMM_REENTRANT_CKPT=1, "
            "deepspeed.checkpointing.checkpoint): with the units ahead of it dropped, none of a checkpointed "
            "segment's inputs requires grad, and its weights get no gradient. Use non-reentrant checkpointing "
            "(use_reentrant=False, timm's and Hugging Face's default), or never drop the first unit "
            "(layer_drop_back.keep_first >= 1; the default is 4), which also covers a model that leaves this "
            "unit unused in some steps (docs/support.md, activation checkpointing)")
        raise KeptUnitWithoutGradientError(self._failure)

    def disarm(self) -> None:
        """End the window's watch (and a failed window's failure): the next window starts afresh."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._unit, self._failure = [], None, None


__all__ = ["KeptGradientCheck", "KeptUnitWithoutGradientError"]
