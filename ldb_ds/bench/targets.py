"""The per-step targets of issue 10, read from ``step`` mode results (``step.json``).

::

    python -m ldb_ds.bench.targets RESULT_DIR_OR_step.json ... [--out targets.md]

For each run (one model, ZeRO stage, world size):

* **LDB FULL / baseline**: per round, the median LDB FULL step over the median baseline step of
  the same round (the variants alternate inside a round, so a disturbance of the machine hits
  both); the median over rounds with its quartiles and min..max. Target: <= 1.01.
* **DROP / oracle DROP - baseline / oracle FULL**: the wrapper's own overhead in a DROP step
  over plain PyTorch with the same units frozen (paired per mask), against DeepSpeed's own
  overhead over plain PyTorch in a FULL step (paired per round). Target: within 0.03.
* **the same overheads in milliseconds**: (median DROP step - median oracle DROP step) -
  (median baseline step - median oracle FULL step). The ratio target above assumes DeepSpeed's
  overhead scales with the step's compute. A fixed per-step cost does not: at ZeRO-3 every
  forward and backward all-gathers every unit's parameters, dropped units included (their
  weights are needed for the forward and for the input gradients), so the same milliseconds
  over the DROP step's smaller compute give a larger ratio. A difference near 0 ms (or below)
  says LDB adds nothing to DeepSpeed's own overhead in a DROP step even where the ratio misses.
* **gradient bytes**: every counted DROP step handed exactly the kept units' bytes to the
  reductions. Target: exact (at world size 1 DeepSpeed reduces nothing: not applicable).

Wall-clock ratios on a shared machine are only as good as the machine was quiet; the rounds'
spread is printed beside every median so a disturbed run shows.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any, Sequence

from .report import stats

FULL_TARGET = 1.01
OVERHEAD_TARGET = 0.03


def _per_round(samples: Sequence[float], steps_per_round: int) -> list[float]:
    rounds = [sorted(samples[i:i + steps_per_round]) for i in range(0, len(samples), steps_per_round)]
    return [stats(r)["median"] for r in rounds if r]


def paired_round_ratios(results: dict[str, Any], num: str, den: str) -> list[float]:
    """Per round: median of ``num``'s steps over median of ``den``'s steps in that round."""
    spr = int(results["steps_per_round"])
    a = _per_round(results["variants"][num]["samples_s"], spr)
    b = _per_round(results["variants"][den]["samples_s"], spr)
    return [x / y for x, y in zip(a, b)]


def evaluate(result: dict[str, Any]) -> dict[str, Any]:
    """The target figures of one ``step`` result (the parsed ``step.json``)."""
    r = result["results"]
    c = result["conditions"]
    full = stats(paired_round_ratios(r, "ldb_full", "baseline"))
    ds_overhead = stats(paired_round_ratios(r, "baseline", "oracle_full"))
    drop_overhead = r["key_figures"]["drop_over_oracle"]  # paired per mask
    drops = r["bytes"]["drop_steps"]
    counted = r["bytes"]["full_counted"] > 0
    ms = {v: 1e3 * r["variants"][v]["total_s"]["median"] for v in ("ldb_drop", "oracle_drop", "baseline", "oracle_full")}
    drop_excess_ms = ms["ldb_drop"] - ms["oracle_drop"]
    ds_excess_ms = ms["baseline"] - ms["oracle_full"]
    return {
        "model": c["model"], "world_size": c["world_size"], "zero_stage": c["zero_stage"],
        "precision": c["precision"], "batch": c["micro_batch_per_rank"], "units": r["units"],
        "full_over_baseline": full, "meets_full": full["median"] <= FULL_TARGET,
        "drop_over_oracle": drop_overhead, "baseline_over_oracle_full": ds_overhead,
        "overhead_difference": drop_overhead["median"] - ds_overhead["median"],
        "meets_overhead": drop_overhead["median"] - ds_overhead["median"] <= OVERHEAD_TARGET,
        "drop_excess_ms": drop_excess_ms, "baseline_excess_ms": ds_excess_ms,
        "excess_difference_ms": drop_excess_ms - ds_excess_ms,
        "drop_bytes_exact": all(d["counted"] == d["expected"] for d in drops) if counted else None,
        "drop_steps_counted": len(drops),
    }


def _fmt(s: dict[str, float]) -> str:
    return f"{s['median']:.3f} [{s['q1']:.3f}, {s['q3']:.3f}] ({s['min']:.3f}..{s['max']:.3f}, n={s['n']})"


def table(rows: Sequence[dict[str, Any]]) -> str:
    head = ("| model | world size | ZeRO | LDB FULL / baseline, per round: median [IQR] (min..max) | <= 1.01 "
            "| DROP / oracle DROP (per mask) | baseline / oracle FULL (per round) | difference | <= 0.03 "
            "| the same in ms: (DROP - oracle DROP) - (baseline - oracle FULL) "
            "| DROP bytes = kept bytes |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
    lines = []
    for e in sorted(rows, key=lambda e: (e["model"], e["world_size"], e["zero_stage"])):
        exact = {True: "exact", False: "NO", None: "n/a (nothing reduced)"}[e["drop_bytes_exact"]]
        lines.append(f"| {e['model']} | {e['world_size']} | {e['zero_stage']} | {_fmt(e['full_over_baseline'])} "
                     f"| {'met' if e['meets_full'] else 'MISSED'} | {_fmt(e['drop_over_oracle'])} "
                     f"| {_fmt(e['baseline_over_oracle_full'])} | {e['overhead_difference']:+.3f} "
                     f"| {'met' if e['meets_overhead'] else 'MISSED'} "
                     f"| {e['drop_excess_ms']:.0f} - {e['baseline_excess_ms']:.0f} = {e['excess_difference_ms']:+.0f} ms "
                     f"| {exact} |")
    return head + "\n".join(lines) + "\n"


def load(paths: Sequence[str]) -> list[dict[str, Any]]:
    files = []
    for p in paths:
        if os.path.isdir(p):
            files += [os.path.join(root, f) for root, _, names in os.walk(p) for f in names if f == "step.json"]
        else:
            files.append(p)
    if not files:
        raise SystemExit(f"no step.json under {list(paths)}")
    out = []
    for f in sorted(files):
        with open(f) as fh:
            result = json.load(fh)
        if result.get("mode") != "step":
            raise SystemExit(f"{f} is not a step-mode result (mode {result.get('mode')!r})")
        out.append(evaluate(result))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ldb_ds.bench.targets", description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", help="step.json files or directories holding them")
    p.add_argument("--out", default=None, help="also write the table (Markdown) and the figures (JSON) here")
    args = p.parse_args(argv)
    rows = load(args.paths)
    text = table(rows)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
