#!/usr/bin/env python
"""Train an image classifier with DeepSpeed and LayerDropBack (ldb_ds).

Start it with any launcher (DS_ACCELERATOR=cpu on a machine without a GPU); ``launch/train.py``
is a thin entry to this module for launchers that want a script path::

    deepspeed --num_gpus 2 launch/train.py --deepspeed_config ds_configs/zero2_ldb.json
    torchrun --nproc_per_node 2 launch/train.py --deepspeed_config ds_configs/zero2_ldb.json
    mpirun -np 2 python launch/train.py --deepspeed_config ds_configs/zero2_ldb.json
    deepspeed --num_gpus 2 --module ldb_ds.train --deepspeed_config ds_configs/zero2_ldb.json
    ldb-train --deepspeed_config ds_configs/zero2_ldb.json                 # one process

Every option can also be set in the DeepSpeed JSON, in a top-level ``"train"`` section whose
keys are the option names with underscores (``{"train": {"model": "resnet50", "epochs": 200}}``);
the command line wins over the JSON, the JSON over the defaults. The resolved settings are saved
as ``args.yaml`` in the run directory ``<output>/<experiment>/``, beside DeepSpeed's TensorBoard
event file, ``ds_config.json`` (the config actually given to DeepSpeed), ``results.json`` and
``checkpoints/``. See docs/training.md for the full reference.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
import warnings

TRAIN_SECTION = "train"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("DeepSpeed")
    g.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config",
                   default=None, help="DeepSpeed JSON (with the layer_drop_back and train sections)")
    g.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int,
                   default=int(os.environ.get("LOCAL_RANK", 0)),
                   help="set by the deepspeed launcher; LOCAL_RANK is read otherwise")
    g.add_argument("--deepspeed", action="store_true", help="accepted for compatibility; ignored")

    g = p.add_argument_group("model")
    g.add_argument("--model", default="mobilenetv2_050",
                   help="timm model name, or tv:<name> for a torchvision model")
    g.add_argument("--pretrained", action="store_true",
                   help="load the library's pretrained weights (from its local cache)")
    g.add_argument("--pretrained-path", default=None,
                   help="timm: local weights file to load instead of the hub")
    g.add_argument("--stem", default="auto", choices=["auto", "cifar", "original"],
                   help="small-input stem adaptation (auto: when img-size <= 64)")
    g.add_argument("--num-classes", type=int, default=None,
                   help="classifier size (default: the dataset's class count)")
    g.add_argument("--drop-path", type=float, default=None, help="timm drop_path_rate")

    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="digits",
                   choices=["digits", "cifar10", "cifar100", "imagefolder", "synthetic"])
    g.add_argument("--data-dir", default=None, help="dataset root (not needed for digits/synthetic)")
    g.add_argument("--download", action="store_true", help="let torchvision download CIFAR")
    g.add_argument("--no-verify-data", action="store_true",
                   help="skip torchvision's MD5 check of CIFAR files (for home-made folders)")
    g.add_argument("--img-size", type=int, default=None, help="input size (default: dataset's)")
    g.add_argument("--no-aug", action="store_true", help="no training augmentation")
    g.add_argument("--workers", type=int, default=0, help="data loader worker processes per rank")
    g.add_argument("--synthetic-size", type=int, default=10_000,
                   help="images in the synthetic train split (test: a fifth)")

    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=10)
    g.add_argument("--batch-size", type=int, default=None,
                   help="micro batch per rank (overrides train_micro_batch_size_per_gpu and "
                        "drops train_batch_size from the config)")
    g.add_argument("--lr", type=float, default=None, help="overrides optimizer.params.lr")
    g.add_argument("--sched", default=None, choices=["none", "cosine"],
                   help="epoch-wise LR schedule set by this script (cosine: annealed to "
                        "--min-lr over --epochs, after --warmup-epochs of linear warm-up). "
                        "Default: cosine, or none when the config has a DeepSpeed 'scheduler' "
                        "section (which then steps the LR every optimizer step)")
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--warmup-epochs", type=int, default=0)
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--max-steps-per-epoch", type=int, default=0,
                   help="cap on optimizer steps per epoch (0: whole epoch); for smoke tests")
    g.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads per rank (default: OMP_NUM_THREADS, else cores / "
                        "local ranks); the deepspeed launcher does not set OMP_NUM_THREADS")

    g = p.add_argument_group("evaluation")
    g.add_argument("--dist-bn", default="reduce", choices=["reduce", "broadcast", "none"],
                   help="before each evaluation and checkpoint, make BatchNorm running statistics "
                        "equal on all ranks: average them (reduce) or copy rank 0's (broadcast)")
    g.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs (0: only at the end)")
    g.add_argument("--eval", action="store_true",
                   help="only evaluate (with --resume: the checkpoint) and exit")
    g.add_argument("--eval-batch-size", type=int, default=None, help="default: 2 x micro batch")

    g = p.add_argument_group("output")
    g.add_argument("--output", default="runs", help="log root (TensorBoard output_path)")
    g.add_argument("--experiment", default=None,
                   help="run name under --output (TensorBoard job_name); default "
                        "<dataset>-<model>-<ldb|baseline>-z<stage>-ws<world size>")
    g.add_argument("--overwrite", action="store_true", help="delete an existing run directory first")
    g.add_argument("--ckpt-every", type=int, default=1,
                   help="save a checkpoint every N epochs and after the last (0: never)")
    g.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from the latest checkpoint of this run (or of the given "
                        "checkpoint directory)")
    g.add_argument("--stop-after-epoch", type=int, default=None,
                   help="end the run after this epoch (as if interrupted; the schedule still "
                        "spans --epochs)")
    g.add_argument("--log-every", type=int, default=10, help="TensorBoard step events every N steps")
    g.add_argument("--log-masks", action="store_true",
                   help="append every step's dropped unit indices to masks.jsonl in the run dir")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    g.add_argument("--no-sync-timing", action="store_true",
                   help="do not synchronise the device around timed phases")
    return p


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, dict]:
    """CLI > the JSON's ``train`` section > defaults. Returns (args, DeepSpeed config dict)."""
    from ldb_ds.config import load_ds_config

    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if not pre.deepspeed_config:
        parser.error("--deepspeed_config is required (see ds_configs/README.md)")
    ds_config = load_ds_config(pre.deepspeed_config)
    section = ds_config.get(TRAIN_SECTION, {}) or {}
    if not isinstance(section, dict):
        parser.error(f"'{TRAIN_SECTION}' in {pre.deepspeed_config} must be a JSON object")
    dests = {a.dest for a in parser._actions} - {"help", "deepspeed_config", "local_rank"}
    unknown = sorted(set(section) - dests)
    if unknown:
        parser.error(f"unknown key(s) in the '{TRAIN_SECTION}' section of {pre.deepspeed_config}: "
                     f"{', '.join(unknown)}; allowed: {', '.join(sorted(dests))}")
    parser.set_defaults(**section)
    args = parser.parse_args(argv)
    if args.sched is None:
        args.sched = "none" if "scheduler" in ds_config else "cosine"
    elif args.sched != "none" and "scheduler" in ds_config:
        parser.error(f"--sched {args.sched} and the 'scheduler' section of "
                     f"{args.deepspeed_config} would both set the learning rate; use one")
    return args, ds_config


