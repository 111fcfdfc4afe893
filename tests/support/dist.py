"""Run a function on N real processes with a real gloo process group (no mocks).

``run_distributed(fn, world_size, *args)`` spawns ``world_size`` processes, each
sets the usual torch.distributed environment, calls
``deepspeed.init_distributed("gloo")`` and then ``fn(rank, *args)``; each
rank's return value is saved with ``torch.save`` and handed back as a list.
A rank that fails or a run past ``timeout`` fails the test (no hangs): all
processes are killed. ``accelerator="cuda"`` runs the ranks on GPUs (one each, NCCL)
instead of DeepSpeed's CPU accelerator with gloo.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
import traceback

import torch
import torch.multiprocessing as mp

from ldb_ds.process import free_port, release_shm_segment


def _entry(rank: int, world_size: int, port: int, out_dir: str, fn, args, accelerator: str = "cpu") -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size), DS_ACCELERATOR=accelerator)
    torch.set_num_threads(1)
    import deepspeed
    import deepspeed.comm as dist
    from deepspeed.accelerator import get_accelerator

    exit_code = 1
    try:
        if accelerator != "cpu":
            get_accelerator().set_device(rank)
        deepspeed.init_distributed(dist_backend="gloo" if accelerator == "cpu" else None, verbose=False)
        release_shm_segment()  # DeepSpeed would leak 69 MB of /dev/shm per rank per run
        result = fn(rank, *args)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
        exit_code = 0
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
    finally:
        if dist.is_initialized():
            # Bounded: on torch 2.4.1, destroy_process_group can hang after gloo
            # all_gather_into_tensor calls (seen in allgather_case, both ranks, after the
            # result was saved); the result or the error is on disk already.
            closer = threading.Thread(target=dist.destroy_process_group, daemon=True)
            closer.start()
            closer.join(30.0)
        # Leave without interpreter teardown: a gloo/ZeRO-3 helper thread still being destroyed
        # there sometimes aborts the process ("terminate called without an active exception")
        # after all its work is done and saved. The result (or the error) is on disk already.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)


def run_distributed(fn, world_size: int = 2, *args, timeout: float = 600.0, accelerator: str = "cpu") -> list:
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(_entry, args=(world_size, free_port(), out_dir, fn, args, accelerator),
                                 nprocs=world_size,
                                 join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"distributed run of {fn.__name__} exceeded {timeout:.0f}s")
        except Exception as err:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            errors = [open(os.path.join(out_dir, f)).read() for f in sorted(os.listdir(out_dir))
                      if f.endswith(".err")]
            raise RuntimeError(f"{fn.__name__} failed on some rank:\n" + "\n".join(errors)) from err
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
