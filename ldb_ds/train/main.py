#!/usr/bin/env python
"""Train an image classifier with DeepSpeed and LayerDropBack (ldb_ds): the wiring.

Start it with any launcher (DS_ACCELERATOR=cpu on a machine without a GPU)::

    deepspeed --num_gpus 2 launch/train.py --deepspeed_config ds_configs/zero2_ldb.json
    torchrun --nproc_per_node 2 launch/train.py --deepspeed_config ds_configs/zero2_ldb.json
    mpirun -np 2 python launch/train.py --deepspeed_config ds_configs/zero2_ldb.json
    deepspeed --num_gpus 2 --module ldb_ds.train --deepspeed_config ds_configs/zero2_ldb.json
    ldb-train --deepspeed_config ds_configs/zero2_ldb.json                 # one process
    ldb-train -c runs/<experiment>/args.yaml --experiment again            # replay a run

The pieces: options (:mod:`.options`, :mod:`.arguments`), the run directory (:mod:`.rundir`),
checkpoints (:mod:`.checkpoint`), the loop (:mod:`.loop`), TensorBoard figures
(:mod:`.monitor`), the data wrappers (:mod:`.data`); datasets, models and the evaluation come
from :mod:`ldb_ds.workloads`. See docs/training.md.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
import time
import warnings
from typing import Any, Callable, NoReturn

from .arguments import default_experiment, parse_args, resolve_ds_config
from .console import error, log
from .options import TrainOptions


def main(argv: list[str] | None = None) -> int:
    opts, ds_config_in = parse_args(argv)

    from ldb_ds.config import LDBConfig, LDBConfigError
    from ldb_ds.workloads.data import DatasetError, build_datasets
    from ldb_ds.workloads.models import ModelError, check_grad_checkpointing, check_model_name

    def make_data(download: bool):
        return build_datasets(opts.dataset, opts.data_dir, img_size=opts.img_size,
                              augment=not opts.no_aug, download=download,
                              verify=not opts.no_verify_data,
                              synthetic_train_size=opts.synthetic_size,
                              synthetic_test_size=max(opts.synthetic_size // 5, 1),
                              synthetic_num_classes=opts.num_classes or 10, seed=opts.seed)

    # Checked before any process group exists: every rank checks the same names and builds the
    # same dataset, so a bad name or a missing dataset fails on every rank alike, with a clear
    # message, before DeepSpeed starts (and nobody waits for a rank that has left).
    from ldb_ds.train.rundir import check_output

    try:
        ldb_config = LDBConfig.from_ds_config(ds_config_in)  # a bad layer_drop_back section fails here
        check_model_name(opts.model)
        if opts.grad_checkpointing:
            check_grad_checkpointing(opts.model, ldb_enabled=ldb_config.enabled)
        problem = check_output(opts.output)  # a file or a read-only folder as --output
        if problem:
            raise DatasetError(problem)
        data = None if opts.dataset_download else make_data(False)
    except (DatasetError, ModelError, LDBConfigError) as err:
        error(str(err))
        return 2
    return _train(opts, ds_config_in, data, make_data)


def _train(opts: TrainOptions, ds_config_in: dict, data, make_data) -> int:
    import deepspeed  # slow to import: only once the options are known to be good
    import torch
    from torch.utils.data import DataLoader

    import ldb_ds
    from ldb_ds import checkpointing
    from ldb_ds.config import LDBConfig
    from ldb_ds.process import init_process, input_dtype
    from ldb_ds.runtime_checks import weights_digest
    from ldb_ds.train import checkpoint, faults
    from ldb_ds.train.data import SeededDataset, SkipBadImages, collate_skipping
    from ldb_ds.train.loop import TrainContext, create_lr_scheduler, fit
    from ldb_ds.train.monitor import TrainMonitor
    from ldb_ds.train import rundir as run_files
    from ldb_ds.train.rundir import RunDir
    from ldb_ds.train.step_checks import StepChecks, drop_precheck
    from ldb_ds.workloads.data import ShardedEval
    from ldb_ds.workloads.evaluation import validate
    from ldb_ds.workloads.models import ModelError, create_model

    proc = init_process(threads=opts.threads, timeout_s=opts.dist_timeout)
    end = _RunEnd(proc.rank, proc.is_main)
    # DeepSpeed 0.19.8's ZeRO calls a torch collective that torch marks deprecated; the warning
    # is about DeepSpeed's code, not ours, and would repeat on every rank.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated",
                            category=FutureWarning)
    if not proc.is_main:  # other ranks stay quiet: DeepSpeed's INFO lines come from rank 0 only
        import logging

        from deepspeed.utils import logger as ds_logger
        ds_logger.setLevel(logging.WARNING)
    signals = faults.parse_signals(opts.preempt_signals)
    # Before the stop handlers: a forkserver must start while the stop signals are ignored.
    worker_start = faults.worker_context(opts.worker_start_method, signals) if opts.workers else None
    stop_signal = faults.StopSignal(signals)  # from now on a preemption signal is a request, not death

    opts.experiment = opts.experiment or default_experiment(opts, ds_config_in, proc.world_size)
    run = RunDir(opts.output, opts.experiment)
    problem = checkpoint.resume_target_problem(opts.resume, run.checkpoints)  # before the folder is touched
    if problem:
        return end(faults.EXIT_USAGE, problem)
    if not run.prepare(overwrite=opts.overwrite, continuing=bool(opts.resume or opts.eval),
                       is_main=proc.is_main, device=proc.device):
        return end(faults.EXIT_USAGE)  # prepare() printed why
    end.run = run
    end.evaluation_only = bool(opts.eval)
    ds_config = resolve_ds_config(ds_config_in, opts)
    if "gradient_clipping" not in ds_config:
        # DeepSpeed 0.19.8 clips at 1.0 unless told otherwise; say so instead of hiding it.
        log("note: the config does not set gradient_clipping; DeepSpeed 0.19.8 then clips at 1.0")
    if data is None:  # --dataset-download: one rank downloads, the others wait and read
        data, failure = None, ""
        if proc.is_main:
            try:
                data = make_data(True)
            except Exception as err:  # offline, a proxy, a full disk: reported below, once
                failure = _download_failure(err)
        # Instead of a barrier: rank 0 tells the others whether the download worked, so a
        # failed download ends every rank with rank 0's one line (no rank left waiting on a peer).
        if not _agree_ok(not failure, None, device=proc.device):
            return end(faults.EXIT_USAGE, failure or "the dataset download failed on rank 0")
        data = data or make_data(False)
    # Host-side agreement (manifests, stop flags, hashes) on gloo groups of their own: no device
    # sync, and the watchdog's group is used by its thread only.
    control = faults.gloo_group(faults.side_group_timeout(opts.dist_timeout)) if proc.world_size > 1 else None
    watch_group = faults.gloo_group(faults.watchdog_timing(opts.dist_timeout)[1] + 5.0) \
        if proc.world_size > 1 else None
    # The per-batch load agreement runs asynchronously beside the step's hooks: a group of its own.
    data_group = faults.gloo_group(faults.side_group_timeout(opts.dist_timeout)) if proc.world_size > 1 else None

    num_classes = opts.num_classes or data.num_classes
    torch.manual_seed(opts.seed)  # same initial weights on every rank
    extra = {} if opts.drop_path is None else {"drop_path_rate": opts.drop_path}
    try:
        model = create_model(opts.model, num_classes=num_classes, img_size=data.img_size,
                             pretrained=opts.pretrained, pretrained_path=opts.pretrained_path,
                             stem=opts.stem, grad_checkpointing=opts.grad_checkpointing, **extra)
    except ModelError as err:  # the same model on every rank: every rank fails here alike
        return end(faults.EXIT_USAGE, str(err), record_status=True)
    log(data.describe())
    log(f"model {opts.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M "
        f"parameters, {num_classes} classes, world size {proc.world_size}, "
        f"{proc.threads} thread(s)/rank")

    # The checkpoint to resume from is verified and compared with this run before the engine
    # exists: another world size at ZeRO 1-3 needs DeepSpeed's universal loader, a config key.
    current = checkpointing.describe_run(
        model, world_size=proc.world_size, zero_stage=(ds_config.get("zero_optimization") or {}).get("stage", 0),
        optimizer=(ds_config.get("optimizer") or {}).get("type"), ldb=LDBConfig.from_ds_config(ds_config).to_dict())
    try:
        resume = checkpoint.choose_resume(opts, run.checkpoints, current, group=control, warn=log)
    except checkpoint.CheckpointError as err:  # every rank: the same line, in bounded time
        return end(faults.EXIT_USAGE, str(err), every_rank=True, record_status=True)
    if resume is not None and resume.universal:
        ds_config.setdefault("checkpoint", {})["load_universal"] = True

    train_set = SeededDataset(SkipBadImages(data.train) if opts.skip_bad_images else data.train, opts.seed)
    test_set = SkipBadImages(data.test) if opts.skip_bad_images else data.test
    collate = collate_skipping if opts.skip_bad_images else None
    try:
        # Persistent workers (as timm's loaders): started, and sent the dataset, once per run.
        engine, _, train_loader, _ = ldb_ds.initialize(
            model=model, model_parameters=list(model.parameters()), training_data=train_set,
            config=ds_config, num_workers=opts.workers, collate_fn=collate,
            persistent_workers=opts.workers > 0, multiprocessing_context=worker_start)
    except _config_errors() as err:
        # The same config and model on every rank: every rank fails here alike, before any
        # collective of the engine, so each leaves on its own and only rank 0 prints.
        message = _first_line(err)
        return end(faults.EXIT_USAGE, f"the DeepSpeed config {opts.deepspeed_config} was refused for this model: "
                   f"{message}", record_status=True, status_message=message)
    end.engine = engine
    # The app's non-finite policy (--on-nonfinite) is the same at every stage and with LDB on or
    # off: ldb_ds installs the stage-0 fp32 skip only with LDB on (off, the library costs what
    # DeepSpeed costs), so the app installs it itself (a no-op where it is installed or not needed).
    from ldb_ds import zero_hooks

    zero_hooks.install_nonfinite_skip(engine.ds_engine, engine.patches)  # removed with the engine's other patches
    ldb = engine.ldb
    log(f"LDB {'enabled' if ldb.enabled else 'disabled'}: {len(ldb.units)} units"
        + (f", {ldb.config}" if ldb.enabled else ""))
    eval_bs = opts.validation_batch_size or 2 * engine.train_micro_batch_size_per_gpu()
    eval_loader = DataLoader(ShardedEval(test_set, proc.rank, proc.world_size), batch_size=eval_bs,
                             shuffle=False, num_workers=opts.workers, collate_fn=collate,
                             multiprocessing_context=worker_start, persistent_workers=opts.workers > 0)
    if opts.workers:  # SLURM and the launchers signal whole process trees; the rank decides
        train_loader.worker_init_fn = eval_loader.worker_init_fn = faults.ignore_signals_in_worker(signals)
        end.loaders = [train_loader, eval_loader]  # their persistent workers end with the run
    # Before resuming: the scheduler takes the base LRs from the config (see loop.py).
    scheduler = create_lr_scheduler(opts, engine.optimizer)

    state = checkpoint.TrainState()
    if resume is not None:
        try:
            state = checkpoint.load(engine, resume, rank=proc.rank, world_size=proc.world_size,
                                    group=control, timeout_s=0.8 * opts.dist_timeout)
        except checkpoint.CheckpointError as err:  # every rank: to_universal's outcome is gathered
            return end(faults.EXIT_USAGE, str(err), every_rank=True, record_status=True)
        for note in resume.notes:
            log(f"note: {note}")
        at = f"epoch {state.next_epoch}" + (f", micro step {state.step_in_epoch}" if state.step_in_epoch else "")
        log(f"resumed from {resume.where} (verified against its manifest): continuing at {at}")
    elif opts.resume == "auto":
        log(f"--resume auto: no checkpoint in {run.checkpoints} yet, starting afresh")

    write_error = ""
    try:
        if proc.is_main and not opts.eval:  # an evaluation records nothing: the files describe training
            _write_start_files(run, opts, state, ds_config, {
                "world_size": proc.world_size, "num_classes": num_classes, "img_size": data.img_size,
                "dataset_description": data.describe(), "threads_per_rank": proc.threads,
                "ldb": ldb.config.to_dict(), "zero_stage": engine.zero_optimization_stage(),
                "micro_batch_per_rank": engine.train_micro_batch_size_per_gpu(),
                "gradient_accumulation_steps": engine.gradient_accumulation_steps(),
                "train_batch_size": engine.train_batch_size(),
                "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
                             "ldb_ds": ldb_ds.__version__}})
    except OSError as err:
        write_error = run_files.describe_os_error(err)
    if not _agree_ok(not write_error, control, device=proc.device):
        return end(faults.EXIT_USAGE, write_error or "rank 0 could not write the run directory",
                   record_status=True, status_message=write_error)

    dtype = input_dtype(engine)

    if opts.eval:
        # No run directory to record a failure in: status.json is the training's record (a bad
        # image met by an evaluation must not turn a completed run into a failed one).
        res = _guarded(lambda: validate(engine, eval_loader, dtype, data_group=data_group), proc.rank,
                       None, lambda: "evaluation", is_main=proc.is_main)
        log(f"eval: top1 {res['top1']:.2f}%  top5 {res['top5']:.2f}%  loss {res['loss']:.4f}")
        return end(faults.EXIT_OK)

    monitor = TrainMonitor(engine, log_every=opts.log_interval, samples_seen=state.samples_seen,
                           sync=not opts.no_sync_timing,
                           mask_log=run.masks_jsonl if opts.log_masks else None)
    heartbeat = faults.Heartbeat()
    ctx = TrainContext(opts=opts, engine=engine, train_loader=train_loader,
                       eval_loader=eval_loader, monitor=monitor, run=run, rank=proc.rank,
                       input_dtype=dtype, scheduler=scheduler, state=state, heartbeat=heartbeat,
                       control_group=control, data_group=data_group,
                       precheck=lambda c: drop_precheck(c, (data.in_chans, data.img_size, data.img_size),
                                                        num_classes))
    agreement = faults.StopAgreement(stop_signal, control, opts.stop_check_every) if signals else None
    ctx.step_hooks.append(StepChecks(ctx, agreement))
    watchdog = None
    if proc.world_size > 1:
        def report(msg: str) -> None:
            if proc.is_main:
                run.write_status("failed", faults.EXIT_HUNG, msg)

        watchdog = faults.Watchdog(heartbeat, watch_group, rank=proc.rank, world_size=proc.world_size,
                                   timeout_s=opts.dist_timeout, on_report=report)
        watchdog.start()
    run_s = _guarded(lambda: fit(ctx), proc.rank, run, heartbeat.describe, is_main=proc.is_main)
    if watchdog is not None:
        watchdog.stop()
    stop_signal.restore()

    if ctx.exit_code:
        return end(ctx.exit_code, ctx.exit_message, record_status=True, checkpoint=state.last_tag)

    # The gradient check (StepChecks) cannot see weights that an update itself made non-finite (a huge
    # weight decay or LR with a finite gradient): check the weights of the last step before `completed`.
    if not checkpoint.weights_finite(engine, control):
        message = checkpoint.nonfinite_weights_message(engine, state.last_tag)
        return end(faults.EXIT_NONFINITE, message, record_status=True, checkpoint=state.last_tag)
    digest = weights_digest(engine)  # a collective at ZeRO-3 (parameters gathered)
    if proc.is_main:
        history = state.history
        final = history[-1] if history else {}
        run.write_results({
            "experiment": opts.experiment, "world_size": proc.world_size,
            "epochs_run": [h["epoch"] for h in history], "train_time_s_this_process": run_s,
            "final_top1": final.get("eval_top1"), "final_loss": final.get("eval_loss"),
            "ldb_steps": ldb.steps, "ldb_drop_steps": ldb.drop_steps,
            "weights_sha256": digest["params"], "buffers_sha256": digest["buffers"],
            "optimizer_steps": int(engine.global_steps), "skipped_steps": ldb.skipped_steps,
            "counters": state.counters, "best_checkpoint": state.best, "history": history})
        last_epoch = int(history[-1]["epoch"]) if history else None
        stopped_early = opts.stop_after_epoch is not None and last_epoch is not None and last_epoch < opts.epochs - 1
        # Completed as asked, not finished: say so, since a requeue script reads "completed" as done.
        note = (f"stopped after epoch {last_epoch} by --stop-after-epoch (the schedule spans --epochs "
                f"{opts.epochs}); --resume auto continues it") if stopped_early else ""
        run.write_status("completed", faults.EXIT_OK, note, checkpoint=state.last_tag)
        log(f"done: {run_s:.1f} s in this process; final top1 "
            f"{final.get('eval_top1', float('nan')):.2f}%; weights SHA-256 {digest['params'][:16]}... "
            f"TensorBoard: tensorboard --logdir {shlex.quote(str(opts.output))}")  # pasteable as is
    return end(faults.EXIT_OK)


class _RunEnd:
    """How :func:`_train` ends once the process group exists, early or not: written once.

    ``end(code, line, ...)`` prints ``line`` (rank 0 only, to stderr; to stdout for a preemption,
    which is not an error; from every rank with ``every_rank``, for a verdict each rank reached
    itself), records the outcome in ``status.json`` on rank 0 (``record_status``: ``preempted``
    for exit 75, else ``failed``; ``status_message`` when the record should differ from the line;
    extra keys such as ``checkpoint``), tears down the engine (once :attr:`engine` is set) and the
    process group, and returns ``code``. A status that cannot be written (the disk that just
    failed) does not change the exit code: the line is already printed. Failures that may have
    lost a peer do not come here: they leave at once (:func:`_die`), since a teardown could wait.
    """

    def __init__(self, rank: int, is_main: bool) -> None:
        self.rank, self.is_main = rank, is_main
        self.run: Any = None
        """The run directory, once prepared (``status.json`` needs it)."""
        self.engine: Any = None
        """The engine, once built (destroyed before the process group)."""
        self.evaluation_only = False
        """``--eval``: no training, so nothing is recorded in ``status.json``."""
        self.loaders: list[Any] = []
        """DataLoaders with persistent workers, shut down at the end (the process leaves with
        ``os._exit``, which runs no finalizer: left alone, a worker would outlive its rank for up
        to the DataLoader's 5 s liveness check, holding the launcher's output pipe open)."""

    def _may_record(self) -> bool:
        """Whether this start's failure goes into ``status.json``, the record of the run's training.

        Not from ``--eval`` (it trains nothing), and not over a ``completed`` run by a start that
        failed before training (a mistyped ``--resume`` tag): a scheduler reading the file would
        take a finished run for a broken one. The line printed says what failed either way.
        """
        if self.evaluation_only:
            return False
        return self.run.read_status().get("status") != "completed"

    def __call__(self, code: int, line: str = "", *, every_rank: bool = False, record_status: bool = False,
                 status_message: str | None = None, **status_extra: Any) -> int:
        from ldb_ds.process import teardown
        from ldb_ds.sampler import shut_down_workers
        from ldb_ds.train import faults

        preempted = code == faults.EXIT_PREEMPTED
        if line:
            if every_rank:
                faults.print_rank(self.rank, line)
            elif preempted:
                log(line)
            else:
                error(line)
        if record_status and self.is_main and self._may_record():
            with contextlib.suppress(OSError):
                self.run.write_status("preempted" if preempted else "failed", code,
                                      line if status_message is None else status_message, **status_extra)
        for loader in self.loaders:
            shut_down_workers(loader)
        teardown(self.engine)
        if self.run is not None:  # the last file is written: the next start may take the folder
            self.run.release()
        return code


def _guarded(call: Callable[[], Any], rank: int, run: Any, where: Callable[[], str], *, is_main: bool) -> Any:
    """``call()``; the failures every rank meets alike end the process with their exit code.

    ``run``: the run directory whose ``status.json`` records the failure (``None``: nothing is
    recorded, as for ``--eval``).

    A data error (an unreadable image, here or on another rank: the batches are agreed before
    their step, ``workloads.batches.agreed_batches``) exits 2 with the file named; another rank's crashed
    loader exits 1; an OS error on the output (a full disk while saving) exits 2 on the rank that
    met it, naming the file; a collective that failed (a lost peer) exits 4, naming ``where()``,
    unless a peer has just recorded its own failure in ``status.json``: then this rank leaves
    quietly with the peer's code (the peer's line is the one that explains).
    """
    from ldb_ds.train import faults
    from ldb_ds.train.rundir import OUTPUT_ERRNOS, describe_os_error
    from ldb_ds.workloads.data import DatasetError, unwrap_error

    started = time.time()
    try:
        return call()
    except DatasetError as err:
        _die(rank, run if is_main else None, faults.EXIT_USAGE, unwrap_error(err))
    except faults.PeerBatchError as err:  # that rank's traceback is above
        _die(rank, run if is_main else None, faults.EXIT_ERROR, str(err))
    except OSError as err:
        if err.errno not in OUTPUT_ERRNOS:
            raise
        # Only this rank knows: it writes the status itself (rank 0 or not), then leaves.
        _die(rank, run, faults.EXIT_USAGE, describe_os_error(err))
    except Exception as err:
        if not faults.is_distributed_failure(err):
            raise
        peer = _peer_failure(run, started)
        if peer is not None:
            sys.stdout.flush()
            os._exit(peer)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        _die(rank, run if is_main else None, faults.EXIT_HUNG, f"a collective failed at {where()}: {first}")


def _peer_failure(run: Any, since: float, wait_s: float = 3.0) -> int | None:
    """The exit code a peer recorded in ``status.json`` after ``since`` (``None`` if none within ``wait_s``).

    A rank that leaves on an error of its own closes its gloo connections, and its peers then fail
    in their next collective: that is a consequence, not news, so they stay quiet.
    """
    if run is None:
        return None
    deadline = time.monotonic() + wait_s
    while True:
        status = run.read_status()
        with contextlib.suppress(TypeError, ValueError):
            if status.get("status") == "failed" and status.get("exit_code") and \
                    float(status.get("time", since)) >= since:
                return int(status["exit_code"])
        if time.monotonic() > deadline:
            return None
        time.sleep(0.2)


def _die(rank: int, run: Any, code: int, message: str) -> NoReturn:
    """Report and leave at once: a peer may be gone, so a collective teardown could wait forever."""
    from ldb_ds.train import faults

    faults.print_rank(rank, message)
    if run is not None:
        with contextlib.suppress(Exception):
            run.write_status("failed", code, message)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _agree_ok(ok: bool, group: Any, *, device: Any = None) -> bool:
    """Whether every rank is ``ok`` (a MIN all-reduce; ``group=None``: the default group, on ``device``).

    Used where one rank did something the others depend on (rank 0 writing the run files,
    downloading the data): all ranks learn the outcome and leave together, in bounded time.
    """
    import torch
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return ok
    flag = torch.tensor([1 if ok else 0], dtype=torch.int32, device=device if group is None else "cpu")
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return bool(int(flag.item()))


def _write_start_files(run: Any, opts: TrainOptions, state: Any, ds_config: dict, record: dict) -> None:
    """Rank 0, a training start: ``args.yaml``, ``ds_config.json``, the trimmed summary and masks of
    a resume, ``running``."""
    steps = [(run.args_yaml, lambda: run.write_args(opts, record)),
             (run.ds_config_json, lambda: run.write_ds_config(ds_config))]
    if opts.resume:
        steps += [(run.summary_csv, lambda: run.trim_summary(state.next_epoch)),
                  (run.masks_jsonl, lambda: run.trim_masks(state.next_epoch, state.step_in_epoch))]
    steps.append((run.status_json, lambda: run.write_status("running", None, "", pid=os.getpid())))
    for path, write in steps:
        try:
            write()
        except OSError as err:
            err.filename = err.filename or path  # a full disk fails at close(), which names no file
            raise


def _config_errors() -> tuple[type[BaseException], ...]:
    """What ``ldb_ds.initialize`` raises for a config that does not fit (DeepSpeed asserts, pydantic)."""
    from ldb_ds.config import LDBConfigError

    errors: list[type[BaseException]] = [LDBConfigError, AssertionError, ValueError]
    with contextlib.suppress(ImportError):
        from pydantic import ValidationError
        errors.append(ValidationError)
    return tuple(errors)


def _first_line(err: BaseException) -> str:
    text = " ".join(str(err).split("\n")[:2]).strip()
    return text or type(err).__name__


def _download_failure(err: BaseException) -> str:
    """One line for a failed ``--dataset-download`` (usually: no network)."""
    return (f"--dataset-download failed: {_first_line(err)}. Without network access, download the files "
            "elsewhere, copy them to --data-dir and leave --dataset-download off")


def run() -> None:
    """The ``ldb-train`` entry point: :func:`main`, then :func:`ldb_ds.process.exit_process` with its code."""
    from ldb_ds.process import exit_process

    exit_process(main())


if __name__ == "__main__":
    run()
