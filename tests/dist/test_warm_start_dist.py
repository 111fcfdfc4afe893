"""Warm start of an LDB engine from a plain DeepSpeed checkpoint, on 2 real ranks (gloo).

A checkpoint saved by ``deepspeed.initialize`` without LDB holds optimizer state for other
param groups (the user's, not one per unit), so a full load is refused with the call to use
(tests/unit/test_bad_input_lib.py); ``engine.load_checkpoint(dir, load_module_only=True)``
loads the module weights, and training continues with a fresh optimizer and LDB state.
"""

from __future__ import annotations

import pytest
import torch

from tests.support.bad_input_workers import warm_start_from_plain_deepspeed
from tests.support.dist import run_distributed


STAGES = (0, 2, 3)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    directory = tmp_path_factory.mktemp("warm_start")
    return str(directory), run_distributed(warm_start_from_plain_deepspeed, 2, str(directory), STAGES, timeout=600)


@pytest.mark.parametrize("stage", STAGES)
def test_ldb_engine_warm_starts_from_a_plain_deepspeed_checkpoint(results, stage):
    directory, ranks = results
    for r in (rank[stage] for rank in ranks):
        assert r["path"] is not None and r["path"].startswith(directory)
        assert any(not torch.equal(r["saved"][n], r["initial"][n]) for n in r["saved"]), "the plain run trained nothing"
        for name, saved in r["saved"].items():
            assert torch.equal(r["loaded"][name], saved), f"{name}: the warm start did not load the saved weights"
        assert any(not torch.equal(r["trained"][n], r["loaded"][n]) for n in r["loaded"]), "training changed nothing"
        # A fresh LDB state: three applied steps counted from zero, two of them in DROP epochs.
        assert (r["steps"], r["drop_steps"]) == (3, 2)
        # Another tag than `latest`: loaded at ZeRO 0-2; at ZeRO-3 DeepSpeed would take `latest`'s
        # weights for it, so it is refused, naming both tags and zero_to_fp32.py.
        if stage == 3:
            assert "'plain'" in r["other_tag"] and "'first'" in r["other_tag"] and "zero_to_fp32.py" in r["other_tag"]
        else:
            assert r["other_tag"] == "loaded"
    for name in ranks[0][stage]["trained"]:
        assert torch.equal(ranks[0][stage]["trained"][name], ranks[1][stage]["trained"][name]), \
            f"ranks disagree on {name}"
