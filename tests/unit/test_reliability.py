"""Reliability pieces that need one process: sampler position, LDB state, compatibility rules,
signals, the watchdog's exit, the run directory's status and mask files (docs/design.md, section 8)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from torch import nn
from torch.utils.data import DistributedSampler

from ldb_ds import LDBConfig, Mode
from ldb_ds.checkpoint_fit import check_compatible
from ldb_ds.checkpointing import CheckpointError, describe_run
from ldb_ds.controller import LDBController
from ldb_ds.functional import build_param_groups, build_units
from ldb_ds.sampler import ScalableBatchSampler
from ldb_ds.train import faults
from ldb_ds.train.rundir import RunDir

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("factor", [1, 3])
def test_sampler_start_batch_resumes_exactly_and_once(factor):
    base = DistributedSampler(range(103), num_replicas=2, rank=1, shuffle=True, seed=5)
    s = ScalableBatchSampler(base, 4, drop_last=False)
    s.factor = factor
    base.set_epoch(7)
    whole = list(s)
    s.start_batch = 3
    assert list(s) == whole[3:]  # the same epoch, from the fourth batch of the current size
    assert s.start_batch == 0 and list(s) == whole  # the skip applies to one iteration only
    assert len(s) == len(whole)


@pytest.mark.parametrize("drop_last", [False, True])
def test_sampler_yields_whole_accumulation_windows(drop_last):
    """With a window of 3 micro batches an epoch of 13 (or 14, the last one short) yields 12: the
    epoch ends at a window boundary; a resumed epoch skips inside it and stops at the same place."""
    base = DistributedSampler(range(110), num_replicas=2, rank=0, shuffle=True, seed=5)  # 55 samples
    s = ScalableBatchSampler(base, 4, drop_last=drop_last)
    everything = list(s)
    s.window = 3
    whole = list(s)
    assert len(everything) == (13 if drop_last else 14) and len(whole) == len(s) == 12
    assert whole == everything[:12]
    s.start_batch = 5
    assert list(s) == whole[5:]


def _controller(**ldb):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(6)])
    cfg = LDBConfig(**{"enabled": True, "keep_first": 1, "keep_last": 1, "drop_rate": 0.5, "sampling_rate": 1,
                       **ldb})
    units = build_units(model, cfg.granularity)
    groups, unit_of_group = build_param_groups(units, [{"params": list(model.parameters())}])
    opt = torch.optim.SGD(groups, lr=0.1)
    return LDBController(cfg, units, unit_of_group, opt.param_groups, [u.numel * 4 for u in units]), model


def test_mid_epoch_state_puts_the_epoch_mask_back():
    """resample=epoch: after set_epoch, loading a mid-epoch state applies the epoch's mask."""
    a, _ = _controller(resample="epoch")
    assert a.set_epoch(1) is Mode.DROP
    a.open_window()
    a.begin_step()
    a.end_step()
    saved, mask = a.state_dict(), list(a.dropped)
    assert any(mask)
    b, model = _controller(resample="epoch")
    b.set_epoch(1)  # what the resumed loop does first
    b.load_state_dict(saved)
    assert b.dropped == mask and b.epoch_mask == mask
    b.open_window()  # keeps the epoch's mask, draws nothing
    assert b.dropped == mask and b.rng.getstate() == a.rng.getstate()
    frozen = [not p.requires_grad for p in model.parameters()]
    assert any(frozen)


def _run(world=2, stage=2, optimizer="AdamW", **ldb):
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2))
    cfg = LDBConfig(enabled=True, **ldb).to_dict()
    return describe_run(model, world_size=world, zero_stage=stage, optimizer=optimizer, ldb=cfg)


