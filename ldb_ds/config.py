"""The ``layer_drop_back`` section of a DeepSpeed JSON config.

This module is pure Python (no torch, no DeepSpeed) and is the one source of
LDB defaults. DeepSpeed ignores unknown *top-level* keys, so the section lives
beside ``zero_optimization`` in the same file the user already passes to
``deepspeed.initialize``::

    "layer_drop_back": {"enabled": true, "drop_rate": 0.3, "sampling_rate": 2}

Every key is validated; an unknown key (a typo such as ``drop_rte``) or a bad
value raises :class:`LDBConfigError` naming the key, the value and what is
allowed. Defaults follow the paper's experiments (Section 4: p = 0.3, kappa = 2
for learning rate and batch size, keep the first 4 layers and the last one).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any, Literal, Mapping, get_args

SECTION = "layer_drop_back"

Granularity = Literal["param", "module", "block"]
ResamplePolicy = Literal["step", "epoch"]
LRPolicy = Literal["kappa", "inverse_keep", "none"]
BatchScaling = Literal["micro_batch", "accumulation"]

# The allowed values, derived from the types (one source for annotations and validation).
GRANULARITIES: tuple[str, ...] = get_args(Granularity)
RESAMPLE_POLICIES: tuple[str, ...] = get_args(ResamplePolicy)
LR_POLICIES: tuple[str, ...] = get_args(LRPolicy)
BATCH_SCALING: tuple[str, ...] = get_args(BatchScaling)


class LDBConfigError(ValueError):
    """A bad ``layer_drop_back`` section: the message names key, value and what is allowed."""


@dataclass(frozen=True)
class LDBConfig:
    """Validated LayerDropBack settings (the ``layer_drop_back`` JSON section)."""

    enabled: bool = False
    """Turn LDB on. Absent section or ``false``: plain DeepSpeed behind the same API.
    A section without this key is off too (DeepSpeed's convention for its own sections),
    with a warning, once per process, that names the section and the key to add."""

    drop_rate: float = 0.3
    """p: probability that a sampleable unit is dropped in a DROP step (paper: 0.3).
    Allowed: 0 <= p < 1."""

    sampling_rate: int = 2
    """s: epoch e is a DROP epoch when ``e % s == 0 and e > 0`` (paper/authors: 2).
    ``1`` makes every epoch after the first a DROP epoch."""

    granularity: Granularity = "module"
    """What one LDB unit is: ``param`` (each parameter tensor, as the authors' code),
    ``module`` (each module that owns parameters directly, e.g. a conv, or a norm
    with weight and bias) or ``block`` (``block_pattern``, else ``block_classes``,
    else timm's ``group_matcher`` blocks, else a Hugging Face model's ``_no_split_modules``)."""

    block_classes: tuple[str, ...] | None = None
    """``block`` granularity: names of module classes whose instances are units, e.g.
    ``["BertEmbeddings", "BertLayer"]``. Unset, a Hugging Face model's own
    ``_no_split_modules`` are used (after timm's ``group_matcher``). Parameters outside
    every such module are units as at ``module`` granularity.
    Only with ``granularity: "block"``; not together with ``block_pattern``."""

    block_pattern: str | None = None
    """``block`` granularity: a regular expression matched (``re.match``, from the start)
    against parameter names; parameters whose match is the same text form one unit, e.g.
    ``"bert\\.encoder\\.layer\\.\\d+\\."`` (one unit per encoder layer). Parameters
    that do not match are units as at ``module`` granularity. Only with
    ``granularity: "block"``; not together with ``block_classes``."""

    keep_first: int = 4
    """Units at the start that are never dropped (paper: the first 4 layers)."""

    keep_last: int = 1
    """Units at the end that are never dropped (paper: the last layer; at ``param``
    granularity use 2 to keep the classifier's weight and bias as the authors do).

    ``keep_first`` and ``keep_last`` may not both be 0 while ``drop_rate > 0``: every unit
    would then be sampleable, and a DROP step that happens to drop all of them leaves nothing
    to train (DeepSpeed fails mid-run on a loss that needs no gradient). ldb_ds refuses that
    setting rather than redraw or keep a unit of its choosing, which would change the paper's
    mask distribution (each unit dropped independently with probability p).

    A tied weight (an embedding shared with the head) is one tensor, so it belongs to one
    unit, at its first use (the embedding); the head then has no unit of its own and
    ``keep_last = 1`` keeps the last module with a weight of its own (e.g. the final norm).
    The tied weight is kept by ``keep_first >= 1``. ``ldb_ds.initialize`` warns and names both."""

    resample: ResamplePolicy = "step"
    """``step``: a new mask every optimizer step (authors' code); ``epoch``: one
    mask per DROP epoch."""

    lr_policy: LRPolicy = "kappa"
    """DROP-epoch learning-rate factor: ``kappa`` (x kappa, the paper's experiments
    and the authors' default "double"), ``inverse_keep`` (x 1/(1-p), the authors'
    "relative" policy; the paper's eta/p is read as a typo of this keep-probability
    form) or ``none``."""

    kappa: float = 2.0
    """Learning-rate factor for ``lr_policy="kappa"`` (paper: 2). Must be > 0."""

    batch_kappa: int = 2
    """Batch-size factor in DROP epochs (paper: 2; authors' from-scratch script: 1)."""

    batch_scaling: BatchScaling = "micro_batch"
    """How the DROP batch grows: ``micro_batch`` (the dataloader yields batches
    batch_kappa times larger, fewer steps per epoch: where the paper's speed comes
    from; needs the memory) or ``accumulation`` (gradient accumulation steps x
    batch_kappa through ``engine.set_train_batch_size``: same memory, same number of
    backward passes)."""

    seed: int = 1234
    """Seed of the mask generator. Only rank 0's generator is used; its draw is
    broadcast, so ranks agree even if their seeds or other RNGs differ."""

    def __post_init__(self) -> None:
        _check_type("enabled", self.enabled, bool)
        _check_number("drop_rate", self.drop_rate)
        if not 0.0 <= float(self.drop_rate) < 1.0:
            _fail("drop_rate", self.drop_rate, "a probability with 0 <= drop_rate < 1")
        _check_type("sampling_rate", self.sampling_rate, int)
        if self.sampling_rate < 1:
            _fail("sampling_rate", self.sampling_rate, "an integer >= 1")
        _check_choice("granularity", self.granularity, GRANULARITIES)
        self._check_block_source()
        for key in ("keep_first", "keep_last"):
            value = getattr(self, key)
            _check_type(key, value, int)
            if value < 0:
                _fail(key, value, "an integer >= 0")
        if self.keep_first == 0 and self.keep_last == 0 and self.drop_rate > 0:
            raise LDBConfigError(
                f"{SECTION}: keep_first = 0 and keep_last = 0 with drop_rate = {self.drop_rate!r} is not allowed: "
                f"every unit could be dropped in the same DROP step, leaving nothing to train. Set keep_last >= 1 "
                f"(the paper keeps the last layer) or keep_first >= 1.")
        _check_choice("resample", self.resample, RESAMPLE_POLICIES)
        _check_choice("lr_policy", self.lr_policy, LR_POLICIES)
        _check_number("kappa", self.kappa)
        if not float(self.kappa) > 0.0:
            _fail("kappa", self.kappa, "a number > 0")
        _check_type("batch_kappa", self.batch_kappa, int)
        if self.batch_kappa < 1:
            _fail("batch_kappa", self.batch_kappa, "an integer >= 1")
        _check_choice("batch_scaling", self.batch_scaling, BATCH_SCALING)
        _check_type("seed", self.seed, int)
        if self.seed < 0:
            _fail("seed", self.seed, "an integer >= 0")

    def _check_block_source(self) -> None:
        if self.block_classes is not None:
            names = self.block_classes
            if isinstance(names, str) or not isinstance(names, (list, tuple)) or not names \
                    or not all(isinstance(n, str) and n for n in names):
                _fail("block_classes", names, "a non-empty list of module class names (strings)")
            object.__setattr__(self, "block_classes", tuple(names))  # frozen: hashable, JSON lists accepted
        if self.block_pattern is not None:
            _check_type("block_pattern", self.block_pattern, str)
            try:
                re.compile(self.block_pattern)
            except re.error as err:
                _fail("block_pattern", self.block_pattern, f"a valid regular expression ({err})")
        source = [k for k in ("block_classes", "block_pattern") if getattr(self, k) is not None]
        if len(source) == 2:
            raise LDBConfigError(f"{SECTION}: set block_classes or block_pattern, not both "
                                 f"(got {self.block_classes!r} and {self.block_pattern!r})")
        if source and self.granularity != "block":
            raise LDBConfigError(f"{SECTION}.{source[0]} is only used with granularity 'block', "
                                 f"but granularity = {self.granularity!r}")

    @classmethod
    def from_dict(cls, section: Mapping[str, Any] | None) -> "LDBConfig":
        """Build from the JSON section; ``None`` (section absent) means disabled."""
        if section is None:
            return cls(enabled=False)
        if not isinstance(section, Mapping):
            raise LDBConfigError(
                f"'{SECTION}' must be a JSON object, got {type(section).__name__}: {section!r}"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise LDBConfigError(
                f"unknown key(s) in '{SECTION}': {', '.join(repr(k) for k in unknown)}; "
                f"allowed keys: {', '.join(sorted(known))}"
            )
        if "enabled" not in section:
            _warn_not_enabled(section)
        return cls(**dict(section))

    @classmethod
    def from_ds_config(cls, ds_config: str | os.PathLike | Mapping[str, Any] | None) -> "LDBConfig":
        """Read the section from a DeepSpeed config given as a dict or a JSON file path.

        ``"layer_drop_back": null`` is read as an absent section (LDB off), with a warning.
        """
        full = load_ds_config(ds_config)
        if SECTION in full and full[SECTION] is None:
            _warn_null_section()
        return cls.from_dict(full.get(SECTION))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def changed_keys(saved: Any, current: Mapping[str, Any]) -> list[str]:
    """The keys whose values differ between a checkpoint's saved section and ``current`` (JSON and
    pickles may turn tuples into lists). A checkpoint without a section: none."""
    if not isinstance(saved, Mapping):
        return []

    def plain(v: Any) -> Any:
        return tuple(plain(x) for x in v) if isinstance(v, (list, tuple)) else v

    # Keys in both only: a key added since the checkpoint was written is not a change the user made.
    return sorted(k for k in set(saved) & set(current) if plain(saved[k]) != plain(current[k]))


_not_enabled_warned = False
_null_warned = False


def _warn_null_section() -> None:
    # JSON null is how some config generators write "unset"; a user who wrote it may expect LDB
    # on (or off) and gets off: say so once, and how to write each intent.
    global _null_warned
    if _null_warned:
        return
    _null_warned = True
    warnings.warn(f"ldb_ds: \"{SECTION}\": null in the DeepSpeed config turns LayerDropBack OFF (read as an absent "
                  f"section). Write \"{SECTION}\": {{\"enabled\": false}} (or remove the section) to keep it off "
                  f"without this warning, or \"{SECTION}\": {{\"enabled\": true}} to turn it on.",
                  UserWarning, stacklevel=4)


def _warn_not_enabled(section: Mapping[str, Any]) -> None:
    # A section with settings but no "enabled" looks like an attempt to turn LDB on; DeepSpeed's
    # convention (off unless enabled) is kept, but not silently.
    global _not_enabled_warned
    if _not_enabled_warned:
        return
    _not_enabled_warned = True
    keys = ", ".join(repr(k) for k in section) or "no keys"
    warnings.warn(f"ldb_ds: the '{SECTION}' section of the DeepSpeed config ({keys}) has no \"enabled\" key, "
                  f"so LayerDropBack is OFF (like DeepSpeed's own sections, it is off unless enabled). Add "
                  f"\"enabled\": true to the '{SECTION}' section to turn it on (or \"enabled\": false to keep "
                  f"it off without this warning).", UserWarning, stacklevel=4)


def load_ds_config(ds_config: str | os.PathLike | Mapping[str, Any] | None) -> dict[str, Any]:
    """A DeepSpeed config as a dict: from a dict, a JSON path, or ``None`` (empty).

    Files are read like DeepSpeed reads them: JSON, or hjson (JSON with comments and
    unquoted keys; DeepSpeed depends on the ``hjson`` package) when it is installed.
    """
    if ds_config is None:
        return {}
    if isinstance(ds_config, Mapping):
        return dict(ds_config)
    if not isinstance(ds_config, (str, os.PathLike)):
        raise TypeError(f"the DeepSpeed config must be a JSON file path (str or os.PathLike) or a dict, "
                        f"got {type(ds_config).__name__}: {ds_config!r}")
    path = os.fspath(ds_config)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"DeepSpeed config file not found: {path}")
    with open(path) as f:
        text = f.read()
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError as err:
        json_error = err
    else:
        if not isinstance(loaded, Mapping):  # DeepSpeed would fail on .get() with an AttributeError
            raise LDBConfigError(f"DeepSpeed config {path} must hold a JSON object ({{...}}), "
                                 f"got a JSON {type(loaded).__name__}")
        return loaded
    try:
        import hjson  # DeepSpeed's own config reader (a pure-Python dependency of DeepSpeed)
    except ImportError:
        hjson = None
    if hjson is not None:
        try:
            loaded = hjson.loads(text)
        except Exception:  # hjson raises its own HjsonDecodeError; report the JSON error below
            loaded = None
        if isinstance(loaded, Mapping):
            return json.loads(json.dumps(loaded))  # plain dicts, like json.load
    raise LDBConfigError(f"DeepSpeed config {path} is not valid JSON (nor hjson): {json_error}") from json_error


def _fail(key: str, value: Any, allowed: str) -> None:
    raise LDBConfigError(f"{SECTION}.{key} = {value!r} is not allowed: expected {allowed}")


def _check_type(key: str, value: Any, types: type | tuple[type, ...]) -> None:
    # bool is a subclass of int in Python; JSON true must not pass as a number.
    wanted = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool) and bool not in wanted:
        ok = False
    else:
        ok = isinstance(value, wanted)
    if not ok:
        names = " or ".join(t.__name__ for t in wanted)
        _fail(key, value, f"a value of type {names}")


def _check_number(key: str, value: Any) -> None:
    # NaN fails every comparison and inf passes "> 0", so range checks alone let both through.
    _check_type(key, value, (int, float))
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int too large for a float
        finite = False
    if not finite:
        _fail(key, value, "a finite number")


def _check_choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(key, value, "one of " + ", ".join(repr(c) for c in choices))


DEFAULTS = LDBConfig(enabled=True)
"""The paper's setting with LDB switched on (what the README's table lists)."""

__all__ = ["LDBConfig", "LDBConfigError", "SECTION", "DEFAULTS", "load_ds_config", "changed_keys"]
