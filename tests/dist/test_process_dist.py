"""The process bootstrap (ldb_ds.process) on 2 real ranks."""

from __future__ import annotations

import os

from tests.support.dist import run_distributed


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
