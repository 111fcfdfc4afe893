"""``step`` mode: per-step time of the baseline, LDB FULL and DROP steps and two plain-PyTorch oracles.

Five variants (six with the DROP epoch's larger batch) on the same fixed batch: the DeepSpeed
baseline (LDB off), an LDB FULL step, an LDB DROP step, and two "oracles" in plain PyTorch without
DeepSpeed: all parameters trainable, and the DROP step's units frozen (replaying exactly the masks
the LDB engine drew). Rounds alternate the variants in a rotated order; warm-up rounds are
discarded. Also: the gradient bytes handed to DeepSpeed's reductions per FULL and DROP step
(counted by :class:`.comm_count.ReductionCounter`), the weight-gradient (dW) cost of every unit
measured in isolation, and from it the DROP step time that skipping the dropped units' dW predicts.
"""

from __future__ import annotations

import copy
from typing import Any

from ..process import input_dtype
from . import report as rep
from .costs import profile_table, weight_grad_costs
from .harness import (BenchContext, barrier, drop_steps_at_the_full_batch, make_engine, make_model, result,
                      timed_step)

VARIANTS = ("baseline", "ldb_full", "ldb_drop", "oracle_drop", "oracle_full", "ldb_drop_kb")
LDB_VARIANTS = ("ldb_full", "ldb_drop", "ldb_drop_kb")


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

    def __init__(self, init_model: Any, precision: str, lr: float, momentum: float, weight_decay: float,
                 device: Any):
        import torch

        self.model = copy.deepcopy(init_model).to(device)
        if precision == "bf16":
            self.model = self.model.bfloat16()
        self.model.train()
        self.params = dict(self.model.named_parameters())
        self.opt = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)

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


