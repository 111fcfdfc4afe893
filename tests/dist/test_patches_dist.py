"""Every change ldb_ds makes to DeepSpeed's objects is owned by one Installation and comes off (issue 17, item 2).

After ``destroy()`` no ldb_ds callable (and no ``_ldb_*`` marker) remains on DeepSpeed's engine,
its optimizers, its modules' hooks or the module-level functions ldb_ds swaps; and an engine whose
patches were removed mid-run steps bitwise as plain DeepSpeed does over the same param groups.
Two real gloo ranks, ZeRO 0-3 (fp32, and bf16 at ZeRO-0 where ldb_ds's own wrapper step runs),
and an engine given LDB by ``ldb_ds.attach`` (the Hugging Face path).
"""

from __future__ import annotations

import pytest

from tests.support import patches_workers as W
from tests.support.dist import run_distributed

CASES = [{"stage": s, "optimizer": "sgd"} for s in (0, 1, 2, 3)] + [{"stage": 0, "optimizer": "adamw", "bf16": True}]


@pytest.fixture(scope="module")
def results():
    return run_distributed(W.run, 2, CASES, [2], timeout=600)


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"zero{c['stage']}{'-bf16' if c.get('bf16') else ''}"
                                                          for c in CASES])
def test_destroy_leaves_no_ldb_ds_patch(results, index):
    for rank in results:
        r = rank["cases"][index]
        assert r["mode"] == "DROP"  # the step before destroy() dropped units: the step state was used
        assert r["installed"] and any("step filter" in d for d in r["installed"]), r["installed"]
        assert r["before_destroy"], "the leftover finder must see the installed patches (else it proves nothing)"
        assert r["after_destroy"] == [], r["after_destroy"]
        assert r["after_remove"] == [], r["after_remove"]
        assert r["all_trainable_after"]  # the DROP mask was released: no parameter left frozen


@pytest.mark.parametrize("index", range(len(CASES)), ids=[f"zero{c['stage']}{'-bf16' if c.get('bf16') else ''}"
                                                          for c in CASES])
def test_engine_without_patches_steps_as_plain_deepspeed(results, index):
    for rank in results:
        # Two LDB FULL steps (bitwise DeepSpeed's loops), then two with every patch removed.
        assert rank["cases"][index]["bitwise_each_step"] == [True] * 4


def test_attached_engine_destroy_takes_every_patch_off(results):
    for rank in results:
        r = rank["attach"][0]
        assert r["mode"] == "DROP"
        assert any("attach: step protocol" in d for d in r["installed"]) and r["before"], r
        assert r["after"] == [], r["after"]
