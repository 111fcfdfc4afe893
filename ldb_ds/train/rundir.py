"""The run directory ``<output>/<experiment>/`` and the files the application writes into it.

=====================  ========================================================================
``events.out.tfevents.*``  DeepSpeed's TensorBoard file (written by DeepSpeed's monitor)
``args.yaml``          the options of the run (replay with ``-c``) and, under ``run:``, what
                       the run found out: world size, ZeRO stage, batch sizes, LDB settings,
                       library versions (a record; ``-c`` skips it)
``ds_config.json``     the config actually handed to DeepSpeed
``summary.csv``        one row per epoch, written with timm's ``update_summary``
``results.json``       per-epoch figures and the final accuracy (``launch/sweep.py`` reads it)
``checkpoints/<tag>/`` DeepSpeed checkpoints with a manifest (:mod:`ldb_ds.train.checkpoint`)
``masks.jsonl``        every step's dropped units, with ``--log-masks``
``status.json``        how the run ended (or ``running``): what requeue scripts read, since
                       the ``deepspeed`` launcher does not pass on the exit code
``.ldb_ds_run``        the marker (ldb-train made this folder) and, while a run goes on, its lock:
                       rank 0 holds a ``flock`` on it and names its pid and host in it
=====================  ========================================================================

Only rank 0 writes files, and an ``--eval`` start writes none of them (it takes the lock, and
makes the folder and its marker if they do not exist); :meth:`RunDir.prepare` is collective so
all ranks agree on whether the run may start.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import socket
import time
from typing import Any

from .arguments import RECORD_KEY
from .console import error, log
from .options import TrainOptions

MARKER = ".ldb_ds_run"
"""Written into every run directory ldb-train creates; ``--overwrite`` deletes only directories holding it.
While a run of the directory goes on, its rank 0 holds an exclusive lock on this file
(:meth:`RunDir.prepare`): a second start of the same experiment is refused, never let in to
delete or write over a live run."""
MARKER_TEXT = "created by ldb-train; --overwrite deletes only folders holding this file\n"

_OS_ERROR_HINTS = {
    errno.ENOSPC: "no space left on the device: free space there or choose another {option}",
    errno.EDQUOT: "the disk quota is exceeded: free space there or choose another {option}",
    errno.EROFS: "the file system is read-only: choose a writable {option}",
    errno.EACCES: "permission denied: choose a folder you may write to as {option}",
    errno.EPERM: "permission denied: choose a folder you may write to as {option}",
    errno.ENOTDIR: "a file stands where a folder is needed: remove it or choose another {option}",
    errno.EEXIST: "a file stands where a folder is needed: remove it or choose another {option}",
}
OUTPUT_ERRNOS = frozenset(_OS_ERROR_HINTS)
"""OS errors that mean "the output location is unusable" (a user's mistake or a full disk, not a bug)."""


_HELD_LOCKS: set[int] = set()
"""File descriptors of the markers this process holds locked (:meth:`RunDir._hold`)."""


def _close_held_locks_in_child() -> None:
    # A forked child (a DataLoader worker) shares the open marker, and a flock lasts while any
    # process has it open: the folder would stay locked until the worker noticed its parent had
    # died. Closing (not unlocking) in the child leaves the lock to the parent alone.
    for fd in _HELD_LOCKS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_close_held_locks_in_child)


def describe_os_error(err: OSError, option: str = "--output") -> str:
    """One line for an OS error on an output file: the file, the cause and what to do."""
    hint = _OS_ERROR_HINTS.get(err.errno, "check that {option} is a writable folder").format(option=option)
    name = err.filename or "the output"
    return f"cannot write {name}: {err.strerror or err} ({hint})"


def check_output(output: str) -> str:
    """Before any process group exists: ``""`` if ``output`` can hold run folders, else why not.

    Every rank checks alike (the same path), so a file where the folder should be, or a folder
    that cannot be written, stops every rank before DeepSpeed starts, with one line.
    """
    from ldb_ds.process import unusable_output_dir

    why, probe = unusable_output_dir(output)
    if why in ("file", "under_file"):
        what = "is a file" if why == "file" else f"lies under {probe}, which is a file"
        return f"--output {output} {what}, not a folder; choose a folder for the runs"
    if why == "not_writable":
        return f"--output {output}: {probe} is not writable (permission denied or read-only); choose a writable folder"
    return ""


