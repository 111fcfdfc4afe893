"""Facts and summary of scripts/gpu_check.sh (standard library only; the image's Python runs it).

    python scripts/gpu_summary.py facts OUT [--dry-run 0|1]   # card, date, versions -> OUT/facts.json
    python scripts/gpu_summary.py summarize OUT               # OUT/summary.md and OUT/summary.json

``summarize`` reads what the check left in OUT (phases.tsv, facts.json, tests/junit.xml,
bench/<cell>/step.json and epochs.json, host/*.json) and reports every phase, also those cut short
or skipped, with one line per cell and the GPU targets of issue 16, item 5 evaluated. OUT is the
check's scratch folder; gpu_check.sh copies summary.md/json next to the tarball.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

WS1_NOTE = ("One GPU means world size 1: DeepSpeed skips the gradient reductions and all-gathers, so these "
            "figures are compute and per-param-group launch costs, not communication (the 2-rank CPU runs "
            "count the communication: docs/benchmark.md).")


def _run(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def facts(out: Path, dry_run: bool) -> dict:
    info: dict = {"date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "dry_run": dry_run, "world_size": 1, "python": platform.python_version(),
                  "platform": platform.platform(), "cpu_cores": os.cpu_count(),
                  "git_commit": _run(["git", "rev-parse", "HEAD"]),
                  "git_dirty": bool(_run(["git", "status", "--porcelain", "--untracked-files=no"]))}
    smi = _run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm,power.limit",
                "--format=csv,noheader"])
    info["nvidia_smi"] = smi
    full = _run(["nvidia-smi"])
    if full:
        (out / "nvidia-smi.txt").write_text(full + "\n")
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
        info["card"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        info["gpus_visible"] = torch.cuda.device_count()
    except Exception as err:  # reported, not fatal: the summary says what could not be read
        info["torch_error"] = repr(err)
    for name in ("deepspeed", "ldb_ds", "timm"):
        try:
            info[name] = __import__(name).__version__
        except Exception as err:
            info[f"{name}_error"] = repr(err)
    if not info.get("card"):
        info["card"] = (smi.split(",")[0].strip() if smi else None) or (
            "none: dry run on the CPU" if dry_run else "no GPU visible")
    (out / "facts.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(info, indent=2))
    return info


def card_slug(card: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", card.lower()).strip("-") or "unknown"


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _get(d: dict | None, *keys, default=None):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return default
        d = d[k]
    return d


def _fmt(x, spec=".3f", suffix="") -> str:
    return "n/a" if x is None else f"{x:{spec}}{suffix}"


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def tests_summary(out: Path) -> dict:
    path = out / "tests" / "junit.xml"
    if not path.exists():
        return {"junit": None}
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:  # a run killed while writing it
        return {"junit": None, "error": f"unreadable junit.xml: {err}"}
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    bad = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase")
           if c.find("failure") is not None or c.find("error") is not None]
    return {"junit": str(path.relative_to(out)), **counts, "passed": counts["tests"] - counts["failures"]
            - counts["errors"] - counts["skipped"], "not_passed": bad}


# The GPU targets (issue 16, item 5).
FULL_EPOCH_MAX = 1.02
"""LDB FULL epoch / DeepSpeed baseline epoch, every cell."""
DROP_SAVING_MIN = 0.90
"""(LDB FULL - LDB DROP step, ms) / (plain PyTorch FULL - plain PyTorch DROP step with the same units frozen)."""
SPEEDUP_MIN = 0.22
"""End-to-end speedup (median of the A/B pairs) on both 224 px ZeRO-2 cells (aim: 0.25)."""
IQR_MAX_POINTS = 4.0
"""The speedup's IQR the check's repetitions are sized for (reported, not a target)."""


def speedup_target_applies(run: str) -> bool:
    """The end-to-end target is set for the paper's 224 px ZeRO-2 cells (named so by gpu_check.sh)."""
    return "-224-" in run and run.endswith("-zero2")


