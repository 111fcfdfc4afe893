"""Process bootstrap shared by the applications (train, bench, sweep) and the tests.

One place decides how a process joins a run: threads per rank, the process
group (with a timeout), the device, the input dtype, and a clean teardown.
It needs torch and DeepSpeed only, like the rest of the core, and is never
imported by the core's own modules.
"""

from __future__ import annotations

import datetime
import os
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any, NoReturn

DEFAULT_DIST_TIMEOUT_S = 600.0
"""Collective timeout: well under torch's 30 minutes, long enough for legitimate one-rank waits
(a dataset download, the first ~90 s build of DeepSpeed's fused ops, rank 0's checkpoint writes)."""
MIN_PROCESS_GROUP_TIMEOUT_S = 300.0
"""The least timeout :func:`init_process` gives the process group. Its rendezvous (every rank
connecting to rank 0's store, rank 0 waiting for all of them) runs under the same timeout, and the
ranks of one job reach it tens of seconds apart on a busy machine (imports, a loaded file system):
with ``--dist-timeout 10`` one start in two failed there with a DistNetworkError."""


def unusable_output_dir(path: str) -> tuple[str, str]:
    """Whether a folder can be created (or written) at ``path``: ``("", "")``, or a reason and the place.

    The nearest existing ancestor decides: ``("file", path)`` where ``path`` itself is a file,
    ``("under_file", ancestor)`` where it lies under one, ``("not_writable", ancestor)`` where the
    ancestor cannot be written. The applications word the message for their own option.
    """
    path = os.path.abspath(path)
    probe = path
    while not os.path.exists(probe) and os.path.dirname(probe) != probe:
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        return ("file" if probe == path else "under_file"), probe
    if not os.access(probe, os.W_OK | os.X_OK):
        return "not_writable", probe
    return "", ""


def free_port() -> int:
    """A free TCP port on this host (two runs on one machine must not both take 29500)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_threads(threads: int | None = None) -> int:
    """torch CPU threads per rank: ``threads``, else OMP_NUM_THREADS, else cores / local ranks.

    The ``deepspeed`` launcher does not set OMP_NUM_THREADS; two ranks with two
    threads each on two cores made steps erratic (docs/design.md, section 5).
    """
    import torch

    n = threads
    if n is None and os.environ.get("OMP_NUM_THREADS"):
        n = int(os.environ["OMP_NUM_THREADS"])
    if n is None:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", 1)))
        n = max(1, (os.cpu_count() or 1) // max(local, 1))
    torch.set_num_threads(n)
    return n


@dataclass(frozen=True)
class Process:
    """Where this process stands in the run."""

    rank: int
    world_size: int
    local_rank: int
    device: Any
    threads: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_process(threads: int | None = None, backend: str | None = None,
                 timeout_s: float = DEFAULT_DIST_TIMEOUT_S, single_process_ok: bool = True) -> Process:
    """Join the run: threads, ``deepspeed.init_distributed`` and the device of this rank.

    Works under the ``deepspeed`` launcher, torchrun, ``mpirun`` (mpi4py
    discovery; it would always use port 29500, so MASTER_PORT is passed
    through) and, with ``single_process_ok``, a plain ``python`` (world size 1,
    with what a launcher would have set filled in).
    """
    launched = any(k in os.environ for k in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"))
    if not launched and single_process_ok:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))
    n_threads = set_threads(threads)

    import deepspeed
    import deepspeed.comm as dist
    from deepspeed.accelerator import get_accelerator

    # The rendezvous shares the group's timeout (torch has no separate one), so the group gets at
    # least MIN_PROCESS_GROUP_TIMEOUT_S. A shorter timeout_s still bounds a hang in training:
    # ldb-train's watchdog fires after timeout_s less its margin, and its side groups time out
    # just after it (train/faults.py, side_group_timeout).
    kwargs: dict[str, Any] = {"auto_mpi_discovery": True, "verbose": False,
                              "distributed_port": int(os.environ.get("MASTER_PORT", 29500)),
                              "timeout": datetime.timedelta(seconds=max(timeout_s, MIN_PROCESS_GROUP_TIMEOUT_S))}
    if backend:
        kwargs["dist_backend"] = backend
    deepspeed.init_distributed(**kwargs)
    release_shm_segment()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    accel = get_accelerator()
    if accel.device_name() != "cpu":
        accel.set_device(local_rank)
    return Process(dist.get_rank(), dist.get_world_size(), local_rank, accel.current_device_name(), n_threads)


def shm_segment_path() -> str:
    """The /dev/shm file DeepSpeed's CPU shared-memory all-reduce creates for this rank.

    ``deepspeed/ops/csrc/cpu/comm/shm.cpp`` (``shm_initialize``, 0.19.8) names it
    ``deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>``.
    """
    import deepspeed.comm as dist

    return os.path.join("/dev/shm", f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                                    f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")


def release_shm_segment() -> bool:
    """Unlink this rank's DeepSpeed shared-memory segment once every rank has mapped it.

    With the CPU accelerator, DeepSpeed 0.19.8 creates a 69 MB segment per rank in /dev/shm
    when the process group starts and never unlinks it (``shared_close`` is never called),
    so every run leaks RAM until reboot; the project's test suite leaked 18 GB in an
    afternoon. Each rank opens and maps every other rank's segment inside
    ``init_distributed`` (``shm_initialize`` waits for all of them), and a mapping outlives
    the name, so after a barrier the names can go: nothing opens them again. Returns
    whether a segment was released. A collective: every rank calls it (calling it again is
    harmless, one more barrier).
    """
    import deepspeed.comm as dist

    # Whether to take the barrier is decided by what every rank shares: the backend built the
    # shm op from the same DeepSpeed install. Never by this rank's own file being there: a rank
    # that skipped the barrier on a local fact (a segment already gone) would leave its peers in
    # the barrier while it entered the next collective: a hang, seen once in CI.
    if getattr(dist.comm.cdb, "shm_comm_op", None) is None:  # GPU accelerator, or no shm op built
        return False
    if dist.get_world_size() > 1:
        dist.barrier()  # every rank has mapped every segment: the names are no longer needed
    try:
        os.unlink(shm_segment_path())
    except FileNotFoundError:  # released before, or ranks on several hosts
        return False
    return True


def input_dtype(engine: Any) -> Any:
    """The dtype a batch must have for ``engine``'s model (bf16, fp16 or fp32)."""
    import torch

    if engine.bfloat16_enabled():
        return torch.bfloat16
    if engine.fp16_enabled():
        return torch.float16
    return torch.float32


