"""``launch/slurm.sbatch`` run as SLURM runs it: preempted by the time-limit signal, requeued, resumed.

There is no SLURM here, so the two commands the script calls are replaced by small scripts on
``PATH`` that do what SLURM's do for it: ``srun`` starts ``SLURM_NTASKS`` copies of its command with
each task's ``SLURM_PROCID``/``SLURM_LOCALID`` and exits with the first failing task's code, ``scontrol`` names the node and records a ``requeue``. Everything
else is real: the batch script, two ldb-train ranks over gloo, the signal SLURM's ``--signal=USR1@300``
sends to every task, the run's files, the script's decision to requeue, and the second start.
"""

from __future__ import annotations

import json
import os
import signal
import sys

import pytest

from ldb_ds.process import free_port
from tests.support import train_utils as tu

pytestmark = pytest.mark.slow

FAKE_SRUN = r"""#!/usr/bin/env bash
# SLURM's srun for one node: start SLURM_NTASKS copies of the command, one per task.
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((i = 0; i < SLURM_NTASKS; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$i SLURM_NODEID=0 "$@" &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p"; r=$?; ((r != 0 && rc == 0)) && rc=$r; done
exit $rc
"""

FAKE_SCONTROL = r"""#!/usr/bin/env bash
if [[ "$1 $2" == "show hostnames" ]]; then echo 127.0.0.1; exit 0; fi
echo "scontrol $*" >> "$FAKE_SLURM_LOG"
"""


def _slurm_env(tmp_path, cfg: str) -> dict[str, str]:
    bin_dir = tmp_path / "slurm_bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    return tu.cpu_env(
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", FAKE_SLURM_LOG=str(tmp_path / "scontrol.log"),
        SLURM_JOB_ID="4242", SLURM_JOB_NAME="ldb_ds", SLURM_JOB_NODELIST="node1", SLURM_NTASKS="2",
        SLURM_NTASKS_PER_NODE="2", SLURM_CPUS_PER_TASK="1", SLURM_SUBMIT_DIR=tu.REPO,
        MASTER_PORT=str(free_port()), PYTHON=sys.executable, CONFIG=cfg,
        # The script's own defaults point elsewhere: the run's folder is the one the sbatch
        # arguments name, and the script must read status.json there to requeue.
        OUTPUT=str(tmp_path / "script_default"), EXPERIMENT="script_default")


def _is_task(cmdline: list[str]) -> bool:
    """A rank: Python running launch/train.py (not srun's bash line that names it)."""
    return bool(cmdline) and os.path.basename(cmdline[0]).startswith("python") and \
        any(a.endswith("launch/train.py") for a in cmdline)


def _requeues(tmp_path) -> list[str]:
    log = tmp_path / "scontrol.log"
    return log.read_text().splitlines() if log.exists() else []


def test_time_limit_signal_requeues_and_the_requeued_job_resumes(tmp_path):
    cfg = tu.write_config(str(tmp_path / "ds.json"), base="zero0_ldb.json")
    env = _slurm_env(tmp_path, cfg)
    out = tmp_path / "out"
    run_dir = out / "run"
    args = ["bash", "launch/slurm.sbatch", "--model", "test_efficientnet", "--no-progress", "--epochs", "3",
            "--max-steps-per-epoch", "25", "--ckpt-every", "0", "--log-masks", "--output", str(out),
            "--experiment", "run"]

    # The job's first start, stopped by SLURM's time-limit signal to every task.
    first = tu.Background(args, str(tmp_path / "log1"), env=env)
    tu.wait_until(lambda: (m := tu.last_mask_line(str(run_dir))) and m["step"] >= 2 and m, 300, "step 2")
    tasks = [p.info["pid"] for p in first.processes() if _is_task(p.info["cmdline"] or [])]
    assert len(tasks) == 2, first.explain()
    for pid in tasks:
        os.kill(pid, signal.SIGUSR1)
    code = first.wait(timeout=first.elapsed() + 120)
    stdout, _ = first.output()
    assert code == 75, first.explain()
    assert "run ended with exit code 75, status preempted" in stdout, first.explain()
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "preempted" and status["checkpoint"], status
    assert _requeues(tmp_path) == ["scontrol requeue 4242"], first.explain()
    assert not (tmp_path / "script_default").exists()

    # The requeued job runs the same script with the same arguments: --resume auto continues.
    second = tu.Background(args, str(tmp_path / "log2"), env=dict(env, MASTER_PORT=str(free_port())))
    code = second.wait(timeout=400)
    stdout, _ = second.output()
    assert code == 0, second.explain()
    assert "resumed from" in stdout, second.explain()
    assert "run ended with exit code 0, status completed" in stdout, second.explain()
    assert _requeues(tmp_path) == ["scontrol requeue 4242"], second.explain()  # not requeued again
    results = json.loads((run_dir / "results.json").read_text())
    assert results["epochs_run"] == [0, 1, 2] and results["world_size"] == 2, results
