"""Bad input to ldb-train and ldb-bench (issue 18): one line, the right exit code, nothing lost.

Every case asserts the exit code, one stderr line naming what is wrong, no traceback, and that
nothing outside the run folder changed: every file of the workspace (a sibling run, a file
beside ``--output``, the configs) is hashed before and after. Most cases fail at argument parsing,
in this process (``main(argv)``); a few start a real run of world size 1 (``python -m
ldb_ds.train``, about 10 s) and one a real 2-rank run under the ``deepspeed`` launcher.
docs/reliability.md ("Bad input") has the table these cases back.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

import pytest

from ldb_ds.bench import dispatch as bench_dispatch
from ldb_ds.train import main as train_main
from tests.support import train_utils as tu

MODEL = "test_efficientnet"


# --------------------------------------------------------------------------- workspace


@pytest.fixture
def ws(tmp_path):
    """``tmp_path`` with ``runs/`` holding another run, a file beside ``runs``, and a base config."""
    other = tmp_path / "runs" / "other"
    other.mkdir(parents=True)
    (other / ".ldb_ds_run").write_text("x")
    (other / "results.json").write_text('{"final_top1": 90}')
    (tmp_path / "keep.txt").write_text("precious")
    (tmp_path / "a_file").write_text("not a folder")
    tu.write_config(str(tmp_path / "ds.json"))
    return tmp_path


def _hashes(root, skip: str | None = None) -> dict[str, str]:
    out = {}
    for d, _, files in os.walk(root):
        if skip and os.path.abspath(d).startswith(os.path.abspath(skip)):
            continue
        for name in files:
            path = os.path.join(d, name)
            if not os.path.islink(path):
                with open(path, "rb") as f:
                    out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def _config(ws, name: str, mutate) -> str:
    path = ws / name
    cfg = json.loads((ws / "ds.json").read_text())
    mutate(cfg)
    path.write_text(json.dumps(cfg))
    return str(path)


def _check(code, err: str, expected_code: int, *needles: str) -> None:
    assert code == expected_code, err
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1, err  # one line says what is wrong
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def _train_in_process(capsys, argv) -> tuple[int, str]:
    try:
        code = train_main.main(argv)
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.err + captured.out


# --------------------------------------------------------------------------- ldb-train, parse time

def _set(section: str, key: str, value):
    def mutate(cfg):
        (cfg.setdefault(section, {}) if section else cfg)[key] = value
    return mutate


TRAIN_ARGS = [  # (id, extra argv, words the error line must hold)
    ("lr-nan", ["--lr", "nan"], ["--lr", "finite"]),
    ("lr-inf", ["--lr", "inf"], ["--lr", "finite"]),
    ("lr-negative", ["--lr", "-1"], ["--lr", ">= 0"]),
    ("min-lr-nan", ["--min-lr", "nan"], ["--min-lr", "finite"]),
    ("warmup-lr-inf", ["--warmup-lr", "inf"], ["--warmup-lr", "finite"]),
    ("drop-path-nan", ["--drop-path", "nan"], ["--drop-path", "finite"]),
    ("drop-path-above-1", ["--drop-path", "1.5"], ["--drop-path", "<= 1"]),
    ("dist-timeout-nan", ["--dist-timeout", "nan"], ["--dist-timeout", "finite"]),
    ("dist-timeout-inf", ["--dist-timeout", "inf"], ["--dist-timeout", "finite"]),
    ("dist-timeout-small", ["--dist-timeout", "1"], ["--dist-timeout", ">= 5"]),
    ("epochs-zero", ["--epochs", "0"], ["--epochs", ">= 1"]),
    ("batch-size-zero", ["--batch-size", "0"], ["--batch-size", ">= 1"]),
    ("workers-negative", ["--workers", "-1"], ["--workers"]),
    ("threads-zero", ["--threads", "0"], ["--threads"]),
    ("checkpoint-hist-negative", ["--checkpoint-hist", "-2"], ["--checkpoint-hist"]),
    ("img-size-tiny", ["--img-size", "4"], ["--img-size"]),
    ("lr-not-a-number", ["--lr", "fast"], ["--lr"]),
    ("experiment-dotdot", ["--experiment", "..", "--overwrite"], ["--experiment", "one folder name"]),
    ("experiment-dot", ["--experiment", ".", "--overwrite"], ["--experiment", "one folder name"]),
    ("experiment-empty", ["--experiment", "", "--overwrite"], ["--experiment"]),
    ("experiment-slash", ["--experiment", "a/b"], ["--experiment"]),
    ("experiment-parent-path", ["--experiment", "../other", "--overwrite"], ["--experiment"]),
    ("experiment-absolute", ["--experiment", "/tmp", "--overwrite"], ["--experiment"]),
    ("output-empty", ["--output", ""], ["--output"]),
    ("data-dir-with-digits", ["--data-dir", "somewhere"], ["--data-dir", "digits"]),
    ("data-dir-with-synthetic", ["--dataset", "synthetic", "--data-dir", "x"], ["--data-dir", "synthetic"]),
    ("bad-signal", ["--preempt-signals", "SIGFOO"], ["--preempt-signals"]),
    ("grad-checkpointing-torchvision", ["--model", "tv:resnet18", "--grad-checkpointing"],
     ["--grad-checkpointing", "torchvision"]),
]


@pytest.mark.parametrize("extra,needles", [c[1:] for c in TRAIN_ARGS], ids=[c[0] for c in TRAIN_ARGS])
def test_train_bad_option(ws, capsys, extra, needles):
    before = _hashes(ws)
    code, err = _train_in_process(capsys, ["--deepspeed_config", str(ws / "ds.json"), "--output",
                                           str(ws / "runs"), *extra])
    _check(code, err, 2, *needles)
    assert _hashes(ws) == before


TRAIN_CONFIGS = [  # (id, config change, words the error line must hold)
    ("json-lr-nan", _set("optimizer", "params", {"lr": float("nan")}), ["optimizer.params.lr", "finite"]),
    ("json-kappa-1e999", _set("layer_drop_back", "kappa", float("inf")), ["layer_drop_back.kappa", "finite"]),
    ("json-clipping-inf", _set("", "gradient_clipping", float("inf")), ["gradient_clipping", "finite"]),
    ("zero-stage-4", _set("zero_optimization", "stage", 4), ["zero_optimization.stage", "0, 1, 2 and 3"]),
    ("batch-mismatch", _set("", "train_batch_size", 7), ["train_batch_size 7"]),
    ("micro-batch-zero", _set("", "train_micro_batch_size_per_gpu", 0), ["train_micro_batch_size_per_gpu"]),
    ("train-section-lr-nan", _set("train", "lr", float("nan")), ["lr", "finite"]),
    ("train-section-experiment-dotdot", _set("train", "experiment", ".."), ["experiment"]),
    ("train-section-experiment-nul", _set("train", "experiment", "a\0b"), ["experiment"]),
    ("ldb-drop-rate-nan", _set("layer_drop_back", "drop_rate", float("nan")), ["drop_rate"]),
]


@pytest.mark.parametrize("mutate,needles", [c[1:] for c in TRAIN_CONFIGS], ids=[c[0] for c in TRAIN_CONFIGS])
def test_train_bad_config_value(ws, capsys, monkeypatch, mutate, needles):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    cfg = _config(ws, "bad.json", mutate)
    before = _hashes(ws)
    code, err = _train_in_process(capsys, ["--deepspeed_config", cfg, "--output", str(ws / "runs")])
    _check(code, err, 2, *needles)
    assert _hashes(ws) == before


@pytest.mark.parametrize("text,needles", [
    ("[1, 2]", ["JSON list", "object"]),
    ('{"optimizer": ', ["not valid JSON"]),
], ids=["json-list", "invalid-json"])
def test_train_config_file_shape(ws, capsys, text, needles):
    (ws / "bad.json").write_text(text)
    before = _hashes(ws)
    code, err = _train_in_process(capsys, ["--deepspeed_config", str(ws / "bad.json")])
    _check(code, err, 2, *needles)
    assert _hashes(ws) == before


@pytest.mark.parametrize("yaml_text,needles", [("lr: .nan\n", ["lr", "finite"]),
                                               ("experiment: ..\n", ["experiment"])],
                         ids=["yaml-lr-nan", "yaml-experiment-dotdot"])
def test_train_bad_yaml_value(ws, capsys, yaml_text, needles):
    (ws / "args.yaml").write_text(yaml_text)
    before = _hashes(ws)
    code, err = _train_in_process(capsys, ["-c", str(ws / "args.yaml"), "--deepspeed_config", str(ws / "ds.json")])
    _check(code, err, 2, *needles)
    assert _hashes(ws) == before


@pytest.mark.parametrize("output,needles", [("a_file", ["is a file"]), ("a_file/runs", ["which is a file"])],
                         ids=["output-is-a-file", "output-under-a-file"])
def test_train_output_not_a_folder(ws, capsys, output, needles):
    before = _hashes(ws)
    code, err = _train_in_process(capsys, ["--deepspeed_config", str(ws / "ds.json"), "--output",
                                           str(ws / output), "--model", MODEL])
    _check(code, err, 2, "--output", *needles)
    assert _hashes(ws) == before


# --------------------------------------------------------------------------- ldb-bench

BENCH_ARGS = [  # (id, argv, words the error line must hold)
    ("lr-nan", ["step", "--lr", "nan"], ["--lr", "finite"]),
    ("momentum-inf", ["step", "--momentum", "inf"], ["--momentum", "finite"]),
    ("momentum-above-1", ["step", "--momentum", "1.5"], ["--momentum"]),
    ("weight-decay-negative", ["step", "--weight-decay", "-1"], ["--weight-decay"]),
    ("batch-size-zero", ["step", "--batch-size", "0"], ["--batch-size"]),
    ("drop-rate-nan", ["step", "--drop-rate", "nan"], ["--drop-rate", "finite"]),
    ("kappa-inf", ["step", "--kappa", "inf"], ["--kappa", "finite"]),
    ("drop-rates-nan", ["sweep-drop-rate", "--drop-rates", "0.1,nan"], ["--drop-rates", "finite"]),
    ("drop-rates-one", ["sweep-drop-rate", "--drop-rates", "1.0"], ["--drop-rates"]),
    ("sampling-rates-zero", ["sweep-sampling-rate", "--sampling-rates", "0"], ["--sampling-rates"]),
    ("intra-bw-nan", ["project", "--intra-bw-gbs", "nan"], ["--intra-bw-gbs", "finite"]),
    ("overlap-nan", ["project", "--overlap", "nan"], ["--overlap"]),
    ("compute-scales-inf", ["project", "--compute-scales", "inf"], ["--compute-scales", "finite"]),
    ("latency-negative", ["project", "--inter-lat-us", "-1"], ["--inter-lat-us"]),
    ("world-sizes-zero", ["scaling", "--world-sizes", "0"], ["--world-sizes"]),
    ("rounds-zero", ["step", "--rounds", "0"], ["--rounds"]),
    ("threads-zero", ["step", "--threads", "0"], ["--threads"]),
    ("zero-stage-4", ["step", "--zero-stage", "4"], ["--zero-stage"]),
    ("unknown-mode", ["bogus"], ["bogus"]),
    ("ldb-keep-first-negative", ["step", "--keep-first", "-1"], ["keep_first"]),
    ("out-is-a-file", ["step", "--out", "{ws}/a_file"], ["--out", "existing file"]),
    ("out-under-a-file", ["step", "--out", "{ws}/a_file/results"], ["--out", "which is a file"]),
    ("report-dir-missing", ["report", "{ws}/no_such_dir"], ["not a directory"]),
]


@pytest.mark.parametrize("argv,needles", [c[1:] for c in BENCH_ARGS], ids=[c[0] for c in BENCH_ARGS])
def test_bench_bad_option(ws, capsys, argv, needles):
    before = _hashes(ws)
    try:
        code = bench_dispatch.main([a.replace("{ws}", str(ws)) for a in argv])
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    _check(code, captured.err + captured.out, 2, *needles)
    assert _hashes(ws) == before


# --------------------------------------------------------------------------- launcher's first exit


@pytest.mark.parametrize("bad", [["--model", "resnet_nope"], ["--no-such-flag"]], ids=["model", "option"])
def test_rank0_prints_the_error_when_a_peer_found_it_first(ws, bad):
    """Launchers end the job at the first rank's exit (DeepSpeed's launch.py kills the other ranks
    at its next poll; torchrun and ``srun --kill-on-bad-exit`` alike). Here rank 0 is held back 2 s
    (SIGSTOP, as a busy machine would), so rank 1 finds the error first; what is left is killed at
    the first exit, as launch.py does. Rank 0's one line must still come out."""
    import signal
    import subprocess
    import time

    from ldb_ds.process import free_port

    argv = [sys.executable, "-m", "ldb_ds.train", "--deepspeed_config", str(ws / "ds.json"), "--output",
            str(ws / "runs"), "--no-progress", *bad]
    port = str(free_port())
    procs = {}
    for rank in (1, 0):
        env = tu.cpu_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                         MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs[rank] = subprocess.Popen(argv, cwd=tu.REPO, env=env, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True)
    os.kill(procs[0].pid, signal.SIGSTOP)
    time.sleep(2.0)
    os.kill(procs[0].pid, signal.SIGCONT)
    deadline = time.monotonic() + 120
    while all(p.poll() is None for p in procs.values()):
        assert time.monotonic() < deadline, "neither rank ended"
        time.sleep(0.05)
    for p in procs.values():  # the launcher's reaction to the first exit
        if p.poll() is None:
            p.kill()
    out = {rank: p.communicate(timeout=30) for rank, p in procs.items()}
    assert procs[0].returncode == 2, out[0]
    _check(procs[0].returncode, out[0][1], 2, "resnet_nope" if bad[0] == "--model" else "--no-such-flag")
    assert "error" not in out[1][1], out[1]  # one line per job: rank 1 stays quiet


