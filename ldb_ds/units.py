"""How a model is cut into LDB units, and one optimizer param group per unit.

A *unit* is what LDB drops or keeps as a whole in a DROP step. Three
granularities (``LDBConfig.granularity``):

* ``param``  - every parameter tensor is a unit (what the authors' code does).
* ``module`` - every module that *directly* owns parameters is a unit, e.g. a
  conv (weight), a norm layer (weight and bias), a linear head (weight and
  bias), or a ViT's root module (cls_token and pos_embed). The default.
* ``block``  - blocks, from the first source that applies: a regular
  expression over parameter names (``block_pattern``), module class names
  (``block_classes``), timm's ``model.group_matcher(coarse=False)`` groups
  (stem, each block, head), or a Hugging Face model's ``_no_split_modules``
  (the block classes it never splits across devices, e.g. ``ViTEmbeddings``,
  ``ViTLayer``; read as an attribute, transformers is not imported). With a
  pattern or class names, parameters outside every block are units as at
  ``module`` granularity.

Units are ordered by the first appearance of their parameters in
``model.named_parameters()``, i.e. from input to output for the usual models,
so ``keep_first``/``keep_last`` mean "the first/last layers".

A tied weight (one tensor used by two modules, e.g. an embedding shared with the head) is
one unit, at its first appearance (the embedding), since a tensor can sit in only one param
group; the head then has no unit of its own, so ``keep_last`` counts from the last module with
a weight of its own (e.g. the final norm). :func:`tied_weights` finds them; ``ldb_ds.initialize``
warns, naming which unit ``keep_last`` keeps and whether the tied weight can be dropped.

Only trainable parameters take part: those with ``requires_grad=True`` when
ldb_ds is initialised and (if the user passes param groups) in one of the user's
groups. Parameters the user froze stay frozen and are never toggled.

Why one param group per unit: under ZeRO 1/2 each param group becomes one
flat fp32 partition and under ZeRO 3 one or more sub-groups, and DeepSpeed
steps them group by group. With a group per unit, "do not update a dropped
unit" becomes "do not step its group", exact at every stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import os
import re

import torch
from torch import nn

from .config import LDBConfig, LDBConfigError
from .schedule import sampleable_range


@dataclass(frozen=True)
class UnitInfo:
    """Read-only description of one unit (what ``engine.ldb.units`` returns)."""

    name: str
    param_names: tuple[str, ...]
    numel: int


def param_numel(p: torch.Tensor) -> int:
    """Full element count, also for a ZeRO-3 partitioned parameter (whose local numel is 0)."""
    return int(getattr(p, "ds_numel", p.numel()))


@dataclass(frozen=True)
class Unit:
    name: str
    param_names: tuple[str, ...]
    params: tuple[nn.Parameter, ...]

    @property
    def numel(self) -> int:
        return sum(param_numel(p) for p in self.params)

    def info(self) -> UnitInfo:
        return UnitInfo(self.name, self.param_names, self.numel)


def build_units(model: nn.Module, granularity: str, trainable: Iterable[nn.Parameter] | None = None, *,
                block_classes: Sequence[str] | None = None, block_pattern: str | None = None) -> list[Unit]:
    """Cut ``model`` into ordered units over its trainable parameters.

    ``trainable``: the parameters that will be optimized (default: all with
    ``requires_grad=True``). Parameters outside it belong to no unit.
    ``block_pattern`` / ``block_classes``: the source of ``block`` units
    (``LDBConfig.block_pattern`` / ``block_classes``); neither: timm's ``group_matcher``,
    else the model's ``_no_split_modules``.
    """
    named = [(n, p) for n, p in model.named_parameters() if param_numel(p) > 0]
    allowed = {id(p) for p in (trainable if trainable is not None else (p for _, p in named if p.requires_grad))}
    named = [(n, p) for n, p in named if id(p) in allowed]
    if not named:
        raise LDBConfigError(f"{type(model).__name__} has no trainable parameters to cut into LDB units")

    if granularity == "param":
        groups = [(n, [n]) for n, _ in named]
    elif granularity == "module":
        groups = _group_by_owning_module(model, [n for n, _ in named])
    elif granularity == "block" and block_pattern is not None:
        groups = _group_by_pattern(model, [n for n, _ in named], block_pattern)
    elif granularity == "block" and block_classes is not None:
        groups = _group_by_block_classes(model, [n for n, _ in named], block_classes)
    elif granularity == "block" and not callable(getattr(model, "group_matcher", None)) \
            and getattr(model, "_no_split_modules", None):
        groups = _group_by_block_classes(model, [n for n, _ in named], model._no_split_modules,
                                         f"{type(model).__name__}._no_split_modules")
    elif granularity == "block":
        groups = _group_by_timm_matcher(model, [n for n, _ in named])
    else:
        raise LDBConfigError(f"layer_drop_back.granularity = {granularity!r} is not allowed: "
                             "expected one of 'param', 'module', 'block'")

    by_name = dict(named)
    return [Unit(name, tuple(names), tuple(by_name[n] for n in names)) for name, names in groups]


_PARAMETRIZED = re.compile(r"^(?:(.*)\.)?parametrizations\.")


def _group_by_owning_module(model: nn.Module, names: Sequence[str]) -> list[tuple[str, list[str]]]:
    # "model.layer1.0.conv1.weight" is owned by module "layer1.0.conv1". A parametrized tensor
    # (torch.nn.utils.parametrize: weight_norm, spectral_norm, orthogonal) lives in a submodule,
    # "layer.parametrizations.weight.original0", but is the layer's weight: the layer owns it, so
    # a weight-normed Linear is one unit with its bias, as a plain one is.
    order: dict[str, list[str]] = {}
    for n in names:
        parametrized = _PARAMETRIZED.match(n)
        owner = (parametrized.group(1) or "") if parametrized else n.rpartition(".")[0]
        order.setdefault(owner, []).append(n)
    return [(owner or "<root>", members) for owner, members in order.items()]


def _group_by_pattern(model: nn.Module, names: Sequence[str], pattern: str) -> list[tuple[str, list[str]]]:
    regex = re.compile(pattern)
    key_of = {}
    for n in names:
        m = regex.match(n)
        key_of[n] = m.group(0) if m and m.group(0) else None
    if not any(key_of.values()):
        raise LDBConfigError(f"layer_drop_back.block_pattern = {pattern!r} matches no trainable parameter of "
                             f"{type(model).__name__} (first names: {', '.join(names[:3])})")
    return _blocks_then_modules(names, key_of)


def _group_by_block_classes(model: nn.Module, names: Sequence[str], block_classes: Sequence[str],
                            source: str = "layer_drop_back.block_classes") -> list[tuple[str, list[str]]]:
    wanted = set(block_classes)
    # The outermost module of a wanted class owns everything below it (classes may nest).
    blocks: list[str] = []
    for module_name, module in model.named_modules():
        if type(module).__name__ in wanted and module_name \
                and not any(module_name.startswith(b + ".") for b in blocks):
            blocks.append(module_name)
    if not blocks and type(model).__name__ in wanted:
        raise LDBConfigError(f"{source} names the whole model ({type(model).__name__}): that would be one unit")
    key_of = {}
    for n in names:
        key_of[n] = next((b for b in blocks if n.startswith(b + ".")), None)
    if not any(key_of.values()):
        found = sorted({type(m).__name__ for m in model.modules()})
        raise LDBConfigError(f"{source} = {list(block_classes)!r}: no module of these classes "
                             f"holds trainable parameters in {type(model).__name__} (its module classes: "
                             f"{', '.join(found[:20])}{', ...' if len(found) > 20 else ''})")
    return _blocks_then_modules(names, key_of)


def _blocks_then_modules(names: Sequence[str], block_of: dict[str, str | None]) -> list[tuple[str, list[str]]]:
    # One unit per block key; a parameter in no block is grouped with its owning module, as at
    # "module" granularity. Units in order of first appearance (input to output).
    order: dict[str, list[str]] = {}
    for n in names:
        key = block_of[n]
        unit = f"block:{key.rstrip('.')}" if key else (n.rpartition(".")[0] or "<root>")
        order.setdefault(unit, []).append(n)
    return list(order.items())


def _group_by_timm_matcher(model: nn.Module, names: Sequence[str]) -> list[tuple[str, list[str]]]:
    matcher = getattr(model, "group_matcher", None)
    if not callable(matcher):
        raise LDBConfigError(
            f"layer_drop_back.granularity = 'block' needs block_pattern, block_classes, a timm model's "
            f"group_matcher() or a Hugging Face model's _no_split_modules; {type(model).__name__} has none. "
            f"Set block_classes or block_pattern, or use granularity 'module' or 'param'.")
    from timm.models import group_parameters  # timm is only needed for this granularity

    layer_to_names = group_parameters(model, matcher(coarse=False))
    wanted = set(names)
    groups = []
    for layer_id in sorted(layer_to_names):
        members = [n for n in layer_to_names[layer_id] if n in wanted]
        if members:
            groups.append((f"block{layer_id}:{_unit_label(members)}", members))
    covered = {n for _, members in groups for n in members}
    missing = [n for n in names if n not in covered]
    if missing:  # defensive: timm matchers map unmatched names to the last group
        groups.append(("block_unmatched", missing))
    # Keep input-to-output order by first appearance, like the other granularities.
    position = {n: i for i, n in enumerate(names)}
    groups.sort(key=lambda g: min(position[n] for n in g[1]))
    return groups


def _unit_label(names: Sequence[str]) -> str:
    """A block unit's name from its parameter names: each top-level part's common module path, joined by "+"."""
    # timm's matchers put more than one top-level module in a group (a ViT's last block with the
    # final norm, an EfficientNet's last block with conv_head and bn2, a stem's conv1 and bn1):
    # name each top-level part by its own common module prefix, "blocks.8+norm", not by the
    # first parameter's module alone (which named a 1 M-parameter unit "blocks.8.norm1").
    by_top: dict[str, list[list[str]]] = {}
    for n in names:
        by_top.setdefault(n.split(".")[0], []).append(n.split(".")[:-1])  # the owning module's path
    # commonprefix compares lists element by element; a top-level parameter ("cls_token") has no module.
    labels = [".".join(os.path.commonprefix(paths)) or top for top, paths in by_top.items()]
    return "+".join(labels if len(labels) <= 4 else labels[:3] + [f"{len(labels) - 3} more"])


@dataclass(frozen=True)
class TiedWeight:
    """One tensor that the model holds under several names (e.g. ``embed.weight`` and ``head.weight``)."""

    unit_index: int
    """Index of the unit that holds it (the unit of its first name)."""
    names: tuple[str, ...]
    """Every name of the tensor, in ``named_parameters(remove_duplicate=False)`` order; the first is its unit's."""


