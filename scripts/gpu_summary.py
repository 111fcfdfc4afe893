"""Facts and summary of scripts/gpu_check.sh (standard library only; the image's Python runs it).

    python scripts/gpu_summary.py facts OUT [--dry-run 0|1]   # card, date, versions -> OUT/facts.json
    python scripts/gpu_summary.py summarize OUT               # OUT/summary.md and OUT/summary.json

``summarize`` reads what the check left in OUT (phases.tsv, facts.json, tests/junit.xml,
bench/<run>/step.json and epochs.json) and reports every phase, also those cut short or skipped.
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


def tests_summary(out: Path) -> dict:
    path = out / "tests" / "junit.xml"
    if not path.exists():
        return {"junit": None}
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    bad = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase")
           if c.find("failure") is not None or c.find("error") is not None]
    return {"junit": str(path.relative_to(out)), **counts, "passed": counts["tests"] - counts["failures"]
            - counts["errors"] - counts["skipped"], "not_passed": bad}


def bench_rows(out: Path) -> list[dict]:
    rows = []
    for run in sorted(p for p in (out / "bench").iterdir() if p.is_dir()) if (out / "bench").is_dir() else []:
        step, epochs = _load(run / "step.json"), _load(run / "epochs.json")
        cond = _get(step, "conditions") or _get(epochs, "conditions") or {}
        key = _get(step, "results", "key_figures") or {}
        ep = _get(epochs, "results") or {}
        rows.append({
            "run": run.name, "model": cond.get("model"), "batch": cond.get("micro_batch_per_rank"),
            "zero": cond.get("zero_stage"), "precision": cond.get("precision"), "device": cond.get("device"),
            "units": _get(step, "results", "units"),
            "baseline_step_ms": (_get(step, "results", "variants", "baseline", "total_s", "median") or 0) * 1e3 or None,
            "ldb_full_over_baseline": key.get("ldb_full_over_baseline"),
            "drop_over_full_same_batch": key.get("drop_over_full_measured"),
            "drop_2x_batch_per_sample_over_full": key.get("drop_epoch_over_full_epoch_predicted"),
            "batch_effect": key.get("batch_effect"),
            "speedup_median": _get(ep, "speedup", "median"), "speedup_min": _get(ep, "speedup", "min"),
            "speedup_max": _get(ep, "speedup", "max"), "drop_over_full_epoch": ep.get("drop_over_full_epoch"),
            "files": sorted(p.name for p in run.glob("*.json")),
        })
    return rows


def summarize(out: Path) -> dict:
    info = _load(out / "facts.json") or {}
    phases = []
    if (out / "phases.tsv").exists():
        for line in (out / "phases.tsv").read_text().splitlines():
            name, status, wall, box = (line.split("\t") + ["", "", "", ""])[:4]
            phases.append({"phase": name, "status": status, "wall_s": int(wall or 0), "time_box_s": int(box or 0)})
    tests = tests_summary(out)
    rows = bench_rows(out)
    card = info.get("card") or "unknown"
    date = (info.get("date_utc") or "")[:10]
    summary = {"card": card, "date_utc": info.get("date_utc"), "dry_run": info.get("dry_run"), "world_size": 1,
               "versions": {k: info.get(k) for k in ("torch", "cuda", "cudnn", "deepspeed", "ldb_ds", "timm", "python")},
               "nvidia_smi": info.get("nvidia_smi"), "git_commit": info.get("git_commit"),
               "phases": phases, "tests": tests, "bench": rows, "note": WS1_NOTE,
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
          "## Phases", "", "| phase | status | wall s | time box s |", "|---|---|---|---|"]
    md += [f"| {p['phase']} | {p['status']} | {p['wall_s']} | {p['time_box_s']} |" for p in phases]
    md += ["", "## Tests (world size 1)", ""]
    if tests.get("junit"):
        md.append(f"{tests['passed']} passed, {tests['failures']} failed, {tests['errors']} errors, "
                  f"{tests['skipped']} skipped ({tests['junit']})")
        md += [f"- not passed: `{name}`" for name in tests["not_passed"]]
    else:
        md.append("no test report (see phases and logs/tests.log)")
    md += ["", "## Benchmark: LDB against the DeepSpeed baseline (bf16, CIFAR stem, 32x32)", "",
           "Step ratios from `step` mode (same per-rank batch for all variants), end-to-end speedup "
           "(1 - T_ldb / T_baseline, paired A/B runs of one FULL and one DROP epoch) from `epochs` mode. "
           "\"DROP 2x batch\" is a DROP step at batch_kappa x the batch, per sample, over a FULL step: the "
           "cost of a DROP epoch relative to a FULL one.", "",
           "| run | units | baseline step ms | LDB FULL / baseline | DROP / FULL (same batch) | "
           "DROP 2x batch per sample / FULL | end-to-end speedup, median (min..max) | DROP / FULL epoch |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        speed = "n/a" if r["speedup_median"] is None else (
            f"{100 * r['speedup_median']:.1f}% ({100 * r['speedup_min']:.1f}..{100 * r['speedup_max']:.1f}%)")
        md.append(f"| {r['run']} | {r['units'] if r['units'] is not None else 'n/a'} | {_fmt(r['baseline_step_ms'], '.1f')} | "
                  f"{_fmt(r['ldb_full_over_baseline'])} | {_fmt(r['drop_over_full_same_batch'])} | "
                  f"{_fmt(r['drop_2x_batch_per_sample_over_full'])} | {speed} | {_fmt(r['drop_over_full_epoch'])} |")
    if not rows:
        md.append("| (no benchmark results) | | | | | | | |")
    md += ["", "Per run: `bench/<run>/step.{json,md,png}` and `epochs.{json,md,png}` with all conditions; "
               "logs in `logs/`.", ""]
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
