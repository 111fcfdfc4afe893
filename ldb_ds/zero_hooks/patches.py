"""The record of every change ldb_ds makes to DeepSpeed's objects, and their removal.

Every ``install_*`` function of :mod:`ldb_ds.zero_hooks` (and :func:`ldb_ds.attach.attach`)
changes DeepSpeed's objects only through a :class:`PatchSet`: an instance attribute set on an
object (``optimizer.step``, ``engine.backward``, ...), a hook whose handle is kept, or a
process-wide swap that is reference-counted. :meth:`PatchSet.remove` undoes them all, newest
first, so wrappers that wrap wrappers (the non-finite skip around the step filter) unwind in
order; afterwards DeepSpeed's objects hold no ldb_ds callable (tests/dist/test_patches_dist.py).

Three kinds; the first two fail differently when DeepSpeed's source is not the verified one
(:data:`ldb_ds.zero_hooks.MIRRORED_SOURCES`), the third only labels what ``describe()`` lists:

* ``OPTIMISATION``: a batched loop or norm that does what DeepSpeed's code does, faster. If the
  code it mirrors changed, it is not installed, with a warning: DeepSpeed's own code runs.
* ``EXACTNESS``: what keeps a dropped unit untouched (the step filter, the non-finite skip, the
  all-gather skip, the fp16 loss scaling), or in a whole-model export (``installation.
  install_whole_model_exports``, which wraps public engine methods and relies on no caller). If the DeepSpeed callers it relies on changed,
  ldb_ds refuses to run LDB (:func:`require_verified`), because a silently wrong update is worse
  than no speed-up.
"""

from __future__ import annotations

import enum
import types
import warnings
from typing import Any, Callable, NamedTuple, Sequence

from .version import VERIFIED_DEEPSPEED, installed_version, sources_match


class Kind(enum.Enum):
    OPTIMISATION = "optimisation"
    EXACTNESS = "exactness"
    INTEGRATION = "integration"  # attach()'s methods and hook: how a foreign loop reaches ldb_ds


class Patch(NamedTuple):
    """One change: ``name`` (what it is), its kind, and where (``target`` and ``attr``, or an undo)."""

    name: str
    kind: Kind
    target: Any
    attr: str
    had_own: bool
    original: Any
    undo: Callable[[], None] | None = None

    def describe(self) -> str:
        where = f"{type(self.target).__name__}.{self.attr}" if self.undo is None else self.attr
        return f"{self.name} ({self.kind.value}): {where}"


class PatchSet:
    """The changes made to one engine's DeepSpeed objects, in order; :meth:`remove` undoes them all."""

    def __init__(self) -> None:
        self._patches: list[Patch] = []

    def set(self, name: str, kind: Kind, target: Any, attr: str, value: Any) -> None:
        """``setattr(target, attr, value)`` on the instance, remembering what was there."""
        own = vars(target)
        had_own = attr in own
        self._patches.append(Patch(name, kind, target, attr, had_own, own.get(attr)))
        setattr(target, attr, value)

    def set_method(self, name: str, kind: Kind, target: Any, attr: str, function: Callable[..., Any]) -> None:
        """:meth:`set` for a method: ``function`` (called without the instance) bound to ``target``.

        torch's LR schedulers wrap ``optimizer.step`` through its ``__func__``
        (``lr_scheduler.patch_track_step_called``): a plain function there makes a scheduler built
        on the optimizer after ``initialize`` fail with "'function' object has no attribute
        '__func__'". A scheduler built before (DeepSpeed builds a callable's inside ``initialize``)
        marked the step it wrapped with ``_wrapped_by_lr_sched``; the mark is carried over, or torch
        warns at every run that ``optimizer.step()`` was overridden (the replaced step still calls
        the scheduler's wrapper, so its bookkeeping goes on).
        """
        def method(_instance: Any, *args: Any, **kwargs: Any) -> Any:
            return function(*args, **kwargs)

        if getattr(getattr(target, attr, None), "_wrapped_by_lr_sched", False):
            method._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
        self.set(name, kind, target, attr, types.MethodType(method, target))

    def add_undo(self, name: str, kind: Kind, where: str, undo: Callable[[], None]) -> None:
        """A change made another way (a hook handle, a reference-counted swap) and how to undo it."""
        self._patches.append(Patch(name, kind, None, where, False, None, undo))

    def describe(self) -> list[str]:
        return [p.describe() for p in self._patches]

    def remove(self, name_prefix: str | None = None) -> None:
        """Undo every change (or those whose name starts with ``name_prefix``), newest first; idempotent.

        A prefix must name changes that nothing later wrapped again (the fp16 loss scaling, say):
        undoing an inner wrapper under an outer one would put the wrong function back.
        """
        for p in reversed(list(self._patches)):
            if name_prefix is not None and not p.name.startswith(name_prefix):
                continue
            self._patches.remove(p)
            if p.undo is not None:
                p.undo()
            elif p.had_own:
                setattr(p.target, p.attr, p.original)
            elif p.attr in vars(p.target):
                delattr(p.target, p.attr)

    def __len__(self) -> int:
        return len(self._patches)


def require_verified(what: str, names: Sequence[str]) -> None:
    """Refuse LDB if the DeepSpeed functions an exactness patch relies on are not the verified ones.

    By source hash alone: a newer DeepSpeed (warned about at initialize) whose functions are
    unchanged still runs LDB; one that changed any of them does not.
    """
    if not sources_match(names):
        raise RuntimeError(
            f"ldb_ds: {what} relies on DeepSpeed functions whose source is not the one verified "
            f"(deepspeed {installed_version()}, verified {VERIFIED_DEEPSPEED[0]}-{VERIFIED_DEEPSPEED[1]}: "
            f"{', '.join(names)}); LayerDropBack could then move dropped units, so it is not run. Install "
            f"deepspeed=={VERIFIED_DEEPSPEED[1]}, or switch LDB off ('enabled': false)")


def fallback_warning(what: str, names: Sequence[str]) -> None:
    """An optimisation patch not installed because its mirrored source changed: say so once per call."""
    warnings.warn(f"ldb_ds: {what} not installed: DeepSpeed's {', '.join(names)} is not the verified source "
                  f"(deepspeed {installed_version()}); DeepSpeed's own code runs (exact, per-group cost)",
                  RuntimeWarning, stacklevel=3)


__all__ = ["Kind", "Patch", "PatchSet", "require_verified", "fallback_warning"]