def tied_weights(model: nn.Module, units: Sequence[Unit]) -> list[TiedWeight]:
    """The unit parameters that the model also holds under other names (tied weights)."""
    names_of: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names_of.setdefault(id(p), []).append(name)
    found = []
    for ui, unit in enumerate(units):
        for p in unit.params:
            if len(names_of.get(id(p), ())) > 1:
                found.append(TiedWeight(ui, tuple(names_of[id(p)])))
    return found


def describe_tied_weights(tied: Sequence[TiedWeight], units: Sequence[Unit], cfg: LDBConfig) -> str:
    """What keep_first/keep_last mean for a model with tied weights (the warning's text)."""
    droppable = sampleable_range(len(units), cfg)
    last_kept = [units[i].name for i in range(max(len(units) - cfg.keep_last, 0), len(units))]
    parts = []
    for t in tied:
        others = ", ".join(repr(n) for n in t.names[1:])
        status = ("it can be dropped (which drops every use of it): set keep_first >= "
                  f"{t.unit_index + 1} to keep it" if t.unit_index in droppable else "it is never dropped")
        parts.append(f"{t.names[0]!r} is also {others}: one tensor, so one unit, unit {t.unit_index} "
                     f"({units[t.unit_index].name!r}, its first use); {status}")
    kept = ", ".join(repr(n) for n in last_kept) or "no unit"
    return (f"ldb_ds: tied weights: {'; '.join(parts)}. The later uses have no unit of their own, so "
            f"keep_last = {cfg.keep_last} keeps {kept}, the last unit(s) with weights of their own, not a tied "
            f"head (layer_drop_back.keep_last, README).")