# --------------------------------------------------------------------------- real runs


def _run_train(ws, *extra: str, nproc: int = 1):
    args = ["--model", MODEL, "--no-progress", "--output", str(ws / "runs"), "--epochs", "1",
            "--max-steps-per-epoch", "1", "--eval-every", "0", *extra]
    if nproc > 1:
        return tu.run_deepspeed(args, nproc=nproc, timeout=240)
    return tu.run([sys.executable, "-m", "ldb_ds.train", *args], timeout=240)


def test_overwrite_refuses_a_folder_ldb_train_did_not_create(ws):
    mine = ws / "runs" / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("my own notes")
    before = _hashes(ws)
    proc = _run_train(ws, "--deepspeed_config", str(ws / "ds.json"), "--experiment", "mine", "--overwrite")
    _check(proc.returncode, proc.stderr, 2, "--overwrite refused", ".ldb_ds_run", "nothing was deleted")
    assert _hashes(ws) == before


@pytest.mark.parametrize("start", [["--resume", "auto"], ["--resume", "auto", "--eval"]], ids=["resume-auto", "eval"])
def test_resume_and_eval_refuse_a_folder_ldb_train_did_not_create(ws, start):
    """--resume auto in a person's folder with no checkpoint would start afresh there and write its
    args.yaml, summary.csv and results.json over theirs: refused, every file as it was."""
    mine = ws / "runs" / "mine"
    mine.mkdir()
    for name, text in (("args.yaml", "mine: 1\n"), ("summary.csv", "user,csv\n"), ("results.json", '{"my": 1}')):
        (mine / name).write_text(text)
    before = _hashes(ws)
    proc = _run_train(ws, "--deepspeed_config", str(ws / "ds.json"), "--experiment", "mine", *start)
    _check(proc.returncode, proc.stderr, 2, "was not created by ldb-train", ".ldb_ds_run", "nothing was written")
    assert _hashes(ws) == before and not (mine / ".ldb_ds_run").exists()


