"""Benchmark: LDB against the DeepSpeed baseline, side by side in one run.

::

    python -m ldb_ds.bench step,epochs --model resnet18 --zero-stage 2 --out bench_results
    deepspeed --num_gpus 2 --module ldb_ds.bench step,epochs ...          # world size 2
    python -m ldb_ds.bench scaling --world-sizes 1,2 ...                  # launches the above
    python -m ldb_ds.bench report bench_results                            # re-render md/png/tb

Modes (comma-separated modes share one process and one process group):

``step``
    Per-step wall-clock time of five variants on the same fixed batch: the DeepSpeed baseline
    (LDB off), an LDB FULL step, an LDB DROP step, and two "oracles" in plain PyTorch without
    DeepSpeed: all parameters trainable, and the DROP step's units frozen (replaying exactly the
    masks the LDB engine drew). Rounds alternate the variants (rotated order), warm-up rounds are
    discarded. Also: the gradient bytes handed to DeepSpeed's reductions per FULL and DROP step
    (counted with :class:`ldb_ds.bench.comm_count.ReductionCounter`), the weight-gradient (dW) cost of
    every unit measured in isolation, and from it the DROP step time that skipping the dropped
    units' dW predicts. ``--profile`` adds a torch.profiler op table of a FULL and a DROP step.
``epochs``
    End-to-end schedule time: the baseline and LDB each train the same whole epochs (steady
    state: epochs 1 .. periods*s, i.e. whole schedule periods), alternating A/B/B/A, repeated.
    Speedup = 1 - T_ldb / T_baseline (the paper's definition), paired per repetition.
``sweep-drop-rate`` / ``sweep-sampling-rate``
    ``epochs`` for each drop rate (paper, Figure 3) / sampling rate (paper, Table 4).
``accuracy``
    Baseline and LDB trained for the same epochs on the bundled digits data (epochs
    interleaved), both test accuracies, both training times, the speedup (Tables 1-2 in small).
``scaling``
    Starts ``step,epochs`` under the deepspeed launcher (or torchrun) at each world size and
    merges the results into speedup against world size (paper, Table 3).
``report``
    Re-renders Markdown, PNG and TensorBoard files from the JSON files in a directory.

Timing rules (docs/benchmark.md): wall clock (``time.perf_counter``) with the accelerator
synchronised around every timed region, warm-up excluded, baseline and LDB alternated in one
process on the same data, medians with quartiles and min/max, and the conditions (machine,
device, world size, model, batch size, precision) written with every table.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from . import report as rep

MODES = ("step", "epochs", "sweep-drop-rate", "sweep-sampling-rate", "accuracy", "scaling", "report")
SHARED_NOTE = ("Wall-clock timings on a machine that may have been shared with other jobs; "
               "compare the ratios measured in the same run, not absolute times.")


# --------------------------------------------------------------------------- arguments


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ldb_ds.bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("mode", help=f"comma-separated list of: {', '.join(MODES)}; or 'all' "
                                "(step,epochs,sweep-drop-rate,sweep-sampling-rate,accuracy)")
    p.add_argument("report_dirs", nargs="*", help="report mode: directories holding result JSON files")
    p.add_argument("--out", default="bench_results", help="output directory (rank 0 writes)")
    g = p.add_argument_group("model and training setup")
    g.add_argument("--model", default="resnet18", help="timm name or tv:<torchvision name> (ldb_ds.train.models)")
    g.add_argument("--stem", default="auto", choices=("auto", "cifar", "original"))
    g.add_argument("--img-size", type=int, default=32)
    g.add_argument("--num-classes", type=int, default=10)
    g.add_argument("--batch-size", type=int, default=32, help="micro batch per rank (FULL steps)")
    g.add_argument("--zero-stage", type=int, default=2, choices=(0, 1, 2, 3))
    g.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    g.add_argument("--lr", type=float, default=0.05)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=5e-4)
    g.add_argument("--ds-config", default=None,
                   help="optional base DeepSpeed JSON; batch size, ZeRO stage, precision and LDB keys "
                        "given on the command line override it")
    g.add_argument("--seed", type=int, default=0, help="model init and data seed")
    g.add_argument("--threads", type=int, default=None, help="torch threads per rank (default: "
                                                              "OMP_NUM_THREADS, else cores / local ranks)")
    g.add_argument("--backend", default=None, help="torch.distributed backend (default: the accelerator's)")
    g = p.add_argument_group("LayerDropBack (the layer_drop_back section)")
    g.add_argument("--drop-rate", type=float, default=None)
    g.add_argument("--sampling-rate", type=int, default=None)
    g.add_argument("--kappa", type=float, default=None)
    g.add_argument("--batch-kappa", type=int, default=None)
    g.add_argument("--granularity", default=None, choices=("param", "module", "block"))
    g.add_argument("--keep-first", type=int, default=None)
    g.add_argument("--keep-last", type=int, default=None)
    g.add_argument("--batch-scaling", default=None, choices=("micro_batch", "accumulation"))
    g.add_argument("--ldb-seed", type=int, default=None)
    g = p.add_argument_group("step mode")
    g.add_argument("--warmup-rounds", type=int, default=2)
    g.add_argument("--rounds", type=int, default=6)
    g.add_argument("--steps-per-round", type=int, default=2)
    g.add_argument("--byte-steps", type=int, default=4, help="untimed DROP steps whose bytes are counted")
    g.add_argument("--dw-reps", type=int, default=5, help="repetitions of each unit's isolated dW timing")
    g.add_argument("--profile", action="store_true", help="torch.profiler op tables of a FULL and a DROP step")
    g = p.add_argument_group("epochs / sweep / accuracy modes")
    g.add_argument("--dataset", default="synthetic", choices=("synthetic", "digits"),
                   help="data for epochs and sweeps (accuracy always uses digits)")
    g.add_argument("--samples-per-rank", type=int, default=512, help="training samples per rank per epoch")
    g.add_argument("--periods", type=int, default=2, help="schedule periods (s epochs each) per timed run")
    g.add_argument("--reps", type=int, default=3, help="A/B repetitions (each: baseline run + LDB run)")
    g.add_argument("--warmup-steps", type=int, default=2, help="untimed FULL and DROP steps per engine first")
    g.add_argument("--drop-rates", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8")
    g.add_argument("--sampling-rates", default="1,2,3,4,5,6,7,8")
    g.add_argument("--sweep-periods", type=int, default=1)
    g.add_argument("--sweep-reps", type=int, default=2)
    g.add_argument("--acc-epochs", type=int, default=8)
    g.add_argument("--acc-limit", type=int, default=None, help="use only this many digits training images")
    g.add_argument("--schedule-epochs", type=int, default=200,
                   help="length of the schedule whose speedup is derived from the measured epoch times")
    g = p.add_argument_group("scaling mode")
    g.add_argument("--world-sizes", default="1,2")
    g.add_argument("--launcher", default="deepspeed", choices=("deepspeed", "torchrun"))
    g.add_argument("--scaling-modes", default="step,epochs")
    g.add_argument("--launcher-args", default="", help="extra launcher arguments (e.g. --bind_cores_to_rank)")
    g = p.add_argument_group("output")
    g.add_argument("--no-tensorboard", action="store_true")
    g.add_argument("--note", action="append", default=[], help="a sentence added to every table")
    g.add_argument("--quiet", action="store_true")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    return p


def parse_modes(text: str) -> list[str]:
    if text == "all":
        return ["step", "epochs", "sweep-drop-rate", "sweep-sampling-rate", "accuracy"]
    modes = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise SystemExit(f"unknown mode(s) {', '.join(bad)}; expected {', '.join(MODES)} or 'all'")
    if ("scaling" in modes or "report" in modes) and len(modes) > 1:
        raise SystemExit("'scaling' and 'report' run alone")
    return modes


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


# --------------------------------------------------------------------------- process setup


@dataclass
class Ctx:
    args: argparse.Namespace
    rank: int
    world_size: int
    threads: int
    device: Any
    argv: list[str]

    @property
    def main(self) -> bool:
        return self.rank == 0

    def log(self, msg: str) -> None:
        if self.main and not self.args.quiet:
            print(f"[bench] {msg}", flush=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup(args: argparse.Namespace, argv: list[str]) -> Ctx:
    # A plain `python -m ldb_ds.bench` is world size 1: give torch.distributed what a launcher would.
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", str(_free_port())))
    import torch

    threads = args.threads
    if threads is None and os.environ.get("OMP_NUM_THREADS"):
        threads = int(os.environ["OMP_NUM_THREADS"])
    if threads is None:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        threads = max(1, (os.cpu_count() or 1) // max(local, 1))
    torch.set_num_threads(threads)

    import deepspeed
    import deepspeed.comm as dist
    from deepspeed.accelerator import get_accelerator

    deepspeed.init_distributed(dist_backend=args.backend, auto_mpi_discovery=True, verbose=False)
    accel = get_accelerator()
    if accel.device_name() != "cpu":
        accel.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    return Ctx(args, dist.get_rank(), dist.get_world_size(), threads, accel.current_device_name(), argv)


def teardown(*engines: Any) -> None:
    import deepspeed.comm as dist

    for e in engines:
        if e is not None:
            e.destroy()
    if dist.is_initialized():
        dist.destroy_process_group()


def sync() -> None:
    from deepspeed.accelerator import get_accelerator

    get_accelerator().synchronize()


def timed_step(forward_loss: Any, backward: Any, optimizer_step: Any) -> tuple[float, float, float]:
    """Seconds of (forward + loss, backward, optimizer step), the device synchronised around each."""
    sync()
    t0 = time.perf_counter()
    loss = forward_loss()
    sync()
    t1 = time.perf_counter()
    backward(loss)
    sync()
    t2 = time.perf_counter()
    optimizer_step()
    sync()
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2


def barrier(ctx: Ctx) -> None:
    import deepspeed.comm as dist

    if ctx.world_size > 1:
        dist.barrier()


# --------------------------------------------------------------------------- configs and models


def ldb_section(args: argparse.Namespace, enabled: bool, **override: Any) -> dict[str, Any]:
    from ..config import DEFAULTS, load_ds_config

    base = DEFAULTS.to_dict()
    if args.ds_config:
        base.update(load_ds_config(args.ds_config).get("layer_drop_back", {}))
    cli = {"drop_rate": args.drop_rate, "sampling_rate": args.sampling_rate, "kappa": args.kappa,
           "batch_kappa": args.batch_kappa, "granularity": args.granularity, "keep_first": args.keep_first,
           "keep_last": args.keep_last, "batch_scaling": args.batch_scaling, "seed": args.ldb_seed}
    base.update({k: v for k, v in cli.items() if v is not None})
    base.update(override)
    base["enabled"] = enabled
    return base


def ds_config(args: argparse.Namespace, enabled: bool, **ldb_override: Any) -> dict[str, Any]:
    """The DeepSpeed config of one side of the comparison (same everything but LDB on/off)."""
    from ..config import load_ds_config

    cfg = copy.deepcopy(load_ds_config(args.ds_config)) if args.ds_config else {
        "gradient_clipping": 0.0,
        "optimizer": {"type": "SGD", "params": {"lr": args.lr, "momentum": args.momentum,
                                                "weight_decay": args.weight_decay}},
        "zero_allow_untested_optimizer": True,
    }
    cfg.pop("train_batch_size", None)  # the per-rank batch is fixed; the global one follows the world size
    cfg["train_micro_batch_size_per_gpu"] = args.batch_size
    cfg["gradient_accumulation_steps"] = 1
    cfg.setdefault("gradient_clipping", 0.0)  # DeepSpeed 0.19.8 clips at 1.0 unless told
    cfg["zero_optimization"] = {**cfg.get("zero_optimization", {}), "stage": args.zero_stage}
    cfg["bf16"] = {"enabled": args.precision == "bf16"}
    cfg["steps_per_print"] = 10**9
    cfg["tensorboard"] = {"enabled": False}  # the benchmark writes its own scalars, outside timed regions
    cfg["wall_clock_breakdown"] = False
    cfg["layer_drop_back"] = ldb_section(args, enabled, **ldb_override)
    return cfg


def make_model(args: argparse.Namespace):
    import torch

    from ..train.models import create_model

    torch.manual_seed(args.seed)  # every copy starts from the same weights
    model = create_model(args.model, num_classes=args.num_classes, img_size=args.img_size, stem=args.stem)
    return model


def make_engine(args: argparse.Namespace, init_model: Any, enabled: bool, training_data: Any = None,
                **ldb_override: Any):
    import ldb_ds

    model = copy.deepcopy(init_model)
    if args.precision == "bf16":
        model = model.bfloat16()
    engine, _, loader, _ = ldb_ds.initialize(model=model, model_parameters=list(model.parameters()),
                                             config=ds_config(args, enabled, **ldb_override),
                                             training_data=training_data)
    return engine, loader


def input_dtype(args: argparse.Namespace):
    import torch

    return torch.bfloat16 if args.precision == "bf16" else torch.float32


def conditions(ctx: Ctx, mode: str, engine: Any = None, model: Any = None) -> dict[str, Any]:
    import deepspeed
    import torch
    from deepspeed.accelerator import get_accelerator

    import ldb_ds

    args = ctx.args
    accel = get_accelerator().device_name()
    if accel == "cuda" and torch.cuda.is_available():
        device = f"{torch.cuda.get_device_name(0)} (cuda)"
    else:
        device = accel.upper()
    backend = torch.distributed.get_backend() if torch.distributed.is_initialized() else None
    ldb = ldb_section(args, True)
    if engine is not None and getattr(engine, "ldb", None) is not None and engine.ldb.enabled:
        ldb = engine.ldb.config.to_dict()
    params = sum(p.numel() for p in model.parameters()) if model is not None else 0
    return {
        "mode": mode, "device": device, "accelerator": accel, "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(), "threads_per_rank": ctx.threads, "hostname": socket.gethostname(),
        "platform": platform.platform(), "backend": backend, "world_size": ctx.world_size,
        "model": args.model, "stem": args.stem, "img_size": args.img_size, "params_m": params / 1e6,
        "micro_batch_per_rank": args.batch_size, "global_batch_full": args.batch_size * ctx.world_size,
        "precision": args.precision, "zero_stage": args.zero_stage, "optimizer":
            f"SGD(lr={args.lr}, momentum={args.momentum}, weight_decay={args.weight_decay})"
            if not args.ds_config else f"from {args.ds_config}",
        "ldb": ldb, "timing": "wall clock (time.perf_counter), accelerator synchronised, warm-up excluded",
        "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__, "ldb_ds": ldb_ds.__version__,
                     "python": platform.python_version()},
        "timestamp": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, "-m", "ldb_ds.bench"] + ctx.argv),
    }


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def result(ctx: Ctx, mode: str, results: dict[str, Any], engine: Any = None, model: Any = None,
           notes: Sequence[str] = ()) -> dict[str, Any]:
    cond = conditions(ctx, mode, engine, model)
    all_notes = list(notes)
    if cond["accelerator"] == "cpu":
        all_notes.append(SHARED_NOTE)
    all_notes += ctx.args.note
    return {"schema": rep.SCHEMA, "mode": mode, "conditions": cond, "results": results, "notes": all_notes}


# --------------------------------------------------------------------------- step runners


class EngineRunner:
    """One timed training step through an ldb_ds engine (baseline or LDB)."""

    def __init__(self, engine: Any):
        self.engine = engine

    def step(self, x: Any, y: Any) -> tuple[float, float, float]:
        import torch.nn.functional as F

        return timed_step(lambda: F.cross_entropy(self.engine(x).float(), y), self.engine.backward,
                          self.engine.step)


class OracleRunner:
    """Plain PyTorch, no DeepSpeed: the floor the wrapper can reach.

    The same architecture and weights, the same per-rank batch and optimizer; a DROP step
    freezes exactly the units the LDB step dropped (``requires_grad=False`` at forward time, so
    autograd skips their dW) and the torch optimizer then skips them (their grad is None).
    No communication at any world size.
    """

    def __init__(self, init_model: Any, args: argparse.Namespace, device: Any):
        import torch

        self.model = copy.deepcopy(init_model).to(device)
        if args.precision == "bf16":
            self.model = self.model.bfloat16()
        self.model.train()
        self.params = dict(self.model.named_parameters())
        self.opt = torch.optim.SGD(self.model.parameters(), lr=args.lr, momentum=args.momentum,
                                   weight_decay=args.weight_decay)

    def set_frozen(self, names: set[str]) -> None:
        for n, p in self.params.items():
            p.requires_grad_(n not in names)

    def step(self, x: Any, y: Any) -> tuple[float, float, float]:
        import torch.nn.functional as F

        def optimizer_step() -> None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)

        return timed_step(lambda: F.cross_entropy(self.model(x).float(), y), lambda loss: loss.backward(),
                          optimizer_step)


def weight_grad_costs(model: Any, x: Any, reps: int = 5) -> tuple[dict[str, float], list[str]]:
    """Seconds of weight-gradient (dW) work per parameter, each leaf module timed in isolation.

    For every leaf module that owns parameters, its input of a real forward pass is captured;
    then ``autograd.grad`` of its output is timed once for the input only (dX) and once for the
    input and the parameters (dX + dW). The difference is the module's dW cost, split over its
    parameters by size. This is the work a DROP step skips for a dropped unit; it is what LDB
    can save in the backward pass. Returns the costs and the modules that could not be timed
    (not a leaf, or not a single tensor input): their parameters count as 0.
    """
    import torch

    model = copy.deepcopy(model)
    model.train()
    leaves, skipped, captured = {}, [], {}
    for name, mod in model.named_modules():
        own = list(mod.parameters(recurse=False))
        if not own:
            continue
        if any(True for _ in mod.children()):
            skipped.append(name or "<root>")
            continue
        leaves[name] = mod

    def hook(name):
        def fn(mod, inputs, output):
            if len(inputs) == 1 and torch.is_tensor(inputs[0]) and torch.is_tensor(output):
                captured[name] = inputs[0].detach().clone()
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in leaves.items()]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    costs: dict[str, float] = {}
    for name, mod in leaves.items():
        own = [(pn, p) for pn, p in mod.named_parameters(recurse=False)]
        prefix = f"{name}." if name else ""
        if name not in captured:
            skipped.append(name)
            continue
        inp = captured[name].requires_grad_(inp_needs_grad(captured[name]))
        out = mod(inp)
        g = torch.randn_like(out)
        wrt_x = [inp] if inp.requires_grad else []
        params = [p for _, p in own]

        def timed(wrt):
            ts = []
            for _ in range(reps + 1):
                sync()
                t = time.perf_counter()
                torch.autograd.grad(out, wrt, g, retain_graph=True, allow_unused=True)
                sync()
                ts.append(time.perf_counter() - t)
            return rep.stats(ts[1:])["median"]

        t_x = timed(wrt_x) if wrt_x else 0.0
        t_all = timed(wrt_x + params)
        dw = max(t_all - t_x, 0.0)
        total = sum(p.numel() for p in params) or 1
        for pn, p in own:
            costs[prefix + pn] = dw * p.numel() / total
    return costs, skipped


def inp_needs_grad(t: Any) -> bool:
    return t.is_floating_point()


def profile_table(runner: Any, x: Any, y: Any, steps: int = 2, top: int = 15) -> list[dict[str, Any]]:
    """Top ops by self time over ``steps`` steps of ``runner`` (torch.profiler), per step."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            runner()
    rows = []
    events = prof.key_averages()
    dev_attr = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    for ev in sorted(events, key=lambda e: e.self_cpu_time_total + getattr(e, dev_attr, 0), reverse=True)[:top]:
        rows.append({"op": ev.key, "self_cpu_ms": ev.self_cpu_time_total / 1e3 / steps,
                     "self_device_ms": getattr(ev, dev_attr, 0) / 1e3 / steps, "calls": ev.count / steps})
    return rows


