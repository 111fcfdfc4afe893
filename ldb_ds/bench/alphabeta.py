"""The arithmetic of ``ldb-bench project``: an alpha-beta model of collectives and a step-time model.

Pure Python (no torch), so every rule is a function a unit test can call. Inputs are seconds and
bytes measured or counted elsewhere (:mod:`.project`); docs/benchmark.md lists which are calibrated
and which are assumed.

One level of ranks (``n`` = message bytes: an all-reduce's tensor, a reduce-scatter's input, an
all-gather's output; ``W`` ranks; ``a`` = latency per step; ``B`` = bandwidth per rank):

===================  =======================================  ======================================
collective           ring                                     tree (double binary tree / PAT-like)
===================  =======================================  ======================================
all-reduce           2(W-1) a + 2 (W-1)/W n/B                 2 ceil(log2 W) a + 2 n/B
reduce-scatter,      (W-1) a + (W-1)/W n/B                    ceil(log2 W) a + n/B
all-gather
broadcast, reduce    ceil(log2 W) a + n/B (pipelined tree)    the same
===================  =======================================  ======================================

``auto`` takes the faster of the two per message, as NCCL's tuner does. Up to ``gpus_per_node``
ranks, one level over the intra-node link. Beyond, two levels as NCCL's hierarchical algorithms
run them, each GPU using its own NIC across nodes: an all-reduce is an intra-node reduce-scatter
of n, an inter-node all-reduce of n/g among the N nodes' peers and an intra-node all-gather of n;
a reduce-scatter (all-gather) is its first (last) two parts; a broadcast crosses nodes, then
fans out inside them. One rank communicates nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Literal, Sequence

Algorithm = Literal["auto", "ring", "tree"]
ALL_REDUCE = ("all_reduce", "all_reduce_coalesced")
SCATTER = ("reduce_scatter", "reduce_scatter_tensor")
GATHERS = ("all_gather", "all_gather_into_tensor", "all_gather_coalesced")
ALL_TO_ALL = ("all_to_all_single", "all_to_all")
ROOTED = ("broadcast", "reduce", "gather", "scatter", "barrier")
REDUCTIONS = ("all_reduce", "all_reduce_coalesced", "reduce", "reduce_scatter", "reduce_scatter_tensor")


@dataclass(frozen=True)
class Links:
    """Link figures. The defaults (8-GPU NVLink nodes, one 400 Gb/s InfiniBand NIC per GPU) are
    ASSUMPTIONS, not measurements; docs/benchmark.md says where they come from."""

    gpus_per_node: int = 8
    """Ranks per node: up to this many ranks communicate over the intra-node link only."""
    intra_bw_gbs: float = 300.0
    """Intra-node bandwidth per rank achieved in a collective, GB/s (bus bandwidth, as nccl-tests
    reports it): NVLink 4 moves 450 GB/s per direction per H100; assumed two thirds of it."""
    intra_lat_us: float = 2.0
    """Intra-node latency per algorithm step, microseconds."""
    inter_bw_gbs: float = 45.0
    """Inter-node bandwidth per rank, GB/s: one 400 Gb/s (50 GB/s) NIC per GPU, 90% of it achieved."""
    inter_lat_us: float = 6.0
    """Inter-node latency per algorithm step, microseconds."""

    @property
    def intra(self) -> tuple[float, float]:
        return self.intra_lat_us * 1e-6, self.intra_bw_gbs * 1e9

    @property
    def inter(self) -> tuple[float, float]:
        return self.inter_lat_us * 1e-6, self.inter_bw_gbs * 1e9


def _one_level(op: str, n: float, w: int, link: tuple[float, float], algorithm: Algorithm) -> float:
    """``op`` in all_reduce / scatter_gather / rooted over ``w`` ranks of one link."""
    if w <= 1:
        return 0.0
    a, bw = link
    steps = math.ceil(math.log2(w))
    if op == "all_reduce":
        ring = 2 * (w - 1) * a + 2 * (w - 1) / w * n / bw
        tree = 2 * steps * a + 2 * n / bw
    elif op == "scatter_gather":
        ring = (w - 1) * a + (w - 1) / w * n / bw
        tree = steps * a + n / bw
    else:
        ring = tree = steps * a + n / bw
    return {"ring": ring, "tree": tree, "auto": min(ring, tree)}[algorithm]


def collective_time(kind: str, nbytes: float, world_size: int, links: Links, algorithm: Algorithm = "auto") -> float:
    """Seconds of one collective of ``nbytes`` over ``world_size`` ranks (0 for one rank)."""
    w, g = int(world_size), links.gpus_per_node
    if kind in ALL_REDUCE:
        op = "all_reduce"
    elif kind in SCATTER or kind in GATHERS or kind in ALL_TO_ALL:
        op = "scatter_gather"
    elif kind in ROOTED:
        op = "rooted"
    else:
        raise ValueError(f"no cost model for collective {kind!r}")
    if w <= g:
        return _one_level(op, nbytes, w, links.intra, algorithm)
    nodes = math.ceil(w / g)
    if kind in ALL_TO_ALL:  # every rank exchanges with every other: the inter-node link paces it
        return _one_level(op, nbytes, w, links.inter, algorithm)
    if op == "rooted":
        return _one_level(op, nbytes, nodes, links.inter, algorithm) + _one_level(op, nbytes, g, links.intra, algorithm)
    intra_part = _one_level("scatter_gather", nbytes, g, links.intra, algorithm)
    inter_part = _one_level(op, nbytes / g, nodes, links.inter, algorithm)
    return inter_part + (2 if op == "all_reduce" else 1) * intra_part


@dataclass(frozen=True)
class Message:
    """One collective a step makes; ``weight`` < 1 for DROP steps averaged over several masks."""

    kind: str
    nbytes: float
    weight: float = 1.0


def comm_time(messages: Iterable[Message], world_size: int, links: Links, algorithm: Algorithm = "auto",
              kinds: Sequence[str] | None = None) -> float:
    """Predicted seconds of ``messages`` (those of the given kinds), one after the other."""
    return sum(m.weight * collective_time(m.kind, m.nbytes, world_size, links, algorithm)
               for m in messages if kinds is None or m.kind in kinds)


@dataclass(frozen=True)
class OptimizerCost:
    """Optimizer step = ``call`` per optimizer invocation + ``group`` per param group stepped +
    ``element`` per parameter element updated (seconds; calibrated by timing the torch optimizer)."""

    call: float
    group: float
    element: float

    def time(self, calls: float, groups: float, elements: float) -> float:
        return self.call * calls + self.group * groups + self.element * elements


@dataclass
class Variant:
    """One kind of step (baseline, LDB FULL, LDB DROP at a batch) on one rank, before communication."""

    forward: float
    """Forward seconds (whole model, incl. the loss)."""
    backward: float
    """Backward seconds (whole model): all input gradients and all kept weight gradients."""
    optimizer_calls: float
    optimizer_groups: float
    optimizer_elements: float
    """Parameter elements stepped (all ranks' worth: divided by W where ZeRO partitions them)."""
    messages: list[Message] = field(default_factory=list)
    """The collectives one optimizer step makes (as counted at one world size)."""
    micro_steps: int = 1
    """Forward/backward passes per optimizer step (gradient accumulation)."""
    samples: int = 1
    """Samples per rank per optimizer step."""


@dataclass(frozen=True)
class StepTime:
    compute: float
    optimizer: float
    comm: float
    comm_exposed: float

    @property
    def total(self) -> float:
        return self.compute + self.optimizer + self.comm_exposed


def step_time(v: Variant, world_size: int, zero_stage: int, opt: OptimizerCost, links: Links,
              algorithm: Algorithm = "auto", overlap: float = 0.0) -> StepTime:
    """Seconds of one optimizer step of ``v`` on one of ``world_size`` ranks.

    ``overlap`` of the gradient reductions (and at ZeRO-3 of the parameter all-gathers) hides behind
    compute, at most as long as the backward pass (forward + backward for ZeRO-3's gathers) lasts;
    everything else (ZeRO-1/2's all-gather after the step, norms, the mask broadcast) is exposed.
    """
    compute = v.micro_steps * (v.forward + v.backward)
    shards = world_size if zero_stage >= 1 else 1  # ZeRO 1-3 partition the optimizer state
    optimizer = opt.time(v.optimizer_calls, v.optimizer_groups, v.optimizer_elements / shards)
    comm = comm_time(v.messages, world_size, links, algorithm)
    overlappable = comm_time(v.messages, world_size, links, algorithm, REDUCTIONS)
    window = v.micro_steps * v.backward
    if zero_stage == 3:
        overlappable += comm_time(v.messages, world_size, links, algorithm, GATHERS)
        window = compute
    hidden = min(overlap * overlappable, window)
    return StepTime(compute, optimizer, comm, comm - hidden)


def schedule_speedup(t_base: float, t_full: float, t_drop: float, sampling_rate: int, drop_samples_factor: int) -> float:
    """End-to-end speedup 1 - T_ldb / T_baseline of a schedule with one DROP epoch in ``sampling_rate``.

    Per-sample costs: a FULL step of B samples takes ``t_base`` (baseline) or ``t_full`` (LDB); a DROP
    step of ``drop_samples_factor`` x B samples takes ``t_drop`` (the steady state of a long run).
    """
    s = sampling_rate
    ldb = (s - 1) * t_full + t_drop / drop_samples_factor
    return 1.0 - ldb / (s * t_base)


def fit_alpha_beta(sizes: Sequence[float], seconds: Sequence[float], world_size: int) -> tuple[float, float]:
    """Latency (s) and bandwidth (bytes/s) of ring all-reduces timed at ``sizes`` (least squares)."""
    n = len(sizes)
    if n < 2 or world_size < 2:
        raise ValueError("fitting latency and bandwidth needs >= 2 message sizes and >= 2 ranks")
    mx, my = sum(sizes) / n, sum(seconds) / n
    slope = sum((x - mx) * (y - my) for x, y in zip(sizes, seconds)) / sum((x - mx) ** 2 for x in sizes)
    intercept = my - slope * mx
    w = world_size
    latency = max(intercept, 0.0) / (2 * (w - 1))
    bandwidth = 2 * (w - 1) / w / slope if slope > 0 else float("inf")
    return latency, bandwidth


__all__ = ["Links", "Message", "OptimizerCost", "Variant", "StepTime", "collective_time", "comm_time",
           "step_time", "schedule_speedup", "fit_alpha_beta", "REDUCTIONS", "GATHERS"]
