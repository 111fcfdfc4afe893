"""Faults injected from outside into real 2-rank runs under the ``deepspeed`` launcher (and the stop
signal under torchrun and mpirun).

Each test starts ``launch/train.py`` on 2 CPU ranks (gloo), injects one fault as a cluster would
(a real signal to a real process, a truncated file on disk, an absurd learning rate, an
unreadable image) and checks the exit code, the message, the time it took and what was kept.
docs/reliability.md has the table these tests back. The model is timm's ``test_efficientnet``
on the bundled digits; epochs are capped with ``--max-steps-per-epoch``.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import time

import pytest
import torch

from ldb_ds import checkpointing
from tests.support import train_utils as tu

pytestmark = pytest.mark.slow

MODEL = "test_efficientnet"


def _args(cfg: str, out, *extra: str) -> list[str]:
    return ["--deepspeed_config", cfg, "--model", MODEL, "--no-progress", "--output", str(out), *extra]


def _report(fault: str, **figures) -> None:
    """Measured figures, shown with ``pytest -s`` (docs/reliability.md quotes them)."""
    print(f"\nMEASURED {fault}: " + ", ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in figures.items()), flush=True)


def _status(run_dir) -> dict:
    return json.loads((run_dir / "status.json").read_text())


def _load(path: str) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def _assert_same(a, b, where: str, skip: tuple[str, ...] = ()) -> None:
    """Tensors bitwise, everything else by ==, recursively (keys in ``skip`` ignored)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert set(a) - set(skip) == set(b) - set(skip), f"{where}: keys differ"
        for k in a:
            if k not in skip:
                _assert_same(a[k], b[k], f"{where}.{k}", skip)
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]", skip)
    elif hasattr(a, "__dict__") and type(a).__eq__ is object.__eq__:  # e.g. DeepSpeed's loss scaler
        assert type(a) is type(b), f"{where}: types differ"
        _assert_same(vars(a), vars(b), where, skip)
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_sigterm_mid_drop_epoch_saves_and_resumes_bitwise(tmp_path):
    """Preemption: SIGTERM reaches rank 0 only (the launcher signals rank after rank); both ranks stop
    after the same optimizer step, save, and the same command resumes to bitwise the uninterrupted run."""
    cfg = tu.write_config(str(tmp_path / "ds.json"), base="zero2_ldb.json", gradient_accumulation_steps=2,
                          ldb={"sampling_rate": 1, "resample": "epoch"})  # epochs 1, 2 are DROP epochs
    command = _args(cfg, tmp_path, "--epochs", "3", "--max-steps-per-epoch", "6", "--log-masks",
                    "--log-interval", "1", "--resume", "auto", "--experiment", "part")
    run_dir = tmp_path / "part"
    bg = tu.start_deepspeed(command, str(tmp_path / "log1"))
    at = tu.wait_until(lambda: (m := tu.last_mask_line(str(run_dir))) and m["mode"] == "DROP" and m, 300,
                       "the first DROP step")
    assert at["epoch"] == 1
    t_signal = time.monotonic()
    os.kill(bg.launcher(), signal.SIGTERM)  # launch.py passes it to rank 0 first, waits up to 30 s for it
    code = bg.wait(timeout=bg.elapsed() + 60)
    stop_s = time.monotonic() - t_signal
    out, err = bg.output()
    assert code != 0 and stop_s < 30, bg.explain()  # within the launcher's 30 s before its SIGKILL
    assert "stopped by SIGTERM after optimizer step" in out, bg.explain()
    status = _status(run_dir)
    assert status["status"] == "preempted" and status["exit_code"] == 75
    tag = status["checkpoint"]
    manifest = checkpointing.verify_local(str(run_dir / "checkpoints"), tag)
    meta = manifest["meta"]
    assert meta["kind"] == "preempt" and meta["next_epoch"] == 1 and 0 < meta["step_in_epoch"] < 10
    assert meta["step_in_epoch"] % 2 == 0  # at an accumulation boundary (gradient_accumulation_steps 2)
    assert (run_dir / "checkpoints" / "latest").read_text() == tag
    saved_s = float(out.split(f"checkpoint {tag} saved in ")[1].split()[0])
    _report("SIGTERM", launcher_exit=code, rank_exit=status["exit_code"], signal_to_all_gone_s=stop_s,
            save_s=saved_s, signalled_at_micro_step=at["step"], stopped_at_micro_step=meta["step_in_epoch"],
            steps_lost=0)

    # The requeue: exactly the same command.
    again = tu.run_deepspeed(command, timeout=400)
    assert again.returncode == 0, tu.explain(again)
    assert f"continuing at epoch 1, micro step {meta['step_in_epoch']}" in again.stdout, tu.explain(again)
    assert _status(run_dir)["status"] == "completed"

    whole = tu.run_deepspeed([*command[:-1], "whole"], timeout=400)
    assert whole.returncode == 0, tu.explain(whole)
    a, b = (json.loads((tmp_path / n / "results.json").read_text()) for n in ("whole", "part"))
    assert a["weights_sha256"] == b["weights_sha256"] and a["buffers_sha256"] == b["buffers_sha256"]
    assert a["optimizer_steps"] == b["optimizer_steps"] and a["final_top1"] == b["final_top1"]
    assert (tmp_path / "whole" / "masks.jsonl").read_text() == (run_dir / "masks.jsonl").read_text()
    with open(run_dir / "summary.csv", newline="") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["0", "1", "2"]
    # Parameters, optimizer state (ZeRO-2 partitions, fp32 masters, momentum) and LDB state, bitwise.
    for name in ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt",
                 "zero_pp_rank_1_mp_rank_00_optim_states.pt", "ldb_state.pt"]:
        x, y = (_load(str(tmp_path / n / "checkpoints" / "epoch2" / name)) for n in ("whole", "part"))
        if name.startswith("mp_rank"):
            _assert_same(x["module"], y["module"], "module")
            assert x["global_steps"] == y["global_steps"]
        elif name == "ldb_state.pt":
            _assert_same(x, y, "LDB state")
        else:
            _assert_same(x["optimizer_state_dict"], y["optimizer_state_dict"], name, skip=("ds_config", "ds_version"))


