"""A DROP step whose first kept unit got no gradient is stopped before its update.

Why it can happen. A dropped unit is ``requires_grad=False``, so when a DROP mask drops the
first units of the model (a dropped prefix: ``keep_first=0``), autograd builds no graph through
them and the first kept unit's input does not require grad. A plain forward still gives that
unit's weights a gradient, because they require grad. Reentrant activation checkpointing does
not: ``torch.utils.checkpoint(..., use_reentrant=True)`` (timm with ``TIMM_REENTRANT_CKPT=1``)
and ``deepspeed.checkpointing.checkpoint`` run the segment without autograd and attach its
backward to the segment's inputs only. With no input requiring grad, torch only warns ("None
of the inputs have requires_grad=True"), DeepSpeed says nothing, and the kept units inside get
no gradient: the step would leave them untrained (ZeRO-0) or move them by momentum and weight
decay alone (ZeRO 1-3 give them a zero gradient), a silently different training. Non-reentrant
checkpointing is exact.

Why watching one unit is enough. A chain of units (timm's and Hugging Face's models, whose units
``build_units`` orders input to output) goes wrong at the first kept unit after the dropped
prefix or not at all: if that unit gets a gradient its output requires grad, and so does every
later segment's input. With the first unit kept (``keep_first >= 1``, the default 4, or a mask
that happens to keep it) the first unit's output requires grad and nothing can go wrong: no
hook, no cost. A model with branches that bypass the first kept unit is not covered.

Cost, only in a window whose mask drops the first unit: a post-accumulate-grad hook on each
parameter of one unit (registered when the window opens, removed at its step) that sets a Python
flag, and a read of the flag at the step. No device work, no host sync. Every rank has the same
mask and the same graph, so every rank stops at the same step, before DeepSpeed's step and its
collectives.
"""

from __future__ import annotations

from typing import Any, Sequence

from .units import Unit


class KeptUnitWithoutGradientError(RuntimeError):
    """A DROP step's first kept unit received no gradient (see the module docstring)."""


class KeptGradientCheck:
    """Arms on the first kept unit after a dropped prefix; :meth:`verify` at the step."""

    def __init__(self) -> None:
        self._handles: list[Any] = []
        self._unit: Unit | None = None
        self._reached = False

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
        self._handles = [p.register_post_accumulate_grad_hook(self._on_gradient) for p in self._unit.params]

    def _on_gradient(self, param: Any) -> None:
        self._reached = True

    def verify(self) -> None:
        """At the accumulation boundary, before the optimizer step: raise if the unit got no gradient."""
        unit, reached = self._unit, self._reached
        self.disarm()
        if unit is None or reached:
            return
        raise KeptUnitWithoutGradientError(
            f"ldb_ds: in this DROP step unit {unit.name!r}, the first one kept after the dropped first units, "
            "received no gradient: the step would not train it (ZeRO 1-3 would move it by momentum and weight "
            "decay alone). No update was applied. The usual cause is reentrant activation checkpointing "
            "(torch.utils.checkpoint(..., use_reentrant=True), TIMM_REENTRANT_CKPT=1, "
            "deepspeed.checkpointing.checkpoint): with the units ahead of it dropped, none of a checkpointed "
            "segment's inputs requires grad, and its weights get no gradient. Use non-reentrant checkpointing "
            "(use_reentrant=False, timm's and Hugging Face's default), or never drop the first unit "
            "(layer_drop_back.keep_first >= 1; the default is 4), which also covers a model that leaves this "
            "unit unused in some steps (docs/support.md, activation checkpointing)")

    def disarm(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._unit = None


__all__ = ["KeptGradientCheck", "KeptUnitWithoutGradientError"]