@pytest.mark.parametrize("start", [["--resume", "epoch9"], ["--resume", "epoch9", "--eval"]], ids=["resume", "eval"])
def test_a_failed_start_keeps_a_completed_runs_status(ws, start):
    """A mistyped --resume tag on a finished run: exit 2 naming it; status.json still says completed
    (a scheduler reading it must not take a finished run for a broken one)."""
    done = ws / "runs" / "done"
    (done / "checkpoints").mkdir(parents=True)
    (done / ".ldb_ds_run").write_text("x")
    (done / "status.json").write_text(json.dumps({"status": "completed", "exit_code": 0, "message": ""}))
    before = _hashes(ws)
    proc = _run_train(ws, "--deepspeed_config", str(ws / "ds.json"), "--experiment", "done", *start)
    _check(proc.returncode, proc.stderr, 2, "epoch9")
    assert json.loads((done / "status.json").read_text())["status"] == "completed"
    status_files = {k: v for k, v in before.items() if k.endswith("status.json")}
    assert {k: v for k, v in _hashes(ws).items() if k.endswith("status.json")} == status_files


@pytest.mark.parametrize("spec", ["README.md", "epoch3", "no/such/dir"])
def test_a_resume_that_names_nothing_leaves_no_run_folder(ws, spec):
    """--resume with a tag or path that is not there, on a new experiment: exit 2 naming it, and no
    run folder is made (it used to be left holding only a 'failed' status.json)."""
    before = _hashes(ws)
    proc = _run_train(ws, "--deepspeed_config", str(ws / "ds.json"), "--experiment", "fresh", "--resume", spec)
    _check(proc.returncode, proc.stderr, 2, f"--resume {spec}")
    assert not (ws / "runs" / "fresh").exists()
    assert _hashes(ws) == before