# --------------------------------------------------------------------------- mode: step


VARIANTS = ("baseline", "ldb_full", "ldb_drop", "oracle_drop", "oracle_full", "ldb_drop_kb")


def run_step(ctx: Ctx) -> dict[str, Any]:
    import torch

    from .comm_count import ReductionCounter
    from ..schedule import Mode

    args = ctx.args
    init_model = make_model(args)
    base, _ = make_engine(args, init_model, enabled=False)
    ldb, _ = make_engine(args, init_model, enabled=True)
    oracle = OracleRunner(init_model, args, ctx.device)
    dtype = input_dtype(args)
    full_epoch, drop_epoch = 0, ldb.ldb.config.sampling_rate  # epoch 0 is always FULL; epoch s is DROP
    units = ldb.ldb.units
    g = torch.Generator().manual_seed(args.seed * 1000 + ctx.rank)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size, generator=g).to(ctx.device, dtype)
    y = torch.randint(0, args.num_classes, (args.batch_size,), generator=g).to(ctx.device)
    kb = ldb.ldb.config.batch_kappa if ldb.ldb.config.batch_scaling == "micro_batch" else 1
    xk, yk = torch.cat([x] * kb), torch.cat([y] * kb)  # the batch of a DROP epoch's step
    runners = {"baseline": EngineRunner(base), "ldb": EngineRunner(ldb)}
    # The oracle replays the masks the LDB DROP steps drew, a block (one round's DROP steps) at a
    # time, newest first; each DROP step has a sequence number so that a recorded oracle step is
    # paired with the recorded LDB step of the same mask.
    blocks: list[list[tuple[int, tuple[int, ...]]]] = []
    seq = [0]
    samples: dict[str, list[tuple[float, float, float]]] = {v: [] for v in VARIANTS}
    mask_of_sample: dict[str, list[tuple[int, ...]]] = {"ldb_drop": [], "oracle_drop": []}
    drop_time_of_seq: dict[int, float] = {}
    pairs: list[tuple[int, float]] = []  # (seq, oracle time)
    kept_fracs: list[float] = []

    def one(variant: str, record: bool) -> None:
        if variant in ("baseline", "ldb_full", "ldb_drop", "ldb_drop_kb"):
            if variant != "baseline":
                ldb.set_epoch(full_epoch if variant == "ldb_full" else drop_epoch)
            runner = runners["baseline" if variant == "baseline" else "ldb"]
            block = []
            for _ in range(args.steps_per_round):
                t = runner.step(xk, yk) if variant == "ldb_drop_kb" else runner.step(x, y)
                if variant == "ldb_drop":
                    seq[0] += 1
                    block.append((seq[0], ldb.ldb.dropped_units))
                    if record:
                        drop_time_of_seq[seq[0]] = sum(t)
                        mask_of_sample["ldb_drop"].append(ldb.ldb.dropped_units)
                        kept_fracs.append(ldb.ldb.kept_param_fraction)
                if record:
                    samples[variant].append(t)
            if variant == "ldb_drop":
                blocks.append(block)
        else:
            block = blocks.pop() if variant == "oracle_drop" else [(0, ())] * args.steps_per_round
            for step_seq, mask in block:
                oracle.set_frozen({n for i in mask for n in units[i].param_names})
                t = oracle.step(x, y)
                if record:
                    samples[variant].append(t)
                    if variant == "oracle_drop":
                        mask_of_sample["oracle_drop"].append(mask)
                        pairs.append((step_seq, sum(t)))
            oracle.set_frozen(set())

    one("ldb_drop", record=False)  # a block in stock: in rotated rounds the oracle may go first
    order = list(VARIANTS)
    total_rounds = args.warmup_rounds + args.rounds
    for r in range(total_rounds):
        k = r % len(order)
        for variant in order[k:] + order[:k]:  # rotated: no variant always runs first or after another
            barrier(ctx)
            one(variant, record=r >= args.warmup_rounds)
        ctx.log(f"step: round {r + 1}/{total_rounds} done")

    variants = {}
    for v in VARIANTS:
        ts = samples[v]
        variants[v] = {"total_s": rep.stats(sum(t) for t in ts), "forward_s": rep.stats(t[0] for t in ts),
                       "backward_s": rep.stats(t[1] for t in ts), "step_s": rep.stats(t[2] for t in ts),
                       "samples_s": [sum(t) for t in ts]}

    # DROP vs oracle, paired: the same mask, both steps recorded.
    ratios = [drop_time_of_seq[q] / t for q, t in pairs if q in drop_time_of_seq]

    # Predicted saving: dW of the dropped units (isolated timing), and the optimizer share.
    ctx.log("step: timing every unit's weight gradient in isolation")
    costs, untimed = weight_grad_costs(oracle.model, x, args.dw_reps)
    unit_dw = [sum(costs.get(n, 0.0) for n in u.param_names) for u in units]
    dw_saved = [sum(unit_dw[i] for i in m) for m in mask_of_sample["ldb_drop"]]
    full_med = variants["ldb_full"]["total_s"]["median"]
    dw_saved_mean = sum(dw_saved) / max(len(dw_saved), 1)
    kept_mean = sum(kept_fracs) / max(len(kept_fracs), 1)
    opt_saved = variants["ldb_full"]["step_s"]["median"] * (1.0 - kept_mean)
    key = {
        "drop_over_oracle": rep.stats(ratios),
        "drop_over_oracle_of_medians": variants["ldb_drop"]["total_s"]["median"]
        / variants["oracle_drop"]["total_s"]["median"],
        "drop_over_full_measured": variants["ldb_drop"]["total_s"]["median"] / full_med,
        "oracle_drop_over_oracle_full": variants["oracle_drop"]["total_s"]["median"]
        / variants["oracle_full"]["total_s"]["median"],
        "predicted_dw_saving_s": dw_saved_mean,
        "predicted_drop_s_dw": full_med - dw_saved_mean,
        "drop_over_full_predicted_dw": 1.0 - dw_saved_mean / full_med,
        "drop_over_full_predicted_dw_opt": 1.0 - (dw_saved_mean + opt_saved) / full_med,
        "dw_total_s": sum(unit_dw),
        "dw_share_of_full": sum(unit_dw) / variants["oracle_full"]["total_s"]["median"],
        "kept_param_fraction_mean": kept_mean,
        # A DROP epoch takes batch_kappa times fewer steps of batch_kappa times larger batches:
        # its cost relative to a FULL epoch is the per-sample cost of those steps.
        "batch_kappa": kb,
        "drop_epoch_over_full_epoch_predicted": variants["ldb_drop_kb"]["total_s"]["median"] / (kb * full_med),
        "batch_effect": (variants["ldb_drop_kb"]["total_s"]["median"] / kb) / variants["ldb_drop"]["total_s"]["median"],
        "schedule_speedup_predicted": (1 - variants["ldb_drop_kb"]["total_s"]["median"] / (kb * full_med))
        / ldb.ldb.config.sampling_rate,
        "ldb_full_over_baseline": full_med / variants["baseline"]["total_s"]["median"],
        "meets_oracle_target": (rep.stats(ratios)["median"] <= 1.05) if ratios else None,
        "meets_prediction": (variants["ldb_drop"]["total_s"]["median"] / full_med) <= 1.0 - dw_saved_mean / full_med,
    }

    # Bytes, counted exactly in untimed steps.
    counter = ReductionCounter()
    try:
        counter.reset()
        runners["baseline"].step(x, y)
        base_bytes, base_calls = counter.bytes, len(counter.calls)
        ldb.set_epoch(full_epoch)
        counter.reset()
        runners["ldb"].step(x, y)
        full_bytes, full_calls = counter.bytes, len(counter.calls)
        ldb.set_epoch(drop_epoch)
        drops = []
        for _ in range(args.byte_steps):
            counter.reset()
            runners["ldb"].step(x, y)
            drops.append({"counted": counter.bytes, "calls": len(counter.calls), "expected": ldb.ldb.grad_bytes_step,
                          "kept_param_fraction": ldb.ldb.kept_param_fraction,
                          "dropped_units": len(ldb.ldb.dropped_units)})
    finally:
        counter.close()
    errors = [abs((d["counted"] / full_bytes) / d["kept_param_fraction"] - 1.0) for d in drops
              if full_bytes and d["kept_param_fraction"]]
    bytes_ = {"baseline_counted": base_bytes, "full_counted": full_bytes, "full_expected": ldb.ldb.grad_bytes_full,
              "baseline_calls": base_calls, "full_calls": full_calls,
              "drop_steps": drops,
              "drop_counted_mean": round(sum(d["counted"] for d in drops) / max(len(drops), 1)),
              "drop_expected_mean": round(sum(d["expected"] for d in drops) / max(len(drops), 1)),
              "drop_ratio_max_rel_error": max(errors) if errors else None}
    if not full_bytes:
        bytes_["note"] = (f"Nothing was handed to a gradient reduction at world size {ctx.world_size} "
                          "(DeepSpeed skips the reduction with one rank); 'expected' is what a FULL/DROP "
                          "step would reduce per rank at world size > 1.")

    profile = None
    if args.profile:
        ctx.log("step: profiling a FULL and a DROP step")
        profile = {"baseline": profile_table(lambda: runners["baseline"].step(x, y), x, y)}
        ldb.set_epoch(full_epoch)
        profile["ldb_full"] = profile_table(lambda: runners["ldb"].step(x, y), x, y)
        ldb.set_epoch(drop_epoch)
        profile["ldb_drop"] = profile_table(lambda: runners["ldb"].step(x, y), x, y)
        oracle.set_frozen(set())
        profile["oracle_full"] = profile_table(lambda: oracle.step(x, y), x, y)
    ldb.set_epoch(full_epoch)

    results = {"variants": variants, "key_figures": key, "bytes": bytes_, "profile": profile,
               "rounds": args.rounds, "warmup_rounds": args.warmup_rounds, "steps_per_round": args.steps_per_round,
               "units": len(units), "unit_dw_s": {u.name: d for u, d in zip(units, unit_dw)},
               "dw_untimed_modules": untimed, "mode_epochs": {"full": full_epoch, "drop": drop_epoch},
               "batch_note": "all variants use the same per-rank batch; batch_kappa acts per epoch (epochs mode)"}
    notes = ["The oracle is plain PyTorch on each rank with no DeepSpeed and no communication."
             + (" At world size > 1 it therefore omits the gradient reduction the other variants pay for."
                if ctx.world_size > 1 else "")]
    if key["ldb_full_over_baseline"] > 1.05:
        notes.append("The LDB FULL step's median is more than 5% above the baseline's: one param group per "
                     "unit adds per-group work (see docs/benchmark.md); on a shared machine compare the "
                     "min-based ratio as well.")
    out = result(ctx, "step", results, ldb, init_model, notes)
    teardown_engines(base, ldb)
    return out