def test_compatibility_rules():
    same = check_compatible({"run": _run()}, _run(), where="ckpt")
    assert same == {"universal": False, "weights_only": False, "notes": []}
    assert check_compatible({"run": _run(world=4)}, _run(), where="ckpt")["universal"]
    zero0 = check_compatible({"run": _run(world=4, stage=0, optimizer="SGD")}, _run(stage=0, optimizer="SGD"),
                             where="ckpt")
    assert not zero0["universal"] and "ZeRO-0 checkpoint loads as it is" in zero0["notes"][0]
    with pytest.raises(CheckpointError, match="optimizer SGD.*Adam-family.*Resume at world size 4"):
        check_compatible({"run": _run(world=4, optimizer="SGD")}, _run(optimizer="SGD"), where="ckpt")
    # An evaluation wants the weights only: a ZeRO-1/2 module file holds them whole at any world size.
    evaluated = check_compatible({"run": _run(world=4, optimizer="SGD")}, _run(optimizer="SGD"), where="ckpt",
                                 weights_only=True)
    assert evaluated["weights_only"] and not evaluated["universal"] and "weights" in evaluated["notes"][0]
    with pytest.raises(CheckpointError, match="optimizer SGD"):  # ZeRO-3 keeps its weights in the partitions
        check_compatible({"run": _run(world=4, stage=3, optimizer="SGD")}, _run(stage=3, optimizer="SGD"),
                         where="ckpt", weights_only=True)
    with pytest.raises(CheckpointError, match="ZeRO stage 1, this run uses stage 2"):
        check_compatible({"run": _run(stage=1)}, _run(), where="ckpt")
    other = describe_run(nn.Sequential(nn.Linear(3, 5), nn.Linear(5, 2)), world_size=2, zero_stage=2,
                         optimizer="AdamW", ldb=LDBConfig(enabled=True).to_dict())
    with pytest.raises(CheckpointError, match=r"another model.*first difference: 0.weight \(4, 3\) there, "
                                              r"0.weight \(5, 3\) here"):
        check_compatible({"run": _run()}, other, where="ckpt")
    with pytest.raises(CheckpointError, match="granularity: 'module' -> 'param'.*param groups"):
        check_compatible({"run": _run()}, _run(granularity="param"), where="ckpt")
    changed = check_compatible({"run": _run()}, _run(drop_rate=0.5), where="ckpt")
    assert "drop_rate: 0.3 -> 0.5" in changed["notes"][0]
    with pytest.raises(CheckpointError, match="middle of an epoch"):
        check_compatible({"run": _run()}, _run(drop_rate=0.5), where="ckpt", allow_ldb_change=False)


def test_stop_signal_records_the_first_real_signal():
    stop = faults.StopSignal(faults.parse_signals("SIGUSR1, usr2"))
    try:
        assert stop.received is None
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGUSR1)  # a second one does not replace it (nor kill us)
        time.sleep(0.05)
        assert stop.received == "SIGUSR2"
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
    assert faults.parse_signals("none") == ()
    with pytest.raises(ValueError, match="SIGKILL"):
        faults.parse_signals("SIGTERM,SIGKILL")


def test_watchdog_timing_reports_before_the_collective_timeout():
    for timeout in (5.0, 10.0, 60.0, 600.0, 1800.0):
        fire, barrier = faults.watchdog_timing(timeout)
        assert 0 < fire and fire + barrier < timeout and fire >= timeout / 2


def test_watchdog_ends_a_stalled_process_with_code_4():
    code = ("import time\nfrom ldb_ds.train import faults\nhb = faults.Heartbeat()\n"
            "hb.beat('backward (gradient reduction)', epoch=2, step=7)\n"
            "w = faults.Watchdog(hb, None, rank=0, world_size=1, timeout_s=5.0)\nw.start()\n"
            "time.sleep(30)\nprint('not stopped')\n")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, PYTHONPATH=ROOT))
    assert proc.returncode == 4 and time.monotonic() - t0 < 15, proc.stderr
    assert "rank 0: error: no progress for" in proc.stderr
    assert "epoch 2, micro step 7, in backward (gradient reduction)" in proc.stderr


