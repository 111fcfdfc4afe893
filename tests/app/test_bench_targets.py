"""``python -m ldb_ds.bench.targets`` reads real step-mode results and computes issue 10's target figures.

One tiny step-mode run (world size 1, ZeRO-2, 3 rounds), then the targets table from its
``step.json``. The figures are checked against the recorded samples, not against a timing.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TINY = ["--model", "test_efficientnet", "--img-size", "16", "--batch-size", "4", "--zero-stage", "2",
        "--warmup-rounds", "1", "--rounds", "3", "--steps-per-round", "2", "--byte-steps", "2", "--dw-reps", "1",
        "--quiet", "--no-tensorboard"]


def test_targets_from_a_real_step_run(tmp_path):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(REPO, ".torch_extensions"))
    env.pop("RANK", None)
    run = subprocess.run([sys.executable, "-m", "ldb_ds.bench", "step", *TINY, "--out", str(tmp_path)], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    from ldb_ds.bench import targets

    out = tmp_path / "targets.md"
    assert targets.main([str(tmp_path), "--out", str(out)]) == 0
    (row,) = json.loads((tmp_path / "targets.json").read_text())
    assert (row["model"], row["world_size"], row["zero_stage"]) == ("test_efficientnet", 1, 2)
    assert row["full_over_baseline"]["n"] == 3  # one paired ratio per round
    # The first round's ratio, from the recorded samples: median of its 2 FULL steps over its 2 baseline steps.
    result = json.loads((tmp_path / "step.json").read_text())["results"]
    full, base = result["variants"]["ldb_full"]["samples_s"][:2], result["variants"]["baseline"]["samples_s"][:2]
    assert targets.paired_round_ratios(result, "ldb_full", "baseline")[0] == pytest.approx(sum(full) / sum(base))
    assert row["drop_bytes_exact"] is True and row["drop_steps_counted"] == 2
    assert row["overhead_difference"] == row["drop_over_oracle"]["median"] - row["baseline_over_oracle_full"]["median"]
    # The same overheads in milliseconds, from the recorded samples' medians.
    ms = {v: 1e3 * statistics.median(result["variants"][v]["samples_s"])
          for v in ("ldb_drop", "oracle_drop", "baseline", "oracle_full")}
    assert row["drop_excess_ms"] == pytest.approx(ms["ldb_drop"] - ms["oracle_drop"])
    assert row["excess_difference_ms"] == pytest.approx(row["drop_excess_ms"] - (ms["baseline"] - ms["oracle_full"]))
    text = out.read_text()
    assert text.count("\n| test_efficientnet | 1 | 2 |") == 1


def test_targets_script_refuses_too_few_rounds(tmp_path):
    # Issue 10: the medians are over at least 5 interleaved repetitions (6 rounds: the DROP / oracle
    # DROP pairing loses one in six); the script says so before running anything.
    env = dict(os.environ, ROUNDS="5", PYTHON=sys.executable)
    run = subprocess.run(["bash", os.path.join(REPO, "launch", "bench_targets.sh"), str(tmp_path / "out")], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "ROUNDS must be >= 6" in run.stderr and "got 5" in run.stderr
    assert not (tmp_path / "out").exists()