class StepBenchmark:
    """The step comparison of one process: build, run the rounds, then summarise.

    The oracle replays the masks the LDB DROP steps drew, one round's block of DROP steps at a
    time, newest first; each DROP step has a sequence number, so that a recorded oracle step is
    paired with the recorded LDB step of the same mask.
    """

    def __init__(self, ctx: BenchContext):
        import torch

        self.ctx = ctx
        opts, run = ctx.opts, ctx.opts.run
        self.init_model = make_model(opts)
        self.base, _ = make_engine(opts, self.init_model, enabled=False)
        self.ldb, _ = make_engine(opts, self.init_model, enabled=True)
        self.oracle = OracleRunner(self.init_model, run.precision, run.lr, run.momentum, run.weight_decay,
                                   ctx.device)
        cfg = self.ldb.ldb.config
        self.full_epoch, self.drop_epoch = 0, cfg.sampling_rate  # epoch 0 is always FULL; epoch s is DROP
        self.units = self.ldb.ldb.units
        g = torch.Generator().manual_seed(run.seed * 1000 + ctx.rank)
        dtype = input_dtype(self.ldb)
        self.x = torch.randn(run.batch_size, 3, run.img_size, run.img_size, generator=g).to(ctx.device, dtype)
        self.y = torch.randint(0, run.num_classes, (run.batch_size,), generator=g).to(ctx.device)
        self.kb = cfg.batch_kappa if cfg.batch_scaling == "micro_batch" else 1
        self.xk, self.yk = torch.cat([self.x] * self.kb), torch.cat([self.y] * self.kb)  # a DROP epoch's batch
        self.runners = {"baseline": EngineRunner(self.base), "ldb": EngineRunner(self.ldb)}
        self.blocks: list[list[tuple[int, tuple[int, ...]]]] = []
        self.seq = 0
        self.samples: dict[str, list[tuple[float, float, float]]] = {v: [] for v in VARIANTS}
        self.drop_masks: list[tuple[int, ...]] = []  # the masks of the recorded LDB DROP steps
        self.drop_time_of_seq: dict[int, float] = {}
        self.pairs: list[tuple[int, float]] = []  # (seq, oracle time)
        self.kept_fracs: list[float] = []

    # -- the rounds -------------------------------------------------------------

    def run_variant(self, variant: str, record: bool) -> None:
        """``steps_per_round`` steps of one variant; recorded unless in warm-up."""
        if variant in LDB_VARIANTS or variant == "baseline":
            self._engine_steps(variant, record)
        else:
            self._oracle_steps(variant, record)

    def _engine_steps(self, variant: str, record: bool) -> None:
        if variant != "baseline":
            self.ldb.set_epoch(self.full_epoch if variant == "ldb_full" else self.drop_epoch)
        runner = self.runners["baseline" if variant == "baseline" else "ldb"]
        block = []
        for _ in range(self.ctx.opts.step.steps_per_round):
            t = runner.step(self.xk, self.yk) if variant == "ldb_drop_kb" else runner.step(self.x, self.y)
            if variant == "ldb_drop":
                self.seq += 1
                block.append((self.seq, self.ldb.ldb.dropped_units))
                if record:
                    self.drop_time_of_seq[self.seq] = sum(t)
                    self.drop_masks.append(self.ldb.ldb.dropped_units)
                    self.kept_fracs.append(self.ldb.ldb.kept_param_fraction)
            if record:
                self.samples[variant].append(t)
        if variant == "ldb_drop":
            self.blocks.append(block)

    def _oracle_steps(self, variant: str, record: bool) -> None:
        steps = self.ctx.opts.step.steps_per_round
        block = self.blocks.pop() if variant == "oracle_drop" else [(0, ())] * steps
        for step_seq, mask in block:
            self.oracle.set_frozen({n for i in mask for n in self.units[i].param_names})
            t = self.oracle.step(self.x, self.y)
            if record:
                self.samples[variant].append(t)
                if variant == "oracle_drop":
                    self.pairs.append((step_seq, sum(t)))
        self.oracle.set_frozen(set())

    def run_rounds(self) -> None:
        o = self.ctx.opts.step
        self.run_variant("ldb_drop", record=False)  # a block in stock: in rotated rounds the oracle may go first
        order = list(VARIANTS)
        total = o.warmup_rounds + o.rounds
        for r in range(total):
            k = r % len(order)
            for variant in order[k:] + order[:k]:  # rotated: no variant always runs first or after another
                barrier(self.ctx)
                self.run_variant(variant, record=r >= o.warmup_rounds)
            self.ctx.log(f"step: round {r + 1}/{total} done")

    # -- the summary ------------------------------------------------------------

    def variant_stats(self) -> dict[str, Any]:
        out = {}
        for v in VARIANTS:
            ts = self.samples[v]
            out[v] = {"total_s": rep.stats(sum(t) for t in ts), "forward_s": rep.stats(t[0] for t in ts),
                      "backward_s": rep.stats(t[1] for t in ts), "step_s": rep.stats(t[2] for t in ts),
                      "samples_s": [sum(t) for t in ts]}
        return out

    def key_figures(self, variants: dict[str, Any], unit_dw: list[float]) -> dict[str, Any]:
        med = {v: variants[v]["total_s"]["median"] for v in VARIANTS}
        ratios = [self.drop_time_of_seq[q] / t for q, t in self.pairs if q in self.drop_time_of_seq]  # same mask
        dw_saved = [sum(unit_dw[i] for i in m) for m in self.drop_masks]
        full = med["ldb_full"]
        dw_saved_mean = sum(dw_saved) / max(len(dw_saved), 1)
        kept_mean = sum(self.kept_fracs) / max(len(self.kept_fracs), 1)
        opt_saved = variants["ldb_full"]["step_s"]["median"] * (1.0 - kept_mean)
        kb = self.kb
        return {
            "drop_over_oracle": rep.stats(ratios),
            "drop_over_oracle_of_medians": med["ldb_drop"] / med["oracle_drop"],
            "drop_over_full_measured": med["ldb_drop"] / full,
            "oracle_drop_over_oracle_full": med["oracle_drop"] / med["oracle_full"],
            "predicted_dw_saving_s": dw_saved_mean,
            "predicted_drop_s_dw": full - dw_saved_mean,
            "drop_over_full_predicted_dw": 1.0 - dw_saved_mean / full,
            "drop_over_full_predicted_dw_opt": 1.0 - (dw_saved_mean + opt_saved) / full,
            "dw_total_s": sum(unit_dw),
            "dw_share_of_full": sum(unit_dw) / med["oracle_full"],
            "kept_param_fraction_mean": kept_mean,
            # A DROP epoch takes batch_kappa times fewer steps of batch_kappa times larger batches:
            # its cost relative to a FULL epoch is the per-sample cost of those steps.
            "batch_kappa": kb,
            "drop_epoch_over_full_epoch_predicted": med["ldb_drop_kb"] / (kb * full),
            "batch_effect": (med["ldb_drop_kb"] / kb) / med["ldb_drop"],
            "schedule_speedup_predicted": (1 - med["ldb_drop_kb"] / (kb * full)) / self.ldb.ldb.config.sampling_rate,
            "ldb_full_over_baseline": full / med["baseline"],
            # What a DROP step saves over a FULL one at the same batch, against what plain PyTorch saves
            # with the same units frozen (GPU target: >= 90%): DeepSpeed's own overhead is not LDB's,
            # but the saving must survive it.
            "drop_saving_s": full - med["ldb_drop"],
            "oracle_drop_saving_s": med["oracle_full"] - med["oracle_drop"],
            "meets_oracle_target": (rep.stats(ratios)["median"] <= 1.05) if ratios else None,
            "meets_prediction": med["ldb_drop"] / full <= 1.0 - dw_saved_mean / full,
        }

    def count_bytes(self) -> dict[str, Any]:
        """Gradient bytes per rank of a baseline, a FULL and ``byte_steps`` DROP steps, counted exactly."""
        from .comm_count import ReductionCounter

        ldb, runners, x, y = self.ldb, self.runners, self.x, self.y
        with ReductionCounter() as counter:
            runners["baseline"].step(x, y)
            base_bytes, base_calls = counter.bytes, len(counter.calls)
            ldb.set_epoch(self.full_epoch)
            counter.reset()
            runners["ldb"].step(x, y)
            full_bytes, full_calls = counter.bytes, len(counter.calls)
            ldb.set_epoch(self.drop_epoch)
            drops = []
            for _ in range(self.ctx.opts.step.byte_steps):
                counter.reset()
                runners["ldb"].step(x, y)
                drops.append({"counted": counter.bytes, "calls": len(counter.calls),
                              "expected": ldb.ldb.grad_bytes_step, "kept_param_fraction": ldb.ldb.kept_param_fraction,
                              "dropped_units": len(ldb.ldb.dropped_units)})
        errors = [abs((d["counted"] / full_bytes) / d["kept_param_fraction"] - 1.0) for d in drops
                  if full_bytes and d["kept_param_fraction"]]
        out = {"baseline_counted": base_bytes, "full_counted": full_bytes, "full_expected": ldb.ldb.grad_bytes_full,
               "baseline_calls": base_calls, "full_calls": full_calls, "drop_steps": drops,
               "drop_counted_mean": round(sum(d["counted"] for d in drops) / max(len(drops), 1)),
               "drop_expected_mean": round(sum(d["expected"] for d in drops) / max(len(drops), 1)),
               "drop_ratio_max_rel_error": max(errors) if errors else None}
        if not full_bytes:
            out["note"] = (f"Nothing was handed to a gradient reduction at world size {self.ctx.world_size} "
                           "(DeepSpeed skips the reduction with one rank); 'expected' is what a FULL/DROP "
                           "step would reduce per rank at world size > 1.")
        return out

    def profile(self) -> dict[str, Any]:
        """torch.profiler op tables of a baseline, FULL, DROP and oracle FULL step."""
        runners, x, y = self.runners, self.x, self.y
        out = {"baseline": profile_table(lambda: runners["baseline"].step(x, y))}
        self.ldb.set_epoch(self.full_epoch)
        out["ldb_full"] = profile_table(lambda: runners["ldb"].step(x, y))
        self.ldb.set_epoch(self.drop_epoch)
        out["ldb_drop"] = profile_table(lambda: runners["ldb"].step(x, y))
        self.oracle.set_frozen(set())
        out["oracle_full"] = profile_table(lambda: self.oracle.step(x, y))
        return out

    def run(self) -> dict[str, Any]:
        with drop_steps_at_the_full_batch():  # what a DROP step saves at the same batch
            return self._run()

    def _run(self) -> dict[str, Any]:
        ctx, o = self.ctx, self.ctx.opts.step
        self.run_rounds()
        variants = self.variant_stats()
        ctx.log("step: timing every unit's weight gradient in isolation")
        costs, untimed = weight_grad_costs(self.oracle.model, self.x, o.dw_reps)
        unit_dw = [sum(costs.get(n, 0.0) for n in u.param_names) for u in self.units]
        key = self.key_figures(variants, unit_dw)
        bytes_ = self.count_bytes()
        profile = None
        if o.profile:
            ctx.log("step: profiling a FULL and a DROP step")
            profile = self.profile()
        self.ldb.set_epoch(self.full_epoch)
        results = {"variants": variants, "key_figures": key, "bytes": bytes_, "profile": profile,
                   "rounds": o.rounds, "warmup_rounds": o.warmup_rounds, "steps_per_round": o.steps_per_round,
                   "units": len(self.units), "unit_dw_s": {u.name: d for u, d in zip(self.units, unit_dw)},
                   "dw_untimed_modules": untimed, "mode_epochs": {"full": self.full_epoch, "drop": self.drop_epoch},
                   "batch_note": "all variants use the same per-rank batch; batch_kappa acts per epoch (epochs mode)"}
        notes = ["The oracle is plain PyTorch on each rank with no DeepSpeed and no communication."
                 + (" At world size > 1 it therefore omits the gradient reduction the other variants pay for."
                    if ctx.world_size > 1 else "")]
        if key["ldb_full_over_baseline"] > 1.05:
            notes.append("The LDB FULL step's median is more than 5% above the baseline's: one param group per "
                         "unit adds per-group work (see docs/benchmark.md); on a shared machine compare the "
                         "min-based ratio as well.")
        out = result(ctx, "step", results, self.ldb, self.init_model, notes)
        self.base.destroy()
        self.ldb.destroy()
        return out


def run_step(ctx: BenchContext) -> dict[str, Any]:
    return StepBenchmark(ctx).run()


__all__ = ["VARIANTS", "EngineRunner", "OracleRunner", "StepBenchmark", "run_step"]
