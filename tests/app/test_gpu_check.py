"""scripts/gpu_check.sh --dry-run: the prepared GPU check, run here on the CPU at tiny sizes.

The same script and commands as on the GPU machine (no install; tests/gpu only collected), so the
check is not broken on the day a GPU is available. About 40 s on 2 cores. No timing is asserted.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

from tests.support.train_utils import REPO, cpu_env

SCRIPT = os.path.join(REPO, "scripts", "gpu_check.sh")


def _run(out, *args, timeout=900):
    env = cpu_env(PYTHON=sys.executable)
    env.pop("OUT", None)
    return subprocess.run(["bash", SCRIPT, "--dry-run", "--out", str(out), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _phases(out):
    rows = [line.split("\t") for line in (out / "phases.tsv").read_text().splitlines()]
    return {name: status for name, status, *_ in rows}


def test_dry_run_takes_every_phase_and_writes_the_summary(tmp_path):
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    phases = _phases(tmp_path)
    bench_runs = ["resnet18-b128-zero2", "densenet121-b128-zero2", "resnet50-b256-zero0"]
    assert phases == {"install": "skipped (dry run)", "facts": "ok", "tests": "ok",
                      **{f"bench-{r}": "ok" for r in bench_runs}}, phases
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["dry_run"] is True and summary["world_size"] == 1
    assert summary["versions"]["deepspeed"] and summary["versions"]["torch"]
    rows = {r["run"]: r for r in summary["bench"]}
    assert sorted(rows) == sorted(bench_runs)
    for name, row in rows.items():
        for key in ("ldb_full_over_baseline", "drop_over_full_same_batch", "drop_2x_batch_per_sample_over_full"):
            assert isinstance(row[key], float) and math.isfinite(row[key]), (name, key, row[key])
        assert row["precision"] == "bf16"
        step = json.loads((tmp_path / "bench" / name / "step.json").read_text())
        assert any("Dry run" in n for n in step["notes"])
        if name.startswith("resnet"):  # end to end too
            assert math.isfinite(row["speedup_median"]) and (tmp_path / "bench" / name / "epochs.json").exists()
    assert rows["densenet121-b128-zero2"]["units"] >= 100  # hundreds of param groups at module granularity
    assert (rows["resnet18-b128-zero2"]["zero"], rows["resnet50-b256-zero0"]["zero"]) == (2, 0)
    # The tiny stand-ins keep batch 128 and 256 apart.
    assert rows["resnet18-b128-zero2"]["batch"] < rows["resnet50-b256-zero0"]["batch"]
    md = (tmp_path / "summary.md").read_text()
    assert "DRY RUN" in md and "world size 1" in md and "densenet121-b128-zero2" in md


def test_a_spent_budget_skips_phases_and_still_writes_the_summary(tmp_path):
    # 20 s less the summary's reserve leaves no phase its minimum: each is recorded as skipped.
    proc = _run(tmp_path, "--budget", "20", timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    phases = _phases(tmp_path)
    assert phases["facts"] == phases["tests"] == "skipped (budget spent)"
    assert all(s == "skipped (budget spent)" for k, s in phases.items() if k.startswith("bench-"))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["bench"] == [] and len(summary["phases"]) == len(phases)
