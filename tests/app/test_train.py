"""The training application end to end: real launchers, real gloo ranks, the bundled digits data.

Each test starts 2 CPU ranks in subprocesses (about 15-40 s each on 2 cores). The model is
timm's ``test_efficientnet`` (0.1 M parameters, a real timm EfficientNet), which reaches
~95% on the digits test split in two epochs.
"""

import csv
import json
import math
import os
import re
import shutil
import sys

import pytest
import timm
import torch
import yaml

from ldb_ds.runtime_checks import named_tensors_digest
from ldb_ds.train import arguments
from tests.support import train_utils as tu  # noqa: E402

pytestmark = pytest.mark.slow

MODEL = "test_efficientnet"

STEP_TAGS = [
    "Train/loss", "Train/lr", "Train/samples_per_sec", "Train/samples_per_sec_per_rank",
    "Train/micro_batch_per_rank", "Time/step_ms", "Time/data_ms", "Time/forward_ms",
    "Time/backward_ms", "Time/optimizer_step_ms", "LDB/mode", "LDB/kept_unit_fraction",
    "LDB/kept_param_fraction", "LDB/lr_factor", "LDB/batch_factor", "Comm/grad_bytes",
    "Comm/grad_bytes_saved",
]
EPOCH_TAGS = [
    "Time/epoch_s", "Time/epoch_train_s", "Train/epoch_loss", "Train/epoch_samples_per_sec",
    "Comm/epoch_grad_bytes", "Comm/epoch_grad_bytes_saved", "LDB/epoch_mode", "Run/world_size",
    "Run/epoch", "Eval/top1", "Eval/top5", "Eval/loss",
]


def _by_step(scalars, tag):
    return dict(scalars[tag])


