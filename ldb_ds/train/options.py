"""The training application's options: one typed field each, defined once.

:class:`TrainOptions` is the single source of every option's name, type, default, help text and
allowed values. The command-line parser (:mod:`ldb_ds.train.arguments`), the DeepSpeed JSON's ``train``
section, ``-c`` YAML files, ``args.yaml`` and the option table in ``docs/training.md`` are all
generated from these fields, so a new option is one new field here.

Names follow timm's ``train.py`` where the two scripts have the same option (``-b/--batch-size``,
``-j/--workers``, ``-vb/--validation-batch-size``, ``--log-interval``, ``--dataset-download``,
``--warmup-lr``); this script's earlier names stay accepted as aliases, on the command line
(``--log-every``) and as keys in files (``log_every``).

Pure Python: nothing here imports torch, so ``--help`` and option errors are instant.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, get_args, get_origin

Dataset = Literal["digits", "cifar10", "cifar100", "imagefolder", "synthetic"]
Stem = Literal["auto", "cifar", "original"]
Sched = Literal["none", "cosine"]
DistBN = Literal["reduce", "broadcast", "none"]
Scope = Literal["run", "invocation", "cli"]
NonFinite = Literal["stop", "skip"]
WorkerStart = Literal["forkserver", "spawn", "fork"]

GROUPS = ("DeepSpeed", "model", "data", "training", "evaluation", "output", "reliability")


class OptionsError(ValueError):
    """A bad option value: the message names the option, the value and what is allowed."""


def _opt(group: str, default: Any, help: str, *, flags: tuple[str, ...] = (),
         aliases: tuple[str, ...] = (), scope: Scope = "run", minimum: float | None = None,
         maximum: float | None = None, default_text: str | None = None, **argparse_kwargs: Any) -> Any:
    """A field with what the parser and the docs need.

    ``flags``: extra spellings on the command line only (``-b``); ``aliases``: earlier long
    names, accepted on the command line and, with underscores, as keys in files. ``scope``:
    ``run`` options describe the experiment and are saved in ``args.yaml`` (so ``-c`` replays
    them); ``invocation`` options say what this start does (``--resume``, ``--overwrite``) and
    are not saved; ``cli`` options come from the launcher or the command line only.
    """
    if group not in GROUPS:
        raise ValueError(f"unknown option group {group!r}")
    meta = dict(group=group, help=help, flags=flags, aliases=aliases, scope=scope,
                minimum=minimum, maximum=maximum, default_text=default_text, argparse=argparse_kwargs)
    return field(default=default, metadata=meta)


_ds = functools.partial(_opt, "DeepSpeed")
_model = functools.partial(_opt, "model")
_data = functools.partial(_opt, "data")
_train = functools.partial(_opt, "training")
_eval = functools.partial(_opt, "evaluation")
_out = functools.partial(_opt, "output")
_rel = functools.partial(_opt, "reliability")


@dataclass
class TrainOptions:
    """Every option of ``ldb-train`` (``python -m ldb_ds.train``, ``launch/train.py``)."""

    # -- DeepSpeed ---------------------------------------------------------------------------
    deepspeed_config: Optional[str] = _ds(
        None, "DeepSpeed JSON, with the layer_drop_back and train sections (required: on the "
        "command line or in the -c file)", flags=("--deepspeed-config",), default_text="required")
    config: Optional[str] = _ds(
        None, "YAML file of option values, e.g. the args.yaml of an earlier run (timm's -c); "
        "the command line overrides it, it overrides the JSON's train section",
        flags=("-c",), scope="cli", metavar="FILE")
    local_rank: Optional[int] = _ds(
        None, "set by the deepspeed launcher; the LOCAL_RANK variable is what is used",
        flags=("--local-rank",), scope="cli")
    deepspeed: bool = _ds(False, "accepted for compatibility with DeepSpeed's own argument; "
                          "ignored", scope="cli")

    # -- model -------------------------------------------------------------------------------
    model: str = _model("mobilenetv2_050", "timm model name, or tv:<name> for a torchvision model")
    pretrained: bool = _model(False, "load the library's pretrained weights (timm: the Hugging "
                              "Face hub cache; torchvision: the torch hub cache)")
    pretrained_path: Optional[str] = _model(None, "timm: a local weights file to load instead "
                                            "of the hub")
    stem: Stem = _model("auto", "small-input stem adaptation: auto (when the image size is at "
                        "most 64), cifar (always) or original (never)")
    num_classes: Optional[int] = _model(None, "classifier size", minimum=1,
                                        default_text="dataset's")
    drop_path: Optional[float] = _model(None, "timm drop_path_rate", minimum=0.0, maximum=1.0,
                                        default_text="model's")
    grad_checkpointing: bool = _model(False, "timm: recompute each block's activations in the backward "
                                      "(timm's non-reentrant checkpointing, exact with LDB): less memory "
                                      "for the DROP epochs' larger micro batch, about one more forward "
                                      "of compute")

    # -- data --------------------------------------------------------------------------------
    dataset: Dataset = _data("digits", "dataset (see docs/training.md, Datasets)")
    data_dir: Optional[str] = _data(None, "dataset root (cifar10, cifar100, imagefolder); refused with digits and "
                                    "synthetic, which are bundled or generated and would ignore it")
    dataset_download: bool = _data(False, "let torchvision download CIFAR (rank 0 downloads, "
                                   "the others wait)", aliases=("--download",))
    no_verify_data: bool = _data(False, "skip torchvision's MD5 check of the CIFAR files (for "
                                 "folders you wrote yourself)")
    img_size: Optional[int] = _data(None, "input size (32 for digits, CIFAR and synthetic; 224 "
                                    "for imagefolder)", minimum=8, default_text="dataset's")
    no_aug: bool = _data(False, "no training augmentation")
    workers: int = _data(0, "data loader worker processes per rank", flags=("-j",), minimum=0)
    worker_start_method: WorkerStart = _data(
        "forkserver", "how data loader workers start (Python's multiprocessing start methods). "
        "forkserver (Python 3.14's default on Linux): forked from a clean helper process, since a "
        "rank forked with its gloo/NCCL and watchdog threads running can deadlock in the worker; "
        "spawn: a fresh interpreter each; fork: copies the rank (no pickling of an in-memory "
        "dataset, the rare deadlock risk). Workers persist across epochs either way")
    synthetic_size: int = _data(10_000, "synthetic train images (test: a fifth)", minimum=1)
    skip_bad_images: bool = _data(False, "skip ImageFolder images that cannot be decoded (each named in a "
                                  "warning; counted in results.json and TensorBoard) instead of stopping "
                                  "with an error naming the file")

    # -- training ----------------------------------------------------------------------------
    epochs: int = _train(10, "epochs (the LR schedule spans them)", minimum=1)
    batch_size: Optional[int] = _train(
        None, "micro batch per rank; overrides train_micro_batch_size_per_gpu and drops "
        "train_batch_size from the config", flags=("-b",), minimum=1, default_text="config's")
    lr: Optional[float] = _train(None, "overrides optimizer.params.lr", minimum=0.0,
                                 default_text="config's")
    sched: Optional[Sched] = _train(
        None, "epoch-wise LR schedule (timm's CosineLRScheduler): cosine (to --min-lr over "
        "--epochs, after --warmup-epochs of linear warm-up) or none. A DeepSpeed 'scheduler' "
        "section in the config owns the LR instead: then the default is none and cosine an error",
        default_text="cosine")
    min_lr: float = _train(0.0, "LR at the end of the cosine schedule", minimum=0.0)
    warmup_epochs: int = _train(0, "epochs of linear LR warm-up before the cosine", minimum=0)
    warmup_lr: Optional[float] = _train(
        None, "LR of the first warm-up epoch; the LR then rises linearly to the base LR",
        minimum=0.0, default_text="base LR / (warmup epochs + 1)")
    seed: int = _train(42, "initial weights and the per-epoch data RNG (LDB masks have their own "
                       "layer_drop_back.seed)", minimum=0)
    max_steps_per_epoch: int = _train(0, "cap on optimizer steps per epoch, for smoke tests "
                                      "(0: the whole epoch)", minimum=0)
    threads: Optional[int] = _train(
        None, "torch CPU threads per rank (the deepspeed launcher does not set OMP_NUM_THREADS)",
        minimum=1, default_text="OMP_NUM_THREADS, else cores / local ranks")

    # -- evaluation --------------------------------------------------------------------------
    dist_bn: DistBN = _eval(
        "reduce", "before each evaluation and checkpoint, make BatchNorm running statistics "
        "equal on all ranks (timm's distribute_bn): average them (reduce), copy rank 0's "
        "(broadcast) or leave them (none)")
    eval_every: int = _eval(1, "evaluate every N epochs (always after the last; 0: only then)",
                            minimum=0)
    eval: bool = _eval(False, "only evaluate (with --resume: the checkpoint) and exit; writes nothing into "
                       "the run directory (no args.yaml, ds_config.json, status.json or TensorBoard file) but "
                       "the holder line of its lock marker, .ldb_ds_run",
                       scope="invocation")
    validation_batch_size: Optional[int] = _eval(
        None, "evaluation batch per rank", flags=("-vb",), aliases=("--eval-batch-size",),
        minimum=1, default_text="2 x micro batch")

    # -- output ------------------------------------------------------------------------------
    output: str = _out("runs", "log root (TensorBoard's output_path)")
    experiment: Optional[str] = _out(
        None, "run name under --output (TensorBoard's job_name): one path component (no '/', not '.' "
        "or '..'); the run directory is <output>/<experiment>",
        default_text="<dataset>-<model>-<ldb|baseline>-z<stage>-ws<N>")
    overwrite: bool = _out(False, "delete an existing run directory first, only if ldb-train created it (it "
                           "holds the .ldb_ds_run marker) and it lies directly in --output; without "
                           "--overwrite an existing non-empty run directory is an error unless --resume",
                           scope="invocation")
    ckpt_every: int = _out(1, "save a checkpoint every N epochs and after the last (0: never)",
                           minimum=0)
    ckpt_every_steps: int = _out(0, "also save a checkpoint every N optimizer steps, in the middle of an "
                                 "epoch too (0: never); a resume continues at that step", minimum=0)
    checkpoint_hist: int = _out(0, "keep only the last N checkpoints, plus the best (highest eval top-1) "
                                "and the one 'latest' names (0: keep all)", minimum=0)
    resume: Optional[str] = _out(
        None, "auto: resume from the newest valid checkpoint of this run, or start afresh if there is "
        "none (the same command can be requeued forever); a tag of this run (epoch3, step120); a tag "
        "directory; or a checkpoint directory. A tag that fails its manifest is an error naming the "
        "file; auto falls back to the previous valid tag. An existing run directory must be "
        "ldb-train's (it holds the .ldb_ds_run marker): a folder a person made is refused, since its "
        "files would be overwritten, and with --eval too (ldb-train's checkpoints are in folders it made)",
        scope="invocation", nargs="?",
        const="auto", metavar="auto|TAG|DIR")
    stop_after_epoch: Optional[int] = _out(
        None, "end the run after this epoch, as if interrupted (the schedule still spans --epochs; "
        "status.json says completed, its message that the run stopped early; --resume auto continues)",
        scope="invocation", minimum=0)
    log_interval: int = _out(10, "TensorBoard step events every N steps (averaged over them)",
                             aliases=("--log-every",), minimum=1)
    log_masks: bool = _out(False, "append every step's dropped unit indices to masks.jsonl in "
                           "the run directory")
    no_progress: bool = _out(False, "no tqdm progress bar")
    no_sync_timing: bool = _out(False, "do not synchronise the device around the timed phases")

    # -- reliability -------------------------------------------------------------------------
    preempt_signals: str = _rel(
        "SIGTERM,SIGUSR1", "signals that stop the run after the current optimizer step with a checkpoint "
        "and exit code 75 (comma-separated; none: off). See docs/reliability.md for what each launcher "
        "delivers")
    stop_check_every: int = _rel(1, "agree on a stop request every N optimizer steps (one all-reduce of an "
                                 "integer over a gloo side group: no device synchronisation)", minimum=1)
    dist_timeout: float = _rel(
        600.0, "collective timeout in seconds; a rank that makes no progress for most of it is named by "
        "the watchdog and the job exits with code 4 within it (the process group itself, whose start-up "
        "rendezvous shares its timeout, gets at least 300 s)", minimum=5.0)
    on_nonfinite: NonFinite = _rel(
        "stop", "a step whose gradient norm is not finite (every ZeRO stage skips it): stop (exit code 3, "
        "nothing saved after the last good checkpoint) or skip it and go on")
    max_consecutive_skips: int = _rel(
        10, "stop (exit code 3) after this many skipped optimizer steps in a row, fp16 loss-scaler "
        "overflows included (0: never)", minimum=0)
    verify_every: int = _rel(0, "every N optimizer steps, all-gather hashes of the LDB mask and of each rank's "
                             "parameters and stop (exit code 5) naming the ranks that differ (0: never)",
                             minimum=0)
    no_memory_check: bool = _rel(False, "skip the forward and backward at the DROP micro batch run before "
                                 "training (it finds an out-of-memory in the first minute, not at the "
                                 "first DROP epoch)")

    def __post_init__(self) -> None:
        hints = type_hints()
        for f in dataclasses.fields(self):
            _check(f, getattr(self, f.name), hints[f.name])
        check_run_name(self.experiment)
        if self.data_dir is not None and self.dataset in ("digits", "synthetic"):
            # Refused, not ignored: a user who names a folder expects it to be read (issue 18).
            raise OptionsError(f"--data-dir (data_dir) = {self.data_dir!r} is not used by --dataset {self.dataset} "
                               "(bundled or generated data); drop --data-dir, or choose cifar10, cifar100 or "
                               "imagefolder")
        if not self.output:
            raise OptionsError("--output (output) must not be empty: give a directory, e.g. runs")
        if "\0" in self.output:
            raise OptionsError(f"--output (output) = {self.output!r} contains a NUL character")
        from .faults import parse_signals  # pure Python, like this module

        try:
            parse_signals(self.preempt_signals)
        except ValueError as err:
            raise OptionsError(f"--preempt-signals (preempt_signals) = {self.preempt_signals!r}: {err}") from None

    def to_dict(self, scope: tuple[str, ...] = ("run", "invocation", "cli")) -> dict[str, Any]:
        """Option values by name, limited to the given scopes (``("run",)``: what args.yaml holds)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.metadata["scope"] in scope}