LAUNCHERS = {  # launcher -> (how to start it, the signal it passes to every rank)
    "torchrun": (tu.start_torchrun, signal.SIGTERM),
    "torchrun-usr1": (lambda a, d: tu.start_torchrun(a, d, extra=("--signals-to-handle",
                                                                  "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1")),
                      signal.SIGUSR1),
    "mpirun": (tu.start_mpirun, signal.SIGUSR1),
    "mpirun-term": (tu.start_mpirun, signal.SIGTERM),
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_stop_signal_to_other_launchers(tmp_path, launcher):
    """The signal each launcher forwards to every rank stops the run with a checkpoint (docs/reliability.md)."""
    if launcher.startswith("mpirun") and shutil.which("mpirun") is None:
        pytest.skip("needs Open MPI's mpirun")
    start, sig = LAUNCHERS[launcher]
    cfg = tu.write_config(str(tmp_path / "ds.json"), base="zero0_ldb.json")
    run_dir = tmp_path / "run"
    # Far more epochs than the test waits for (an epoch of the digits takes about a second): the
    # signal must arrive while the run trains, and the run stops at it.
    bg = start(_args(cfg, tmp_path, "--epochs", "100", "--ckpt-every", "0", "--log-masks",
                     "--experiment", "run"), str(tmp_path / "log"))
    tu.wait_until(lambda: (m := tu.last_mask_line(str(run_dir))) and m["step"] >= 2 and m, 300, "step 2")
    t_signal = time.monotonic()
    os.kill(bg.proc.pid, sig)
    code = bg.wait(timeout=bg.elapsed() + 60)
    stop_s = time.monotonic() - t_signal
    out, _ = bg.output()
    status = _status(run_dir)
    assert status["status"] == "preempted" and status["exit_code"] == 75, bg.explain()
    assert f"stopped by {sig.name} after optimizer step" in out and stop_s < 30, bg.explain()
    checkpointing.verify_local(str(run_dir / "checkpoints"), status["checkpoint"])
    _report(f"{sig.name} to {launcher}", launcher_exit=code, signal_to_all_gone_s=stop_s)


def test_stop_signal_to_every_process_with_data_workers(tmp_path):
    """As SLURM signals a job step: SIGUSR1 to every rank and every process under it, the
    forkserver (-j 1, --worker-start-method's default) and the DataLoader workers it forked. Only
    the ranks act on it: no worker dies, and the run stops after an agreed step with a checkpoint."""
    cfg = tu.write_config(str(tmp_path / "ds.json"), base="zero0_ldb.json")
    run_dir = tmp_path / "run"
    bg = tu.start_deepspeed(_args(cfg, tmp_path, "--epochs", "100", "--ckpt-every", "0", "--log-masks", "-j", "1",
                                  "--experiment", "run"), str(tmp_path / "log"))
    tu.wait_until(lambda: (m := tu.last_mask_line(str(run_dir))) and m["step"] >= 2 and m, 300, "step 2")
    launchers = {bg.proc.pid, bg.launcher()}
    targets = [p for p in bg.processes() if p.pid not in launchers]
    lines = [" ".join(p.info["cmdline"] or []) for p in targets]
    assert sum("forkserver" in ln for ln in lines) >= 2, lines  # a server per rank (and its workers)
    t_signal = time.monotonic()
    for p in targets:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p.pid, signal.SIGUSR1)
    code = bg.wait(timeout=bg.elapsed() + 60)
    stop_s = time.monotonic() - t_signal
    out, err = bg.output()
    status = _status(run_dir)
    assert status["status"] == "preempted" and status["exit_code"] == 75, bg.explain()
    assert "stopped by SIGUSR1 after optimizer step" in out and stop_s < 30, bg.explain()
    assert "DataLoader worker" not in err, bg.explain()
    checkpointing.verify_local(str(run_dir / "checkpoints"), status["checkpoint"])
    _report("SIGUSR1 to every process (-j 1)", launcher_exit=code, processes_signalled=len(targets),
            signal_to_all_gone_s=stop_s)


