"""Collectives reached by every rank whatever one rank alone meets (2 real gloo ranks, bounded time).

Each case gives one rank something the others do not see (its share of a checkpoint's files, the
work rank 0 does alone), then checks that every rank leaves with the same outcome and that the
ranks still pair up in a collective afterwards: a rank that skipped a collective on a local fact
would leave its peers waiting (or, as here, fail them with a lost-peer error).
"""

from __future__ import annotations

import hashlib
import json
import os

import pytest

from tests.support.dist import run_distributed

pytestmark = pytest.mark.slow


def _outcome(call) -> str:
    try:
        call()
        return "ok"
    except Exception as err:  # noqa: BLE001 - recorded, compared across ranks
        return f"{type(err).__name__}: {err}"


def _paired() -> float:
    import torch
    import torch.distributed as dist

    t = torch.ones(1)
    dist.all_reduce(t)  # both ranks are still in step: the next collective pairs up
    return float(t)


def _write_tag(root: str, tag: str, files: dict[str, bytes], entries: dict | None = None, manifest=None) -> None:
    os.makedirs(os.path.join(root, tag))
    for name, data in files.items():
        with open(os.path.join(root, tag, name), "wb") as f:
            f.write(data)
    if manifest is None:
        manifest = {"format": 1, "tag": tag, "created": 1.0, "files": entries or {
            n: {"size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in files.items()}}
    with open(os.path.join(root, tag, "ldb_manifest.json"), "w") as f:
        json.dump(manifest, f)


def _verify_malformed_entry(rank: int, root: str) -> dict:
    import torch.distributed as dist

    from ldb_ds.checkpointing import verify

    if rank == 0:
        # verify() splits the files over the ranks: a.pt is rank 0's to check, b.pt rank 1's, and
        # b.pt's entry has no SHA-256 (a manifest edited by hand, or by another tool).
        _write_tag(root, "t", {"a.pt": b"aaa", "b.pt": b"bbb"},
                   {"a.pt": {"size": 3, "sha256": hashlib.sha256(b"aaa").hexdigest()}, "b.pt": {"size": 3}})
    dist.barrier()
    return {"verify": _outcome(lambda: verify(root, "t")), "sum": _paired()}


def test_verify_of_a_malformed_manifest_entry_agrees_across_ranks(tmp_path):
    results = run_distributed(_verify_malformed_entry, 2, str(tmp_path), timeout=60)
    assert results[0]["verify"] == results[1]["verify"], results
    assert results[0]["verify"].startswith("CheckpointError: checkpoint manifest ")
    assert "b.pt" in results[0]["verify"]
    assert [r["sum"] for r in results] == [2.0, 2.0]


def _universal_over_unreadable_conversion(rank: int, root: str) -> dict:
    import torch.distributed as dist

    from ldb_ds.checkpoint_fit import to_universal

    if rank == 0:
        _write_tag(root, "u", {"mp_rank_00_model_states.pt": b"not a checkpoint"})
        # An earlier conversion whose manifest parses but is no JSON object: rank 0 alone reads it.
        os.makedirs(os.path.join(root, "u_universal"))
        with open(os.path.join(root, "u_universal", "ldb_manifest.json"), "w") as f:
            f.write("null")
    dist.barrier()
    return {"universal": _outcome(lambda: to_universal(root, "u", timeout_s=50)), "sum": _paired()}


def test_to_universal_over_an_unreadable_conversion_agrees_across_ranks(tmp_path):
    results = run_distributed(_universal_over_unreadable_conversion, 2, str(tmp_path), timeout=60)
    # Rank 0 converts again; the source is no real checkpoint, so the conversion fails, and both
    # ranks raise rank 0's outcome.
    assert results[0]["universal"] == results[1]["universal"], results
    assert results[0]["universal"].startswith("CheckpointError: ")
    assert [r["sum"] for r in results] == [2.0, 2.0]


def _save_over_malformed_manifest(rank: int, root: str) -> dict:
    import torch.distributed as dist

    from ldb_ds import checkpointing
    from tests.support.reliability_workers import config, engine_for, train_step

    engine = engine_for(config(2))
    engine.set_epoch(0)
    train_step(engine, 1, rank)
    if rank == 0:
        # A half-finished save of tag s, its manifest parseable but no JSON object. Saving s again
        # replaces it; rank 0 alone inspects the folder first.
        _write_tag(root, "s", {"mp_rank_00_model_states.pt": b"partial"})
        with open(os.path.join(root, "s", "ldb_manifest.json"), "w") as f:
            f.write("[]")
    dist.barrier()
    out = {"save": _outcome(lambda: checkpointing.save(engine, root, "s")), "sum": _paired()}
    out["verify"] = _outcome(lambda: checkpointing.verify(root, "s"))
    engine.destroy()
    return out


def test_save_over_a_malformed_manifest_agrees_across_ranks(tmp_path):
    results = run_distributed(_save_over_malformed_manifest, 2, str(tmp_path), timeout=60)
    for r in results:
        assert r == {"save": "ok", "sum": 2.0, "verify": "ok"}, results
