"""Command line, ``-c`` YAML and the JSON ``train`` section, resolved into :class:`TrainOptions`.

Precedence, highest first (as timm's ``train.py`` with ``-c``, plus the DeepSpeed JSON):

1. the command line;
2. the ``-c/--config`` YAML file (e.g. the ``args.yaml`` of an earlier run);
3. the top-level ``"train"`` section of the DeepSpeed JSON;
4. the defaults of :class:`~ldb_ds.train.options.TrainOptions`.

The parser is generated from the dataclass fields: every field is a flag (its name with dashes,
plus the field's extra flags and aliases), typed and with choices from the field's type.
``--deepspeed_config`` may come from the command line or from the YAML file (a replayed
``args.yaml`` names the JSON it was run with; a relative path is relative to the working
directory, as in timm). Keys in files are option names with underscores; an alias such as
``log_every`` is accepted for ``log_interval``. An unknown key, a value of the wrong type or
outside the allowed range is an error that names the file, the key and what is allowed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any, Mapping, NoReturn

from . import options
from .console import log
from .options import OptionsError, TrainOptions

TRAIN_SECTION = "train"
RECORD_KEY = "run"
"""Key of ``args.yaml`` holding what the run found out (world size, versions...): a record, not
options, so ``-c`` skips it."""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no 30-line usage first), printed by one rank, status 2."""

    def error(self, message: str) -> NoReturn:
        from ..process import report_agreed_error
        from .console import is_main

        report_agreed_error(f"{self.prog}: error: {message} (see {self.prog} --help)", is_main=is_main())
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    """An argparse parser with one flag per :class:`TrainOptions` field.

    No flag has a default here (``argparse.SUPPRESS``: an option not given is absent from the
    result): the real defaults live in the dataclass, so ``parse_args`` can tell a value given
    on the command line from one that was not.
    """
    p = _Parser(
        prog="ldb-train", description="Train an image classifier with DeepSpeed and "
        "LayerDropBack (ldb_ds). Options may also come from -c FILE.yaml and from the "
        "DeepSpeed JSON's 'train' section; see docs/training.md.",
        argument_default=argparse.SUPPRESS)
    groups = {g: p.add_argument_group(g) for g in options.GROUPS}
    hints = options.type_hints()
    for f in options.fields():
        m = f.metadata
        kind, choices, _ = options.base_type(hints[f.name])
        names = [*(s for s in m["flags"] if not s.startswith("--")), options.flag(f.name),
                 *(s for s in m["flags"] if s.startswith("--")), *m["aliases"]]
        default = m["default_text"] or ("off" if kind is bool else f.default)
        shown = "" if default is None else f" (default: {default})"
        kwargs: dict[str, Any] = dict(dest=f.name, help=m["help"] + shown)
        if kind is bool:
            kwargs["action"] = "store_true"
        else:
            kwargs["type"] = kind
            if choices:
                kwargs["choices"] = choices
        kwargs.update(m["argparse"])
        groups[m["group"]].add_argument(*names, **kwargs)
    return p