def test_sigstop_rank_is_named_within_the_timeout(tmp_path):
    """A rank that stops answering (SIGSTOP: its sockets stay open) is named, and the job exits."""
    cfg = tu.write_config(str(tmp_path / "ds.json"), base="zero0_ldb.json")
    timeout = 10
    command = _args(cfg, tmp_path, "--epochs", "3", "--max-steps-per-epoch", "40", "--log-masks",
                    "--ckpt-every-steps", "3", "--dist-timeout", str(timeout), "--experiment", "hung")
    run_dir = tmp_path / "hung"
    bg = tu.start_deepspeed(command, str(tmp_path / "log"))
    tu.wait_until(lambda: (m := tu.last_mask_line(str(run_dir))) and m["step"] >= 4 and m, 300, "step 4")
    victim = bg.ranks()[1]
    t_stop = time.monotonic()
    os.kill(victim, signal.SIGSTOP)
    code = bg.wait(timeout=bg.elapsed() + timeout + 60)  # kills everything if it does not end
    total_s = time.monotonic() - t_stop
    out, err = bg.output()
    assert code == 4, bg.explain()
    line = next((ln for ln in err.splitlines() if "rank 0: error: no progress for" in ln), None)
    assert line is not None, bg.explain()
    assert "rank(s) that did not answer: 1" in line and "epoch 0, micro step" in line, line
    status = _status(run_dir)
    assert status["status"] == "failed" and status["exit_code"] == 4 and "did not answer: 1" in status["message"]
    # The watchdog reported within the timeout; the launcher then waits 30 s for the stopped rank
    # to obey SIGTERM before it kills it.
    assert total_s < timeout + 30 + 15, total_s
    silent_s = float(line.split("no progress for ")[1].split()[0])
    _report("SIGSTOP", exit=code, dist_timeout_s=timeout, reported_after_s=silent_s, stop_to_all_gone_s=total_s)
    tag = checkpointing.read_latest(str(run_dir / "checkpoints"))
    checkpointing.verify_local(str(run_dir / "checkpoints"), tag)  # what was kept is intact