def _median(step: dict | None, variant: str) -> float | None:
    return _get(step, "results", "variants", variant, "total_s", "median")


def _target(value, limit, at_most: bool) -> dict:
    ok = None if value is None or value != value else (value <= limit if at_most else value >= limit)
    return {"value": value, "limit": limit, "rule": "<=" if at_most else ">=", "pass": ok}


def bench_rows(out: Path) -> list[dict]:
    rows = []
    for run in sorted(p for p in (out / "bench").iterdir() if p.is_dir()) if (out / "bench").is_dir() else []:
        step, epochs = _load(run / "step.json"), _load(run / "epochs.json")
        cond = _get(step, "conditions") or _get(epochs, "conditions") or {}
        key = _get(step, "results", "key_figures") or {}
        ep = _get(epochs, "results") or {}
        med = {v: _median(step, v) for v in ("baseline", "ldb_full", "ldb_drop", "oracle_full", "oracle_drop")}
        # The DROP step's saving at the same batch, LDB against plain PyTorch with the same units frozen
        # (step.py writes it; recomputed from the medians for results written before it did).
        saving = key.get("drop_saving_s")
        if saving is None and med["ldb_full"] is not None and med["ldb_drop"] is not None:
            saving = med["ldb_full"] - med["ldb_drop"]
        oracle_saving = key.get("oracle_drop_saving_s")
        if oracle_saving is None and med["oracle_full"] is not None and med["oracle_drop"] is not None:
            oracle_saving = med["oracle_full"] - med["oracle_drop"]
        # No ratio where plain PyTorch saves nothing (noise at tiny sizes): the target is then not judged.
        saving_ratio = saving / oracle_saving if saving is not None and oracle_saving and oracle_saving > 0 else None
        full_epoch = ep.get("full_epoch_over_baseline")
        if full_epoch is None and _get(ep, "epoch_s", "baseline_FULL", "median"):
            full_epoch = _get(ep, "epoch_s", "ldb_FULL", "median") / _get(ep, "epoch_s", "baseline_FULL", "median")
        sp = ep.get("speedup") or {}
        iqr_points = 100 * (sp["q3"] - sp["q1"]) if "q1" in sp and "q3" in sp else None
        targets = {"full_epoch_over_baseline": _target(full_epoch, FULL_EPOCH_MAX, True),
                   "drop_saving_over_oracle": _target(saving_ratio, DROP_SAVING_MIN, False)}
        if speedup_target_applies(run.name):
            targets["speedup"] = _target(sp.get("median"), SPEEDUP_MIN, False)
        rows.append({
            "run": run.name, "model": cond.get("model"), "img_size": cond.get("img_size"), "stem": cond.get("stem"),
            "batch": cond.get("micro_batch_per_rank"), "zero": cond.get("zero_stage"),
            "precision": cond.get("precision"), "device": cond.get("device"),
            "units": _get(step, "results", "units"),
            "baseline_step_ms": _ms(med["baseline"]), "oracle_full_step_ms": _ms(med["oracle_full"]),
            "deepspeed_over_pytorch": (med["baseline"] / med["oracle_full"]) if med["baseline"] and med["oracle_full"]
            else None,
            "ldb_full_over_baseline": key.get("ldb_full_over_baseline"),
            "drop_over_full_same_batch": key.get("drop_over_full_measured"),
            "oracle_drop_over_oracle_full": key.get("oracle_drop_over_oracle_full"),
            "drop_2x_batch_per_sample_over_full": key.get("drop_epoch_over_full_epoch_predicted"),
            "batch_effect": key.get("batch_effect"),
            "drop_saving_ms": _ms(saving), "oracle_drop_saving_ms": _ms(oracle_saving),
            "drop_saving_over_oracle": saving_ratio, "full_epoch_over_baseline": full_epoch,
            # Whether LDB's FULL-epoch excess sits at the epoch boundary (epochs.py times each epoch's
            # first step apart; absent in results written before it did).
            "full_epoch_over_baseline_after_first_step": ep.get("full_epoch_over_baseline_after_first_step"),
            # How much of a FULL epoch the host spent waiting for the input pipeline, per side: an
            # epoch that is mostly loading measures the loader, not LDB (absent in older results).
            "loader_wait_share_baseline": _share(ep, "baseline_FULL"),
            "loader_wait_share_ldb": _share(ep, "ldb_FULL"),
            "loader_workers": ep.get("loader_workers"),
            "speedup_median": sp.get("median"), "speedup_q1": sp.get("q1"), "speedup_q3": sp.get("q3"),
            "speedup_min": sp.get("min"), "speedup_max": sp.get("max"), "speedup_reps": sp.get("n"),
            "speedup_iqr_points": iqr_points, "drop_over_full_epoch": ep.get("drop_over_full_epoch"),
            "targets": targets, "files": sorted(p.name for p in run.glob("*.json")),
        })
    return rows


