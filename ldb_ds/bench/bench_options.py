"""The benchmark's options: typed dataclasses, one per argument group, and the checks of their values.

Each field is one option: its type, its default (the one default) and its attribute docstring (the
``--help`` text); each group's ``__post_init__`` checks its values, so a bad one is caught however
the group is built (one ``ldb-bench: error:`` line, exit status 2). The ``ldb-bench`` command line
is generated from these classes by :mod:`.bench_arguments`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, NoReturn

from ..process import launched_rank, report_agreed_error
from .alphabeta import Links

MODES = ("step", "epochs", "sweep-drop-rate", "sweep-sampling-rate", "accuracy", "counts", "project", "host",
         "scaling", "report")
ALL = ("step", "epochs", "sweep-drop-rate", "sweep-sampling-rate", "accuracy")
"""What ``all`` runs."""
ALONE = ("scaling", "report")
"""Modes that run alone (they start no process group of their own)."""


@dataclass
class RunOptions:
    """model and training setup (both sides of every comparison)"""

    model: str = "resnet18"
    """timm name or tv:<torchvision name> (ldb_ds.workloads.models.create_model)."""
    stem: Literal["auto", "cifar", "original"] = "auto"
    """Stem adaptation for small inputs: auto gives inputs <= 64 px the CIFAR stem."""
    img_size: int = 32
    """Input image size in pixels."""
    num_classes: int = 10
    """Classes of the synthetic data and the model head."""
    batch_size: int = 32
    """Micro batch per rank of a FULL step (DROP epochs use batch_kappa times more)."""
    zero_stage: Literal[0, 1, 2, 3] = 2
    """ZeRO stage of both sides."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Model and input precision of both sides."""
    lr: float = 0.05
    """SGD learning rate (unless --ds-config has an optimizer section)."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 5e-4
    """SGD weight decay."""
    ds_config: str | None = None
    """Optional base DeepSpeed JSON; batch size, ZeRO stage, precision and LDB keys given on the command
    line override it."""
    seed: int = 0
    """Model init and data seed."""
    threads: int | None = None
    """torch threads per rank (default: OMP_NUM_THREADS, else cores / local ranks)."""
    backend: str | None = None
    """torch.distributed backend (default: the accelerator's)."""

    def __post_init__(self) -> None:
        for name in ("img_size", "num_classes", "batch_size"):
            _positive(name, getattr(self, name))
        _at_least("lr", self.lr, 0.0)
        _at_least("momentum", self.momentum, 0.0, 1.0)
        _at_least("weight_decay", self.weight_decay, 0.0)
        _at_least("seed", self.seed, 0)
        _at_least("threads", self.threads, 1)


@dataclass
class StepOptions:
    """step mode"""

    warmup_rounds: int = 2
    """Rounds of all variants run first and discarded."""
    rounds: int = 6
    """Timed rounds of all variants (rotated order)."""
    steps_per_round: int = 2
    """Steps per variant and round."""
    byte_steps: int = 4
    """Untimed DROP steps whose bytes are counted."""
    dw_reps: int = 5
    """Repetitions of each unit's isolated dW timing."""
    profile: bool = False
    """torch.profiler op tables of a FULL and a DROP step."""

    def __post_init__(self) -> None:
        _positive("rounds", self.rounds)
        _positive("steps_per_round", self.steps_per_round)
        _positive("dw_reps", self.dw_reps)
        _at_least("warmup_rounds", self.warmup_rounds, 0)
        _at_least("byte_steps", self.byte_steps, 0)


@dataclass
class EpochOptions:
    """epochs / sweep / accuracy modes"""

    dataset: Literal["synthetic", "digits"] = "synthetic"
    """Data for epochs and sweeps (accuracy always uses digits)."""
    samples_per_rank: int = 512
    """Training samples per rank per epoch."""
    periods: int = 2
    """Schedule periods (s epochs each) per timed run."""
    reps: int = 3
    """A/B repetitions (each: baseline run + LDB run)."""
    warmup_steps: int = 2
    """Untimed FULL and DROP steps per engine first."""
    loader_workers: int = 0
    """DataLoader worker processes (persistent) of the epochs, sweep and accuracy runs; 0: the main
    process collates each batch between steps. On a GPU a few workers keep the input pipeline off
    the step's path, so the epochs time the training, as a GPU training loop does."""
    drop_rates: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    """Drop rates of sweep-drop-rate."""
    sampling_rates: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
    """Sampling rates of sweep-sampling-rate."""
    sweep_periods: int = 1
    """Schedule periods per timed run in the sweeps."""
    sweep_reps: int = 2
    """A/B repetitions per sweep value."""
    acc_epochs: int = 8
    """Epochs of the accuracy comparison."""
    acc_limit: int | None = None
    """Use only this many digits training images."""
    schedule_epochs: int = 200
    """Length of the schedule whose speedup is derived from the measured epoch times."""

    def __post_init__(self) -> None:
        for name in ("samples_per_rank", "periods", "reps", "sweep_periods", "sweep_reps", "acc_epochs",
                     "schedule_epochs"):
            _positive(name, getattr(self, name))
        _at_least("warmup_steps", self.warmup_steps, 0)
        _at_least("loader_workers", self.loader_workers, 0)
        _at_least("acc_limit", self.acc_limit, 1)
        if not self.drop_rates or any(not 0.0 <= r < 1.0 for r in self.drop_rates):
            fail(f"--drop-rates must be numbers in [0, 1), got {self.drop_rates}")
        if not self.sampling_rates or min(self.sampling_rates) < 1:
            fail(f"--sampling-rates must be integers >= 1, got {self.sampling_rates}")


@dataclass
class ScalingOptions:
    """scaling mode (options of the driver, not passed on to the runs it launches)"""

    world_sizes: tuple[int, ...] = (1, 2)
    """World sizes, each a separate launch."""
    launcher: Literal["deepspeed", "torchrun"] = "deepspeed"
    """The launcher that starts each world size."""
    scaling_modes: str = "step,epochs"
    """The modes each launch runs."""
    launcher_args: str = ""
    """Extra launcher arguments (e.g. --bind_cores_to_rank)."""

    def __post_init__(self) -> None:
        if not self.world_sizes or min(self.world_sizes) < 1:
            fail(f"--world-sizes must be integers >= 1, got {self.world_sizes}")


@dataclass
class CountsOptions:
    """counts mode (collectives, optimizer calls and kernels per step, counted)"""

    count_models: tuple[str, ...] = ()
    """Models to count, one after the other (default: --model)."""
    count_stages: tuple[int, ...] = (0, 1, 2, 3)
    """ZeRO stages to count."""
    count_steps: int = 3
    """Counted LDB DROP steps per model and stage (their masks differ: the table gives the mean)."""
    count_profile: bool = True
    """Count torch.profiler ops (optimizer steps, foreach/fused kernels) as well."""

    def __post_init__(self) -> None:
        _positive("count_steps", self.count_steps)
        if any(s not in (0, 1, 2, 3) for s in self.count_stages):
            fail(f"--count-stages must be ZeRO stages 0-3, got {self.count_stages}")


@dataclass
class ProjectOptions:
    """project mode (alpha-beta projection to large clusters; see docs/benchmark.md)"""

    project_world_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
    """World sizes of the projection."""
    gpus_per_node: int = Links.gpus_per_node
    """Ranks per node: up to this many ranks communicate over the intra-node link only."""
    intra_bw_gbs: float = Links.intra_bw_gbs
    """ASSUMED intra-node bandwidth per rank achieved in a collective, GB/s (bus bandwidth, as nccl-tests
    reports it): NVLink 4 moves 450 GB/s per direction per H100; two thirds of it assumed."""
    intra_lat_us: float = Links.intra_lat_us
    """ASSUMED intra-node latency per algorithm step, microseconds."""
    inter_bw_gbs: float = Links.inter_bw_gbs
    """ASSUMED inter-node bandwidth per rank, GB/s: one 400 Gb/s (50 GB/s) InfiniBand NIC per GPU, 90% of it
    achieved."""
    inter_lat_us: float = Links.inter_lat_us
    """ASSUMED inter-node latency per algorithm step, microseconds."""
    algorithm: Literal["auto", "ring", "tree"] = "auto"
    """Collective algorithm: ring ((W-1) latency steps), tree (log2 W steps) or auto (the faster one
    per message, as NCCL's tuner picks)."""
    overlap: float | None = None
    """Fraction of the gradient reduction hidden behind backward compute (0..1; default: DeepSpeed's own
    default for the stage: 1 at ZeRO-3 (overlap_comm on), 0 otherwise)."""
    compute_scales: tuple[float, ...] = (1.0,)
    """What-if factors: each divides the calibrated compute and the optimizer's per-element cost (a device
    that many times faster than the calibrating one; an ASSUMPTION); per-call and per-group optimizer costs
    (launch latency) stay as measured. The main table uses the measured costs; the plot and the what-if
    table show every factor."""
    project_reps: int = 5
    """Profiled repetitions of each unit's forward, input-gradient and weight-gradient work."""
    counts: str | None = None
    """A counts.json (from ``ldb-bench counts`` at world size >= 2) holding this model and ZeRO stage, whose
    collectives to use instead of counting here (at world size 1 DeepSpeed skips the all-gathers)."""
    unit_costs: str | None = None
    """A project.json whose measured per-unit costs to reuse (e.g. measured on a GPU), instead of
    measuring here."""
    validate: list[str] = field(default_factory=list)
    """A step.json (with epochs.json beside it) measured at some world size, to compare the projection
    with (repeatable)."""
    calibrate_comm: bool = False
    """At world size > 1: fit the latency and bandwidth of this run's backend from timed collectives and
    use them for the intra-node link (calibrated instead of assumed)."""

    def __post_init__(self) -> None:
        if self.overlap is not None and not 0.0 <= self.overlap <= 1.0:
            fail(f"--overlap must lie in [0, 1], got {self.overlap}")
        for name in ("gpus_per_node", "project_reps"):
            _positive(name, getattr(self, name))
        if not self.compute_scales or min(self.compute_scales) <= 0:
            fail(f"--compute-scales must be numbers > 0, got {self.compute_scales}")
        for name in ("intra_bw_gbs", "inter_bw_gbs"):
            if getattr(self, name) <= 0:
                fail(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        for name in ("intra_lat_us", "inter_lat_us"):
            _at_least(name, getattr(self, name), 0.0)
        if not self.project_world_sizes or min(self.project_world_sizes) < 1:
            fail(f"--project-world-sizes must be integers >= 1, got {self.project_world_sizes}")


# ============================================================================ host mode (issue 16, item 1)
# One block on purpose (the rest of this file is edited for input validation): the host mode's options.
# It is wired in by three one-word entries: "host" in MODES, HostOptions in GROUPS, BenchOptions.host.


@dataclass
class HostOptions:
    """host mode (host work per step on a model of N tiny units: ops, syncs, copies, collectives)"""

    host_units: tuple[int, ...] = (50, 200)
    """Model sizes N: N x Linear(width, width) + ReLU, every Linear one LDB unit."""
    host_stages: tuple[int, ...] = (0, 1, 2, 3)
    """ZeRO stages of the cells."""
    host_precisions: tuple[str, ...] = ("fp32", "bf16")
    """Precisions of the cells (fp32, bf16)."""
    host_optimizers: tuple[str, ...] = ("sgd", "adamw")
    """Optimizers of the cells: sgd (momentum 0.9), adamw (torch's, through DeepSpeed's torch_adam); foreach=True."""
    host_width: int = 8
    """Width w of each Linear(w, w)."""
    host_batch: int = 4
    """Micro batch per rank (FULL and DROP steps alike)."""
    host_warmup: int = 2
    """Untimed, uncounted steps of every variant first."""
    host_rounds: int = 10
    """Timed interleaved rounds (deepspeed, off, full, drop; rotated); 0: counts only. The time figure
    is paired by round (its median over rounds): 10 rounds give it a quartile range to read."""
    host_steps_per_round: int = 2
    """Timed steps per variant and round."""

    def __post_init__(self) -> None:
        if not self.host_units or min(self.host_units) < 3:
            fail(f"--host-units must be integers >= 3 (keep_first + keep_last + 1), "
                 f"got {','.join(map(str, self.host_units))!r}")
        checks = (("host_stages", self.host_stages, (0, 1, 2, 3)),
                  ("host_precisions", self.host_precisions, ("fp32", "bf16")),
                  ("host_optimizers", self.host_optimizers, ("sgd", "adamw")))
        for name, values, allowed in checks:
            if not values or any(v not in allowed for v in values):
                fail(f"{flag_of(name)} must be a comma-separated list of {', '.join(map(str, allowed))}; "
                     f"got {','.join(map(str, values))!r}")
        for name in ("host_width", "host_batch", "host_steps_per_round"):
            _positive(name, getattr(self, name))
        for name in ("host_warmup", "host_rounds"):
            if getattr(self, name) < 0:
                fail(f"{flag_of(name)} must be >= 0, got {getattr(self, name)}")

# ============================================================================ end of host mode block


@dataclass
class OutputOptions:
    """output"""

    out: str = "bench_results"
    """Output directory (rank 0 writes)."""
    no_tensorboard: bool = False
    """Write no TensorBoard scalars."""
    note: list[str] = field(default_factory=list)
    """A sentence added to every table (repeatable)."""
    quiet: bool = False
    """Print no progress and no tables."""


GROUPS: dict[str, type] = {"run": RunOptions, "step": StepOptions, "epochs": EpochOptions, "scaling": ScalingOptions,
                           "counts": CountsOptions, "project": ProjectOptions, "host": HostOptions, "output": OutputOptions}


@dataclass
class BenchOptions:
    """Everything one benchmark invocation was asked to do."""

    modes: list[str]
    report_dirs: list[str]
    run: RunOptions
    step: StepOptions
    epochs: EpochOptions
    scaling: ScalingOptions
    counts: CountsOptions
    project: ProjectOptions
    host: HostOptions
    output: OutputOptions
    ldb: dict[str, Any]
    """The ``layer_drop_back`` keys given on the command line (the others keep LDBConfig's defaults)."""


# --------------------------------------------------------------------------- checks


def flag_of(name: str) -> str:
    """A field's command-line flag (``--`` and the name with dashes), as the errors below name it."""
    return "--" + name.replace("_", "-")


def report_error(message: str) -> None:
    """One ``ldb-bench: error:`` line per job, from rank 0 (every rank found it; the others let it print)."""
    report_agreed_error(f"ldb-bench: error: {message}", is_main=launched_rank() == 0)


def fail(message: str) -> NoReturn:
    """:func:`report_error` and exit status 2 (as argparse's own errors): the usage is in --help."""
    report_error(message)
    raise SystemExit(2)


def _positive(name: str, value: int) -> None:
    if value < 1:
        fail(f"{flag_of(name)} must be >= 1, got {value}")


def _at_least(name: str, value: float | None, low: float, high: float | None = None) -> None:
    """``low <= value (<= high)``; ``None`` passes (an optional value not given)."""
    if value is not None and (value < low or (high is not None and value > high)):
        fail(f"{flag_of(name)} must be " + (f">= {low}" if high is None else f"in [{low}, {high}]")
             + f", got {value}")


__all__ = ["MODES", "ALL", "ALONE", "BenchOptions", "RunOptions", "StepOptions", "EpochOptions", "ScalingOptions",
           "CountsOptions", "ProjectOptions", "HostOptions", "OutputOptions", "GROUPS", "flag_of", "report_error",
           "fail"]