def test_sigkill_rank_then_requeue_resumes_from_the_last_complete_checkpoint(tmp_path):
    cfg = tu.write_config(str(tmp_path / "ds.json"), base="zero1_ldb.json")
    command = _args(cfg, tmp_path, "--epochs", "2", "--max-steps-per-epoch", "40", "--log-masks",
                    "--ckpt-every-steps", "4", "--resume", "auto", "--experiment", "killed")
    run_dir = tmp_path / "killed"
    bg = tu.start_deepspeed(command, str(tmp_path / "log"))
    tu.wait_until(lambda: (m := tu.last_mask_line(str(run_dir))) and m["step"] >= 6 and m, 300, "step 6")
    t_kill = time.monotonic()
    os.kill(bg.ranks()[1], signal.SIGKILL)
    code = bg.wait(timeout=bg.elapsed() + 60)
    assert code != 0 and time.monotonic() - t_kill < 30, bg.explain()
    reached = tu.last_mask_line(str(run_dir))["step"]
    tag = checkpointing.read_latest(str(run_dir / "checkpoints"))
    manifest = checkpointing.verify_local(str(run_dir / "checkpoints"), tag)
    lost = reached - manifest["meta"]["step_in_epoch"]
    assert tag.startswith("step") and 0 <= lost <= 4 + 1, (tag, reached)  # at most --ckpt-every-steps (+1 in flight)
    _report("SIGKILL", exit=code, kill_to_all_gone_s=time.monotonic() - t_kill, checkpoint=tag,
            micro_steps_lost=lost)
    again = tu.run_deepspeed(command, timeout=400)
    assert again.returncode == 0, tu.explain(again)
    assert f"resumed from {run_dir / 'checkpoints' / tag}" in again.stdout, tu.explain(again)
    assert json.loads((run_dir / "results.json").read_text())["epochs_run"] == [0, 1]


