"""What every measuring mode shares: the process context, timing, the two engines and the conditions.

The process itself joins the run through the core's one bootstrap (:func:`ldb_ds.process.init_process`:
threads, process group, device), exactly as the training app and the tests do.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import os
import platform
import shlex
import socket
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from ..process import Process, init_process, synchronize
from . import report as rep
from .bench_options import BenchOptions

SHARED_NOTE = ("Wall-clock timings on a machine that may have been shared with other jobs; "
               "compare the ratios measured in the same run, not absolute times.")


@dataclass
class BenchContext:
    """The options of this invocation and where this process stands in the run."""

    opts: BenchOptions
    process: Process
    argv: list[str]

    @property
    def rank(self) -> int:
        return self.process.rank

    @property
    def world_size(self) -> int:
        return self.process.world_size

    @property
    def threads(self) -> int:
        return self.process.threads

    @property
    def device(self) -> Any:
        return self.process.device

    @property
    def main(self) -> bool:
        return self.process.is_main

    def log(self, msg: str) -> None:
        if self.main and not self.opts.output.quiet:
            print(f"[bench] {msg}", flush=True)


def setup(opts: BenchOptions, argv: list[str]) -> BenchContext:
    """Join the run (a plain ``python -m ldb_ds.bench`` is world size 1)."""
    return BenchContext(opts, init_process(threads=opts.run.threads, backend=opts.run.backend), argv)


def barrier(ctx: BenchContext) -> None:
    import deepspeed.comm as dist

    if ctx.world_size > 1:
        dist.barrier()


def timed_step(forward_loss: Callable[[], Any], backward: Callable[[Any], Any],
               optimizer_step: Callable[[], Any]) -> tuple[float, float, float]:
    """Seconds of (forward + loss, backward, optimizer step), the device synchronised around each."""
    synchronize()
    t0 = time.perf_counter()
    loss = forward_loss()
    synchronize()
    t1 = time.perf_counter()
    backward(loss)
    synchronize()
    t2 = time.perf_counter()
    optimizer_step()
    synchronize()
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2


# --------------------------------------------------------------------------- configs and models


@contextlib.contextmanager
def drop_steps_at_the_full_batch() -> Iterator[None]:
    """Silence the engine's warning that a DROP epoch got the FULL epoch's micro batch.

    For the measurements that do so on purpose (a DROP step against a FULL one at the same batch:
    ``step``, ``counts``); ``epochs`` trains DROP epochs at their own batch and keeps the warning.
    """
    from ..engine import DropBatchWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DropBatchWarning)
        yield


def ldb_section(opts: BenchOptions, enabled: bool, **override: Any) -> dict[str, Any]:
    """The ``layer_drop_back`` section: LDBConfig's defaults < --ds-config < the command line < ``override``."""
    from ..config import DEFAULTS, load_ds_config

    base = DEFAULTS.to_dict()
    if opts.run.ds_config:
        base.update(load_ds_config(opts.run.ds_config).get("layer_drop_back", {}))
    base.update(opts.ldb)
    base.update(override)
    base["enabled"] = enabled
    return base


def ds_config(opts: BenchOptions, enabled: bool, **ldb_override: Any) -> dict[str, Any]:
    """The DeepSpeed config of one side of the comparison (same everything but LDB on/off)."""
    from ..config import load_ds_config

    run = opts.run
    cfg = copy.deepcopy(load_ds_config(run.ds_config)) if run.ds_config else {
        "gradient_clipping": 0.0,
        "optimizer": {"type": "SGD", "params": {"lr": run.lr, "momentum": run.momentum,
                                                "weight_decay": run.weight_decay}},
        "zero_allow_untested_optimizer": True,
    }
    cfg.pop("train_batch_size", None)  # the per-rank batch is fixed; the global one follows the world size
    cfg["train_micro_batch_size_per_gpu"] = run.batch_size
    cfg["gradient_accumulation_steps"] = 1
    cfg.setdefault("gradient_clipping", 0.0)  # DeepSpeed 0.19.8 clips at 1.0 unless told
    cfg["zero_optimization"] = {**cfg.get("zero_optimization", {}), "stage": run.zero_stage}
    cfg["bf16"] = {"enabled": run.precision == "bf16"}
    cfg["steps_per_print"] = 10**9
    cfg["tensorboard"] = {"enabled": False}  # the benchmark writes its own scalars, outside timed regions
    cfg["wall_clock_breakdown"] = False
    cfg["layer_drop_back"] = ldb_section(opts, enabled, **ldb_override)
    return cfg


