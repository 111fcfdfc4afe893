"""The process bootstrap (ldb_ds.process) on 2 real ranks."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from ldb_ds.process import free_port
from tests.support import train_utils as tu
from tests.support.dist import run_distributed

_JOIN = """
import torch, deepspeed.comm as dist
from ldb_ds.process import init_process
p = init_process(timeout_s=10)
t = torch.ones(1) * (p.rank + 1)
dist.all_reduce(t)
print("joined", p.rank, p.world_size, t.item())
dist.destroy_process_group()
"""


def test_ranks_that_start_further_apart_than_the_timeout_still_meet():
    """Rank 1 reaches the rendezvous about 18 s before rank 0, with a 10 s collective timeout
    (ldb-train's --dist-timeout 10): the ranks still meet (process.MIN_PROCESS_GROUP_TIMEOUT_S).
    Bound by the 10 s, rank 1 gave up connecting to rank 0's store (DistNetworkError), as one
    start in two did on a busy machine."""
    port = str(free_port())
    procs = []
    try:
        for rank, delay in ((1, 0.0), (0, 18.0)):
            time.sleep(delay)
            env = tu.cpu_env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                             MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
            procs.append(subprocess.Popen([sys.executable, "-c", _JOIN], env=env, cwd=tu.REPO,
                                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        outputs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outputs):
        assert p.returncode == 0 and "joined" in out and "3.0" in out, out[-3000:]


def _shm_state(rank: int) -> dict:
    import deepspeed.comm as dist
    import torch

    from ldb_ds.process import shm_segment_path

    t = torch.ones(3) * (rank + 1)
    dist.all_reduce(t)  # the process group still works after the names are gone
    return {"shm_op": dist.comm.cdb.shm_comm_op is not None, "exists": os.path.exists(shm_segment_path()),
            "sum": t.tolist()}


def test_deepspeed_shm_segments_do_not_outlive_the_run():
    # run_distributed starts ranks the way ldb_ds.process.init_process does (release_shm_segment
    # right after init_distributed). DeepSpeed's CPU backend really created its segments (the shm
    # op is loaded), and none is left in /dev/shm to leak 69 MB per rank after the processes exit.
    results = run_distributed(_shm_state, 2, timeout=300)
    assert all(r["shm_op"] for r in results)
    assert not any(r["exists"] for r in results)
    assert results[0]["sum"] == [3.0, 3.0, 3.0]


def _release_with_one_segment_left(rank: int) -> dict:
    import deepspeed.comm as dist
    import torch

    from ldb_ds.process import release_shm_segment, shm_segment_path

    # run_distributed released both segments already. Rank 0 now has a segment file again and
    # rank 1 has none: the barrier must not depend on that (a rank skipping it hung the peers).
    if rank == 0:
        open(shm_segment_path(), "wb").close()
    released = release_shm_segment()
    t = torch.ones(1)
    dist.all_reduce(t)  # both ranks left the barrier together: the next collective pairs up
    return {"released": released, "exists": os.path.exists(shm_segment_path()), "sum": float(t)}


def test_releasing_segments_agrees_across_ranks_whatever_each_rank_finds():
    results = run_distributed(_release_with_one_segment_left, 2, timeout=60)
    assert [r["released"] for r in results] == [True, False]
    assert not any(r["exists"] for r in results)
    assert [r["sum"] for r in results] == [2.0, 2.0]
