"""Faults the training application survives or reports: preemption, hung ranks, lost peers.

Exit codes (every rank exits with the same one; ``docs/reliability.md`` has the table):

=====  =====================================================================================
0      finished
1      an unexpected error (a traceback)
2      bad options, data or checkpoint, found before training (one line naming what is wrong)
3      non-finite loss or gradient with ``--on-nonfinite stop``, or too many skipped steps
4      a rank stopped answering (the watchdog names it) or a peer was lost mid-collective
5      ``--verify-every`` found replicas that differ (the message names the ranks)
6      the DROP epochs' micro batch does not fit in memory (the pre-check before epoch 0)
75     preempted (SIGTERM/SIGUSR1): a checkpoint was saved; start the same command again
=====  =====================================================================================

The ``deepspeed`` launcher replaces the ranks' exit codes with its own (1 when it was
signalled), so the run also writes ``status.json`` in its run directory (see
:meth:`ldb_ds.train.rundir.RunDir.write_status`); requeue scripts read that.

**Preemption.** :class:`StopSignal` turns the configured signals into a flag; the ranks agree on
it through :class:`StopAgreement`, an all-reduce of one integer over a *gloo* side group every N
optimizer steps (no device synchronisation on a GPU: the flag lives in host memory), so they all
stop after the same optimizer step even when the signal reached only some of them (the
``deepspeed`` launcher signals rank after rank, waiting up to 30 s for each).

**Hung ranks.** The loop beats a :class:`Heartbeat` (epoch, micro step, phase). The
:class:`Watchdog` thread fires when a rank has made no progress for ``fire_after_s`` (less than
the collective timeout, so it runs before NCCL's own watchdog would abort the process), asks
gloo's ``monitored_barrier`` on a second side group which ranks still answer, prints one line
naming the step, the phase (the collective the rank waits in) and the ranks that did not answer,
and ends the process with exit code 4. A rank that answers but is stuck elsewhere (a hung read)
is named by comparing the ranks' heartbeats.

**Bad data.** A batch that fails to load on one rank (an unreadable image) must stop every rank
before any of them enters the step's first collective, or the others would fail there (exit 4)
and the error would be reported as a lost peer. :func:`agreed_batches` (it lives in
:mod:`ldb_ds.workloads.batches`) fetches each batch one step ahead and all-reduces a per-rank
status over a gloo side group while the current step runs, so every rank learns of the failure,
with the failing rank's message, and raises it before the batch's step: every rank exits 2.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

# The batch agreement (the "Bad data" paragraph above) lives in ldb_ds.workloads.batches, with the
# shared evaluation that reads through it too; main.py catches PeerBatchError through this module,
# and both names stay importable from here.
from ldb_ds.workloads.batches import PeerBatchError, agreed_batches

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NONFINITE, EXIT_HUNG, EXIT_DIVERGED, EXIT_MEMORY = 0, 1, 2, 3, 4, 5, 6
EXIT_PREEMPTED = 75
"""EX_TEMPFAIL in sysexits.h: "temporary failure, the user is invited to retry"."""

SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT", "SIGHUP")


def parse_signals(text: str) -> tuple[str, ...]:
    """``"SIGTERM,SIGUSR1"`` -> names; ``"none"`` -> (). Raises ``ValueError`` naming a bad one."""
    if text.strip().lower() in ("", "none"):
        return ()
    names = tuple(s.strip().upper() for s in text.split(",") if s.strip())
    names = tuple(n if n.startswith("SIG") else "SIG" + n for n in names)
    bad = [n for n in names if n not in SIGNALS]
    if bad:
        raise ValueError(f"unknown or unsupported signal(s) {', '.join(bad)}: expected a comma-separated list of "
                         f"{', '.join(SIGNALS)}, or none")
    return names


def print_rank(rank: int, msg: str, *, error: bool = True) -> None:
    """One line from this rank (errors every rank must show, e.g. a bad explicit checkpoint)."""
    from .console import PREFIX

    stream = sys.stderr if error else sys.stdout
    # One write of the whole line: ranks share the launcher's pipe, and a write of less than
    # PIPE_BUF bytes is not interleaved with another process's.
    stream.write(f"{PREFIX} rank {rank}: {'error: ' if error else ''}{msg}\n")
    stream.flush()


# --------------------------------------------------------------------------- side groups


def gloo_group(timeout_s: float) -> Any:
    """A new gloo process group over all ranks (a collective: every rank calls it, in the same order).

    Host-side agreement (stop flags, hashes, the watchdog's barrier) goes through gloo so that it
    never waits for the device, and through groups of its own so that two threads never issue
    collectives on one group.
    """
    import torch.distributed as dist

    return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))


# --------------------------------------------------------------------------- preemption


class StopSignal:
    """Catch ``signals``; remember the first one. Repeated signals are ignored (the save runs)."""

    def __init__(self, signals: Sequence[str]):
        self.received: str | None = None
        self._previous: dict[int, Any] = {}
        for name in signals:
            num = getattr(signal, name)
            self._previous[num] = signal.signal(num, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        if self.received is None:
            self.received = signal.Signals(signum).name

    def restore(self) -> None:
        for num, handler in self._previous.items():
            signal.signal(num, handler)
        self._previous.clear()


def ignore_signals_in_worker(signals: Sequence[str]) -> Callable[[int], None]:
    """A DataLoader ``worker_init_fn``: workers ignore the stop signals.

    SLURM and the ``deepspeed`` launcher signal the whole process tree. A worker killed by
    SIGTERM makes the rank's next batch raise ("DataLoader worker ... is killed by signal"),
    before it could finish its step and save; ignoring the signal there lets the rank decide.
    The workers still end with the rank (the DataLoader shuts them down, or they see it gone).
    A ``functools.partial``, not a closure: forkserver and spawn workers receive it pickled.
    """
    return functools.partial(_ignore_signals, tuple(getattr(signal, n) for n in signals))


def _ignore_signals(nums: tuple[int, ...], worker_id: int) -> None:
    for num in nums:
        signal.signal(num, signal.SIG_IGN)


#: Imported once by the forkserver, so that each worker it forks starts with them loaded.
WORKER_PRELOAD = ("torch", "torchvision", "PIL.Image", "ldb_ds.train.data", "ldb_ds.workloads.data")


def worker_context(method: str, signals: Sequence[str]) -> Any:
    """The multiprocessing context for the rank's DataLoader workers (``--worker-start-method``).

    Why not fork, torch's default before Python 3.14: a rank has threads (gloo's and NCCL's
    loops, the TCPStore, the watchdog, TensorBoard's writer), and ``fork()`` copies only the
    calling thread; a lock another thread held at that instant stays held in the worker forever,
    and the rank then waits for a batch that never comes (pytorch/pytorch#75147; a CI run with
    ``-j 1`` hung once, its cause not captured: the tests now dump every process's stacks).

    The forkserver is a helper process started here, before the stop signals get their handlers
    and while they are ignored: it and the workers it forks inherit the ignoring across ``exec``
    (a handler would not survive it), so a signal sent to the whole process tree reaches the
    rank only, as with :func:`ignore_signals_in_worker`. It exits when the rank does. The cost:
    each worker receives the dataset pickled (fork shares it); ldb-train's workers persist, so
    that is once per run (CIFAR-10 in memory, 4 workers, 2 cores: about 3 s before the first
    batch, against 0.1 s forked). ``spawn`` and ``fork`` are passed through as they are.
    """
    import multiprocessing
    from multiprocessing import forkserver

    ctx = multiprocessing.get_context(method)
    if method != "forkserver":
        return ctx
    ctx.set_forkserver_preload(list(WORKER_PRELOAD))
    nums = [getattr(signal, n) for n in signals]
    previous = {num: signal.signal(num, signal.SIG_IGN) for num in nums}
    try:
        forkserver.ensure_running()
    finally:
        for num, handler in previous.items():
            signal.signal(num, handler)
    return ctx


class StopAgreement:
    """All ranks agree on a stop request every ``every`` optimizer steps (one gloo all-reduce)."""

    def __init__(self, stop: StopSignal, group: Any, every: int = 1):
        self.stop, self.group, self.every = stop, group, max(int(every), 1)
        self.agreed: str | None = None

    def check(self, optimizer_step: int) -> str | None:
        """The signal's name once any rank has one (the same on every rank), else ``None``."""
        import torch
        import torch.distributed as dist

        if self.agreed is not None or optimizer_step % self.every:
            return self.agreed
        mine = SIGNALS.index(self.stop.received) + 1 if self.stop.received else 0
        flag = torch.tensor([mine], dtype=torch.int32)  # host memory: gloo, no device sync
        if dist.is_initialized() and dist.get_world_size(self.group) > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        code = int(flag.item())
        self.agreed = SIGNALS[code - 1] if code else None
        return self.agreed


# --------------------------------------------------------------------------- hung ranks


@dataclass
class Beat:
    epoch: int = -1
    step: int = 0
    phase: str = "starting"
    time: float = 0.0


class Heartbeat:
    """What this rank is doing; read by the :class:`Watchdog` thread."""

    def __init__(self) -> None:
        self.now = Beat(time=time.monotonic())
        self.paused = 0

    def beat(self, phase: str, epoch: int | None = None, step: int | None = None) -> None:
        b = self.now
        self.now = Beat(b.epoch if epoch is None else epoch, b.step if step is None else step, phase,
                        time.monotonic())

    @contextlib.contextmanager
    def pause(self, phase: str) -> Iterator[None]:
        """A legitimate long wait (a checkpoint written by rank 0 while the others wait)."""
        self.beat(phase)
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1
            self.beat(phase + " done")

    def describe(self) -> str:
        b = self.now
        where = f"epoch {b.epoch}, micro step {b.step}" if b.epoch >= 0 else "before training"
        return f"{where}, in {b.phase}"


def watchdog_timing(timeout_s: float) -> tuple[float, float]:
    """``(fire_after_s, barrier_s)`` for a collective timeout: the report finishes before it expires."""
    barrier = min(max(timeout_s / 10.0, 2.0), 30.0)
    return max(timeout_s - barrier - 2.0, timeout_s / 2.0), barrier


def side_group_timeout(timeout_s: float) -> float:
    """The timeout of the control and data side groups, a little past ``timeout_s``.

    In training the watchdog fires ``fire_after_s`` after a rank's last heartbeat and reports
    within ``barrier_s`` more, just before ``timeout_s``. A side-group collective that started at
    that heartbeat (a checkpoint's manifest gather, the batch agreement started a step ahead)
    would otherwise time out at ``timeout_s``, a second or two after the report is due, and on
    a loaded machine sometimes first, reporting "a collective failed" instead of naming the rank
    that stopped answering. Outside training (set-up, ``--eval``) this is the bound of a hang.
    """
    return timeout_s + watchdog_timing(timeout_s)[1] + 5.0


class Watchdog(threading.Thread):
    """Ends the process with exit code 4 and a message when the heartbeat stops (see the module doc)."""

    def __init__(self, heartbeat: Heartbeat, group: Any, *, rank: int, world_size: int, timeout_s: float,
                 on_report: Callable[[str], None] | None = None):
        super().__init__(name="ldb-watchdog", daemon=True)
        self.hb, self.group, self.rank, self.world = heartbeat, group, rank, world_size
        self.fire_after, self.barrier_s = watchdog_timing(timeout_s)
        self.on_report = on_report
        self._stop_event = threading.Event()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        tick = min(1.0, self.fire_after / 10.0)
        while not self._stop_event.wait(tick):
            age = time.monotonic() - self.hb.now.time
            if self.hb.paused or age < self.fire_after:
                continue
            msg = self.diagnose(age)
            print_rank(self.rank, msg)
            if self.on_report is not None:
                with contextlib.suppress(Exception):
                    self.on_report(msg)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_HUNG)  # the main thread is blocked in a collective that will not return

    def diagnose(self, age: float) -> str:
        import torch.distributed as dist

        head = f"no progress for {age:.0f} s at {self.hb.describe()}"
        if self.world == 1:
            return head
        try:
            dist.monitored_barrier(group=self.group, timeout=datetime.timedelta(seconds=self.barrier_s),
                                   wait_all_ranks=True)
        except RuntimeError as err:
            found = re.search(r"Ranks? ([\d, ]+) failed to pass monitoredBarrier", str(err))
            if found:
                return f"{head}; rank(s) that did not answer: {found.group(1).strip()}"
            if self.rank != 0:
                return f"{head}; rank 0 did not confirm that every rank answers (rank 0 names the missing ranks, " \
                       "unless it is the one not answering)"
            return f"{head}; the check of which ranks answer failed: {str(err).splitlines()[0]}"
        # Every rank answers: name the ones stuck somewhere else (the others wait for them).
        beats: list[Any] = [None] * self.world
        try:
            dist.all_gather_object(beats, (self.hb.now.epoch, self.hb.now.step, self.hb.now.phase), group=self.group)
        except RuntimeError:
            return f"{head}; every rank answers the watchdog, but their positions could not be gathered"
        if len(set(beats)) == 1:
            return f"{head}; every rank answers and all wait at the same point (a collective that does not complete)"
        common = max(set(beats), key=beats.count)
        odd = "; ".join(f"rank {r} at epoch {b[0]}, micro step {b[1]}, in {b[2]}" for r, b in enumerate(beats)
                        if b != common)
        return f"{head}; every rank answers, but not all are at the same point: {odd}"


def is_distributed_failure(err: BaseException) -> bool:
    """Whether ``err`` comes from a collective that failed (a lost or stalled peer), not from a bug."""
    import torch.distributed as dist

    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(err, dist_error):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and any(s in text for s in (
        "Connection closed by peer", "Connection reset by peer", "Timed out", "timed out", "gloo", "NCCL",
        "Broken pipe"))


__all__ = ["EXIT_OK", "EXIT_ERROR", "EXIT_USAGE", "EXIT_NONFINITE", "EXIT_HUNG", "EXIT_DIVERGED", "EXIT_MEMORY",
           "EXIT_PREEMPTED", "SIGNALS", "parse_signals", "print_rank", "gloo_group", "StopSignal",
           "ignore_signals_in_worker", "worker_context", "WORKER_PRELOAD", "StopAgreement",
           "agreed_batches", "PeerBatchError", "Beat", "Heartbeat", "watchdog_timing", "side_group_timeout",
           "Watchdog", "is_distributed_failure"]