def test_a_running_experiment_is_never_deleted_or_written_by_a_second_start(ws):
    """The same experiment started again while it runs (a second terminal, a job submitted twice):
    --overwrite and --resume auto are refused with the holder named (exit 2), nothing of the live
    run is deleted or written, and it goes on training. SIGKILL to its rank then frees the folder
    at once (the kernel drops the lock with the process), although the rank's forked DataLoader
    worker is still alive: the worker never held the lock."""
    import signal

    from ldb_ds.train.rundir import RunDir

    run_dir, cfg = ws / "runs" / "live", str(ws / "ds.json")
    live = tu.Background([sys.executable, "-m", "ldb_ds.train", "--model", MODEL, "--no-progress",
                          "--output", str(ws / "runs"), "--experiment", "live", "--epochs", "10000",
                          "--max-steps-per-epoch", "1", "--eval-every", "0", "-j", "1",
                          "--worker-start-method", "fork", "--deepspeed_config", cfg], str(ws / "log"))
    try:
        tu.wait_until(lambda: (run_dir / "checkpoints" / "latest").exists(), 180, "the live run's first checkpoint")
        written_once = {name: (run_dir / name).read_bytes() for name in ("args.yaml", "ds_config.json")}
        for start in (["--overwrite"], ["--resume", "auto"]):
            proc = _run_train(ws, "--deepspeed_config", cfg, "--experiment", "live", *start)
            _check(proc.returncode, proc.stderr, 2, "is in use by another ldb-train start",
                   f"(pid {live.proc.pid} on ", "nothing was deleted or written")
            assert {name: (run_dir / name).read_bytes() for name in written_once} == written_once
            assert (run_dir / "checkpoints" / "latest").exists() and live.proc.poll() is None, live.explain()
        workers = [p for p in live.processes() if p.info["pid"] != live.proc.pid]
        assert workers, "the live run has no DataLoader worker"
        os.kill(live.proc.pid, signal.SIGKILL)
        live.proc.wait(timeout=30)
        assert any(p.is_running() for p in workers)  # the orphaned worker lives on for a while
        after = RunDir(str(ws / "runs"), "live")
        assert after._prepare_on_main(overwrite=False, continuing=True) == ""
        after.release()
    finally:
        live.kill()


