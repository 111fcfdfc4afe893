"""ldb_ds's own ZeRO step loops (ldb_ds.zero_hooks.zero12_step, zero3_step) against DeepSpeed's, on 2 real ranks (gloo).

The exactness tests of tests/dist/test_core_dist.py (parity with a plain PyTorch reference,
dropped units bitwise untouched, exact gradient bytes, checkpoint/resume) already run with these
loops, since ldb_ds installs them by default. Here: the replacement gives bitwise DeepSpeed's own
result on the same gradients, step after step, FULL and DROP, and a FULL step issues the same
collectives as plain DeepSpeed with one param group (docs/design.md, section 4).
"""

from __future__ import annotations

import pytest
import torch

from tests.support.dist import run_distributed
from tests.support.step_workers import allgather_case, baseline_collectives, run_equivalence

ZERO12 = [{"stage": s, "optimizer": o, **({"bf16": True} if bf16 else {})}
          for s in (1, 2) for o in ("sgd", "adamw") for bf16 in (False, True)]
EXTRA = [
    {"stage": 2, "optimizer": "sgd", "clip": 0.05},        # clipping: the combined scale is not 1
    {"stage": 1, "optimizer": "adamw", "clip": 0.05, "bf16": True},
    {"stage": 2, "optimizer": "sgd", "poison_step": 2},    # an overflow (inf gradients) skips the step
    {"stage": 3, "optimizer": "sgd"},
    {"stage": 3, "optimizer": "adamw", "bf16": True},
    {"stage": 3, "optimizer": "sgd", "clip": 0.05},
    # Param groups split into several ZeRO-3 sub-groups: one call with several partitions per
    # group (SGD), or one call per sub-group for an optimizer whose groups are not merged.
    {"stage": 3, "optimizer": "sgd", "sub_group_size": 100},
    {"stage": 3, "optimizer": "rmsprop", "sub_group_size": 100},
]
STALE = [{"stage": 2, "optimizer": "sgd", "stale_source": True}, {"stage": 3, "optimizer": "sgd", "stale_source": True}]
CASES = ZERO12 + EXTRA + STALE


def case_id(c):
    return "-".join([f"zero{c['stage']}", c["optimizer"]] + [k for k in ("bf16", "clip", "poison_step", "stale_source",
                                                                      "sub_group_size") if k in c])


@pytest.fixture(scope="module")
def results():
    r0, r1 = run_distributed(run_equivalence, 2, CASES, timeout=900)
    return {case_id(c): (c, a, b) for c, a, b in zip(CASES, r0, r1)}


@pytest.mark.parametrize("case", ZERO12 + EXTRA, ids=case_id)
def test_ldb_step_is_bitwise_deepspeeds_step(results, case):
    _, r0, r1 = results[case_id(case)]
    expected = ("zero12_step",) if case["stage"] in (1, 2) else ("zero3_grad_norm", "zero3_optimizer_step", "zero3_step")
    assert r0["installed"] == expected
    if "sub_group_size" in case:
        assert r0["sub_groups"] > r0["groups"]  # some group really is split
    modes = [s["mode"] for s in r0["steps"]]
    assert "FULL" in modes and any(s["dropped"] for s in r0["steps"])
    for rank_steps in (r0["steps"], r1["steps"]):
        for s in rank_steps:
            assert s["same_mask"]
            # Weights, fp32 masters and optimizer state of every unit, and the gradient norm.
            assert s["equal"], (s["mode"], s["dropped"], s["differing"])
            assert s["norm_equal"]
    if case["optimizer"] == "adamw":
        assert r0["steps"][0]["state_keys"] > 0  # the comparison covers optimizer state


def test_overflow_is_skipped_as_deepspeed_skips_it(results):
    _, r0, _ = results[case_id(EXTRA[2])]
    skipped = [s["skipped"] for s in r0["steps"]]
    assert skipped[1] == (0, 0) and skipped[2] == (1, 1) and skipped[-1] == (1, 1)
    # No all-gather after a skipped step, in either loop.
    assert "all_gather_into_tensor" not in r0["steps"][2]["calls_ours"]
    assert "all_gather_into_tensor" not in r0["steps"][2]["calls_theirs"]


@pytest.mark.parametrize("case", ZERO12[:1] + EXTRA[3:4], ids=case_id)
def test_one_collective_where_deepspeed_issues_one_per_group(results, case):
    _, r0, _ = results[case_id(case)]
    kind = "all_gather_into_tensor" if case["stage"] in (1, 2) else "all_reduce"
    for s in r0["steps"]:
        if case["stage"] in (1, 2):
            assert s["calls_ours"][kind] == 1  # all kept groups in one all-gather
            assert s["calls_theirs"][kind] == 6 - len(s["dropped"])  # one per kept group
        else:
            assert s["calls_ours"][kind] == 1 and s["calls_theirs"][kind] == 6  # the norm, once per sub-group


def test_stale_deepspeed_source_keeps_deepspeeds_own_loops(results):
    # ZeRO-1/2's step() and ZeRO-3's norm and step() "changed": those stay DeepSpeed's; ZeRO-3's
    # optimizer call mirrors another function, still as verified.
    for case, left in zip(STALE, [(), ("zero3_optimizer_step",)]):
        _, r0, _ = results[case_id(case)]
        assert r0["installed"] == left
        assert all(s["equal"] for s in r0["steps"])


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_full_step_collectives_match_plain_deepspeed(stage):
    r0, _ = run_distributed(baseline_collectives, 2, stage, timeout=300)
    assert r0["ldb_groups"] == 8 and r0["baseline_groups"] == 1
    assert r0["ldb_full"] == r0["baseline_full"], r0
    assert r0["ldb_drop_dropped"]  # the DROP step dropped units, and still issued no more collectives
    assert all(r0["ldb_drop"].get(k, 0) <= n for k, n in r0["ldb_full"].items()), r0


@pytest.mark.parametrize("sizes,bucket,calls", [([3, 5, 2, 8], 10**9, 1), ([3, 5, 2, 8], 16, 3), ([40, 3], 16, 2)],
                         ids=["one-bucket", "buckets", "big-group-in-place"])
def test_coalesced_allgather_gives_deepspeeds_buffers(sizes, bucket, calls):
    for r in run_distributed(allgather_case, 2, sizes, bucket, timeout=120):
        for ours, theirs in zip(r["ours"]["flats"], r["deepspeed"]["flats"]):
            assert torch.equal(ours, theirs)
        assert r["deepspeed"]["calls"] == {"all_gather_into_tensor": len(sizes)}
        assert r["ours"]["calls"] == {"all_gather_into_tensor": calls} and r["ours"]["returned"] == calls
