"""The run directory ``<output>/<experiment>/`` and the files the application writes into it.

=====================  ========================================================================
``events.out.tfevents.*``  DeepSpeed's TensorBoard file (written by DeepSpeed's monitor)
``args.yaml``          the options of the run (replay with ``-c``) and, under ``run:``, what
                       the run found out: world size, ZeRO stage, batch sizes, LDB settings,
                       library versions (a record; ``-c`` skips it)
``ds_config.json``     the config actually handed to DeepSpeed
``summary.csv``        one row per epoch, written with timm's ``update_summary``
``results.json``       per-epoch figures and the final accuracy (``launch/sweep.py`` reads it)
``checkpoints/<tag>/`` DeepSpeed checkpoints with a manifest (:mod:`ldb_ds.train.checkpoint`)
``masks.jsonl``        every step's dropped units, with ``--log-masks``
``status.json``        how the run ended (or ``running``): what requeue scripts read, since
                       the ``deepspeed`` launcher does not pass on the exit code
=====================  ========================================================================

Only rank 0 writes files; :meth:`RunDir.prepare` is collective so all ranks agree on whether the
run may start.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

from .cli import RECORD_KEY
from .console import log
from .options import TrainOptions


class RunDir:
    """Paths of one run and the writers of its files (call the writers on rank 0 only)."""

    def __init__(self, output: str, experiment: str) -> None:
        self.output = output
        self.experiment = experiment
        self.path = os.path.join(output, experiment)
        self.checkpoints = os.path.join(self.path, "checkpoints")
        self.args_yaml = os.path.join(self.path, "args.yaml")
        self.ds_config_json = os.path.join(self.path, "ds_config.json")
        self.summary_csv = os.path.join(self.path, "summary.csv")
        self.results_json = os.path.join(self.path, "results.json")
        self.masks_jsonl = os.path.join(self.path, "masks.jsonl")
        self.status_json = os.path.join(self.path, "status.json")

    def prepare(self, *, overwrite: bool, continuing: bool, is_main: bool, device: Any) -> bool:
        """Create, replace or refuse the directory; ``False`` (on every rank) when refused.

        ``continuing`` (``--resume``/``--eval``) uses an existing directory as it is. Otherwise
        an existing non-empty directory is replaced with ``overwrite`` and refused without it:
        a new run never mixes its files with an old one's. A collective: rank 0 decides and
        broadcasts the verdict, so every rank returns the same answer and they exit together.
        """
        import deepspeed.comm as dist
        import torch

        refused = torch.zeros(1, dtype=torch.int32, device=device)
        if is_main and not continuing and os.path.isdir(self.path) and os.listdir(self.path):
            if overwrite:
                shutil.rmtree(self.path)
            else:
                log(f"error: the run directory {self.path} exists; pass --resume to continue "
                    "it, --overwrite to replace it, or --experiment NAME")
                refused += 1
        dist.broadcast(refused, src=0)
        if int(refused.item()):
            return False
        if is_main:
            os.makedirs(self.path, exist_ok=True)
        return True

    def write_args(self, opts: TrainOptions, record: dict[str, Any]) -> None:
        """``args.yaml``: the run's options (what ``-c`` replays), then the ``run:`` record.

        Options that describe this start rather than the experiment (``--resume``,
        ``--overwrite``, ``--eval``, ``--stop-after-epoch``, the launcher's ``--local_rank``)
        are left out, so a replay never deletes or cuts short a run by surprise.
        """
        import yaml

        data = {**opts.to_dict(scope=("run",)), RECORD_KEY: record}
        # Through JSON first: plain types only (torch.__version__ is a str subclass yaml refuses).
        data = json.loads(json.dumps(data, default=str))
        with open(self.args_yaml, "w") as f:
            yaml.safe_dump(data, f, sort_keys=False)

    def write_ds_config(self, ds_config: dict) -> None:
        with open(self.ds_config_json, "w") as f:
            json.dump(ds_config, f, indent=2)

    def trim_summary(self, start_epoch: int) -> None:
        """Drop ``summary.csv`` rows of epochs a resumed run is about to train again."""
        from timm.utils.summary import trim_summary

        trim_summary(self.summary_csv, start_epoch)

    def append_summary(self, epoch: int, train: dict[str, Any], evaluation: dict[str, Any],
                       lr: float) -> None:
        """One ``summary.csv`` row (timm's layout: epoch, train_*, eval_*, lr).

        ``evaluation`` must have the same keys every epoch (``None`` where an epoch was not
        evaluated): the header is written once, from the first row.
        """
        from timm.utils import update_summary

        new = not os.path.exists(self.summary_csv) or os.path.getsize(self.summary_csv) == 0
        update_summary(epoch, train, evaluation, self.summary_csv, lr=lr, write_header=new)

    def write_results(self, results: dict[str, Any]) -> None:
        with open(self.results_json, "w") as f:
            json.dump(results, f, indent=2)

    def write_status(self, status: str, exit_code: int | None = None, message: str = "",
                     **extra: Any) -> None:
        """``status.json``, replaced atomically: ``running``, ``completed``, ``preempted`` or ``failed``.

        A requeue script requeues on ``preempted`` (and on ``running`` left by a job that was
        killed outright); ``failed`` needs a person.
        """
        import time

        data = {"status": status, "exit_code": exit_code, "message": message, "time": time.time(), **extra}
        tmp = f"{self.status_json}.tmp{os.getpid()}"
        os.makedirs(self.path, exist_ok=True)
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.status_json)

    def trim_masks(self, epoch: int, step: int) -> None:
        """Drop ``masks.jsonl`` lines after micro step ``step`` of ``epoch`` (a resume trains them again)."""
        if not os.path.isfile(self.masks_jsonl):
            return
        with open(self.masks_jsonl) as f:
            lines = f.readlines()
        keep = [line for line in lines if (lambda r: (r["epoch"], r["step"]) <= (epoch, step))(json.loads(line))]
        if len(keep) != len(lines):
            with open(self.masks_jsonl, "w") as f:
                f.writelines(keep)


__all__ = ["RunDir"]