def test_overwrite_never_follows_a_link_out_of_output(ws):
    os.symlink(ws / "runs" / "other", ws / "runs" / "link")
    before = _hashes(ws)
    proc = _run_train(ws, "--deepspeed_config", str(ws / "ds.json"), "--experiment", "link", "--overwrite")
    _check(proc.returncode, proc.stderr, 2, "--overwrite refused", "not a folder directly inside --output")
    assert _hashes(ws) == before and (ws / "runs" / "other" / "results.json").exists()


def test_reentrant_grad_checkpointing_refused_with_ldb(ws, capsys):
    """timm's reentrant checkpointing would step a block's kept units with no gradient when LDB
    drops every unit ahead of the block: refused before anything starts."""
    import timm.layers

    before = _hashes(ws)
    timm.layers.set_reentrant_ckpt(True)  # what TIMM_REENTRANT_CKPT=1 sets when timm is imported
    try:
        code, err = _train_in_process(capsys, ["--deepspeed_config", str(ws / "ds.json"), "--output",
                                               str(ws / "runs"), "--grad-checkpointing"])
    finally:
        timm.layers.set_reentrant_ckpt(False)
    _check(code, err, 2, "--grad-checkpointing", "TIMM_REENTRANT_CKPT")
    assert _hashes(ws) == before