def resolve_ds_config(ds_config: dict, args: argparse.Namespace, world_size: int) -> dict:
    """The config handed to DeepSpeed: CLI overrides applied, TensorBoard pointed at the run."""
    cfg = json.loads(json.dumps(ds_config))  # deep copy
    cfg.pop(TRAIN_SECTION, None)  # ours; DeepSpeed would ignore it anyway
    if args.batch_size is not None:
        cfg["train_micro_batch_size_per_gpu"] = args.batch_size
        cfg.pop("train_batch_size", None)
    if args.lr is not None:
        if "optimizer" not in cfg:
            raise SystemExit("--lr needs an 'optimizer' section in the DeepSpeed config")
        cfg["optimizer"].setdefault("params", {})["lr"] = args.lr
    if "optimizer" not in cfg:
        raise SystemExit(f"{args.deepspeed_config} has no 'optimizer' section; add one, e.g. "
                         '{"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}} (see ds_configs/)')
    if "gradient_clipping" not in cfg:
        # DeepSpeed 0.19.8 clips at 1.0 unless told otherwise; say so instead of hiding it.
        print("[train.py] note: the config does not set gradient_clipping; DeepSpeed 0.19.8 "
              "then clips at 1.0", flush=True)
    tb = cfg.setdefault("tensorboard", {"enabled": True})
    tb["output_path"] = args.output
    tb["job_name"] = args.experiment
    return cfg


def default_experiment(args: argparse.Namespace, ds_config: dict, world_size: int) -> str:
    ldb = (ds_config.get("layer_drop_back") or {}).get("enabled", False)
    stage = (ds_config.get("zero_optimization") or {}).get("stage", 0)
    model = args.model.replace("tv:", "tv-").replace("/", "-")
    return f"{args.dataset}-{model}-{'ldb' if ldb else 'baseline'}-z{stage}-ws{world_size}"