def test_truncated_checkpoint_fallback_and_explicit_error(tmp_path):
    cfg = tu.write_config(str(tmp_path / "ds.json"), base="zero0_ldb.json")
    base = _args(cfg, tmp_path, "--max-steps-per-epoch", "3", "--experiment", "trunc")
    first = tu.run_deepspeed(base + ["--epochs", "2"], timeout=400)
    assert first.returncode == 0, tu.explain(first)
    ckpts = tmp_path / "trunc" / "checkpoints"
    bad = ckpts / "epoch1" / "mp_rank_00_model_states.pt"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])

    t0 = time.monotonic()
    explicit = tu.run_deepspeed(base + ["--epochs", "3", "--resume", "epoch1"], timeout=200)
    assert explicit.returncode == 2 and time.monotonic() - t0 < 120, tu.explain(explicit)
    for rank in (0, 1):
        lines = [ln for ln in explicit.stderr.splitlines() if ln.startswith(f"[ldb-train] rank {rank}: error:")]
        assert len(lines) == 1 and f"{bad} is truncated" in lines[0], tu.explain(explicit)
    assert "Traceback" not in explicit.stderr and "PytorchStreamReader" not in explicit.stderr
    _report("truncated checkpoint, --resume epoch1", exit=explicit.returncode, start_to_exit_s=time.monotonic() - t0)

    auto = tu.run_deepspeed(base + ["--epochs", "3", "--resume", "auto"], timeout=400)
    assert auto.returncode == 0, tu.explain(auto)
    assert f"skipping checkpoint epoch1: {bad} is truncated" in auto.stdout, tu.explain(auto)
    assert f"resumed from {ckpts / 'epoch0'}" in auto.stdout
    assert json.loads((tmp_path / "trunc" / "results.json").read_text())["epochs_run"] == [0, 1, 2]
    _report("truncated checkpoint, --resume auto", exit=auto.returncode, fell_back_to="epoch0",
            epochs_retrained=1)
    for tag in ("epoch0", "epoch1", "epoch2"):  # epoch1 was written again, whole
        checkpointing.verify_local(str(ckpts), tag)


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_absurd_learning_rate_stops_with_the_step_named(tmp_path, policy):
    cfg = tu.write_config(str(tmp_path / "ds.json"), base="zero0_ldb.json")
    t0 = time.monotonic()
    proc = tu.run_deepspeed(_args(cfg, tmp_path, "--epochs", "2", "--max-steps-per-epoch", "20", "--lr", "1e30",
                                  "--ckpt-every-steps", "1", "--on-nonfinite", policy,
                                  "--max-consecutive-skips", "3", "--experiment", policy), timeout=300)
    assert proc.returncode == 3, tu.explain(proc)
    run_dir = tmp_path / policy
    status = _status(run_dir)
    assert status["status"] == "failed" and status["exit_code"] == 3
    message = next(ln for ln in proc.stderr.splitlines() if "error:" in ln)
    if policy == "stop":
        assert "non-finite gradient norm at epoch 0 (FULL), micro step" in message, message
        assert "dropped units: none" in message and "nothing was saved after checkpoint step" in message
    else:
        assert "3 optimizer steps in a row were skipped" in message, message
        scalars = tu.read_scalars(str(run_dir))
        assert max(v for _, v in scalars["Reliability/nonfinite_steps"]) >= 1
    # Nothing was saved from the first bad step on: the newest checkpoint is the last good step.
    tags = checkpointing.list_tags(str(run_dir / "checkpoints"))
    steps = sorted(int(t[len("step"):]) for t in tags if t.startswith("step"))
    bad_step = int(message.split("optimizer step ")[1].split()[0].strip(",;")) if policy == "stop" else None
    if bad_step is not None:
        assert steps and max(steps) == bad_step - 1, (steps, bad_step)
    assert time.monotonic() - t0 < 200
    _report(f"NaN ({policy})", exit=proc.returncode, start_to_exit_s=time.monotonic() - t0,
            newest_checkpoint=max(steps) if steps else None, bad_step=bad_step)