@functools.lru_cache(maxsize=None)
def type_hints() -> dict[str, Any]:
    """The fields' types, resolved (the module uses postponed annotations)."""
    return typing.get_type_hints(TrainOptions)


def fields() -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(TrainOptions)


def base_type(hint: Any) -> tuple[type, tuple[str, ...] | None, bool]:
    """``(python type, Literal choices or None, optional)`` of a field's type."""
    optional = False
    if get_origin(hint) is typing.Union:
        args = [a for a in get_args(hint) if a is not type(None)]
        optional = len(args) < len(get_args(hint))
        (hint,) = args
    if get_origin(hint) is Literal:
        return str, tuple(get_args(hint)), optional
    return hint, None, optional


def flag(name: str) -> str:
    """The long command-line flag of an option (``batch_size`` -> ``--batch-size``).

    ``deepspeed_config`` and ``local_rank`` keep the underscore spelling DeepSpeed's own
    launcher and argument helpers use (the dash spelling is an extra flag).
    """
    return f"--{name}" if name in ("deepspeed_config", "local_rank") else "--" + name.replace("_", "-")


def key_aliases() -> dict[str, str]:
    """File keys accepted for an option besides its name (``log_every`` -> ``log_interval``)."""
    return {a.lstrip("-").replace("-", "_"): f.name for f in fields() for a in f.metadata["aliases"]}


