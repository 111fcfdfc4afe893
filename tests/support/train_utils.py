"""Helpers for the training-script tests (test_train*.py, test_data*.py).

Real launchers, real processes, real files: the tests start ``launch/train.py`` through the
``deepspeed`` launcher, ``torchrun`` or ``mpirun`` in a subprocess with CPU settings, write
datasets in the formats torchvision reads, and read TensorBoard's event files back with
TensorBoard's own reader.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import pickle
import shutil
import subprocess
import sys
from typing import Sequence

import numpy as np

from ldb_ds.process import free_port

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = os.path.join(REPO, "launch", "train.py")
BIN = os.path.dirname(sys.executable)


def cpu_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               TORCH_EXTENSIONS_DIR=env.get("TORCH_EXTENSIONS_DIR",
                                            os.path.join(REPO, ".torch_extensions")),
               PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""),
               PYTHONUNBUFFERED="1",
               # A run that hangs is ended by run() with SIGABRT: every Python process of the tree
               # then prints all its threads' stacks, so a rare hang explains itself.
               PYTHONFAULTHANDLER="1")
    env.update(extra)
    return env


def tool(name: str) -> str:
    """The console script ``name`` of this virtualenv (deepspeed, torchrun), else from PATH."""
    local = os.path.join(BIN, name)
    return local if os.path.exists(local) else (shutil.which(name) or name)


STACK_LINES = 2000
"""How much of a hung run's stderr a failure quotes: every thread of a few ranks, launcher and workers."""


class RunHung(AssertionError):
    """A run that outlived its timeout; the message holds the stacks its processes printed."""