def normalise_param_groups(model: nn.Module, model_parameters: Any) -> list[dict[str, Any]]:
    """The user's ``model_parameters`` as a list of param-group dicts.

    Accepts what ``deepspeed.initialize`` accepts: None (all trainable
    parameters of the model), an iterable of tensors, or an iterable of dicts
    (param groups, e.g. timm's ``param_groups_weight_decay``).
    """
    if model_parameters is None:
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]
    items = list(model_parameters)
    if not items:
        raise ValueError("model_parameters is empty: nothing to optimize")
    if all(isinstance(g, Mapping) for g in items):
        groups = []
        for i, g in enumerate(items):
            if "params" not in g:
                raise ValueError(f"param group {i} has no 'params' key")
            params = g["params"]
            params = [params] if isinstance(params, torch.Tensor) else list(params)
            groups.append({**g, "params": params})
        return groups
    if all(isinstance(p, torch.Tensor) for p in items):
        return [{"params": items}]
    raise TypeError("model_parameters must be tensors or param-group dicts, not a mix")


def split_groups_by_unit(units: Sequence[Unit], user_groups: Sequence[Mapping[str, Any]]
                         ) -> tuple[list[dict[str, Any]], list[int]]:
    """One param group per (unit, user group) pair that has parameters.

    Each new group keeps all hyperparameters of the user group it came from
    (weight decay, lr scale, ...), so splitting changes nothing but the
    grouping. Returns the groups and, for each group, the index of its unit.
    Groups come in unit order: DeepSpeed keeps this order, which is how a ZeRO
    flat group is mapped back to its unit.
    """
    group_of_param: dict[int, int] = {}
    for gi, g in enumerate(user_groups):
        for p in g["params"]:
            if id(p) in group_of_param:
                raise ValueError("a parameter appears in more than one param group")
            group_of_param[id(p)] = gi

    groups: list[dict[str, Any]] = []
    unit_of_group: list[int] = []
    for ui, unit in enumerate(units):
        per_user_group: dict[int, list[nn.Parameter]] = {}
        for p in unit.params:
            per_user_group.setdefault(group_of_param[id(p)], []).append(p)
        for gi in sorted(per_user_group):
            hyper = {k: v for k, v in user_groups[gi].items() if k != "params"}
            groups.append({**hyper, "params": per_user_group[gi]})
            unit_of_group.append(ui)
    return groups, unit_of_group


def trainable_params(user_groups: Sequence[Mapping[str, Any]]) -> list[nn.Parameter]:
    return [p for g in user_groups for p in g["params"] if p.requires_grad and param_numel(p) > 0]


__all__ = ["param_numel", "Unit", "UnitInfo", "TiedWeight", "build_units", "tied_weights",
           "describe_tied_weights", "normalise_param_groups", "split_groups_by_unit", "trainable_params"]