class RunDir:
    """Paths of one run and the writers of its files (call the writers on rank 0 only)."""

    def __init__(self, output: str, experiment: str) -> None:
        self.output = output
        self.experiment = experiment
        self.path = os.path.join(output, experiment)
        self.checkpoints = os.path.join(self.path, "checkpoints")
        self.args_yaml = os.path.join(self.path, "args.yaml")
        self.ds_config_json = os.path.join(self.path, "ds_config.json")
        self.summary_csv = os.path.join(self.path, "summary.csv")
        self.results_json = os.path.join(self.path, "results.json")
        self.masks_jsonl = os.path.join(self.path, "masks.jsonl")
        self.status_json = os.path.join(self.path, "status.json")
        self._lock_fd: int | None = None
        """The open marker whose ``flock`` says this process runs the directory (:meth:`prepare`)."""
        self._cannot_lock = False
        """The file system refused ``flock`` (warned once): the run goes on unlocked."""
        self._holder_recorded = False
        """This process wrote its holder line into the marker (:meth:`_record_holder`)."""

    def prepare(self, *, overwrite: bool, continuing: bool, is_main: bool, device: Any) -> bool:
        """Create, replace or refuse the directory; ``False`` (on every rank) when refused.

        ``continuing`` (``--resume``/``--eval``) uses an existing directory as it is, if ldb-train
        created it (it holds :data:`MARKER`; an empty one is taken too), and refuses one a person
        made, whose files it would overwrite. Otherwise
        an existing non-empty directory is replaced with ``overwrite`` and refused without it:
        a new run never mixes its files with an old one's. ``overwrite`` deletes only a directory
        that holds :data:`MARKER` (ldb-train created it) and resolves to a direct child of the
        resolved ``--output``: a symbolic link or a folder a person made is never deleted. Rank 0
        of the run then holds the lock of :data:`MARKER` until it exits, and a start that finds
        the lock held (the same experiment still running, in another job or terminal) is refused
        before it deletes or writes anything: ``--overwrite`` would otherwise delete a live run's
        checkpoints under it, and two resumes would write the same checkpoint files at once. A
        collective: rank 0 decides and broadcasts the verdict, so every rank returns the same
        answer and they exit together (no rank meets a lost peer).
        """
        import deepspeed.comm as dist
        import torch

        refused = torch.zeros(1, dtype=torch.int32, device=device)
        if is_main:
            try:
                problem = self._prepare_on_main(overwrite=overwrite, continuing=continuing)
            except OSError as err:
                problem = describe_os_error(err, "--output")
            if problem:
                self.release()
                error(problem)
                refused += 1
        dist.broadcast(refused, src=0)
        return not int(refused.item())

    def _prepare_on_main(self, *, overwrite: bool, continuing: bool) -> str:
        """Rank 0's part of :meth:`prepare`: ``""`` when the directory is ready, else the one-line reason."""
        if os.path.lexists(self.path) and not os.path.isdir(self.path):
            return (f"the run directory {self.path} exists and is not a directory; remove it or choose "
                    "another --experiment")
        marker = os.path.join(self.path, MARKER)
        if (continuing and os.path.isdir(self.path) and os.listdir(self.path)
                and not os.path.isfile(marker)):
            # --resume (auto too, which starts afresh where it finds no checkpoint) uses the folder
            # as it is and writes args.yaml, summary.csv, results.json, status.json and checkpoints/
            # into it: over a person's files of the same names, unless the folder is known to be a
            # run's. The marker says so (ldb-train writes it into every folder it starts). --eval
            # writes nothing, but is refused alike: ldb-train's checkpoints are in folders it made.
            return (f"the run directory {self.path} was not created by ldb-train (it has no {MARKER} file), and "
                    f"--resume would write args.yaml, summary.csv, results.json and checkpoints into it; "
                    f"nothing was written. Choose another --experiment (--resume PATH takes a checkpoint from "
                    f"anywhere); if it is a run of an ldb-train older than the marker, create it: touch {marker}")
        if os.path.lexists(marker):
            # Before anything is deleted or written: a run of this folder that is still going
            # (another job, a second launch of the same command) holds the marker's lock.
            busy = self._hold(marker)
            if busy:
                return busy
        if not continuing and os.path.isdir(self.path) and os.listdir(self.path):
            if not overwrite:
                return (f"the run directory {self.path} exists; pass --resume to continue it, --overwrite "
                        "to replace it, or --experiment NAME")
            why_not = self.deletable()
            if why_not:
                return why_not
            # The old marker's lock is held through the deletion, so no start can take the folder
            # in between; it is let go with the unlinked file once the folder is gone.
            shutil.rmtree(self.path)
            self.release()
        os.makedirs(self.path, exist_ok=True)
        if not os.path.exists(marker) and (not continuing or not os.listdir(self.path)):
            # Written only into a folder this run starts (new or empty): the marker is what later
            # allows --overwrite to delete it, so it must never be added to a folder of unknown origin.
            with open(marker, "w") as f:
                f.write(MARKER_TEXT)
        if self._lock_fd is None and not self._cannot_lock:
            busy = self._hold(marker)  # a start that reached the new folder first is still refused
            if busy:
                return busy
        self._record_holder()
        return ""

    def _hold(self, marker: str) -> str:
        """Lock ``marker`` for as long as this process lives: ``""``, or why the folder is in use.

        An exclusive ``flock``, taken without waiting: the kernel lets it go when the holder's
        process ends however it ends (SIGKILL, a node's job killed by the scheduler), so a
        crashed run never leaves a stale lock, unlike a pid file. Locking writes nothing: a start
        refused afterwards (``--overwrite`` of a link to another run's folder) leaves every file as
        it was; :meth:`_record_holder` writes the holder into the marker once the folder is this
        run's. A file system that cannot lock (some NFS or Lustre mounts) gets a warning and no
        lock: concurrent starts of one experiment are then not detected there.
        """
        try:
            fd = os.open(marker, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as err:
            if err.errno == errno.ELOOP:
                return (f"the run directory {self.path} has a symbolic link as its {MARKER} file; nothing was "
                        "deleted or written. Remove the link or choose another --experiment")
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").partition("\n")[2].strip()
            os.close(fd)
            holder = holder.removeprefix("in use by ") or "holder unknown"
            return (f"the run directory {self.path} is in use by another ldb-train start "
                    f"({holder}); nothing was deleted or written. Wait for it to end or "
                    f"stop it, or choose another --experiment (to evaluate one of its checkpoints meanwhile: "
                    f"--experiment NEW --resume {self.checkpoints}/TAG --eval)")
        except OSError as err:  # ENOLCK, EOPNOTSUPP: a file system without flock
            os.close(fd)
            self._cannot_lock = True
            log(f"warning: cannot lock {marker} ({err.strerror}); a second start of this experiment "
                "while this one runs would not be detected")
            return ""
        self._lock_fd = fd
        _HELD_LOCKS.add(fd)
        return ""

    def _record_holder(self) -> None:
        """The marker says who holds it (pid, host, since when): the refusal line of a second start."""
        if self._lock_fd is None:
            return
        since = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        os.ftruncate(self._lock_fd, 0)
        os.pwrite(self._lock_fd, f"{MARKER_TEXT}in use by pid {os.getpid()} on {socket.gethostname()} "
                  f"since {since}\n".encode(), 0)
        self._holder_recorded = True

    def release(self) -> None:
        """Let go of the run directory's lock (the end of the process does so too)."""
        if self._lock_fd is not None:
            _HELD_LOCKS.discard(self._lock_fd)
            if self._holder_recorded:  # the holder line goes: nobody holds the folder now
                with contextlib.suppress(OSError):
                    os.ftruncate(self._lock_fd, len(MARKER_TEXT.encode()))
            os.close(self._lock_fd)
            self._lock_fd, self._holder_recorded = None, False

    def deletable(self) -> str:
        """``""`` if ``--overwrite`` may delete the run directory, else why not (one line)."""
        real_out, real_run = os.path.realpath(self.output), os.path.realpath(self.path)
        if os.path.islink(self.path) or os.path.dirname(real_run) != real_out or real_run == real_out:
            return (f"--overwrite refused: {self.path} resolves to {real_run}, which is not a folder directly "
                    f"inside --output {real_out}; nothing was deleted. Choose another --experiment")
        if not os.path.isfile(os.path.join(self.path, MARKER)):
            return (f"--overwrite refused: {self.path} was not created by ldb-train (it has no {MARKER} file); "
                    "nothing was deleted. Delete it yourself, or choose another --experiment")
        return ""

    def write_args(self, opts: TrainOptions, record: dict[str, Any]) -> None:
        """``args.yaml``: the run's options (what ``-c`` replays), then the ``run:`` record.

        Options that describe this start rather than the experiment (``--resume``,
        ``--overwrite``, ``--eval``, ``--stop-after-epoch``, the launcher's ``--local_rank``)
        are left out, so a replay never deletes or cuts short a run by surprise.
        """
        import yaml

        data = {**opts.to_dict(scope=("run",)), RECORD_KEY: record}
        # Through JSON first: plain types only (torch.__version__ is a str subclass yaml refuses).
        data = json.loads(json.dumps(data, default=str))
        with open(self.args_yaml, "w") as f:
            yaml.safe_dump(data, f, sort_keys=False)

    def write_ds_config(self, ds_config: dict) -> None:
        with open(self.ds_config_json, "w") as f:
            json.dump(ds_config, f, indent=2)

    def trim_summary(self, start_epoch: int) -> None:
        """Drop ``summary.csv`` rows of epochs a resumed run is about to train again."""
        from timm.utils.summary import trim_summary

        trim_summary(self.summary_csv, start_epoch)

    def append_summary(self, epoch: int, train: dict[str, Any], evaluation: dict[str, Any],
                       lr: float) -> None:
        """One ``summary.csv`` row (timm's layout: epoch, train_*, eval_*, lr).

        ``evaluation`` must have the same keys every epoch (``None`` where an epoch was not
        evaluated): the header is written once, from the first row.
        """
        from timm.utils import update_summary

        new = not os.path.exists(self.summary_csv) or os.path.getsize(self.summary_csv) == 0
        update_summary(epoch, train, evaluation, self.summary_csv, lr=lr, write_header=new)

    def write_results(self, results: dict[str, Any]) -> None:
        with open(self.results_json, "w") as f:
            json.dump(results, f, indent=2)

    def read_status(self) -> dict[str, Any]:
        """The record in ``status.json`` (``status``, ``exit_code``, ``time``, ...); ``{}`` when there is
        none or it cannot be read as one (a rank may be replacing it right now)."""
        try:
            with open(self.status_json) as f:
                data = json.load(f)
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def write_status(self, status: str, exit_code: int | None = None, message: str = "",
                     **extra: Any) -> None:
        """``status.json``, replaced atomically: ``running``, ``completed``, ``preempted`` or ``failed``.

        A requeue script requeues on ``preempted`` (and on ``running`` left by a job that was
        killed outright); ``failed`` needs a person.
        """
        data = {"status": status, "exit_code": exit_code, "message": message, "time": time.time(), **extra}
        tmp = f"{self.status_json}.tmp{os.getpid()}"
        try:
            os.makedirs(self.path, exist_ok=True)
            with open(tmp, "w") as f:
                json.dump(data, f, indent=2)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.status_json)
        except OSError:
            if os.path.exists(tmp):
                os.remove(tmp)
            if status == "running" or not self._overwrite_status_in_place(status, exit_code):
                raise

    def _overwrite_status_in_place(self, status: str, exit_code: int | None) -> bool:
        """Last resort on a full disk: turn the old ``status.json`` into a short ``failed`` one in place.

        A new file needs a free block, rewriting the first bytes of an existing one does not (the
        earlier ``running`` status is longer than this record; JSON allows the trailing spaces).
        Without it a job stopped by a full disk would be left ``running`` and requeued forever.
        """
        record = json.dumps({"status": status, "exit_code": exit_code, "message": "disk full"})
        try:
            size = os.path.getsize(self.status_json)
            if size < len(record):
                return False
            with open(self.status_json, "r+") as f:
                f.write(record + " " * (size - len(record)))
            return True
        except OSError:
            return False

    def trim_masks(self, epoch: int, step: int) -> None:
        """Drop ``masks.jsonl`` lines after micro step ``step`` of ``epoch`` (a resume trains them again)."""
        if not os.path.isfile(self.masks_jsonl):
            return
        with open(self.masks_jsonl) as f:
            lines = f.readlines()
        keep = [line for line in lines if (lambda r: (r["epoch"], r["step"]) <= (epoch, step))(json.loads(line))]
        if len(keep) != len(lines):
            with open(self.masks_jsonl, "w") as f:
                f.writelines(keep)


__all__ = ["RunDir", "MARKER", "OUTPUT_ERRNOS", "describe_os_error", "check_output"]