def _share(ep: dict, key: str) -> float | None:
    """The median loader wait of ``key``'s epochs over their median time (None where not measured)."""
    wait, epoch = _get(ep, "loader_wait_s", key, "median"), _get(ep, "epoch_s", key, "median")
    return wait / epoch if isinstance(wait, (int, float)) and epoch else None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else 1e3 * seconds


_FLAG = re.compile(r"(^meets_|(^|_)met$|(^|_)pass(ed)?$|(^|_)ok$)")
"""A pass/fail flag's name (``counts_ok``, ``us_per_unit_ok``, ``meets_x``, ``passed``). Other booleans
under ``targets`` qualify a verdict and are not one: ``us_per_unit_resolved`` False means the time
verdict is within the measurement's resolution (reported apart), not that a target failed."""


def _flags(node, path: str = "") -> list[tuple[str, bool]]:
    """Every pass/fail flag in a host result: the booleans named as :data:`_FLAG`, at any depth."""
    found: list[tuple[str, bool]] = []
    if isinstance(node, dict):
        for k, v in node.items():
            name = f"{path}.{k}" if path else str(k)
            if isinstance(v, bool) and _FLAG.search(str(k)):
                found.append((name, v))
            else:
                found += _flags(v, name)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found += _flags(v, f"{path}[{i}]")
    return found


def host_summary(out: Path) -> dict:
    """The ``host`` mode's targets: per cell (``results.cells[i].targets``), every boolean flag true."""
    files = sorted((out / "host").glob("*.json")) if (out / "host").is_dir() else []
    cells, failed, unresolved = 0, [], 0
    for f in files:
        res = _get(_load(f), "results")
        found = res.get("cells") if isinstance(res, dict) else None
        if not isinstance(found, list):  # another schema: all flags of the file as one cell
            found = [{"cell": f.name, "targets": res}] if res else []
        for c in found:
            flags = _flags(c.get("targets") or {}) if isinstance(c, dict) else []
            if not flags:
                continue
            cells += 1
            unresolved += (c.get("targets") or {}).get("us_per_unit_resolved") is False
            bad = [n for n, ok in flags if not ok]
            if bad:
                failed.append(f"N={c.get('units', '?')} {c.get('cell', '?')} ({', '.join(bad)})")
    verdict = "n/a" if not cells else ("pass" if not failed else "FAIL")
    return {"files": [f.name for f in files], "cells": cells, "failed": failed, "verdict": verdict,
            "unresolved": unresolved}


def _verdict(t: dict | None) -> str:
    if t is None:
        return ""
    return {True: "pass", False: "FAIL", None: "n/a"}[t["pass"]]