def parse_args(argv: list[str] | None = None) -> tuple[TrainOptions, dict]:
    """Resolve the options (see the module docstring). Returns ``(options, DeepSpeed config)``.

    Bad input exits through ``parser.error`` (status 2) with a message naming what is wrong.
    """
    from ldb_ds.config import LDBConfigError, load_ds_config

    parser = build_parser()
    given = vars(parser.parse_args(argv))  # only what was given (argument_default=SUPPRESS)
    try:
        from_yaml = load_yaml(given["config"]) if given.get("config") else {}
        ds_path = given.get("deepspeed_config") or from_yaml.get("deepspeed_config")
        if not ds_path:
            raise OptionsError("--deepspeed_config is required, on the command line or in the "
                               "-c file (see ds_configs/README.md)")
        try:
            ds_config = load_ds_config(ds_path)
        except (FileNotFoundError, LDBConfigError) as err:
            raise OptionsError(str(err)) from err
        except (OSError, UnicodeDecodeError) as err:
            raise OptionsError(f"cannot read the DeepSpeed config {ds_path}: {err}") from None
        if not isinstance(ds_config, dict):
            raise OptionsError(f"{ds_path} holds a JSON {type(ds_config).__name__}, not an object: a DeepSpeed "
                               'config is one {"key": value, ...} object (see ds_configs/)')
        check_finite_numbers(ds_config, ds_path)
        section = ds_config.get(TRAIN_SECTION, {})
        if section is None:
            section = {}
        from_json = check_keys(section, f"the '{TRAIN_SECTION}' section of {ds_path}",
                               deny=("deepspeed_config",))
        if "optimizer" not in ds_config:
            raise OptionsError(f"{ds_path} has no 'optimizer' section; add one, e.g. "
                               '{"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}} '
                               "(see ds_configs/)")
        values = {**from_json, **from_yaml, **given, "deepspeed_config": ds_path}
        _drop_data_dir_of_another_dataset(values, (from_json, from_yaml, given), ds_path)
        opts = TrainOptions(**values)
        check_ds_config(ds_config, ds_path, opts, launched_world_size())
        if opts.sched is None:
            opts.sched = "none" if "scheduler" in ds_config else "cosine"
        elif opts.sched != "none" and "scheduler" in ds_config:
            raise OptionsError(f"--sched {opts.sched} and the 'scheduler' section of {ds_path} "
                               "would both set the learning rate; use one")
    except OptionsError as err:
        parser.error(str(err))
    return opts, ds_config


def _drop_data_dir_of_another_dataset(values: dict[str, Any], sources: tuple[dict[str, Any], ...],
                                      ds_path: str) -> None:
    """A ``data_dir`` goes with the dataset it was given for.

    ``ds_configs/paper_scratch_*.json`` name CIFAR-10 in ``data/``; ``--dataset digits`` on the
    command line (a later source) then leaves that folder unused, and is no conflict: the file's
    ``data_dir`` is dropped, with a note. A ``data_dir`` given at the same level as, or a later one
    than, a dataset that reads none is still refused (``TrainOptions``): who names a folder there
    expects it to be read.
    """
    if values.get("dataset") not in ("digits", "synthetic") or values.get("data_dir") is None:
        return
    level = {key: max(i for i, src in enumerate(sources) if key in src) for key in ("dataset", "data_dir")}
    if level["dataset"] > level["data_dir"]:
        where = (f"the '{TRAIN_SECTION}' section of {ds_path}", "the -c file")[level["data_dir"]]
        log(f"note: data_dir {values['data_dir']!r} from {where} is not used by --dataset {values['dataset']}")
        values["data_dir"] = None


def load_yaml(path: str) -> dict[str, Any]:
    """Option values from a ``-c`` YAML file (``args.yaml`` of a run, or written by hand)."""
    import yaml

    if not os.path.isfile(path):
        raise OptionsError(f"-c {path}: no such file")
    with open(path) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise OptionsError(f"-c {path} is not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise OptionsError(f"-c {path} must hold a mapping of option names to values, got "
                           f"{type(data).__name__}")
    data = {k: v for k, v in data.items() if k != RECORD_KEY}
    return check_keys(data, f"-c {path}")


def check_keys(section: Mapping[str, Any], where: str, deny: tuple[str, ...] = ()
               ) -> dict[str, Any]:
    """Map alias keys to option names; refuse unknown keys and command-line-only options.

    A number written as a string (YAML 1.1 reads ``1e-3`` as one) is converted as argparse
    would convert it on the command line; the dataclass checks everything else.
    """
    hints = options.type_hints()
    if not isinstance(section, Mapping):
        raise OptionsError(f"{where} must be a mapping of option names to values, got "
                           f"{type(section).__name__}")
    by_name = {f.name: f for f in options.fields()}
    aliases = options.key_aliases()
    out: dict[str, Any] = {}
    unknown, cli_only = [], []
    for key, value in section.items():
        name = aliases.get(key, key)
        f = by_name.get(name)
        if f is None:
            unknown.append(key)
        elif f.metadata["scope"] == "cli" or name in deny:
            cli_only.append(key)
        elif name in out:
            raise OptionsError(f"{where} sets {name} twice (as {name} and an alias)")
        else:
            kind = options.base_type(hints[name])[0]
            if isinstance(value, str) and kind in (int, float):
                try:
                    value = kind(value)
                except ValueError:
                    raise OptionsError(f"{where}: {key} = {value!r} is not allowed: expected a "
                                       f"value of type {kind.__name__}") from None
            try:
                options.check_value(name, value)
            except OptionsError as err:
                raise OptionsError(f"{where}: {err}") from None
            out[name] = value
    if unknown:
        allowed = sorted(f.name for f in options.fields()
                         if f.metadata["scope"] != "cli" and f.name not in deny)
        raise OptionsError(f"unknown key(s) in {where}: {', '.join(map(str, sorted(unknown)))}; "
                           f"allowed: {', '.join(allowed)}")
    if cli_only:
        raise OptionsError(f"{where} cannot set {', '.join(sorted(cli_only))}: give it on the "
                           "command line" + (" or in the -c file" if deny else ""))
    return out


