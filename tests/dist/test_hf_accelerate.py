"""The Accelerate recipe on 2 real ranks (gloo): accelerator.prepare with a DeepSpeedPlugin at ZeRO-2.

``plan_param_groups`` -> the user's optimizer -> ``accelerator.prepare`` -> ``plan.attach(engine)``
and a hand-written loop (docs/usage.md, the Hugging Face Trainer / Accelerate section).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("accelerate", reason="the Accelerate recipe needs accelerate: pip install 'ldb_ds[hf]'")
pytest.importorskip("transformers", reason="the test model is a transformers ViT: pip install 'ldb_ds[hf]'")

from tests.support.dist import run_distributed  # noqa: E402
from tests.support.hf_workers import accelerate_case  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    return run_distributed(accelerate_case, 2, str(tmp_path_factory.mktemp("acc")), timeout=600)


def test_recipe_matches_ldb_ds_initialize_bitwise(results):
    for r in results:
        masks = [rec["dropped"] for rec in r["steps"]]
        assert [rec["mode"] for rec in r["steps"]] == ["FULL"] * 4 + ["DROP"] * 4 and any(masks)
        assert masks == r["ref_masks"]
        for n in r["final"]:
            assert torch.equal(r["final"][n], r["ref_final"][n]), n


def test_dropped_units_untouched_and_ranks_agree(results):
    r0, r1 = results
    for r in results:
        drops = [rec for rec in r["steps"] if rec["dropped"]]
        assert drops and all(rec["untouched"] and rec["kept_changed"] for rec in drops)
    assert [rec["dropped"] for rec in r0["steps"]] == [rec["dropped"] for rec in r1["steps"]]
    for n in r0["final"]:
        assert torch.equal(r0["final"][n], r1["final"][n]), n


def test_save_state_and_load_state_carry_the_ldb_state(results):
    r0 = results[0]
    assert "acc/pytorch_model/ldb_state.pt" in r0["files"]  # Accelerate's DeepSpeed tag folder
    assert r0["saved_steps"] == 6 and r0["moved_on_steps"] == 8
    assert r0["restored"] == r0["saved"]