def cell_line(r: dict) -> str:
    """One line per cell: the step ratio, the FULL epoch ratio, the DROP saving, the speedup, with targets."""
    t = r["targets"]
    speed = "speedup n/a" if r["speedup_median"] is None else (
        f"speedup {100 * r['speedup_median']:.1f}% [{100 * r['speedup_q1']:.1f}, {100 * r['speedup_q3']:.1f}] "
        f"(n={r['speedup_reps']}, IQR {r['speedup_iqr_points']:.1f} pt)")
    if "speedup" in t:
        speed += f" >= {100 * SPEEDUP_MIN:.0f}%: {_verdict(t['speedup'])}"
    return (f"{r['run']}: LDB FULL step / DeepSpeed {_fmt(r['ldb_full_over_baseline'])} | "
            f"FULL epoch / baseline {_fmt(r['full_epoch_over_baseline'])} <= {FULL_EPOCH_MAX}: "
            f"{_verdict(t['full_epoch_over_baseline'])} (without first steps "
            f"{_fmt(r['full_epoch_over_baseline_after_first_step'])}; waiting for the loader "
            f"{_pct(r['loader_wait_share_baseline'])} / {_pct(r['loader_wait_share_ldb'])} of a FULL epoch) | "
            f"DROP saves {_fmt(r['drop_saving_ms'], '.1f')} ms vs "
            f"PyTorch {_fmt(r['oracle_drop_saving_ms'], '.1f')} ms = {_fmt(r['drop_saving_over_oracle'], '.2f')} "
            f">= {DROP_SAVING_MIN}: {_verdict(t['drop_saving_over_oracle'])} | {speed}")