def check_finite_numbers(value: Any, where: str, key: str = "") -> None:
    """Refuse NaN and infinity anywhere in a config (Python's JSON reader accepts ``NaN`` and
    ``Infinity``, and ``1e999`` reads as infinity); every DeepSpeed and LDB number is meant finite."""
    if isinstance(value, float) and not math.isfinite(value):
        raise OptionsError(f"{where}: {key} = {value!r} is not allowed: expected a finite number")
    if isinstance(value, dict):
        for k, v in value.items():
            check_finite_numbers(v, where, f"{key}.{k}" if key else str(k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_finite_numbers(v, where, f"{key}[{i}]")


def launched_world_size() -> int | None:
    """The world size the launcher announced (torchrun/deepspeed: WORLD_SIZE; mpirun: OMPI_COMM_WORLD_SIZE),
    ``None`` if unknown; read before any process group exists. A single process is world size 1."""
    for name in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        text = os.environ.get(name, "")
        if text.isdigit() and int(text) > 0:
            return int(text)
    return None if "LOCAL_RANK" in os.environ or "RANK" in os.environ else 1


def check_ds_config(ds_config: dict, where: str, opts: TrainOptions, world_size: int | None) -> None:
    """DeepSpeed's own checks that would otherwise fail inside ``deepspeed.initialize`` on every rank,
    as a 30-line traceback: the ZeRO stage and the batch-size arithmetic (issue 18). Run before any
    process group exists, so every rank stops alike and nobody waits for a peer that left."""
    zero = ds_config.get("zero_optimization") or {}
    if not isinstance(zero, dict):
        raise OptionsError(f"{where}: zero_optimization must be an object, got {type(zero).__name__}")
    stage = zero.get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise OptionsError(f"{where}: zero_optimization.stage = {stage!r} is not allowed: DeepSpeed's ZeRO "
                           "stages are 0, 1, 2 and 3")
    names = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
    train, micro, gas = (ds_config.get(n) for n in names)
    if opts.batch_size is not None:  # as resolve_ds_config: the micro batch wins, the global one is derived
        train, micro = None, opts.batch_size
    for name, value in zip(names, (train, micro, gas)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise OptionsError(f"{where}: {name} = {value!r} is not allowed: expected an integer >= 1")
    if train is None and micro is None:
        raise OptionsError(f"{where} sets neither train_batch_size nor train_micro_batch_size_per_gpu; set one, "
                           "or pass --batch-size")
    if world_size is None or train is None:
        return
    per_rank = train / world_size
    if micro is not None and gas is not None and micro * gas * world_size != train:
        raise OptionsError(f"{where}: train_batch_size {train} is not train_micro_batch_size_per_gpu {micro} x "
                           f"gradient_accumulation_steps {gas} x world size {world_size}; drop train_batch_size "
                           "(it is derived) or make the product match")
    split = micro or gas or 1
    if per_rank != int(per_rank) or int(per_rank) % split:
        raise OptionsError(f"{where}: train_batch_size {train} does not divide into world size {world_size} x "
                           f"{'micro batch' if micro else 'accumulation steps'} {split}; drop train_batch_size "
                           "and set train_micro_batch_size_per_gpu (or --batch-size)")


def resolve_ds_config(ds_config: dict, opts: TrainOptions) -> dict:
    """The config handed to DeepSpeed: option overrides applied, TensorBoard pointed at the run
    (off for ``--eval``).

    ``ds_config`` has an ``optimizer`` section (:func:`parse_args` checks).
    """
    cfg = json.loads(json.dumps(ds_config))  # deep copy
    cfg.pop(TRAIN_SECTION, None)  # ours; DeepSpeed would ignore it anyway
    if opts.batch_size is not None:
        cfg["train_micro_batch_size_per_gpu"] = opts.batch_size
        cfg.pop("train_batch_size", None)
    if opts.lr is not None:
        cfg["optimizer"].setdefault("params", {})["lr"] = opts.lr
    tb = cfg.setdefault("tensorboard", {"enabled": True})
    tb["output_path"] = opts.output
    tb["job_name"] = opts.experiment
    if opts.eval:  # an evaluation logs nothing there: no event file of its own beside the training's
        tb["enabled"] = False
    return cfg


def default_experiment(opts: TrainOptions, ds_config: dict, world_size: int) -> str:
    """``<dataset>-<model>-<ldb|baseline>-z<stage>-ws<world size>``."""
    ldb = (ds_config.get("layer_drop_back") or {}).get("enabled", False)
    stage = (ds_config.get("zero_optimization") or {}).get("stage", 0)
    model = opts.model.replace("tv:", "tv-").replace("/", "-")
    return f"{opts.dataset}-{model}-{'ldb' if ldb else 'baseline'}-z{stage}-ws{world_size}"


def options_table() -> str:
    """The option reference as a Markdown table (docs/training.md embeds it; a test checks)."""
    hints = options.type_hints()
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for f in options.fields():
        m = f.metadata
        kind, choices, _ = options.base_type(hints[f.name])
        names = [options.flag(f.name), *m["flags"], *m["aliases"]]
        spelled = ", ".join(f"`{n}`" for n in names)
        if m["argparse"].get("nargs") == "?":
            arg = m["argparse"].get("metavar", "VALUE")
            spelled = spelled.replace(f"`{options.flag(f.name)}`", f"`{options.flag(f.name)} [{arg}]`")
        if m["default_text"]:
            default = m["default_text"]
        else:
            default = "off" if kind is bool else "" if f.default is None else f"`{f.default}`"
        meaning = m["help"] + (f" ({', '.join(f'`{c}`' for c in choices)})" if choices else "")
        if m["scope"] == "invocation":
            meaning += "; not saved in args.yaml"
        elif m["scope"] == "cli":
            meaning += "; command line only"
        rows.append(f"| {spelled} | {_md(default)} | {_md(meaning)} |")
    return "\n".join(rows)


def _md(text: str) -> str:
    """Text for a Markdown table cell: ``|`` escaped, ``<name>`` not read as an HTML tag."""
    return text.replace("|", "\\|").replace("<", "&lt;")


DOCS_BEGIN = "<!-- options: generated by python -m ldb_ds.train.arguments --update-docs -->"
DOCS_END = "<!-- options end -->"


def update_docs(path: str) -> None:
    """Rewrite the option table between the markers in ``path`` (docs/training.md)."""
    with open(path) as f:
        text = f.read()
    start, end = text.index(DOCS_BEGIN) + len(DOCS_BEGIN), text.index(DOCS_END)
    with open(path, "w") as f:
        f.write(text[:start] + "\n" + options_table() + "\n" + text[end:])


if __name__ == "__main__":  # python -m ldb_ds.train.arguments [--update-docs [docs/training.md]]
    if sys.argv[1:2] == ["--update-docs"]:
        update_docs(sys.argv[2] if len(sys.argv) > 2 else os.path.join("docs", "training.md"))
    else:
        print(options_table())


__all__ = ["TRAIN_SECTION", "RECORD_KEY", "build_parser", "parse_args", "load_yaml", "check_keys",
           "check_finite_numbers", "launched_world_size", "check_ds_config",
           "resolve_ds_config", "default_experiment", "options_table"]