def check_value(name: str, value: Any) -> None:
    """Raise :class:`OptionsError` unless ``value`` is allowed for option ``name``."""
    f = next(f for f in fields() if f.name == name)
    _check(f, value, type_hints()[name])


def check_run_name(name: str | None) -> None:
    """Refuse a run name that is not exactly one path component (``None``: the default name).

    The name is joined to ``--output`` and ``--overwrite`` deletes the result: ``..``, ``.``, a
    separator or an absolute path would point the deletion outside ``--output`` (issue 18).
    """
    if name is None:
        return
    where = "--experiment (experiment)"
    seps = [s for s in ("/", os.sep, os.altsep) if s]
    if not isinstance(name, str) or name in ("", ".", "..") or "\0" in name or any(s in name for s in seps) \
            or os.path.isabs(name):
        raise OptionsError(f"{where} = {name!r} is not allowed: a run name is one folder name under --output "
                           "(no '/', not '.', '..' or empty); put the parent folder in --output")


def _check(f: dataclasses.Field, value: Any, hint: Any) -> None:
    kind, choices, optional = base_type(hint)
    where = f"{flag(f.name)} ({f.name})"
    if value is None:
        if optional:
            return
        raise OptionsError(f"{where} must be set")
    # bool is a subclass of int: a YAML/JSON true must not pass as a number.
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise OptionsError(f"{where} = {value!r} is not allowed: expected a value of type "
                           f"{kind.__name__}")
    if choices is not None and value not in choices:
        raise OptionsError(f"{where} = {value!r} is not allowed: expected one of "
                           + ", ".join(choices))
    # NaN fails every comparison, so a `value < minimum` check lets it through: test it first.
    if kind is float and not math.isfinite(value):
        raise OptionsError(f"{where} = {value!r} is not allowed: expected a finite number")
    minimum, maximum = f.metadata["minimum"], f.metadata["maximum"]
    if minimum is not None and value < minimum:
        raise OptionsError(f"{where} = {value!r} is not allowed: expected a value >= {minimum}")
    if maximum is not None and value > maximum:
        raise OptionsError(f"{where} = {value!r} is not allowed: expected a value <= {maximum}")


__all__ = ["TrainOptions", "OptionsError", "Dataset", "Stem", "Sched", "DistBN", "NonFinite", "GROUPS",
           "fields", "type_hints", "base_type", "flag", "key_aliases", "check_value", "check_run_name"]
