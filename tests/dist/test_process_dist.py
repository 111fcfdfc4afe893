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
