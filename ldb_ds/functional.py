"""LayerDropBack as plain functions, for any training loop (no DeepSpeed needed).

:class:`ldb_ds.LDBEngine` is built on these; so is the Hugging Face
integration. In a plain PyTorch loop, one process::

    import random, torch
    from ldb_ds import LDBConfig, Mode, functional as ldb

    cfg = LDBConfig(enabled=True)
    units = ldb.build_units(model, cfg.granularity)                   # input to output
    groups, unit_of_group = ldb.build_param_groups(units, [{"params": list(model.parameters())}])
    opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=5e-4)
    rng = random.Random(cfg.seed)
    for epoch in range(epochs):
        mode = ldb.epoch_mode(epoch, cfg)
        for x, y in loader:                                             # DROP: batch x cfg.batch_kappa
            dropped = ldb.draw_mask(rng, len(units), cfg) if mode is Mode.DROP else [False] * len(units)
            ldb.apply_mask(units, dropped)                              # before the forward
            torch.nn.functional.cross_entropy(model(x), y).backward()
            hidden = ldb.dropped_groups(groups, unit_of_group, dropped)
            with ldb.hide_groups(opt, hidden, lr_factor=ldb.lr_factor(mode, cfg)):
                opt.step()                                              # dropped units untouched
            opt.zero_grad()
    ldb.apply_mask(units, [False] * len(units))                         # all trainable again

Each function does one thing:

* :func:`build_units` cuts a model into units (``param``/``module``/``block``);
* :func:`build_param_groups` gives one optimizer param group per (unit, user group);
* :func:`draw_mask` draws one DROP-step mask (the paper's rule, ``u < p`` per unit);
* :func:`apply_mask` sets ``requires_grad`` so autograd computes no weight
  gradient for dropped units (the forward pass is unchanged);
* :func:`frozen_kept_parameter` finds a kept unit's parameter frozen since (the next
  :func:`apply_mask` would make it trainable again);
* :func:`hide_groups` hides the dropped units' groups from one optimizer step
  and applies the DROP learning-rate factor only for that step.

Why hide groups and not just rely on missing gradients: torch optimizers skip
parameters whose ``grad`` is None, but a wrapper that flattens groups (DeepSpeed's
ZeRO) turns missing gradients into zeros, and momentum and weight decay then
move a parameter with a zero gradient. A hidden group is not looked at at all.
"""

from __future__ import annotations

import contextlib
import itertools
import operator
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch

from .schedule import batch_factor, draw_dropped, epoch_mode, kept_fraction, lr_factor
from .units import Unit, build_units, split_groups_by_unit


def build_param_groups(units: Sequence[Unit], user_groups: Sequence[Mapping[str, Any]]
                       ) -> tuple[list[dict[str, Any]], list[int]]:
    """One param group per (unit, user group); returns ``(groups, unit_of_group)``.

    Each group keeps the hyperparameters of the user group its parameters came
    from (weight decay, lr scale, ...). ``unit_of_group[i]`` is the index of
    group i's unit. Groups are in unit order.
    """
    return split_groups_by_unit(units, user_groups)


def draw_mask(rng: Any, num_units: int, cfg: Any) -> list[bool]:
    """One DROP-step mask: ``mask[i]`` is True when unit i is dropped (see :func:`ldb_ds.schedule.draw_dropped`).

    In a multi-process run only one rank may draw; the others must receive its
    mask (:class:`ldb_ds.controller.LDBController` broadcasts it).
    """
    return draw_dropped(rng, num_units, cfg)


def apply_mask(units: Sequence[Unit], dropped: Sequence[bool]) -> None:
    """Make dropped units' parameters ``requires_grad=False`` and the others ``True``.

    Call it before the forward pass of a step (autograd decides at forward time
    which weight gradients to compute) and only at gradient-accumulation
    boundaries: a unit dropped for part of a window would get a partial gradient.
    """
    if len(dropped) != len(units):
        raise ValueError(f"mask has {len(dropped)} entries for {len(units)} units")
    for unit, is_dropped in zip(units, dropped):
        for p in unit.params:
            p.requires_grad_(not is_dropped)


def frozen_kept_parameter(units: Sequence[Unit], dropped: Sequence[bool]) -> tuple[str, str] | None:
    """``(unit name, parameter name)`` of the first kept unit's parameter that is ``requires_grad=False``.

    After :func:`apply_mask` there is none: one found was frozen by someone else since, and the
    next :func:`apply_mask` would make it trainable again. O(parameters): for epoch boundaries,
    not for every step.
    """
    for unit, is_dropped in zip(units, dropped):
        if not is_dropped:
            for name, p in zip(unit.param_names, unit.params):
                if not p.requires_grad:
                    return unit.name, name
    return None


def dropped_groups(groups: Sequence[Mapping[str, Any]], unit_of_group: Sequence[int],
                   dropped: Sequence[bool]) -> list[Mapping[str, Any]]:
    """The param-group dicts whose unit is dropped (what :func:`hide_groups` takes)."""
    return [g for g, ui in zip(groups, unit_of_group) if dropped[ui]]