def test_deepspeed_launcher_end_to_end(tmp_path):
    """2 ranks, ZeRO-2 + LDB, 3 epochs (FULL, FULL, DROP) on digits: accuracy and TensorBoard."""
    # Options from the JSON's "train" section (log_every: the earlier name of log_interval);
    # the command line overrides one of them.
    cfg = tu.write_config(str(tmp_path / "ds.json"), base="zero2_ldb.json",
                          train={"model": MODEL, "epochs": 7, "log_every": 1,
                                 "no_progress": True})
    out = tmp_path / "my runs"  # a space: the launcher passes it through, the closing hint quotes it
    proc = tu.run_deepspeed(["--deepspeed_config", cfg, "--epochs", "3", "--output", str(out),
                             "--experiment", "e2e"], timeout=400)
    assert proc.returncode == 0, tu.explain(proc)
    assert f"tensorboard --logdir '{out}'" in proc.stdout, tu.explain(proc)
    run_dir = out / "e2e"

    results = json.loads((run_dir / "results.json").read_text())
    assert results["world_size"] == 2 and results["epochs_run"] == [0, 1, 2]
    assert results["final_top1"] > 60.0, results  # chance is 10%
    assert results["ldb_drop_steps"] > 0

    args = yaml.safe_load((run_dir / "args.yaml").read_text())
    assert args["model"] == MODEL and args["epochs"] == 3 and args["log_interval"] == 1
    assert args["experiment"] == "e2e" and args["sched"] == "cosine" and "resume" not in args
    assert args["run"]["world_size"] == 2 and args["run"]["ldb"]["enabled"] is True
    # -c replays exactly the options of the run (the run: record is skipped).
    replayed, _ = arguments.parse_args(["-c", str(run_dir / "args.yaml")])
    assert replayed.to_dict(scope=("run",)) == {k: v for k, v in args.items() if k != "run"}

    with open(run_dir / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    assert [r["train_mode"] for r in rows] == ["FULL", "FULL", "DROP"]
    assert float(rows[-1]["eval_top1"]) == pytest.approx(results["final_top1"])
    # The lr column is the LR applied: the cosine's value, times kappa = 2 in the DROP epoch.
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[0] == pytest.approx(0.05) and lrs[2] == pytest.approx(2 * 0.05 * 0.5 * (1 + math.cos(2 * math.pi / 3)))
    ds_cfg = json.loads((run_dir / "ds_config.json").read_text())
    assert ds_cfg["tensorboard"]["output_path"] == str(out)
    assert ds_cfg["tensorboard"]["job_name"] == "e2e"

    s = tu.read_scalars(str(run_dir))
    missing = [t for t in STEP_TAGS + EPOCH_TAGS if t not in s]
    assert not missing, f"missing tags {missing}; have {sorted(s)}"
    for tag in ("Train/samples_per_sec", "Train/samples_per_sec_per_rank", "Time/step_ms",
                "Time/forward_ms", "Time/backward_ms", "Time/epoch_s"):
        assert all(v > 0 for _, v in s[tag]), tag
    # The x axis is the number of samples seen by all ranks: strictly increasing.
    steps = [x for x, _ in s["Train/loss"]]
    assert steps == sorted(set(steps)) and steps[0] > 0
    assert all(v == 2 for _, v in s["Run/world_size"])

    mode = _by_step(s, "LDB/mode")
    kept = _by_step(s, "LDB/kept_param_fraction")
    kept_units = _by_step(s, "LDB/kept_unit_fraction")
    micro = _by_step(s, "Train/micro_batch_per_rank")
    saved = _by_step(s, "Comm/grad_bytes_saved")
    full = [x for x, m in mode.items() if m == 0]
    drop = [x for x, m in mode.items() if m == 1]
    assert full and drop
    assert all(kept[x] == 1.0 and kept_units[x] == 1.0 and saved[x] == 0 for x in full)
    assert all(kept[x] < 1.0 for x in drop)
    assert sum(kept[x] for x in drop) / len(drop) < 0.95
    assert all(saved[x] > 0 for x in drop)
    # The epoch line reports the epoch's own mean kept fraction (not the last log window's).
    lines = {int(m[1]): float(m[2]) for m in re.finditer(r"epoch (\d) \[\w+\] .* kept params ([\d.]+)", proc.stdout)}
    assert lines[0] == lines[1] == 1.0, tu.explain(proc)
    assert lines[2] == pytest.approx(sum(kept[x] for x in drop) / len(drop), abs=6e-4), tu.explain(proc)
    # DROP epochs double the micro batch (batch_kappa=2; the last batch of an epoch may be
    # smaller) and the LR factor is kappa=2.
    assert max(micro[x] for x in full) == 32.0 and max(micro[x] for x in drop) == 64.0
    lr_factor = _by_step(s, "LDB/lr_factor")
    assert {lr_factor[x] for x in drop} == {2.0} and {lr_factor[x] for x in full} == {1.0}
    assert [v for _, v in s["LDB/epoch_mode"]] == [0.0, 0.0, 1.0]
    top1 = [v for _, v in s["Eval/top1"]]
    assert len(top1) == 3 and top1[-1] == pytest.approx(results["final_top1"], abs=1e-3)

    # The last checkpoint evaluates to the same accuracy (BatchNorm statistics are made equal
    # on all ranks before evaluating and saving, so rank 0's checkpoint is everybody's model).
    # Started by replaying the run's args.yaml with -c. An evaluation records nothing in the run:
    # args.yaml, ds_config.json and status.json describe the training (the marker is the lock file).
    run_files = _files_of(run_dir)
    again = tu.run_deepspeed(["-c", str(run_dir / "args.yaml"), "--resume", "--eval"])
    assert again.returncode == 0, tu.explain(again)
    assert f"eval: top1 {results['final_top1']:.2f}%" in again.stdout, tu.explain(again)
    # The same in one process (docs/training.md's replay command): SGD at ZeRO-2, the weights only.
    alone = tu.run([sys.executable, "-m", "ldb_ds.train", "-c", str(run_dir / "args.yaml"), "--resume", "--eval"])
    assert alone.returncode == 0, tu.explain(alone)
    assert "only the module's weights" in alone.stdout, tu.explain(alone)
    assert f"eval: top1 {results['final_top1']:.2f}%" in alone.stdout, tu.explain(alone)
    assert _files_of(run_dir) == run_files  # no event file, no args.yaml of world size 1


def _files_of(run_dir) -> dict[str, bytes]:
    """Every file directly in ``run_dir`` but the marker (the lock file), with its bytes."""
    return {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file() and p.name != ".ldb_ds_run"}


def test_eval_at_another_world_size_keeps_batchnorm_statistics(tmp_path):
    """A 2-rank ZeRO-3 AdamW run evaluated at world size 1 (DeepSpeed's universal checkpoint, which
    restores parameters and optimizer state only): the BatchNorm statistics come from the rank
    files, so the evaluation is the run's own (it read the initial statistics before)."""
    cfg = tu.write_config(str(tmp_path / "ds.json"), base="zero3_ldb.json",
                          optimizer={"type": "AdamW", "params": {"lr": 0.001, "weight_decay": 0.01}})
    common = ["--deepspeed_config", cfg, "--model", MODEL, "--epochs", "1", "--max-steps-per-epoch", "3",
              "--no-progress", "--output", str(tmp_path), "--experiment", "bn"]
    trained = tu.run_deepspeed(common)
    assert trained.returncode == 0, tu.explain(trained)
    with open(tmp_path / "bn" / "summary.csv", newline="") as f:
        row = list(csv.DictReader(f))[-1]
    alone = tu.run([sys.executable, "-m", "ldb_ds.train", *common, "--resume", "--eval"])
    assert alone.returncode == 0, tu.explain(alone)
    assert "universal checkpoint" in alone.stdout, tu.explain(alone)
    assert f"eval: top1 {float(row['eval_top1']):.2f}%" in alone.stdout, (row, tu.explain(alone))

    # docs/training.md's way to a plain PyTorch state dict: DeepSpeed's own zero_to_fp32.py, which
    # the checkpoint folder carries, rebuilds the run's weights bitwise from LDB's per-unit
    # partitions (the run's weights_sha256 is over the same names, dtypes, shapes and bytes).
    ckpts = tmp_path / "bn" / "checkpoints"
    converted = tu.run([sys.executable, str(ckpts / "zero_to_fp32.py"), str(ckpts), str(tmp_path / "fp32"),
                        "--tag", "epoch0"])
    assert converted.returncode == 0, tu.explain(converted)
    model = timm.create_model(MODEL, num_classes=10)
    state = torch.load(tmp_path / "fp32" / "pytorch_model.bin", map_location="cpu", weights_only=True)
    model.load_state_dict(state)  # strict: every parameter and buffer, nothing else
    results = json.loads((tmp_path / "bn" / "results.json").read_text())
    assert named_tensors_digest(model.named_parameters()) == results["weights_sha256"]


def test_grad_checkpointing_trains_the_same_weights(tmp_path):
    """--grad-checkpointing (timm's non-reentrant checkpointing) over FULL, FULL, DROP epochs: the
    weights bit for bit those of the run without it, at world size 1. The recomputation in the
    backward updates BatchNorm's running statistics a second time (torch's checkpoint does that
    with or without LDB), so the buffers differing is the sign that the blocks were recomputed."""
    cfg = tu.write_config(str(tmp_path / "ds.json"), base="zero2_ldb.json")
    common = ["--deepspeed_config", cfg, "--model", MODEL, "--epochs", "3", "--max-steps-per-epoch", "3",
              "--no-progress", "--eval-every", "0", "--output", str(tmp_path)]
    results = {}
    for name, extra in (("plain", []), ("checkpointed", ["--grad-checkpointing"])):
        proc = tu.run([sys.executable, "-m", "ldb_ds.train", *common, "--experiment", name, *extra])
        assert proc.returncode == 0, tu.explain(proc)
        results[name] = json.loads((tmp_path / name / "results.json").read_text())
    assert results["plain"]["ldb_drop_steps"] == results["checkpointed"]["ldb_drop_steps"] == 3
    assert results["checkpointed"]["weights_sha256"] == results["plain"]["weights_sha256"]
    assert results["checkpointed"]["buffers_sha256"] != results["plain"]["buffers_sha256"]


def _final_module_state(run_dir, tag):
    state = torch.load(os.path.join(run_dir, "checkpoints", tag, "mp_rank_00_model_states.pt"),
                       map_location="cpu", weights_only=False)
    return state["module"]


@pytest.mark.parametrize("stage", [0, 2])
def test_resume_matches_uninterrupted_run(tmp_path, stage):
    """Stop after epoch 1, resume: same masks and bitwise the same weights as one run."""
    cfg = tu.write_config(str(tmp_path / "ds.json"), base=f"zero{stage}_ldb.json",
                          ldb={"sampling_rate": 1})  # epochs 1 and 2 are DROP epochs
    common = ["--deepspeed_config", cfg, "--model", MODEL, "--epochs", "3",
              "--max-steps-per-epoch", "4", "--log-every", "1", "--log-masks", "--no-progress",
              "--sched", "cosine", "--output", str(tmp_path)]
    whole = tu.run_deepspeed(common + ["--experiment", "whole"])
    assert whole.returncode == 0, tu.explain(whole)
    part = tu.run_deepspeed(common + ["--experiment", "part", "--stop-after-epoch", "1"])
    assert part.returncode == 0, tu.explain(part)
    assert not (tmp_path / "part" / "checkpoints" / "epoch2").exists()
    status = json.loads((tmp_path / "part" / "status.json").read_text())
    assert status["status"] == "completed" and "stopped after epoch 1 by --stop-after-epoch" in status["message"]
    # As if the stopped run had written epoch 2's summary row and died before its checkpoint:
    # the resumed run trains epoch 2 again and must replace that row, not add a second one.
    with open(tmp_path / "part" / "summary.csv", "a") as f:
        f.write("2" + ",-1" * 10 + "\n")
    resumed = tu.run_deepspeed(common + ["--experiment", "part", "--resume"])
    assert resumed.returncode == 0, tu.explain(resumed)
    assert json.loads((tmp_path / "part" / "status.json").read_text())["message"] == ""  # finished now
    assert "resumed from" in resumed.stdout
    with open(tmp_path / "part" / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["0", "1", "2"] and rows[2]["train_loss"] != "-1"
    with open(tmp_path / "whole" / "summary.csv", newline="") as f:
        whole_rows = list(csv.DictReader(f))
    assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in whole_rows]

    masks_whole = (tmp_path / "whole" / "masks.jsonl").read_text().splitlines()
    masks_part = (tmp_path / "part" / "masks.jsonl").read_text().splitlines()
    assert len(masks_whole) == 12 and masks_part == masks_whole
    assert any(json.loads(line)["dropped"] for line in masks_whole if '"epoch": 2' in line)

    a = _final_module_state(str(tmp_path / "whole"), "epoch2")
    b = _final_module_state(str(tmp_path / "part"), "epoch2")
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"weights differ after resume: {differ[:5]}"
    ra = json.loads((tmp_path / "whole" / "results.json").read_text())
    rb = json.loads((tmp_path / "part" / "results.json").read_text())
    assert ra["final_top1"] == rb["final_top1"] and rb["epochs_run"] == [0, 1, 2]


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="needs Open MPI's mpirun")
def test_mpirun_two_ranks(tmp_path):
    pytest.importorskip("mpi4py")
    cfg = tu.write_config(str(tmp_path / "ds.json"), base="zero1_ldb.json",
                          ldb={"sampling_rate": 1})
    proc = tu.run_mpirun(["--deepspeed_config", cfg, "--model", MODEL, "--epochs", "2",
                          "--max-steps-per-epoch", "3", "--no-progress", "--ckpt-every", "0",
                          "--output", str(tmp_path), "--experiment", "mpi"])
    assert proc.returncode == 0, tu.explain(proc)
    results = json.loads((tmp_path / "mpi" / "results.json").read_text())
    assert results["world_size"] == 2 and results["ldb_drop_steps"] == 3


