"""Reliability pieces of the core on real 2-rank engines (gloo): docs/design.md, section 8.

Non-finite steps are skipped and counted alike at every ZeRO stage (stage 0 in fp32 through
``zero_hooks.install_nonfinite_skip``); the DROP-batch pre-check leaves no trace and reports an
out-of-memory on every rank; replica hashes name the rank that differs; checkpoints are atomic,
verified, fall back past a broken tag; a checkpoint resumes at another world size (ZeRO-0 as it
is, Adam-family ZeRO-2 through DeepSpeed's universal checkpoint, SGD ZeRO-2 refused clearly).
"""

from __future__ import annotations

import pytest
import torch

from tests.support import reliability_workers as W
from tests.support.dist import run_distributed

pytestmark = pytest.mark.slow

NONFINITE = [{"stage": s} for s in (0, 1, 2, 3)] + [{"stage": s, "bf16": True} for s in (0, 2)] \
    + [{"stage": 0, "poison": "one-inf"}]


def test_nonfinite_step_is_skipped_and_counted_at_every_stage():
    ranks = run_distributed(W.nonfinite_cases, 2, NONFINITE, timeout=600)
    for case, r0, r1 in zip(NONFINITE, *ranks):
        name = f"zero{case['stage']}{'-bf16' if case.get('bf16') else ''}{'-' + case['poison'] if 'poison' in case else ''}"
        for r in (r0, r1):
            assert r["skipped"] == 1, (name, r)  # DeepSpeed's skipped_steps counts it
            assert r["ldb_skipped"] == 1 and r["ldb_steps"] == 0, (name, r)  # one count, as an fp16 overflow
            assert r["params_kept"] and r["optimizer_kept"], (name, r)  # nothing moved
            assert r["mask_drawn"], (name, r)  # the skipped window consumed its draw: mask stream in step
            assert r["moved_after"] and r["finite_after"], (name, r)  # and training goes on
        assert r0["mask"] == r1["mask"], name


def test_nonfinite_skip_reads_a_sparse_gradient():
    for r in run_distributed(W.sparse_nonfinite, 2, timeout=300):
        assert r["sparse_grad"], r  # the case is what it says: the embedding's gradient is sparse
        assert r["skipped"] == [0, 1, 1] and r["emb_moved"] == [True, False, True], r
        assert all(r["finite"]), r


def test_drop_precheck_leaves_no_trace_and_reports_oom_on_every_rank():
    ranks = run_distributed(W.precheck_cases, 2, [0, 2, 3], timeout=600)
    for r in ranks:
        for case in r:
            assert case["params"] and case["buffers"] and case["rng"], case
            assert case["global_steps"] == (2, 2), case
    messages = run_distributed(W.precheck_oom, 2, timeout=300)
    for m in messages:
        assert "DROP epochs' micro batch (8 per rank = 2 x the FULL one) does not fit in memory" in m, m
        assert '"batch_scaling": "accumulation"' in m
    assert "can't allocate memory" in messages[1] and "on another rank" in messages[0]


def test_replica_hashes_name_the_rank_that_differs():
    for r in run_distributed(W.replica_checks, 2, timeout=300):
        assert r["same"] == "ok"
        assert "replicas diverged after the test's change: parameters of rank(s) 1 differ" in r["params"]
        assert r["params"].endswith("[1]")
        assert "LDB mask of rank(s) 1" in r["mask"] and "parameters" not in r["mask"]


def test_atomic_checkpoint_manifest_verify_fallback_prune(tmp_path):
    ranks = run_distributed(W.checkpoint_files, 2, str(tmp_path), timeout=300)
    for rank, r in enumerate(ranks):
        assert r["latest"] == "b" and r["verify"] == "b"
        assert "mp_rank_00_model_states.pt" in r["files"] and "ldb_rank00001.pt" in r["files"]
        assert {"zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} \
            <= set(r["files"])
        assert r["own"] == {"rank": rank}
        assert r["found"] == "b" and "'latest' names c, which is not a complete checkpoint" in r["warnings_c"][0]
        victim = tmp_path / "b" / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
        assert r["verify_error"].startswith(f"{victim} is truncated: ")  # the same line on both ranks
        assert r["fallback"] == "a" and any(f"skipping checkpoint b: {victim} is truncated" in w
                                            for w in r["warnings_b"])
        assert r["left"] == ["b"]
        *traversal, mine = r["bad_tags"]
        assert all(t.startswith("ValueError: checkpoint tag") for t in traversal), traversal
        assert mine.startswith("CheckpointError: ") and "notes.txt, which no checkpoint writes" in mine
        assert r["kept"] and r["c_verifies"] == "c"
    assert ranks[0]["pruned"] == ["a"]


def test_resume_at_another_world_size(tmp_path):
    saved = run_distributed(W.save_for_resize, 2, str(tmp_path), timeout=600)
    loaded = run_distributed(W.resume_at_world_size_1, 1, str(tmp_path), timeout=600)[0]
    zero0, adam2, sgd2 = loaded
    assert not zero0["universal"] and "a ZeRO-0 checkpoint loads as it is" in zero0["notes"][0]
    assert adam2["universal"] and "universal checkpoint" in adam2["notes"][0]
    # The conversion sits beside its source but is not a checkpoint of its own (resume, prune).
    assert adam2["converted_to"] == "t_universal" and adam2["tags"] == ["t"]
    for i, case in enumerate((zero0, adam2)):
        assert case["client"] == i and case["ldb_steps"] == 3  # 2 loaded + the step after
        # The step after loading matches world size 2's (same global batch, state loaded).
        for a, b in zip(case["after"], saved[0][i]):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (i, (a - b).abs().max())
    assert "world size 2 with ZeRO stage 2 and optimizer SGD" in sgd2["error"]
    assert "ds_to_universal" in sgd2["error"] and "Adam-family" in sgd2["error"]


def test_atomic_checkpoint_of_an_attached_engine_carries_the_ldb_state(tmp_path):
    """The Hugging Face path (``ldb_ds.attach``): the LDB state file is hashed in the manifest."""
    for r in run_distributed(W.attached_checkpoint, 2, str(tmp_path), timeout=300):
        assert r["state_file"] in r["files"] and "mp_rank_00_model_states.pt" in r["files"], r
        assert r["ldb"] is not None and r["ldb"]["enabled"], r  # compatibility checks see the LDB section
        assert r["verified"] == "t" and r["same_state"] and r["steps"] == 2, r