def test_grad_checkpointing_on_a_timm_model_without_it(ws):
    """timm's DLA has no checkpointing (it asserts): exit 2 naming the model, status failed."""
    before = _hashes(ws)
    proc = _run_train(ws, "--deepspeed_config", str(ws / "ds.json"), "--experiment", "gc", "--model", "dla34",
                      "--grad-checkpointing")
    _check(proc.returncode, proc.stderr, 2, "dla34", "gradient checkpointing")
    assert _hashes(ws, skip=str(ws / "runs" / "gc")) == before
    assert json.loads((ws / "runs" / "gc" / "status.json").read_text())["exit_code"] == 2


def test_units_left_by_keep_first_named(ws):
    cfg = _config(ws, "kf.json", _set("layer_drop_back", "keep_first", 100))
    before = _hashes(ws)
    proc = _run_train(ws, "--deepspeed_config", cfg, "--experiment", "kf")
    _check(proc.returncode, proc.stderr, 2, "keep_first")
    assert _hashes(ws, skip=str(ws / "runs" / "kf")) == before
    assert json.loads((ws / "runs" / "kf" / "status.json").read_text())["exit_code"] == 2


def test_full_disk_ends_failed_with_the_file_named(ws):
    """args.yaml is /dev/full (every write: ENOSPC): exit 2, the file named, status failed (not running)."""
    run_dir = ws / "runs" / "full"
    run_dir.mkdir()
    (run_dir / ".ldb_ds_run").write_text("x")
    (run_dir / "status.json").write_text(json.dumps({"status": "running", "exit_code": None, "message": ""}))
    os.symlink("/dev/full", run_dir / "args.yaml")
    before = _hashes(ws, skip=str(run_dir))
    proc = _run_train(ws, "--deepspeed_config", str(ws / "ds.json"), "--experiment", "full", "--resume", "auto")
    _check(proc.returncode, proc.stderr, 2, "args.yaml", "no space left")
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "failed" and status["exit_code"] == 2
    assert _hashes(ws, skip=str(run_dir)) == before


def test_nonfinite_weights_after_the_last_step_two_ranks(ws):
    """A weight decay that overflows the update (finite gradients): exit 3 on both ranks, nothing saved."""
    cfg = _config(ws, "wd.json", _set("optimizer", "params", {"lr": 10.0, "weight_decay": 1e38}))
    before = _hashes(ws)
    proc = _run_train(ws, "--deepspeed_config", cfg, "--experiment", "wd", nproc=2)
    _check(proc.returncode, proc.stderr, 3, "weights became non-finite after optimizer step 1")
    run_dir = ws / "runs" / "wd"
    status = json.loads((run_dir / "status.json").read_text())
    assert status["status"] == "failed" and status["exit_code"] == 3
    assert not (run_dir / "checkpoints" / "latest").exists()
    assert _hashes(ws, skip=str(run_dir)) == before