def test_data_workers_train_bitwise_as_the_rank_alone(tmp_path):
    """-j 1 (persistent forkserver workers, ldb-train's default start) trains bitwise as -j 0: the
    augmentation seed reaches the workers every epoch, the DROP epochs' larger batch too, and an
    epoch cut short by --max-steps-per-epoch leaves nothing stale for the next one."""
    cfg = tu.write_config(str(tmp_path / "ds.json"), base="zero1_ldb.json", ldb={"sampling_rate": 1})
    sha = {}
    for workers in ("0", "1"):
        proc = tu.run_deepspeed(["--deepspeed_config", cfg, "--model", MODEL, "--epochs", "3",
                                 "--max-steps-per-epoch", "3", "--no-progress", "--ckpt-every", "0",
                                 "--output", str(tmp_path), "--experiment", f"j{workers}", "-j", workers])
        assert proc.returncode == 0, tu.explain(proc)
        results = json.loads((tmp_path / f"j{workers}" / "results.json").read_text())
        assert results["ldb_drop_steps"] > 0
        sha[workers] = results["weights_sha256"]
    assert sha["0"] == sha["1"], sha


def test_torchrun_two_ranks(tmp_path):
    cfg = tu.write_config(str(tmp_path / "ds.json"), base="zero0_baseline.json")
    proc = tu.run_torchrun(["--deepspeed_config", cfg, "--model", MODEL, "--epochs", "1",
                            "--max-steps-per-epoch", "3", "--no-progress", "--ckpt-every", "0",
                            "--output", str(tmp_path), "--experiment", "tr"])
    assert proc.returncode == 0, tu.explain(proc)
    results = json.loads((tmp_path / "tr" / "results.json").read_text())
    assert results["world_size"] == 2 and results["ldb_drop_steps"] == 0
    s = tu.read_scalars(str(tmp_path / "tr"))
    assert all(v == 1.0 for _, v in s["LDB/kept_param_fraction"])  # baseline: nothing dropped


