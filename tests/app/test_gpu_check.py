"""scripts/gpu_check.sh --dry-run: the prepared GPU check, run here on the CPU at tiny sizes.

The same script and commands as on the GPU machine (no install; tests/gpu only collected; the
224 px cells at 32 px with a ViT-Ti/16 standing in for the ViT-B/16), so the check is not broken on
the day a GPU is available. What comes back from the device is checked as the device returns it:
only summary.md, summary.json and one tarball in OUT, also when the budget is spent or the script
is stopped by a signal. About 2.5 minutes on 2 cores. No timing is asserted.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import tarfile

import pytest

from ldb_ds.bench.bench_options import MODES
from tests.support.train_utils import REPO, cpu_env

SCRIPT = os.path.join(REPO, "scripts", "gpu_check.sh")
OUT_FILES = ["gpu_check.tar.gz", "summary.json", "summary.md"]
PAPER_CELLS = ["vit_b16-224-b64-zero2", "resnet50-224-b64-zero2", "vit_b16-224-b64-zero3"]
CIFAR_CELLS = ["resnet18-32-b128-zero2"]


def _env(tmp_path):
    scratch = tmp_path / "scratch"  # the script's ${TMPDIR}: its work folder must not be left there
    scratch.mkdir(exist_ok=True)
    env = cpu_env(PYTHON=sys.executable, TMPDIR=str(scratch))
    env.pop("OUT", None)
    return env


def _cmd(out, *args):
    return ["bash", SCRIPT, "--dry-run", "--out", str(out), *args]


def _run(tmp_path, *args, timeout=900):
    return subprocess.run(_cmd(tmp_path / "out", *args), cwd=REPO, env=_env(tmp_path), capture_output=True,
                          text=True, timeout=timeout)


def _unpack(tmp_path):
    """OUT holds exactly the three files; the tarball unpacked into tmp_path/packed."""
    out = tmp_path / "out"
    assert sorted(os.listdir(out)) == OUT_FILES
    assert not [p for p in os.listdir(tmp_path / "scratch") if p.startswith("gpu_check_work")]
    packed = tmp_path / "packed"
    with tarfile.open(out / "gpu_check.tar.gz") as tar:
        tar.extractall(packed, filter="data")
    # The copies in OUT are the packed summary.
    assert (out / "summary.md").read_text() == (packed / "summary.md").read_text()
    return packed


def _phases(packed):
    rows = [line.split("\t") for line in (packed / "phases.tsv").read_text().splitlines()]
    return {name: status for name, status, *_ in rows}


def test_dry_run_takes_every_phase_and_packs_one_tarball(tmp_path):
    proc = _run(tmp_path)
    packed = _unpack(tmp_path)
    phases = _phases(packed)
    # The host mode is called as on the GPU; until it exists it is reported as failed, not fatal.
    host_ok = "host" in MODES
    assert phases.pop("host") == "ok" if host_ok else phases.pop("host").startswith("failed")
    assert phases == {"install": "skipped (dry run)", "facts": "ok", "tests": "ok",
                      **{f"bench-{c}": "ok" for c in PAPER_CELLS + CIFAR_CELLS}}, phases
    assert proc.returncode == (0 if host_ok else 1), proc.stdout[-4000:] + proc.stderr[-4000:]
    assert (packed / "facts.json").exists() and (packed / "logs" / "tests.log").exists()

    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["dry_run"] is True and summary["world_size"] == 1
    assert summary["versions"]["deepspeed"] and summary["versions"]["torch"]
    cells = [r["run"] for r in summary["bench"]]
    assert cells == PAPER_CELLS + CIFAR_CELLS  # in the order they ran: the paper's settings first
    rows = {r["run"]: r for r in summary["bench"]}
    for name, row in rows.items():
        for key in ("ldb_full_over_baseline", "full_epoch_over_baseline", "full_epoch_over_baseline_after_first_step",
                    "drop_saving_ms", "oracle_drop_saving_ms",
                    "speedup_median", "speedup_q1", "speedup_q3", "baseline_step_ms",
                    "oracle_full_step_ms"):
            assert isinstance(row[key], float) and math.isfinite(row[key]), (name, key, row[key])
        assert row["precision"] == "bf16" and row["loader_workers"] == 1
        assert all(0 < row[k] < 1 for k in ("loader_wait_share_baseline", "loader_wait_share_ldb")), row
        # The figures the summary judges are those step.py / epochs.py wrote.
        step = json.loads((packed / "bench" / name / "step.json").read_text())
        epochs = json.loads((packed / "bench" / name / "epochs.json").read_text())
        key = step["results"]["key_figures"]
        assert math.isclose(row["drop_saving_ms"], 1e3 * key["drop_saving_s"])
        if key["oracle_drop_saving_s"] > 0:  # at tiny sizes plain PyTorch's saving may be noise below 0: not judged
            assert math.isclose(row["drop_saving_over_oracle"], key["drop_saving_s"] / key["oracle_drop_saving_s"])
        else:
            assert row["drop_saving_over_oracle"] is None and row["targets"]["drop_saving_over_oracle"]["pass"] is None
        assert math.isclose(row["full_epoch_over_baseline"], epochs["results"]["full_epoch_over_baseline"])
        assert any("Dry run" in n for n in step["notes"])
        # The end-to-end target is judged on the two 224 px ZeRO-2 cells only.
        expected = {"full_epoch_over_baseline", "drop_saving_over_oracle"} | (
            {"speedup"} if name in PAPER_CELLS[:2] else set())
        assert set(row["targets"]) == expected, (name, row["targets"])
        assert row["targets"]["full_epoch_over_baseline"]["pass"] == (row["full_epoch_over_baseline"] <= 1.02)
    # The 224 px entries run the ImageNet stem at their (tiny) size; the 32 px ones the CIFAR stem.
    assert {rows[c]["stem"] for c in PAPER_CELLS} == {"original"} and rows[CIFAR_CELLS[0]]["stem"] == "cifar"
    assert rows["vit_b16-224-b64-zero2"]["model"] == "vit_tiny_patch16_224"
    assert (rows["vit_b16-224-b64-zero2"]["zero"], rows["vit_b16-224-b64-zero3"]["zero"]) == (2, 3)
    assert rows["resnet50-224-b64-zero2"]["img_size"] > rows["resnet18-32-b128-zero2"]["img_size"]
    if host_ok:
        assert summary["host"]["files"] and summary["host"]["cells"] >= 1
        # The host verdict is the host mode's own per cell: a time verdict within the measurement's
        # resolution (us_per_unit_resolved false) is reported apart, not counted as a failed target.
        host_cells = json.loads((packed / "host" / "host.json").read_text())["results"]["cells"]
        failing = [c for c in host_cells if not c["targets"]["counts_ok"] or c["targets"]["us_per_unit_ok"] is False]
        assert summary["host"]["cells"] == len(host_cells) and len(summary["host"]["failed"]) == len(failing)
        assert summary["host"]["unresolved"] == sum(c["targets"].get("us_per_unit_resolved") is False
                                                    for c in host_cells)
    # One line per cell and one for the host benchmark, in summary.md and on stdout.
    assert len(summary["lines"]) == len(cells) + 1 and summary["lines"][-1].startswith("host")
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "DRY RUN" in md and "world size 1" in md
    for line in summary["lines"]:
        assert f"- {line}" in md and line in proc.stdout


def test_dry_run_without_PYTHON_uses_the_project_virtualenv(tmp_path):
    # docs/benchmark.md runs `bash scripts/gpu_check.sh --dry-run` in a plain shell: a python3 on
    # PATH without torch (here a shim that fails) must not be what runs the tests phase.
    if not os.access(os.path.join(REPO, ".venv", "bin", "python"), os.X_OK):
        pytest.skip("no .venv in the repository (scripts/setup.sh)")
    shims = tmp_path / "shims"
    shims.mkdir()
    for name in ("python3", "python"):
        (shims / name).write_text("#!/bin/sh\necho 'a python3 without the project' >&2\nexit 97\n")
        (shims / name).chmod(0o755)
    env = _env(tmp_path)
    env.pop("PYTHON")
    env["PATH"] = f"{shims}{os.pathsep}{env.get('PATH', '')}"
    # 45 s: the facts and tests phases fit; a bench phase, if one starts, is cut at the budget.
    proc = subprocess.run(_cmd(tmp_path / "out", "--budget", "45"), cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=240)
    phases = _phases(_unpack(tmp_path))
    assert phases["tests"] == "ok", (phases, proc.stdout[-4000:] + proc.stderr[-4000:])


def test_a_spent_budget_skips_phases_and_still_packs_the_summary(tmp_path):
    # 20 s is all reserve for the end: no phase gets its minimum, each is recorded as skipped.
    proc = _run(tmp_path, "--budget", "20", timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    packed = _unpack(tmp_path)
    phases = _phases(packed)
    assert phases["facts"] == phases["tests"] == phases["host"] == "skipped (budget spent)"
    assert all(s == "skipped (budget spent)" for k, s in phases.items() if k.startswith("bench-"))
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["bench"] == [] and len(summary["phases"]) == len(phases)


def test_a_signal_stops_the_running_phase_and_still_packs_the_summary(tmp_path):
    # As when the device call is stopped from outside: SIGTERM in the middle of the first cell.
    proc = subprocess.Popen(_cmd(tmp_path / "out"), cwd=REPO, env=_env(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if f"bench-{PAPER_CELLS[0]}: start" in line:
                break
        else:
            raise AssertionError("the first cell never started:\n" + "".join(seen))
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, "".join(seen) + rest
    phases = _phases(_unpack(tmp_path))
    assert phases[f"bench-{PAPER_CELLS[0]}"] == "interrupted (SIGTERM)", phases
    assert f"bench-{PAPER_CELLS[1]}" not in phases  # nothing started after the signal
    assert "## Cells" in (tmp_path / "out" / "summary.md").read_text()