def batch_to_device(tensor: Any, device: Any, dtype: Any = None) -> Any:
    """``tensor`` (a batch from a DataLoader) on ``device``, cast to ``dtype`` there.

    Why not ``tensor.to(device, dtype)``: with a dtype change torch converts on the host first,
    into pageable memory, and a copy without ``non_blocking`` waits for everything queued on the
    device, so each step's input copy would stall the host until the previous step ends. Copied
    with ``non_blocking`` from a pinned batch (ldb_ds's loader pins on an accelerator), the host
    goes on queueing work while the copy runs in order on the device's stream; from pageable
    memory it is a plain copy. The cast is then the same rounding on the device (bitwise the same
    values). On the CPU both are what ``tensor.to(dtype)`` does.
    """
    tensor = tensor.to(device, non_blocking=True)
    return tensor if dtype is None else tensor.to(dtype)


def synchronize() -> None:
    """Wait for the device (a no-op on the CPU): timings must cover the work, not its launch."""
    from deepspeed.accelerator import get_accelerator

    get_accelerator().synchronize()


def teardown(*engines: Any) -> None:
    """Destroy engines and the process group.

    Without this, gloo threads sometimes abort the process at exit
    ("terminate called without an active exception").
    """
    import deepspeed.comm as dist

    for engine in engines:
        if engine is not None:
            engine.destroy()
    if dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()


RANK0_GRACE_S = 5.0
"""How long a rank other than 0 waits before it leaves on an error that only rank 0 prints.

The command-line applications print an error every rank finds alike (a bad option, an unknown
model) once, from rank 0. Launchers end the whole job at the first rank's exit (DeepSpeed's
``launch.py`` kills the other ranks at its next poll; torchrun, ``srun --kill-on-bad-exit``
alike), so a rank 1 that got there first could take rank 0 down before its line was printed
(seen in 1 of 4 runs on a busy machine). The wait costs nothing where a launcher is there:
rank 0's exit ends it."""


def launched_rank() -> int:
    """The rank the launcher gave this process (RANK; mpirun: OMPI_COMM_WORLD_RANK), 0 if none."""
    for name in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        text = os.environ.get(name, "")
        if text.isdigit():
            return int(text)
    return 0


def report_agreed_error(line: str, *, is_main: bool) -> None:
    """Print ``line`` to stderr on rank 0 only: every rank found the same error (one line per job).

    The other ranks wait :data:`RANK0_GRACE_S` instead, so that their exit cannot end the job
    before rank 0 has printed it.
    """
    if is_main:
        print(line, file=sys.stderr, flush=True)
    else:
        time.sleep(RANK0_GRACE_S)


def exit_process(code: int) -> NoReturn:
    """End a finished command-line run now, without the interpreter's own teardown.

    Why: after the results are written and the process group is destroyed, Python's teardown
    still destroys the C++ objects of torch, gloo and DeepSpeed's extensions, and now and then
    one of them holds a joinable ``std::thread``: the process aborts ("terminate called without
    an active exception", SIGABRT), and a run that finished is reported as failed by the
    launcher. Seen in about 1 of 6 ``ldb-bench`` runs at world size 2 on a CPU; faulthandler
    showed the main thread past its last Python frame. Nothing is left to do at that point:
    logging is shut down and the standard streams are flushed here (DeepSpeed's TensorBoard
    monitor flushes every write; checkpoints, ``results.json`` and ``status.json`` are closed).
    Used by the ``ldb-train``/``ldb-bench`` entry points only, never by library code.

    Under ``mpirun`` (mpi4py, which DeepSpeed uses to discover ranks), MPI is finalized first, as
    mpi4py's own exit hook would: without it Open MPI's ``mpirun`` reports the rank as having
    exited "improperly" and fails the job.
    """
    import logging

    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized():
        mpi.Finalize()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


__all__ = ["DEFAULT_DIST_TIMEOUT_S", "MIN_PROCESS_GROUP_TIMEOUT_S", "Process", "free_port", "set_threads",
           "init_process", "release_shm_segment",
           "shm_segment_path", "input_dtype", "batch_to_device", "synchronize", "teardown", "RANK0_GRACE_S",
           "launched_rank", "report_agreed_error", "exit_process"]