def test_forkserver_workers_ignore_the_stop_signals_and_the_rank_keeps_its_handlers():
    """ldb-train's DataLoader workers (--worker-start-method forkserver): the forkserver starts
    with the stop signals ignored and keeps ignoring them, so a signal sent to the whole process
    tree (SLURM) neither kills it nor the workers it forks; the rank's own handlers are unchanged."""
    code = """
import os, signal, time
from torch.utils.data import DataLoader
from multiprocessing import forkserver
from ldb_ds.train import faults
from tests.support.loader_probe import WorkerFacts, ignored_signals

handler = lambda *a: None
signal.signal(signal.SIGTERM, handler)
ctx = faults.worker_context("forkserver", ["SIGTERM", "SIGUSR1"])
assert signal.getsignal(signal.SIGTERM) is handler and signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL
server = forkserver._forkserver._forkserver_pid
assert {signal.SIGTERM, signal.SIGUSR1} <= ignored_signals(server), ignored_signals(server)
loader = DataLoader(WorkerFacts(), batch_size=1, num_workers=1, multiprocessing_context=ctx,
                    worker_init_fn=faults.ignore_signals_in_worker(["SIGTERM", "SIGUSR1"]))
for pid, parent, ignoring in loader:
    assert int(parent) == server and bool(ignoring) and int(pid) != os.getpid(), (pid, parent, ignoring)
os.kill(server, signal.SIGUSR1)
os.kill(server, signal.SIGTERM)
time.sleep(0.5)
os.kill(server, 0)  # still there
print("ok", server)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=ROOT), cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr[-3000:]


def test_a_hung_test_run_fails_with_every_process_stack(tmp_path):
    """The harness's answer to a hang (tests/support/train_utils.py): a run, and its child, that
    outlive the timeout end with RunHung naming both and quoting each one's thread stacks."""
    from tests.support import train_utils as tu

    code = ("import subprocess, sys, threading, time\n"
            "def waiting_in_a_thread():\n    time.sleep(100)\n"
            "threading.Thread(target=waiting_in_a_thread, daemon=True).start()\n"
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(100)'])\n"
            "time.sleep(100)\n")
    for start in ("run", "background"):
        t0 = time.monotonic()
        with pytest.raises(tu.RunHung) as hung:
            if start == "run":
                tu.run([sys.executable, "-c", code], timeout=3)
            else:
                tu.Background([sys.executable, "-c", code], str(tmp_path / "bg")).wait(3)
        text = str(hung.value)
        assert time.monotonic() - t0 < 30, start
        assert text.count("  pid ") == 2, text  # the run and its child, each named
        assert text.count("Fatal Python error: Aborted") == 2, text  # each printed its stacks
        assert "in waiting_in_a_thread" in text, text  # the other thread's stack too
        # Each process's stacks whole, one after the other: signalled at once, the two
        # shared stderr and interleaved byte by byte (CI, 2026-12-05).
        child = re.search(r"Fatal Python error: Aborted\n+Current thread 0x[0-9a-f]+ \(most recent call first\):\n"
                          r'  File "<string>", line 1 in <module>(\n|$)', text)
        parent = re.search(r"Fatal Python error: Aborted\n+Thread 0x[0-9a-f]+ \(most recent call first\):\n"
                           r'  File "<string>", line 3 in waiting_in_a_thread(\n|$)', text)
        assert child and parent, text


@pytest.mark.parametrize("tag", ["", ".", "..", "../run", "a/b", "/home", "x\0y"])
def test_a_tag_that_is_not_one_folder_name_is_refused(tag):
    from ldb_ds.checkpointing import check_tag

    with pytest.raises(ValueError, match="not one folder name"):
        check_tag(tag)
    assert check_tag(3) == "3" and check_tag("epoch4") == "epoch4"


def test_only_a_checkpoints_folder_may_be_replaced(tmp_path):
    """checkpointing.replace_refused: what a save of the same tag may delete, on real folders."""
    from ldb_ds.checkpointing import MANIFEST, replace_refused

    def tree(name, files):
        for rel in files:
            path = tmp_path / name / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("x")
        return str(tmp_path / name)

    assert replace_refused(str(tmp_path / "absent")) == ""
    # What an unfinished save or ds_to_universal conversion leaves: replaceable.
    assert replace_refused(tree("unfinished", ["mp_rank_00_model_states.pt", "ldb_state.pt.tmp123",
                                               f"{MANIFEST}.tmp9", "zero/fc.weight/fp32.pt",
                                               "tmp/fc.weight/0/exp_avg.01"])) == ""
    # A complete checkpoint: its manifest names it.
    done = tree("done", ["mp_rank_00_model_states.pt", "notes.txt"])
    (tmp_path / "done" / MANIFEST).write_text(json.dumps({"format": 1, "files": {}, "tag": "done"}))
    assert replace_refused(done) == ""
    # The user's files, at any depth, a link, a plain file: refused, naming the entry.
    mine = tree("mine", ["mp_rank_00_model_states.pt", "data/labels.csv"])
    assert "data/labels.csv, which no checkpoint writes" in replace_refused(mine)
    for name in ("weights.pt", "report.2024", "zero/notes.txt", "other/fp32.pt"):  # not DeepSpeed's names
        assert "which no checkpoint writes" in replace_refused(tree(f"user_{name.replace('/', '_')}",
                                                                    ["ldb_state.pt", name])), name
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "link")
    assert "is a symbolic link" in replace_refused(str(tmp_path / "link"))
    os.symlink(tmp_path / "elsewhere", tmp_path / "unfinished" / "zero" / "inner")
    assert "inner, which no checkpoint writes" in replace_refused(str(tmp_path / "unfinished"))
    (tmp_path / "file").write_text("x")
    assert "is not a checkpoint folder" in replace_refused(str(tmp_path / "file"))
    # A manifest naming another tag (a folder copied under a new name) does not make it ours.
    (tmp_path / "mine" / MANIFEST).write_text(json.dumps({"format": 1, "files": {}, "tag": "other"}))
    assert "labels.csv" in replace_refused(mine)