@contextlib.contextmanager
def hide_groups(optimizer: torch.optim.Optimizer, hidden: Iterable[Mapping[str, Any]],
                lr_factor: float = 1.0) -> Iterator[list[dict[str, Any]]]:
    """Inside the block, ``optimizer.param_groups`` lacks the ``hidden`` group dicts and the others' lr is x ``lr_factor``.

    Groups are recognised by identity (the dict objects). Yields the visible groups.
    On exit the full list and every group's own ``lr`` value are put back
    (the value, not ``lr / factor``: bitwise exact for any factor), so an LR
    scheduler keeps owning ``lr``.
    """
    hidden_ids = {id(g) for g in hidden}
    all_groups = optimizer.param_groups
    visible = [g for g in all_groups if id(g) not in hidden_ids]
    saved_lr = [g["lr"] for g in visible]
    try:
        optimizer.param_groups = visible
        if lr_factor != 1.0:
            for g in visible:
                g["lr"] = g["lr"] * lr_factor
        yield visible
    finally:
        for g, lr in zip(visible, saved_lr):
            g["lr"] = lr
        optimizer.param_groups = all_groups


# torch optimizers whose step treats every parameter on its own: its state is keyed by the
# parameter and the step writes nothing into the group dict. Stepping two groups with equal
# hyperparameters as one group then gives the same bits, and the foreach/fused kernels run once
# over all of them instead of once per group. Exact types: a subclass may keep per-group state.
MERGEABLE_OPTIMIZERS = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


def _key_reader(group: Mapping[str, Any]) -> tuple:
    """``(group, len(group), read_values, names)``: ``group``'s hyperparameter names (every key but
    ``params``) and an ``itemgetter`` of their values. Made once per group dict (merged_groups'
    ``key_cache``, checked against the dict's identity and length)."""
    names = tuple(k for k in group if k != "params")
    getter = operator.itemgetter(*names) if len(names) > 1 else (lambda g, n=names: tuple(g[k] for k in n))
    return (group, len(group), getter, names)


def _unhashable_key(key: tuple) -> tuple:
    """``key`` with every unhashable value (a list or dict) replaced by its identity."""
    values = []
    for v in key[1]:
        try:
            hash(v)
        except TypeError:
            v = ("unhashable", id(v))
        values.append(v)
    return (key[0], tuple(values))


@contextlib.contextmanager
def merged_groups(optimizer: torch.optim.Optimizer,
                  key_cache: dict[int, tuple] | None = None) -> Iterator[list[dict[str, Any]]]:
    """Inside the block, ``optimizer.param_groups`` holds one group per set of equal hyperparameters.

    One param group per unit costs per-group work in every optimizer step: torch's optimizers
    run their foreach/fused kernels once per group. For the optimizers in
    :data:`MERGEABLE_OPTIMIZERS` (exact types) the groups whose hyperparameters are equal (every
    key but ``params``) are stepped as one group, which is bitwise the same update: each
    parameter's update reads only its own gradient, its own state and the shared
    hyperparameters. Other optimizers (DeepSpeed's FusedAdam keeps its step counter per group)
    and single groups are left as they are; groups without params are left out (they step
    nothing). On exit the original list is back; a hyperparameter the step changed in a merged
    group is written back to each of its groups. ``key_cache`` (a dict the caller keeps across
    steps, e.g. the step filter) saves looking up each group's key names again every step.
    """
    groups = optimizer.param_groups
    if type(optimizer) not in MERGEABLE_OPTIMIZERS or len(groups) < 2:
        yield groups
        return
    # Groups without params step nothing and are left out. ZeRO-3 (with offload) shows all N
    # groups, all but one empty, in each of its N calls: that stays a cheap check, not N keys.
    # The key of a group: its hyperparameter names and values, equal for two groups exactly when
    # every value but ``params`` is equal. Per group and step, so the work is kept in C: one
    # itemgetter call, one tuple, one dict look-up (which hashes the key). The values are read at
    # every step: schedulers (and the DROP factor) write ``lr`` every step, so a cached *value*
    # would go stale; only the names are cached (_key_reader).
    members: dict[tuple, list[dict[str, Any]]] = {}
    nonempty = 0
    cache = {} if key_cache is None else key_cache
    for g in groups:
        if g["params"]:
            nonempty += 1
            entry = cache.get(id(g))
            if entry is None or entry[0] is not g or entry[1] != len(g):
                entry = cache[id(g)] = _key_reader(g)
            key = (entry[3], entry[2](g))
            try:
                same = members.get(key)
            except TypeError:  # a list or dict among the values: only the same object counts as equal
                key = _unhashable_key(key)
                same = members.get(key)
            if same is None:
                members[key] = [g]
            else:
                same.append(g)
    if len(members) == nonempty:  # nothing to merge (this includes a single group)
        yield groups
        return
    merged = [{**same[0], "params": list(itertools.chain.from_iterable(g["params"] for g in same))}
              for same in members.values()]
    try:
        optimizer.param_groups = merged
        yield merged
    finally:
        optimizer.param_groups = groups
        for m, same in zip(merged, members.values()):
            first = same[0]
            for k, v in m.items():
                if k != "params" and v is not first.get(k):
                    for g in same:
                        g[k] = v


__all__ = ["build_units", "build_param_groups", "draw_mask", "apply_mask", "frozen_kept_parameter", "dropped_groups",
           "hide_groups",
           "merged_groups", "MERGEABLE_OPTIMIZERS", "epoch_mode", "lr_factor", "batch_factor", "kept_fraction"]