def set_threads(args: argparse.Namespace) -> int:
    import torch

    n = args.threads
    if n is None and os.environ.get("OMP_NUM_THREADS"):
        n = int(os.environ["OMP_NUM_THREADS"])
    if n is None:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get(
            "OMPI_COMM_WORLD_LOCAL_SIZE", 1)))
        n = max(1, (os.cpu_count() or 1) // max(local, 1))
    torch.set_num_threads(n)
    return n


def epoch_lr_scale(epoch: int, args: argparse.Namespace, base_lr: float) -> float:
    """LR of ``epoch`` under the script's schedule, as a value (not a factor)."""
    if args.sched == "none":
        return base_lr
    if epoch < args.warmup_epochs:
        return base_lr * (epoch + 1) / (args.warmup_epochs + 1)
    span = max(args.epochs - args.warmup_epochs, 1)
    t = (epoch - args.warmup_epochs) / span
    return args.min_lr + 0.5 * (base_lr - args.min_lr) * (1.0 + math.cos(math.pi * t))


def distribute_bn(module, how: str) -> None:
    """Make BatchNorm running statistics equal on every rank (timm's ``distribute_bn``).

    Every rank updates its own running mean/variance from its own batches and DeepSpeed never
    synchronises buffers, so without this each rank would evaluate with different statistics
    and the checkpoint would keep only rank 0's (a resumed run would then evaluate differently).
    """
    import deepspeed.comm as dist

    if how == "none" or dist.get_world_size() == 1:
        return
    for name, buf in module.named_buffers(recurse=True):
        if ("running_mean" in name or "running_var" in name) and buf.is_floating_point():
            t = buf.detach().float().clone()  # reduce in fp32 (bf16 buffers with bf16 configs)
            if how == "reduce":
                dist.all_reduce(t)
                t /= dist.get_world_size()
            else:
                dist.broadcast(t, src=0)
            buf.data.copy_(t.to(buf.dtype))


def main(argv: list[str] | None = None) -> int:
    args, ds_config_in = parse_args(argv)
    threads = set_threads(args)

    import torch
    import yaml
    from torch.utils.data import DataLoader
    from tqdm import tqdm

    from ldb_ds.config import LDBConfig, LDBConfigError
    from ldb_ds.train.data import DatasetError, ShardedEval, build_datasets
    from ldb_ds.train.models import ModelError, check_model_name, create_model

    # ---- data and model name, checked before any process group exists -------------------------
    # Every rank builds the same dataset and checks the same names; a bad name or a missing
    # dataset then fails on every rank alike with a clear message, before DeepSpeed starts.
    def make_data(download: bool):
        return build_datasets(args.dataset, args.data_dir, img_size=args.img_size,
                              augment=not args.no_aug, download=download,
                              verify=not args.no_verify_data,
                              synthetic_train_size=args.synthetic_size,
                              synthetic_test_size=max(args.synthetic_size // 5, 1),
                              synthetic_num_classes=args.num_classes or 10, seed=args.seed)

    try:
        LDBConfig.from_ds_config(ds_config_in)  # a bad layer_drop_back section fails here
        check_model_name(args.model)
        data = None if args.download else make_data(False)
    except (DatasetError, ModelError, LDBConfigError) as err:
        print(f"[train.py] error: {err}", file=sys.stderr, flush=True)
        return 2

    import deepspeed  # slow to import: only once the arguments are known to be good
    import deepspeed.comm as dist
    from deepspeed.accelerator import get_accelerator

    import ldb_ds
    from ldb_ds.train.monitor import TrainMonitor, evaluate

    # deepspeed / torchrun set RANK etc.; under plain mpirun, mpi4py discovery fills them in
    # (it would always use port 29500: pass MASTER_PORT through to pick another).
    deepspeed.init_distributed(auto_mpi_discovery=True,
                               distributed_port=int(os.environ.get("MASTER_PORT", 29500)))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", args.local_rank))
    accel = get_accelerator()
    if accel.device_name() != "cpu":
        accel.set_device(local_rank)
    is_main = rank == 0
    # DeepSpeed 0.19.8's ZeRO calls a torch collective that torch marks deprecated; the warning
    # is about DeepSpeed's code, not ours, and would repeat on every rank.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.* is deprecated",
                            category=FutureWarning)
    if not is_main:  # other ranks stay quiet: DeepSpeed's INFO lines come from rank 0 only
        import logging

        from deepspeed.utils import logger as ds_logger
        ds_logger.setLevel(logging.WARNING)

    def log(msg: str) -> None:
        if is_main:
            print(f"[train.py] {msg}", flush=True)

    args.experiment = args.experiment or default_experiment(args, ds_config_in, world_size)
    run_dir = os.path.join(args.output, args.experiment)
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    # Rank 0 decides about the run directory and tells the others, so all ranks exit together.
    verdict = torch.zeros(1, dtype=torch.int32, device=accel.current_device_name())
    if is_main and os.path.isdir(run_dir) and os.listdir(run_dir) and not (args.resume or args.eval):
        if args.overwrite:
            shutil.rmtree(run_dir)
        else:
            print(f"[train.py] error: the run directory {run_dir} exists; pass --resume to "
                  "continue it, --overwrite to replace it, or --experiment NAME", flush=True)
            verdict += 1
    dist.broadcast(verdict, src=0)
    if int(verdict.item()):
        dist.destroy_process_group()
        return 2
    if is_main:
        os.makedirs(run_dir, exist_ok=True)
    ds_config = resolve_ds_config(ds_config_in, args, world_size)
    if data is None:  # --download: one rank downloads, the others wait and read
        data = make_data(True) if is_main else None
        dist.barrier()
        data = data or make_data(False)
    num_classes = args.num_classes or data.num_classes
    torch.manual_seed(args.seed)  # same initial weights on every rank
    extra = {} if args.drop_path is None else {"drop_path_rate": args.drop_path}
    model = create_model(args.model, num_classes=num_classes, img_size=data.img_size,
                         pretrained=args.pretrained, pretrained_path=args.pretrained_path,
                         stem=args.stem, **extra)
    log(f"{data.describe()}")
    log(f"model {args.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M "
        f"parameters, {num_classes} classes, world size {world_size}, {threads} thread(s)/rank")

    engine, optimizer, train_loader, _ = ldb_ds.initialize(
        model=model, model_parameters=list(model.parameters()), training_data=data.train,
        config=ds_config, num_workers=args.workers)
    device = engine.device
    in_dtype = (torch.bfloat16 if engine.bfloat16_enabled()
                else torch.float16 if engine.fp16_enabled() else torch.float32)
    ldb = engine.ldb
    log(f"LDB {'enabled' if ldb.enabled else 'disabled'}: {len(ldb.units)} units"
        + (f", {ldb.config}" if ldb.enabled else ""))

    eval_bs = args.eval_batch_size or 2 * engine.train_micro_batch_size_per_gpu()
    eval_loader = DataLoader(ShardedEval(data.test, rank, world_size), batch_size=eval_bs,
                             shuffle=False, num_workers=args.workers)
    criterion = torch.nn.CrossEntropyLoss()
    base_lrs = [g["lr"] for g in engine.optimizer.param_groups]

    # ---- resume -----------------------------------------------------------------------------
    start_epoch, samples_seen, history = 0, 0, []
    if args.resume:
        load_dir = ckpt_dir if args.resume == "auto" else args.resume
        path, client = engine.load_checkpoint(load_dir)
        if path is None:
            log(f"error: --resume found no checkpoint in {load_dir} (DeepSpeed looks for the "
                "'latest' file written by save_checkpoint)")
            _teardown(engine, dist)
            return 2
        client = client or {}
        start_epoch = int(client.get("epoch", -1)) + 1
        samples_seen = int(client.get("samples_seen", 0))
        history = list(client.get("history", []))
        log(f"resumed from {path}: continuing at epoch {start_epoch}")

    # ---- save the resolved settings --------------------------------------------------------
    if is_main:
        resolved = dict(vars(args))
        resolved.update(world_size=world_size, num_classes=num_classes, img_size=data.img_size,
                        dataset_description=data.describe(), threads_per_rank=threads,
                        ldb=ldb.config.to_dict(), zero_stage=engine.zero_optimization_stage(),
                        micro_batch_per_rank=engine.train_micro_batch_size_per_gpu(),
                        gradient_accumulation_steps=engine.gradient_accumulation_steps(),
                        train_batch_size=engine.train_batch_size(),
                        versions={"torch": torch.__version__, "deepspeed": deepspeed.__version__,
                                  "ldb_ds": ldb_ds.__version__})
        with open(os.path.join(run_dir, "args.yaml"), "w") as f:
            # Through JSON first: plain types only (torch.__version__ is a str subclass yaml refuses).
            yaml.safe_dump(json.loads(json.dumps(resolved, default=str)), f, sort_keys=False)
        with open(os.path.join(run_dir, "ds_config.json"), "w") as f:
            json.dump(ds_config, f, indent=2)

    mon = TrainMonitor(engine, log_every=args.log_every, samples_seen=samples_seen,
                       sync=not args.no_sync_timing,
                       mask_log=os.path.join(run_dir, "masks.jsonl") if args.log_masks else None)

    if args.eval:
        res = evaluate(engine, eval_loader)
        log(f"eval: top1 {res['top1']:.2f}%  top5 {res['top5']:.2f}%  loss {res['loss']:.4f}")
        _teardown(engine, dist)
        return 0

    # ---- train ------------------------------------------------------------------------------
    gas = engine.gradient_accumulation_steps()
    last_epoch = args.epochs - 1
    if args.stop_after_epoch is not None:
        last_epoch = min(last_epoch, args.stop_after_epoch)
    t_run = time.perf_counter()
    for epoch in range(start_epoch, last_epoch + 1):
        # Augmentation and dropout draw from torch's global RNG: seeding it per epoch (and
        # rank) makes a resumed run draw exactly what the uninterrupted run drew.
        torch.manual_seed(args.seed * 1_000_003 + epoch * 1_009 + rank)
        for g, base in zip(engine.optimizer.param_groups, base_lrs):
            g["lr"] = epoch_lr_scale(epoch, args, base)
        mode = engine.set_epoch(epoch)
        engine.train()
        mode_name = getattr(mode, "value", str(mode))
        # Whole accumulation windows only: set_epoch needs a closed window.
        n_micro = len(train_loader) // gas * gas
        if args.max_steps_per_epoch:
            n_micro = min(n_micro, args.max_steps_per_epoch * gas)
        mon.begin_epoch(epoch)
        bar = tqdm(total=n_micro, desc=f"epoch {epoch}/{args.epochs - 1} {mode_name}",
                   disable=not is_main or args.no_progress, dynamic_ncols=True, leave=True,
                   mininterval=1.0)
        for i, (x, y) in enumerate(train_loader):
            if i >= n_micro:
                break
            with mon.phase("forward"):
                x, y = x.to(device, dtype=in_dtype), y.to(device)
                loss = criterion(engine(x).float(), y)
            with mon.phase("backward"):
                engine.backward(loss)
            with mon.phase("optimizer_step"):
                engine.step()
            stats = mon.end_step(loss, x.size(0))
            bar.update(1)
            if stats and (i + 1) % args.log_every == 0:
                bar.set_postfix(loss=f"{stats['loss']:.3f}", sps=f"{stats['samples_per_sec']:.0f}",
                                mode=stats["mode_name"], refresh=False)
        bar.close()
        do_eval = (args.eval_every and (epoch + 1) % args.eval_every == 0) or epoch == last_epoch
        distribute_bn(engine.module, args.dist_bn)
        res = evaluate(engine, eval_loader) if do_eval else None
        ep = mon.end_epoch(res)
        ep.update(mode_name=mode_name, lr=epoch_lr_scale(epoch, args, base_lrs[0]) * ldb.lr_factor)
        history.append(ep)
        log(f"epoch {epoch} [{mode_name}] loss {ep['train_loss']:.4f} | "
            + (f"eval top1 {res['top1']:.2f}% loss {res['loss']:.4f} | " if res else "")
            + f"{ep['epoch_s']:.1f} s, {ep['samples_per_sec']:.1f} samples/s, "
              f"{ep['steps']} steps, kept params {mon.last.get('kept_param_fraction', 1.0):.3f}")
        if args.ckpt_every and ((epoch + 1) % args.ckpt_every == 0 or epoch == last_epoch):
            engine.save_checkpoint(ckpt_dir, tag=f"epoch{epoch}", client_state={
                "epoch": epoch, "mode": mode_name, "samples_seen": mon.samples_seen,
                "history": history, "args": {k: v for k, v in vars(args).items()
                                             if isinstance(v, (int, float, str, bool, type(None)))}})
    run_s = time.perf_counter() - t_run

    if is_main:
        final = history[-1] if history else {}
        results = {"experiment": args.experiment, "world_size": world_size,
                   "epochs_run": [h["epoch"] for h in history], "train_time_s_this_process": run_s,
                   "final_top1": final.get("eval_top1"), "final_loss": final.get("eval_loss"),
                   "ldb_steps": ldb.steps, "ldb_drop_steps": ldb.drop_steps, "history": history}
        with open(os.path.join(run_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        log(f"done: {len(history)} epoch(s) in this process, {run_s:.1f} s; final top1 "
            f"{final.get('eval_top1', float('nan')):.2f}%. TensorBoard: tensorboard --logdir "
            f"{args.output}")
    _teardown(engine, dist)
    return 0


def _teardown(engine, dist) -> None:
    # Without this, gloo threads sometimes abort the process at exit ("terminate called
    # without an active exception").
    engine.destroy()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