def teardown_engines(*engines: Any) -> None:
    for e in engines:
        e.destroy()


# --------------------------------------------------------------------------- mode: epochs


def epoch_dataset(ctx: Ctx, batch_kappa: int):
    from ..train.data import SyntheticDataset, build_datasets

    args = ctx.args
    if args.dataset == "digits":
        return build_datasets("digits", img_size=args.img_size).train
    # Whole DROP batches on every rank: a multiple of batch * batch_kappa * world size.
    unit = args.batch_size * max(batch_kappa, 1) * ctx.world_size
    n = max(unit, -(-args.samples_per_rank * ctx.world_size // unit) * unit)
    return SyntheticDataset(n, args.num_classes, args.img_size, seed=args.seed)


def run_epoch(ctx: Ctx, engine: Any, loader: Any, epoch: int, max_steps: int | None = None,
              kept: list[float] | None = None) -> tuple[float, int, int]:
    """Train one epoch (or its first ``max_steps`` steps); wall-clock seconds, steps, samples."""
    import torch.nn.functional as F

    dtype = input_dtype(ctx.args)
    engine.set_epoch(epoch)
    engine.train()
    steps = samples = 0
    sync()
    t0 = time.perf_counter()
    for x, y in loader:
        if max_steps is not None and steps >= max_steps:
            break
        x, y = x.to(ctx.device, dtype), y.to(ctx.device)
        loss = F.cross_entropy(engine(x).float(), y)
        engine.backward(loss)
        engine.step()
        steps += 1
        samples += x.size(0)
        if kept is not None and engine.ldb.enabled and engine.ldb.mode.value == "DROP":
            kept.append(engine.ldb.kept_param_fraction)
    sync()
    return time.perf_counter() - t0, steps, samples


def compare_schedules(ctx: Ctx, base: tuple, ldb: tuple, epochs: list[int], reps: int,
                      label: str = "") -> dict[str, Any]:
    """Alternate whole-schedule runs of the baseline and LDB; paired speedups per repetition."""
    from ..schedule import epoch_mode

    args = ctx.args
    (be, bl), (le, ll) = base, ldb
    cfg = le.ldb.config
    drop_epoch = next((e for e in range(1, 10 * cfg.sampling_rate + 2) if epoch_mode(e, cfg).value == "DROP"), 1)
    for engine, loader in (base, ldb):  # warm-up: a few FULL and DROP steps, not timed
        run_epoch(ctx, engine, loader, 0, args.warmup_steps)
        run_epoch(ctx, engine, loader, drop_epoch, args.warmup_steps)
    per = {"baseline_s": [], "ldb_s": [], "baseline_epochs": [], "ldb_epochs": []}
    steps = {"baseline": 0, "ldb": 0}
    kept: list[float] = []
    for r in range(reps):
        order = [("baseline", base), ("ldb", ldb)]
        if r % 2:
            order.reverse()  # A B, B A, A B, ...: neither side always runs first
        for name, (engine, loader) in order:
            barrier(ctx)
            sync()
            t0 = time.perf_counter()
            ep_times, n_steps = [], 0
            for e in epochs:
                t, s, _ = run_epoch(ctx, engine, loader, e, kept=kept if name == "ldb" else None)
                ep_times.append((e, engine.ldb.mode.value, t))
                n_steps += s
            sync()
            per[f"{name}_s"].append(time.perf_counter() - t0)
            per[f"{name}_epochs"].append(ep_times)
            steps[name] = n_steps
        ctx.log(f"{label}rep {r + 1}/{reps}: baseline {per['baseline_s'][-1]:.2f} s, LDB {per['ldb_s'][-1]:.2f} s, "
                f"speedup {100 * (1 - per['ldb_s'][-1] / per['baseline_s'][-1]):.1f}%")
    speedups = [1 - l / b for b, l in zip(per["baseline_s"], per["ldb_s"])]
    ep = {"baseline_FULL": [], "ldb_FULL": [], "ldb_DROP": []}
    for name in ("baseline", "ldb"):
        for run in per[f"{name}_epochs"]:
            for _, mode, t in run:
                if f"{name}_{mode}" in ep:
                    ep[f"{name}_{mode}"].append(t)
    ep_stats = {k: rep.stats(v) for k, v in ep.items()}
    t_full = ep_stats["ldb_FULL"]["median"]
    t_drop = ep_stats["ldb_DROP"]["median"]
    t_base = ep_stats["baseline_FULL"]["median"]
    n_sched = args.schedule_epochs
    n_drop = sum(1 for e in range(n_sched) if epoch_mode(e, cfg).value == "DROP")
    derived_ldb = (n_sched - n_drop) * t_full + n_drop * (t_drop if n_drop else 0.0)
    return {
        "epochs": list(epochs), "modes": [epoch_mode(e, cfg).value for e in epochs], "reps": reps,
        "samples_per_epoch": len(ll.dataset) if hasattr(ll, "dataset") else None,
        "baseline_s": rep.stats(per["baseline_s"]), "ldb_s": rep.stats(per["ldb_s"]),
        "speedup": rep.stats(speedups), "throughput_ratio": rep.stats(b / l for b, l in zip(per["baseline_s"], per["ldb_s"])),
        "epoch_s": ep_stats, "drop_over_full_epoch": (t_drop / t_full) if ep["ldb_DROP"] else None,
        "steps": steps, "kept_param_fraction": (sum(kept) / len(kept)) if kept else None,
        "per_rep": {"baseline_s": per["baseline_s"], "ldb_s": per["ldb_s"], "speedup": speedups,
                    "baseline_epochs": per["baseline_epochs"], "ldb_epochs": per["ldb_epochs"]},
        "derived": {"epochs": n_sched, "drop_epochs": n_drop,
                    "speedup": 1 - derived_ldb / (n_sched * t_base) if t_base else None,
                    "how": "from the median FULL and DROP epoch times measured above (not a measured run)"},
    }


def steady_epochs(sampling_rate: int, periods: int) -> list[int]:
    """Epochs 1 .. periods*s: whole schedule periods in steady state (epoch 0 is FULL in any schedule)."""
    return list(range(1, periods * sampling_rate + 1))


def run_epochs(ctx: Ctx) -> dict[str, Any]:
    args = ctx.args
    init_model = make_model(args)
    cfg = ldb_section(args, True)
    data = epoch_dataset(ctx, cfg["batch_kappa"])
    base = make_engine(args, init_model, False, data)
    ldb = make_engine(args, init_model, True, data)
    res = compare_schedules(ctx, base, ldb, steady_epochs(cfg["sampling_rate"], args.periods), args.reps)
    out = result(ctx, "epochs", res, ldb[0], init_model,
                 ["Epoch 0 (always FULL) is left out: the timed epochs are whole schedule periods, as in a "
                  "long run. The baseline trains the same epochs, all FULL."])
    teardown_engines(base[0], ldb[0])
    return out


# --------------------------------------------------------------------------- sweeps


def run_sweep(ctx: Ctx, parameter: str) -> dict[str, Any]:
    args = ctx.args
    init_model = make_model(args)
    cfg = ldb_section(args, True)
    if parameter == "drop_rate":
        values: list[Any] = _floats(args.drop_rates)
        paper = rep.PAPER["figure3_drop_rate"]
    else:
        values = _ints(args.sampling_rates)
        paper = rep.PAPER["table4_sampling_rate"]
    data = epoch_dataset(ctx, cfg["batch_kappa"])
    base = make_engine(args, init_model, False, data)
    rows = []
    for v in values:
        ldb = make_engine(args, init_model, True, data, **{parameter: v})
        s = ldb[0].ldb.config.sampling_rate
        res = compare_schedules(ctx, base, ldb, steady_epochs(s, args.sweep_periods), args.sweep_reps,
                                label=f"{parameter}={v}: ")
        rows.append({"value": v, "speedup": res["speedup"], "baseline_s": res["baseline_s"], "ldb_s": res["ldb_s"],
                     "drop_over_full_epoch": res["drop_over_full_epoch"],
                     "kept_param_fraction": res["kept_param_fraction"], "epochs": res["epochs"],
                     "modes": res["modes"], "paper_speedup_pct": paper.get(v), "per_rep": res["per_rep"]})
        ldb[0].destroy()
    mode = "sweep-drop-rate" if parameter == "drop_rate" else "sweep-sampling-rate"
    res = {"parameter": parameter, "rows": rows, "reps": args.sweep_reps,
           "epoch_rule": f"1 .. {args.sweep_periods}*s (whole schedule periods)"}
    notes = ["Paper values are GPU runs of other models (Figure 3: DLA on CIFAR-10, only the rates quoted in "
             "its text; Table 4: ResNet-50 on CIFAR-100): compare shapes, not levels."]
    out = result(ctx, mode, res, None, init_model, notes)
    base[0].destroy()
    return out


# --------------------------------------------------------------------------- accuracy


def run_accuracy(ctx: Ctx) -> dict[str, Any]:
    import math

    from torch.utils.data import DataLoader, Subset

    from ..train.data import ShardedEval, build_datasets
    from ..train.monitor import evaluate
    from ..schedule import epoch_mode

    args = ctx.args
    bundle = build_datasets("digits", img_size=args.img_size)
    train = bundle.train if args.acc_limit is None else Subset(bundle.train, range(min(args.acc_limit,
                                                                                      len(bundle.train))))
    args_acc = copy.copy(args)
    args_acc.num_classes = bundle.num_classes
    init_model = make_model(args_acc)
    base = make_engine(args_acc, init_model, False, train)
    ldb = make_engine(args_acc, init_model, True, train)
    eval_loader = DataLoader(ShardedEval(bundle.test, ctx.rank, ctx.world_size), batch_size=2 * args.batch_size)
    base_lrs = {name: [g["lr"] for g in e.optimizer.param_groups] for name, (e, _) in (("baseline", base), ("ldb", ldb))}
    per_epoch, totals, steps = [], {"baseline": 0.0, "ldb": 0.0}, {"baseline": 0, "ldb": 0}
    best = {"baseline": 0.0, "ldb": 0.0}
    cfg = ldb[0].ldb.config
    for epoch in range(args.acc_epochs):
        scale = 0.5 * (1 + math.cos(math.pi * epoch / args.acc_epochs))  # cosine, no warm-up
        row = {"epoch": epoch, "mode": epoch_mode(epoch, cfg).value}
        order = [("baseline", base), ("ldb", ldb)]
        if epoch % 2:
            order.reverse()
        for name, (engine, loader) in order:
            for grp, lr0 in zip(engine.optimizer.param_groups, base_lrs[name]):
                grp["lr"] = lr0 * scale
            barrier(ctx)
            t, s, _ = run_epoch(ctx, engine, loader, epoch)
            totals[name] += t
            steps[name] += s
            row[f"{name}_s"] = t
        for name, (engine, _) in (("baseline", base), ("ldb", ldb)):
            top1 = evaluate(engine, eval_loader)["top1"]
            row[f"{name}_top1"] = top1
            best[name] = max(best[name], top1)
        per_epoch.append(row)
        ctx.log(f"accuracy: epoch {epoch} [{row['mode']}] baseline {row['baseline_top1']:.2f}% "
                f"({row['baseline_s']:.1f} s), LDB {row['ldb_top1']:.2f}% ({row['ldb_s']:.1f} s)")
    res = {"dataset": "digits", "train_size": len(train), "test_size": len(bundle.test), "epochs": args.acc_epochs,
           "per_epoch": per_epoch, "speedup": 1 - totals["ldb"] / totals["baseline"],
           "baseline": {"final_top1": per_epoch[-1]["baseline_top1"], "best_top1": best["baseline"],
                        "train_s": totals["baseline"], "steps": steps["baseline"]},
           "ldb": {"final_top1": per_epoch[-1]["ldb_top1"], "best_top1": best["ldb"], "train_s": totals["ldb"],
                   "steps": steps["ldb"]}}
    notes = ["One run per side (accuracy varies with the seed by about a point on 360 test images); "
             "cosine learning rate over the run, LDB's DROP epochs scale it by kappa."]
    out = result(ctx, "accuracy", res, ldb[0], init_model, notes)
    teardown_engines(base[0], ldb[0])
    return out


# --------------------------------------------------------------------------- scaling (driver)


SCALING_ONLY = ("--world-sizes", "--launcher", "--scaling-modes", "--out", "--launcher-args")


def strip_options(argv: Sequence[str], names: Sequence[str], mode: str = "scaling") -> list[str]:
    """``argv`` without the positional ``mode`` and the options ``names`` (``--opt v`` and ``--opt=v``)."""
    out, skip, mode_seen = [], False, False
    for a in argv:
        if skip:
            skip = False
        elif a in names:
            skip = True
        elif any(a.startswith(n + "=") for n in names):
            pass
        elif a == mode and not mode_seen:
            mode_seen = True
        else:
            out.append(a)
    return out


def launch_command(args: argparse.Namespace, ws: int, modes: str, rest: list[str], out: str) -> list[str]:
    bin_dir = os.path.dirname(sys.executable)
    port = str(_free_port())
    extra = shlex.split(args.launcher_args)
    if args.launcher == "deepspeed":
        exe = os.path.join(bin_dir, "deepspeed")
        exe = exe if os.path.exists(exe) else "deepspeed"
        head = [exe, "--num_gpus", str(ws), "--master_port", port, *extra, "--module", "ldb_ds.bench"]
    else:
        exe = os.path.join(bin_dir, "torchrun")
        exe = exe if os.path.exists(exe) else "torchrun"
        head = [exe, "--nproc_per_node", str(ws), "--master_port", port, *extra, "-m", "ldb_ds.bench"]
    return head + [modes, *rest, "--out", out]


def run_scaling(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    rest = strip_options(argv, SCALING_ONLY)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # the deepspeed launcher does not set it (docs/design.md, section 5)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    runs = {}
    for ws in _ints(args.world_sizes):
        out = os.path.join(args.out, f"ws{ws}")
        cmd = launch_command(args, ws, args.scaling_modes, rest, out)
        print(f"[bench] scaling: {' '.join(shlex.quote(c) for c in cmd)}", flush=True)
        proc = subprocess.run(cmd, env=env, cwd=os.getcwd())
        if proc.returncode != 0:
            raise SystemExit(f"scaling: world size {ws} failed with exit code {proc.returncode}")
        runs[ws] = out
    return merge_scaling(runs, " ".join(shlex.quote(a) for a in [sys.executable, "-m", "ldb_ds.bench"] + argv))


def merge_scaling(runs: dict[int, str], command: str) -> dict[str, Any]:
    rows, cond = [], None
    for ws, out in sorted(runs.items()):
        row: dict[str, Any] = {"world_size": ws, "dir": out}
        ep_path, st_path = os.path.join(out, "epochs.json"), os.path.join(out, "step.json")
        if os.path.exists(ep_path):
            ep = rep.read_json(ep_path)
            cond = ep["conditions"]
            r = ep["results"]
            row.update(speedup=r["speedup"], baseline_s=r["baseline_s"], ldb_s=r["ldb_s"],
                       drop_over_full_epoch=r["drop_over_full_epoch"])
        if os.path.exists(st_path):
            st = rep.read_json(st_path)
            cond = cond or st["conditions"]
            k, b = st["results"]["key_figures"], st["results"]["bytes"]
            row.update(drop_over_oracle=k["drop_over_oracle"]["median"], drop_over_full_step=k["drop_over_full_measured"],
                       bytes_full=b["full_counted"], bytes_drop_mean=b["drop_counted_mean"])
        row.setdefault("speedup", rep.stats([]))
        row.setdefault("baseline_s", rep.stats([]))
        row.setdefault("ldb_s", rep.stats([]))
        rows.append(row)
    cond = dict(cond or {})
    cond.update(world_size=",".join(str(ws) for ws in sorted(runs)), command=command, mode="scaling")
    notes = ["Each world size is a separate launch with the same per-rank batch and per-rank epoch size "
             "(weak scaling). The paper's Table 3 is MobileNetV2 on CIFAR-100 on GPUs."]
    if cond.get("accelerator") == "cpu":
        notes.append(SHARED_NOTE)
    return {"schema": rep.SCHEMA, "mode": "scaling", "conditions": cond,
            "results": {"rows": rows, "paper": {str(k): v for k, v in rep.PAPER["table3_scaling"].items()}},
            "notes": notes}


# --------------------------------------------------------------------------- report


def run_report(args: argparse.Namespace) -> None:
    dirs = args.report_dirs or [args.out]
    for d in dirs:
        for name in sorted(os.listdir(d)):
            if name.endswith(".json"):
                try:
                    res = rep.read_json(os.path.join(d, name))
                except ValueError:
                    continue
                paths = rep.write_all(res, d, name[:-5], tensorboard=not args.no_tensorboard)
                print(f"[bench] re-rendered {', '.join(paths.values())}")


# --------------------------------------------------------------------------- main


RUNNERS: dict[str, Callable[[Ctx], dict[str, Any]]] = {
    "step": run_step,
    "epochs": run_epochs,
    "sweep-drop-rate": lambda ctx: run_sweep(ctx, "drop_rate"),
    "sweep-sampling-rate": lambda ctx: run_sweep(ctx, "sampling_rate"),
    "accuracy": run_accuracy,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    modes = parse_modes(args.mode)
    if modes == ["report"]:
        run_report(args)
        return 0
    if modes == ["scaling"]:
        res = run_scaling(args, argv)
        paths = rep.write_all(res, args.out, "scaling", tensorboard=not args.no_tensorboard)
        print(rep.markdown(res))
        print(f"[bench] wrote {', '.join(paths.values())}")
        return 0
    ctx = setup(args, argv)
    try:
        for mode in modes:
            ctx.log(f"{mode}: start (world size {ctx.world_size}, {ctx.threads} thread(s)/rank)")
            res = RUNNERS[mode](ctx)
            if ctx.main:
                paths = rep.write_all(res, args.out, mode, tensorboard=not args.no_tensorboard)
                if not args.quiet:
                    print(rep.markdown(res), flush=True)
                ctx.log(f"wrote {', '.join(paths.values())}")
    finally:
        teardown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