def summarize(out: Path) -> dict:
    info = _load(out / "facts.json") or {}
    phases = []
    if (out / "phases.tsv").exists():
        for line in (out / "phases.tsv").read_text().splitlines():
            name, status, wall, box = (line.split("\t") + ["", "", "", ""])[:4]
            phases.append({"phase": name, "status": status, "wall_s": int(wall or 0), "time_box_s": int(box or 0)})
    tests = tests_summary(out)
    # Cells in the order they ran (most important first), as gpu_check.sh lists them.
    ran = [p["phase"][len("bench-"):] for p in phases if p["phase"].startswith("bench-")]
    rows = sorted(bench_rows(out), key=lambda r: (ran.index(r["run"]) if r["run"] in ran else len(ran), r["run"]))
    host = host_summary(out)
    host_phase = next((p["status"] for p in phases if p["phase"] == "host"), "not run")
    host_line = (f"host (ldb-bench host): phase {host_phase}; targets {host['verdict']}"
                 f" ({host['cells'] - len(host['failed'])} of {host['cells']} cells pass; "
                 f"{host['unresolved']} time verdicts within the measurement's resolution)")
    lines = [cell_line(r) for r in rows] + [host_line]
    card = info.get("card") or "unknown"
    date = (info.get("date_utc") or "")[:10]
    summary = {"card": card, "date_utc": info.get("date_utc"), "dry_run": info.get("dry_run"), "world_size": 1,
               "versions": {k: info.get(k) for k in ("torch", "cuda", "cudnn", "deepspeed", "ldb_ds", "timm", "python")},
               "nvidia_smi": info.get("nvidia_smi"), "git_commit": info.get("git_commit"),
               "targets": {"full_epoch_over_baseline_max": FULL_EPOCH_MAX, "drop_saving_over_oracle_min":
                           DROP_SAVING_MIN, "speedup_min_224px_zero2": SPEEDUP_MIN, "iqr_max_points": IQR_MAX_POINTS},
               "lines": lines, "phases": phases, "tests": tests, "bench": rows, "host": host, "note": WS1_NOTE,
               "results_dir": f"docs/results/gpu/{card_slug(card)}/{date}"}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    v = summary["versions"]
    md = [f"# ldb_ds GPU check: {card}{' (DRY RUN: nothing measured)' if info.get('dry_run') else ''}", "",
          f"- date (UTC): {info.get('date_utc')}; commit {info.get('git_commit')}"
          f"{' (uncommitted changes)' if info.get('git_dirty') else ''}",
          f"- nvidia-smi: {info.get('nvidia_smi') or 'not available'}",
          f"- torch {v['torch']} (CUDA {v['cuda']}, cuDNN {v['cudnn']}), deepspeed {v['deepspeed']}, "
          f"ldb_ds {v['ldb_ds']}, timm {v['timm']}, Python {v['python']}",
          f"- {WS1_NOTE}", f"- suggested place for these files: `{summary['results_dir']}/`", "",
          "## Cells", ""]
    md += [f"- {line}" for line in lines]
    md += ["", "## Phases", "", "| phase | status | wall s | time box s |", "|---|---|---|---|"]
    md += [f"| {p['phase']} | {p['status']} | {p['wall_s']} | {p['time_box_s']} |" for p in phases]
    md += ["", "## Tests (world size 1)", ""]
    if tests.get("junit"):
        md.append(f"{tests['passed']} passed, {tests['failures']} failed, {tests['errors']} errors, "
                  f"{tests['skipped']} skipped ({tests['junit']})")
        md += [f"- not passed: `{name}`" for name in tests["not_passed"]]
    else:
        md.append(f"no test report ({tests.get('error') or 'see phases and logs/tests.log'})")
    md += ["", "## Benchmark: LDB against the DeepSpeed baseline (bf16, synthetic data)", "",
           "Step figures from `step` mode (same per-rank batch for all variants; \"PyTorch\" is plain PyTorch "
           "with no DeepSpeed, the DROP oracle freezing the same units), end-to-end speedup (1 - T_ldb / "
           "T_baseline over paired A/B runs of one FULL and one DROP epoch, s=2, p=0.3, kappa 2; median "
           f"[IQR]) from `epochs` mode. Targets: FULL epoch / baseline <= {FULL_EPOCH_MAX}; DROP saving >= "
           f"{DROP_SAVING_MIN:.0%} of PyTorch's; speedup >= {SPEEDUP_MIN:.0%} on the 224 px ZeRO-2 cells.", "",
           "| cell | units | DeepSpeed step ms | PyTorch step ms | LDB FULL step / DeepSpeed | FULL epoch / "
           "baseline | DROP / FULL step | PyTorch DROP / FULL | DROP saving ms (PyTorch) | end-to-end speedup, "
           "median [IQR] | DROP / FULL epoch |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speed = "n/a" if r["speedup_median"] is None else (
            f"{100 * r['speedup_median']:.1f}% [{100 * r['speedup_q1']:.1f}, {100 * r['speedup_q3']:.1f}]")
        md.append(f"| {r['run']} | {r['units'] if r['units'] is not None else 'n/a'} | "
                  f"{_fmt(r['baseline_step_ms'], '.1f')} | {_fmt(r['oracle_full_step_ms'], '.1f')} | "
                  f"{_fmt(r['ldb_full_over_baseline'])} | {_fmt(r['full_epoch_over_baseline'])} | "
                  f"{_fmt(r['drop_over_full_same_batch'])} | {_fmt(r['oracle_drop_over_oracle_full'])} | "
                  f"{_fmt(r['drop_saving_ms'], '.1f')} ({_fmt(r['oracle_drop_saving_ms'], '.1f')}) | {speed} | "
                  f"{_fmt(r['drop_over_full_epoch'])} |")
    if not rows:
        md.append("| (no benchmark results) | | | | | | | | | | |")
    md += ["", f"Host benchmark: files {', '.join(host['files']) or 'none'}; {host['cells']} cells with targets, "
               f"verdict {host['verdict']}.", ""] + [f"- not met: {c}" for c in host["failed"]] + ["",
           "Everything else is in `gpu_check.tar.gz`: per cell `bench/<cell>/step.{json,md,png}` and "
           "`epochs.{json,md,png}` with all conditions, `host/`, `tests/junit.xml`, `facts.json`, logs in `logs/`.", ""]
    (out / "summary.md").write_text("\n".join(md))
    print("\n".join(md))
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=("facts", "summarize"))
    p.add_argument("out", type=Path)
    p.add_argument("--dry-run", default="0")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.command == "facts":
        facts(a.out, a.dry_run == "1")
    else:
        summarize(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
