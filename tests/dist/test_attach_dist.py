"""``ldb_ds.attach``: LDB as hooks on a raw DeepSpeed engine, on 2 real ranks (gloo), ZeRO 2 and 3.

What the Hugging Face Trainer and Accelerate need, tested without them: a loop that calls the
DeepSpeed engine's own forward, backward, step, save_checkpoint and load_checkpoint gets exactly
LDBEngine's training (same masks, bitwise the same weights), masks fixed across an accumulation
window, dropped units untouched, and a checkpoint that carries the LDB state in its own file.
"""

from __future__ import annotations

import pytest
import torch

from tests.support.attach_workers import attach_case
from tests.support.dist import run_distributed


@pytest.mark.parametrize("stage", [2, 3])
def test_hooks_on_a_raw_engine_equal_ldb_engine_and_resume(tmp_path, stage):
    r0, r1 = run_distributed(attach_case, 2, stage, str(tmp_path), timeout=600)
    for r in (r0, r1):
        assert r["masks"] == r["ref_masks"] and any(r["masks"])
        for a, b in zip(r["final"], r["ref_final"]):
            assert torch.equal(a, b)
        # gradient_accumulation_steps 2: one mask per optimizer step, the same in both micro batches.
        assert all(w[0] == w[1] == m for w, m in zip(r["micro_masks"], r["masks"]))
        assert r["untouched"] and all(r["untouched"])
        assert r["counts"] == (9, 6)
        # save_checkpoint: DeepSpeed's files and the LDB state in the same tag folder; the mask
        # in place before the save (units dropped at step 5) is back after it.
        assert r["tag"] == "global_step5"  # DeepSpeed's default tag: the optimizer steps so far
        assert "ldb_state.pt" in r["files"] and any(f.endswith("model_states.pt") for f in r["files"])
        assert r["masks"][4] and not all(r["flags_after_save"])
        # load_checkpoint on a fresh engine restores the LDB state and the run continues exactly.
        assert r["loaded"] and r["resumed_state"]["steps"] == r["saved_state"]["steps"] == 5
        assert r["resumed_state"]["rng_state"] == r["saved_state"]["rng_state"]
        assert r["masks_b"] == r["masks"][5:]
        for a, b in zip(r["final"], r["final_b"]):
            assert torch.equal(a, b)
        assert "already has LDB attached" in r["double_attach"]
    assert r0["masks"] == r1["masks"]