def test_unreadable_image_named_or_skipped(tmp_path):
    tu.write_image_folder(str(tmp_path / "data"), classes=("a", "b"), per_class=8, size=16)
    bad = tmp_path / "data" / "train" / "b" / "2.png"
    bad.write_bytes(bad.read_bytes()[:50])
    # 8 images per rank in 2 batches: a batch that loses its bad image still has 3 (BatchNorm needs 2).
    cfg = tu.write_config(str(tmp_path / "ds.json"), base="zero0_ldb.json", train_micro_batch_size_per_gpu=4)
    base = _args(cfg, tmp_path, "--dataset", "imagefolder", "--data-dir", str(tmp_path / "data"),
                 "--img-size", "16", "--epochs", "1", "--ckpt-every", "0")
    failing = tu.run_deepspeed(base + ["--experiment", "strict"], timeout=300)
    # The ranks agree on every batch before its step (workloads.batches.agreed_batches): the rank that read
    # the file names it, the other names the rank and the file, and both exit 2 before the step.
    assert failing.returncode == 2, tu.explain(failing)
    assert f"unreadable image {bad}" in failing.stderr and "--skip-bad-images" in failing.stderr
    assert "could not load its batch: unreadable image" in failing.stderr, tu.explain(failing)
    assert "a collective failed" not in failing.stderr, tu.explain(failing)
    assert _status(tmp_path / "strict")["exit_code"] == 2
    skipping = tu.run_deepspeed(base + ["--experiment", "skip", "--skip-bad-images", "-j", "1"], timeout=300)
    assert skipping.returncode == 0, tu.explain(skipping)
    results = json.loads((tmp_path / "skip" / "results.json").read_text())
    assert results["counters"]["bad_images"] == 1
    assert f"skipping unreadable image {bad}" in skipping.stdout
    # The same at evaluation (after the epoch trained): rank 1's shard holds the file; both exit 2.
    shutil.copy(tmp_path / "data" / "train" / "a" / "2.png", bad)  # the training set is whole again
    bad_val = tmp_path / "data" / "val" / "a" / "3.png"
    bad_val.write_bytes(bad_val.read_bytes()[:50])
    evaluating = tu.run_deepspeed(base + ["--experiment", "strict_eval"], timeout=300)
    assert evaluating.returncode == 2, tu.explain(evaluating)
    assert f"unreadable image {bad_val}" in evaluating.stderr, tu.explain(evaluating)
    assert "rank 1 could not load its batch" in evaluating.stderr, tu.explain(evaluating)
    assert "epoch 0 [" not in evaluating.stdout  # the epoch's summary comes after its evaluation
    assert _status(tmp_path / "strict_eval")["exit_code"] == 2
    # --eval of the completed run fails on the same file: exit 2, and the run's record stays as it
    # was (status.json said failed, exit 2, before 2026-12-05: a finished run taken for a broken one).
    skip_dir = tmp_path / "skip"
    record = {p.name: p.read_bytes() for p in skip_dir.iterdir() if p.is_file() and p.name != ".ldb_ds_run"}
    assert _status(skip_dir)["status"] == "completed"
    evaluated = tu.run_deepspeed(base + ["--experiment", "skip", "--resume", "auto", "--eval"], timeout=300)
    assert evaluated.returncode == 2 and f"unreadable image {bad_val}" in evaluated.stderr, tu.explain(evaluated)
    assert {p.name: p.read_bytes() for p in skip_dir.iterdir() if p.is_file() and p.name != ".ldb_ds_run"} == record


def test_healthy_run_with_every_check_on(tmp_path):
    """No fault: the replica check, mid-epoch checkpoints with --checkpoint-hist and the DROP-batch
    memory check all run, and the run ends normally with what each promises."""
    cfg = tu.write_config(str(tmp_path / "ds.json"), base="zero0_ldb.json",  # batch_kappa 2
                          ldb={"sampling_rate": 1})  # epoch 1 is a DROP epoch
    proc = tu.run_deepspeed(_args(cfg, tmp_path, "--epochs", "2", "--max-steps-per-epoch", "4", "--verify-every", "1",
                                  "--ckpt-every-steps", "2", "--checkpoint-hist", "1", "--experiment", "ok"),
                            timeout=300)
    assert proc.returncode == 0, tu.explain(proc)
    assert "DROP-batch memory check: a micro batch of 64 per rank fits" in proc.stdout, tu.explain(proc)
    run_dir = tmp_path / "ok"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["counters"]["replica_checks"] == results["optimizer_steps"] > 0, results["counters"]
    assert len(results["weights_sha256"]) == 64
    ckpts = str(run_dir / "checkpoints")
    tags = checkpointing.list_tags(ckpts)
    best = results["best_checkpoint"]["tag"]
    latest = checkpointing.read_latest(ckpts)
    assert set(tags) == {best, latest}, (tags, best, latest)  # the last one plus the best
    for tag in tags:
        checkpointing.verify_local(ckpts, tag)