def run(cmd: Sequence[str], timeout: float = 300, env: dict | None = None,
        cwd: str = REPO) -> subprocess.CompletedProcess:
    """``subprocess.run`` with the output captured, in a session of its own.

    On a timeout the whole process tree (launcher, ranks, DataLoader workers) gets SIGABRT:
    with ``PYTHONFAULTHANDLER=1`` (:func:`cpu_env`) each Python process prints every thread's
    stack, and the test fails with :class:`RunHung` quoting them, instead of a bare timeout that
    leaves no clue where a rare hang was.
    """
    import signal
    import threading

    proc = subprocess.Popen(list(cmd), cwd=cwd, env=env or cpu_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        tree = _process_tree(proc.pid)
        # Read on while the processes print their stacks: a full pipe would block a writer,
        # and a blocked writer does not die.
        drained: list[tuple[str, str]] = []
        reader = threading.Thread(target=lambda: drained.append(proc.communicate()), daemon=True)
        reader.start()
        listing = _abort(tree)
        reader.join(20)
        if reader.is_alive():
            for pid in tree:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            reader.join(20)
        out, err = drained[0] if drained else ("", "")
        stacks = [ln for ln in (err or "").splitlines() if ln.strip()][-STACK_LINES:]
        raise RunHung(f"no exit after {timeout:.0f} s; every process was sent SIGABRT:\n{listing}\n"
                      f"command: {' '.join(cmd)}\nstdout (tail):\n" + "\n".join((out or "").splitlines()[-40:])
                      + "\nstderr (tail, with the stacks):\n" + "\n".join(stacks)) from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _abort(procs: dict[int, str]) -> str:
    """SIGABRT to each of ``procs`` (``{pid: command line}``): with ``PYTHONFAULTHANDLER=1`` each
    Python process prints every thread's stack as it dies. Returns the processes, one line each.

    One process at a time, each given up to 3 s to die before the next is signalled: processes
    of one run share a stderr, and faulthandler writes in small pieces, so stacks printed at once
    interleave byte by byte into text no one can read (seen in CI).
    """
    import signal
    import time

    import psutil

    for pid in procs:
        try:
            os.kill(pid, signal.SIGABRT)
            process = psutil.Process(pid)
        except (ProcessLookupError, psutil.NoSuchProcess):
            continue
        # Dead means gone or a zombie: its parent may never reap it, but its stacks are written.
        end = time.monotonic() + 3
        with contextlib.suppress(psutil.NoSuchProcess):
            while process.status() != psutil.STATUS_ZOMBIE and time.monotonic() < end:
                time.sleep(0.02)
    return "\n".join(f"  pid {pid}: {line}" for pid, line in procs.items())


def _process_tree(pid: int) -> dict[int, str]:
    """``{pid: command line}`` of ``pid`` and its descendants, deepest first."""
    import psutil

    try:
        procs = list(reversed(psutil.Process(pid).children(recursive=True))) + [psutil.Process(pid)]
    except psutil.NoSuchProcess:
        return {}
    tree = {}
    for p in procs:
        with contextlib.suppress(psutil.Error):
            tree[p.pid] = " ".join(p.cmdline())[:160]
    return tree


def run_deepspeed(args: Sequence[str], nproc: int = 2, timeout: float = 300
                  ) -> subprocess.CompletedProcess:
    cmd = [tool("deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()),
           TRAIN, *args]
    return run(cmd, timeout=timeout)


def run_torchrun(args: Sequence[str], nproc: int = 2, timeout: float = 300
                 ) -> subprocess.CompletedProcess:
    cmd = [tool("torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
           TRAIN, *args]
    return run(cmd, timeout=timeout)


def run_mpirun(args: Sequence[str], nproc: int = 2, timeout: float = 300
               ) -> subprocess.CompletedProcess:
    port = str(free_port())
    env = cpu_env(MASTER_PORT=port)
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(nproc),
           "-x", "DS_ACCELERATOR", "-x", "OMP_NUM_THREADS", "-x", "TORCH_EXTENSIONS_DIR",
           "-x", "PYTHONPATH", "-x", "MASTER_PORT", "-x", "PATH",
           sys.executable, TRAIN, *args]
    return run(cmd, timeout=timeout, env=env)


def explain(proc: subprocess.CompletedProcess, lines: int = 60) -> str:
    out = (proc.stdout or "").splitlines()[-lines:] + (proc.stderr or "").splitlines()[-lines:]
    return f"exit code {proc.returncode}\n" + "\n".join(out)


def write_config(path: str, base: str = "zero0_ldb.json", ldb: dict | None = None,
                 train: dict | None = None, **top: object) -> str:
    """A DeepSpeed JSON derived from ``ds_configs/<base>`` with sections overridden."""
    with open(os.path.join(REPO, "ds_configs", base)) as f:
        cfg = json.load(f)
    if ldb is not None:
        cfg.setdefault("layer_drop_back", {}).update(ldb)
    if train is not None:
        cfg.setdefault("train", {}).update(train)
    cfg.update(top)
    with open(path, "w") as f:
        json.dump(cfg, f, indent=2)
    return path


def read_scalars(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    """All scalars of the event file(s) in ``run_dir``, read with TensorBoard's own reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(glob.glob(os.path.join(run_dir, "events.out.tfevents.*")))
    assert files, f"no TensorBoard event file in {run_dir}: {os.listdir(run_dir)}"
    out: dict[str, list[tuple[int, float]]] = {}
    for path in files:
        acc = EventAccumulator(path, size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def write_cifar_folder(root: str, name: str = "cifar10", n_train: int = 50, n_test: int = 20,
                       num_classes: int | None = None, seed: int = 0) -> str:
    """Write a small dataset in torchvision's CIFAR python format under ``root``.

    Same file names and pickle layout as the official release (``data``: uint8 (N, 3072) in
    CHW order; ``labels`` for CIFAR-10, ``fine_labels`` for CIFAR-100; a meta pickle with the
    class names), so torchvision's own loader reads it; only the official MD5 sums differ.
    """
    from torchvision.datasets import CIFAR10, CIFAR100

    base = CIFAR10 if name == "cifar10" else CIFAR100
    num_classes = num_classes or (10 if name == "cifar10" else 100)
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, base.base_folder)
    os.makedirs(folder, exist_ok=True)
    label_key = "labels" if name == "cifar10" else "fine_labels"

    def batch(n: int) -> dict:
        return {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                label_key: [int(v) for v in rng.integers(0, num_classes, n)],
                "batch_label": "synthetic test batch"}

    per = [n_train // len(base.train_list)] * len(base.train_list)
    per[-1] += n_train - sum(per)
    for (fname, _), n in zip(base.train_list, per):
        with open(os.path.join(folder, fname), "wb") as f:
            pickle.dump(batch(n), f)
    for fname, _ in base.test_list:
        with open(os.path.join(folder, fname), "wb") as f:
            pickle.dump(batch(n_test), f)
    with open(os.path.join(folder, base.meta["filename"]), "wb") as f:
        pickle.dump({base.meta["key"]: [f"class{i}" for i in range(num_classes)]}, f)
    return folder


def write_image_folder(root: str, classes: Sequence[str] = ("cat", "dog", "fox"),
                       per_class: int = 3, size: int = 40, splits=("train", "val")) -> str:
    """PNG files in the ImageNet layout ``root/<split>/<class>/<i>.png``."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in splits:
        for c in classes:
            d = os.path.join(root, split, c)
            os.makedirs(d, exist_ok=True)
            for i in range(per_class):
                arr = rng.integers(0, 256, (size, size + 7, 3), dtype=np.uint8)
                Image.fromarray(arr).save(os.path.join(d, f"{i}.png"))
    return root


# --------------------------------------------------------------------------- runs to inject faults into


class Background:
    """A launcher started in its own session (so the test can signal its whole process tree).

    stdout/stderr go to files (read them with :meth:`output`); :meth:`ranks` finds the rank
    processes by their ``--local_rank`` argument, :meth:`launcher` the per-node
    ``deepspeed.launcher.launch`` process.
    """

    def __init__(self, cmd: Sequence[str], log_dir: str, env: dict | None = None):
        import time

        os.makedirs(log_dir, exist_ok=True)
        self.out_path = os.path.join(log_dir, "stdout.txt")
        self.err_path = os.path.join(log_dir, "stderr.txt")
        self._out, self._err = open(self.out_path, "w"), open(self.err_path, "w")
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(list(cmd), cwd=REPO, env=env or cpu_env(), stdout=self._out,
                                     stderr=self._err, start_new_session=True, text=True)
        self.pgid = self.proc.pid
        self._seen: set[int] = {self.proc.pid}

    def elapsed(self) -> float:
        import time

        return time.monotonic() - self.t0

    def processes(self) -> list:
        """The live processes of the run: the session's, the launcher's descendants (torchrun puts
        its workers in sessions of their own) and any seen before (orphans keep counting)."""
        import psutil

        try:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                self._seen.add(child.pid)
        except psutil.NoSuchProcess:
            pass
        out = []
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                mine = p.info["pid"] in self._seen or os.getpgid(p.info["pid"]) == self.pgid
            except (ProcessLookupError, PermissionError):
                continue
            if mine and p.status() != psutil.STATUS_ZOMBIE:
                self._seen.add(p.info["pid"])
                out.append(p)
        return out

    def ranks(self) -> dict[int, int]:
        """``{local_rank: pid}`` of the training processes (not their DataLoader workers)."""
        found = {}
        for p in self.processes():
            cmd = p.info["cmdline"] or []
            if any(a.endswith("train.py") for a in cmd):
                for a in cmd:
                    if a.startswith("--local_rank="):
                        found[int(a.split("=", 1)[1])] = p.info["pid"]
        return found

    def launcher(self) -> int:
        """pid of the per-node launcher (``python -m deepspeed.launcher.launch``)."""
        for p in self.processes():
            if "deepspeed.launcher.launch" in " ".join(p.info["cmdline"] or []):
                return p.info["pid"]
        raise AssertionError("no deepspeed.launcher.launch process")

    def wait(self, timeout: float) -> int:
        """Wait until every process of the session is gone (``timeout`` counts from the start).

        Returns the top process's exit code; kills everything and fails after the timeout.
        """
        import time

        deadline = self.t0 + timeout
        try:
            code = self.proc.wait(timeout=max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            listing = self.abort()
            raise RunHung(f"the run did not end within {timeout:.0f} s; its processes, sent SIGABRT:\n"
                          f"{listing}\n{self.explain(stacks=True)}") from None
        while self.processes():
            if time.monotonic() > deadline:
                listing = self.abort()
                raise RunHung(f"processes of the run still alive after {timeout:.0f} s, sent SIGABRT:\n"
                              f"{listing}\n{self.explain(stacks=True)}")
            time.sleep(0.2)
        self._out.close()
        self._err.close()
        return code

    def abort(self) -> str:
        """SIGABRT to every process (each prints its threads' stacks: ``PYTHONFAULTHANDLER``), then
        SIGKILL to what is left; returns the processes it found, one line each."""
        import time

        listing = _abort({p.info["pid"]: " ".join(p.info["cmdline"] or [])[:160] for p in self.processes()})
        end = time.monotonic() + 10
        while self.processes() and time.monotonic() < end:
            time.sleep(0.2)
        self.kill()
        return listing

    def kill(self) -> None:
        import signal as _signal

        for p in self.processes():
            try:
                os.kill(p.info["pid"], _signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(self.pgid, _signal.SIGKILL)
        except ProcessLookupError:
            pass

    def output(self) -> tuple[str, str]:
        with open(self.out_path) as f, open(self.err_path) as g:
            return f.read(), g.read()

    def explain(self, stacks: bool = False) -> str:
        """The output's tail; with ``stacks``, enough of stderr to hold every process's stacks."""
        out, err = self.output()
        return "\n".join(out.splitlines()[-40:] + err.splitlines()[-(STACK_LINES if stacks else 40):])


def start_deepspeed(args: Sequence[str], log_dir: str, nproc: int = 2) -> Background:
    cmd = [tool("deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()), TRAIN, *args]
    return Background(cmd, log_dir)


def start_torchrun(args: Sequence[str], log_dir: str, nproc: int = 2, extra: Sequence[str] = ()) -> Background:
    cmd = [tool("torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(free_port()), *extra,
           TRAIN, *args]
    return Background(cmd, log_dir)


def start_mpirun(args: Sequence[str], log_dir: str, nproc: int = 2) -> Background:
    cmd = ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", str(nproc),
           "-x", "DS_ACCELERATOR", "-x", "OMP_NUM_THREADS", "-x", "TORCH_EXTENSIONS_DIR",
           "-x", "PYTHONPATH", "-x", "MASTER_PORT", "-x", "PATH", sys.executable, TRAIN, *args]
    return Background(cmd, log_dir, env=cpu_env(MASTER_PORT=str(free_port())))


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll ``predicate()`` until it returns something true; fail naming ``what`` after ``timeout``."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def last_mask_line(run_dir: str) -> dict | None:
    """The newest line of ``masks.jsonl`` (one per micro step, written by rank 0), if any."""
    path = os.path.join(run_dir, "masks.jsonl")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        lines = f.read().splitlines()
    return json.loads(lines[-1]) if lines else None