def test_clear_errors_before_any_rank_starts(tmp_path):
    """A bad model name or a missing dataset fails fast, with the reason and the remedy."""
    cfg = tu.write_config(str(tmp_path / "ds.json"), base="zero0_ldb.json")
    python = [sys.executable, tu.TRAIN, "--deepspeed_config", cfg, "--output", str(tmp_path)]
    module = [sys.executable, "-m", "ldb_ds.train", "--deepspeed_config", cfg]  # the same main
    bad_model = tu.run(module + ["--model", "resnet5O"], timeout=120)
    assert bad_model.returncode == 2
    assert "unknown model 'resnet5O'" in bad_model.stderr and "resnet50" in bad_model.stderr
    missing = tmp_path / "no_such_dir"
    no_data = tu.run(python + ["--dataset", "cifar10", "--data-dir", str(missing)], timeout=120)
    assert no_data.returncode == 2
    assert os.path.join(str(missing), "cifar-10-batches-py") in no_data.stderr
    assert "--download" in no_data.stderr
    bad_key = tu.write_config(str(tmp_path / "bad.json"), base="zero0_ldb.json",
                              ldb={"drop_rte": 0.3})
    bad = tu.run([sys.executable, tu.TRAIN, "--deepspeed_config", bad_key], timeout=120)
    assert bad.returncode == 2 and "drop_rte" in bad.stderr
    bad_train = tu.write_config(str(tmp_path / "bad2.json"), base="zero0_ldb.json",
                                train={"epoch": 3})
    bad2 = tu.run([sys.executable, tu.TRAIN, "--deepspeed_config", bad_train], timeout=120)
    assert bad2.returncode == 2 and "'train' section" in bad2.stderr and "epoch" in bad2.stderr


def test_scaling_sweep_overlays_world_sizes(tmp_path):
    """launch/sweep.py: baseline and LDB at world sizes 1 and 2 in one log root, plus a summary."""
    root = tmp_path / "sweep"
    proc = tu.run([sys.executable, os.path.join(tu.REPO, "launch", "sweep.py"),
                   "--log-root", str(root), "--world-sizes", "1", "2",
                   "--configs", "ds_configs/zero0_baseline.json", "ds_configs/zero0_ldb.json",
                   "--", "--model", MODEL, "--epochs", "3", "--max-steps-per-epoch", "2"],
                  timeout=400)
    assert proc.returncode == 0, tu.explain(proc)
    summary = (root / "summary.csv").read_text().splitlines()
    assert len(summary) == 5 and all(",ok," in row for row in summary[1:]), summary
    assert "speedup_vs_baseline" in (root / "summary.md").read_text()
    for ws in (1, 2):
        for name in ("zero0_baseline", "zero0_ldb"):
            s = tu.read_scalars(str(root / f"{name}-ws{ws}"))
            assert {v for _, v in s["Run/world_size"]} == {float(ws)}