def test_status_file_and_mask_trim(tmp_path):
    run = RunDir(str(tmp_path), "x")
    run.write_status("preempted", 75, "stopped", checkpoint="step4")
    status = json.loads(open(run.status_json).read())
    assert status["status"] == "preempted" and status["exit_code"] == 75 and status["checkpoint"] == "step4"
    with open(run.masks_jsonl, "w") as f:
        for e, s in [(0, 1), (0, 2), (1, 1), (1, 2), (1, 3)]:
            f.write(json.dumps({"epoch": e, "step": s, "mode": "FULL", "dropped": []}) + "\n")
    run.trim_masks(1, 2)
    assert [json.loads(line)["step"] for line in open(run.masks_jsonl)] == [1, 2, 1, 2]
    run.trim_masks(1, 0)
    assert len(open(run.masks_jsonl).read().splitlines()) == 2


def test_a_run_folder_in_use_is_never_deleted_or_taken(tmp_path):
    """The run directory's lock (a real flock on the marker): a second start of the same experiment
    is refused while the first holds it, whatever it asks for, and nothing is deleted; a child
    forked by the holder (a DataLoader worker) does not keep it; after the holder lets go, the
    folder is free again, and a marker that is a symbolic link is never written through."""
    first = RunDir(str(tmp_path), "x")
    assert first._prepare_on_main(overwrite=False, continuing=False) == ""
    (tmp_path / "x" / "results.json").write_text("first run")
    marker = tmp_path / "x" / ".ldb_ds_run"
    assert f"in use by pid {os.getpid()}" in marker.read_text()
    for overwrite, continuing in ((True, False), (False, True), (False, False)):
        why = RunDir(str(tmp_path), "x")._prepare_on_main(overwrite=overwrite, continuing=continuing)
        assert f"is in use by another ldb-train start (pid {os.getpid()} on " in why, why
        assert "nothing was deleted or written" in why
        assert (tmp_path / "x" / "results.json").read_text() == "first run"
    ready_r, ready_w = os.pipe()
    child = os.fork()
    if child == 0:  # the worker: alive while the holder lets go; it runs its code after the fork hooks
        os.write(ready_w, b"1")
        time.sleep(5)
        os._exit(0)
    try:
        assert os.read(ready_r, 1) == b"1"
        first.release()
        assert marker.read_text().count("\n") == 1  # the holder line goes with the lock
        second = RunDir(str(tmp_path), "x")
        assert second._prepare_on_main(overwrite=True, continuing=False) == ""  # the child holds nothing
        assert not (tmp_path / "x" / "results.json").exists()  # replaced, as --overwrite asks
        second.release()
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        os.close(ready_r)
        os.close(ready_w)
    (tmp_path / "y").mkdir()
    (tmp_path / "elsewhere").write_text("a person's file")
    os.symlink(tmp_path / "elsewhere", tmp_path / "y" / ".ldb_ds_run")
    why = RunDir(str(tmp_path), "y")._prepare_on_main(overwrite=False, continuing=True)
    assert "symbolic link as its .ldb_ds_run" in why and (tmp_path / "elsewhere").read_text() == "a person's file"