def make_model(opts: BenchOptions, num_classes: int | None = None):
    """The model both sides start from (same seed: every copy has the same weights)."""
    import torch

    from ..workloads.models import create_model

    run = opts.run
    torch.manual_seed(run.seed)
    return create_model(run.model, num_classes=num_classes or run.num_classes, img_size=run.img_size, stem=run.stem)


def make_engine(opts: BenchOptions, init_model: Any, enabled: bool, training_data: Any = None,
                **ldb_override: Any) -> tuple[Any, Any]:
    """``(engine, loader)``: ldb_ds over a copy of ``init_model``, LDB on or off."""
    import ldb_ds

    model = copy.deepcopy(init_model)
    if opts.run.precision == "bf16":
        model = model.bfloat16()
    # Persistent workers (as timm's loaders): started once per engine, in the untimed warm-up.
    workers = opts.epochs.loader_workers if training_data is not None else 0
    engine, _, loader, _ = ldb_ds.initialize(model=model, model_parameters=list(model.parameters()),
                                             config=ds_config(opts, enabled, **ldb_override),
                                             training_data=training_data, num_workers=workers,
                                             persistent_workers=workers > 0)
    return engine, loader


def close_engine(side: tuple[Any, Any]) -> None:
    """End an ``(engine, loader)`` of :func:`make_engine`: the loader's workers, then the engine."""
    from ..sampler import shut_down_workers

    engine, loader = side
    shut_down_workers(loader)
    engine.destroy()


# --------------------------------------------------------------------------- conditions


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def command_line(argv: Sequence[str]) -> str:
    """The command of this run (without the ``--local_rank`` a launcher appends)."""
    args = [a for a in argv if not a.startswith(("--local_rank", "--local-rank"))]
    return " ".join(shlex.quote(a) for a in [sys.executable, "-m", "ldb_ds.bench", *args])


def conditions(ctx: BenchContext, mode: str, engine: Any = None, model: Any = None) -> dict[str, Any]:
    """Machine, device, world size, model, batch, precision, ZeRO stage, LDB settings, versions, command."""
    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator

    import ldb_ds

    run = ctx.opts.run
    accel = get_accelerator().device_name()
    if accel == "cuda" and torch.cuda.is_available():
        device = f"{torch.cuda.get_device_name(0)} (cuda)"
    else:
        device = accel.upper()
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
    ldb = ldb_section(ctx.opts, True)
    if engine is not None and getattr(engine, "ldb", None) is not None and engine.ldb.enabled:
        ldb = engine.ldb.config.to_dict()
    params = sum(p.numel() for p in model.parameters()) if model is not None else 0
    return {
        "mode": mode, "device": device, "accelerator": accel, "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(), "threads_per_rank": ctx.threads, "hostname": socket.gethostname(),
        "platform": platform.platform(), "backend": backend, "world_size": ctx.world_size,
        "model": run.model, "stem": run.stem, "img_size": run.img_size, "params_m": params / 1e6,
        "micro_batch_per_rank": run.batch_size, "global_batch_full": run.batch_size * ctx.world_size,
        "precision": run.precision, "zero_stage": run.zero_stage, "optimizer":
            f"SGD(lr={run.lr}, momentum={run.momentum}, weight_decay={run.weight_decay})"
            if not run.ds_config else f"from {run.ds_config}",
        "ldb": ldb, "timing": "wall clock (time.perf_counter), accelerator synchronised, warm-up excluded",
        "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "ldb_ds": ldb_ds.__version__,
                     "python": platform.python_version()},
        "timestamp": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": command_line(ctx.argv),
    }


def result(ctx: BenchContext, mode: str, results: dict[str, Any], engine: Any = None, model: Any = None,
           notes: Sequence[str] = (), timed: bool = True) -> dict[str, Any]:
    """One result object (schema :data:`report.SCHEMA`): conditions, the mode's figures and notes
    (``timed=False``: counts, which a shared machine does not disturb)."""
    cond = conditions(ctx, mode, engine, model)
    all_notes = list(notes)
    if cond["accelerator"] == "cpu" and timed:
        all_notes.append(SHARED_NOTE)
    all_notes += ctx.opts.output.note
    return {"schema": rep.SCHEMA, "mode": mode, "conditions": cond, "results": results, "notes": all_notes}


__all__ = ["SHARED_NOTE", "BenchContext", "setup", "barrier", "timed_step", "drop_steps_at_the_full_batch",
           "ldb_section", "ds_config", "make_model", "make_engine", "close_engine", "conditions", "result", "cpu_model", "command_line"]
