"""LDB exactness at ZeRO 0-3 on 2 real ranks (gloo), against an independent reference.

All cases run in one 2-rank process group (start-up dominates these tiny
runs); each test below checks one property of the recorded results.
"""

from __future__ import annotations

import pytest
import torch

from tests.support.checks import assert_grad_bytes_follow_mask
from tests.support.core_workers import run_cases
from tests.support.dist import run_distributed
from tests.support.reference_ldb import reference_run

STAGES = (0, 1, 2, 3)
PARITY = [{"stage": s, "optimizer": o} for s in STAGES for o in ("sgd", "adamw")]
EXTRA = [
    {"stage": 2, "optimizer": "sgd", "nesterov": True},
    {"stage": 1, "optimizer": "sgd", "gas": 2},
    {"stage": 3, "optimizer": "adamw", "gas": 2},
    {"stage": 2, "optimizer": "sgd", "clip": 0.05},   # clipping on: dropped units add nothing to the norm
    {"stage": 0, "optimizer": "sgd", "ldb": {"lr_policy": "inverse_keep", "resample": "epoch"}},
    {"stage": 1, "optimizer": "adamw", "ldb": {"batch_scaling": "accumulation"}},
    {"stage": 3, "optimizer": "sgd", "warmup": True},  # DeepSpeed's WarmupLR x the DROP factor
]
# DeepSpeed's own (C++) Adam in AdamW mode, stage 0 and 2: matches torch's documented AdamW rule
# to ~3e-7 after 9 steps (fp32 rounding of a fused kernel), and keeps a per-*group* step counter,
# which the untouched test checks too.
FUSED_ADAM = [{"stage": s, "optimizer": "adamw", "torch_adam": False} for s in (0, 2)]
BF16 = [{"stage": s, "optimizer": "sgd", "bf16": True} for s in STAGES]
AGREE = [{"stage": 2, "optimizer": "sgd", "rank_seeds": True, "ldb": {"drop_rate": 0.5}}]
CASES = PARITY + EXTRA + FUSED_ADAM + BF16 + AGREE
for c in CASES:
    c.update(snapshots=True, count_bytes=True)


def case_id(c):
    extra = [k for k in ("nesterov", "gas", "clip", "bf16", "rank_seeds", "ldb", "warmup") if k in c]
    if c.get("torch_adam") is False:
        extra.append("fused")
    return f"zero{c['stage']}-{c['optimizer']}" + "".join(f"-{k}{c[k] if k == 'gas' else ''}" for k in extra)


@pytest.fixture(scope="module")
def results():
    per_rank = run_distributed(run_cases, 2, CASES, timeout=900)
    return {case_id(c): (c, per_rank[0][i], per_rank[1][i]) for i, c in enumerate(CASES)}


def _get(results, case):
    return results[case_id(case)]


@pytest.mark.parametrize("case", PARITY + EXTRA[:5] + EXTRA[6:] + FUSED_ADAM, ids=case_id)
def test_parity_with_plain_pytorch_reference(results, case):
    _, r0, r1 = _get(results, case)
    ref = reference_run(case)
    got_masks = [rec["dropped"] for rec in r0["records"]]
    assert got_masks == ref["masks"], "ldb_ds drew other masks than the paper's rule with the same seed"
    assert any(got_masks), "no unit was ever dropped: the test would not exercise LDB"
    if case.get("warmup"):
        # The scheduler keeps its own (unscaled) values; the factor lives only inside the step.
        assert [rec["scheduler_lr"] for rec in r0["records"]] == pytest.approx(ref["scheduler_lrs"])
    for name, want in ref["final"].items():
        torch.testing.assert_close(r0["final"][name], want, rtol=1e-5, atol=1e-6, msg=f"{name} differs")
        assert torch.equal(r0["final"][name], r1["final"][name]), f"ranks disagree on {name}"


def test_parity_detects_a_wrong_update(results):
    """The parity tolerance is tight enough to see one skipped LR factor."""
    case = PARITY[2]  # zero1-sgd
    _, r0, _ = _get(results, case)
    ref = reference_run({**case, "ldb": {"kappa": 1.0}})
    diffs = [float((r0["final"][n] - w).abs().max()) for n, w in ref["final"].items()]
    assert max(diffs) > 1e-4


@pytest.mark.parametrize("case", PARITY + FUSED_ADAM + BF16, ids=case_id)
def test_dropped_units_untouched_by_the_step(results, case):
    _, r0, r1 = _get(results, case)
    drop_records = [rec for rec in r0["records"] + r1["records"] if rec["dropped"]]
    assert drop_records, "no DROP step with dropped units"
    for rec in drop_records:
        assert rec["dropped_untouched"] and all(rec["dropped_untouched"].values()), rec["dropped_untouched"]
        assert all(rec["kept_changed"].values()), "kept units must still train"
        keys = next(iter(rec["snapshot_keys"].values()))
        # The snapshot really covers the optimizer state, not just the weights.
        assert any("/state/" in k for k in keys), keys
        assert any(k.startswith("param/") for k in keys) and any("master" in k for k in keys)


@pytest.mark.parametrize("case", PARITY, ids=case_id)
def test_gradient_bytes_follow_the_mask(results, case):
    _, r0, _ = _get(results, case)
    assert_grad_bytes_follow_mask(r0["records"])


def test_ranks_with_different_seeds_drop_identical_units(results):
    _, r0, r1 = _get(results, AGREE[0])
    masks0 = [rec["dropped"] for rec in r0["records"]]
    masks1 = [rec["dropped"] for rec in r1["records"]]
    assert masks0 == masks1
    # Rank 1's own generator would have drawn something else: the broadcast is what makes them agree.
    first_drop = next(rec for rec in r0["records"] if rec["mode"] == "DROP")
    own = tuple(i for i, d in enumerate(r1["own_first_draw"]) if d)
    own0 = tuple(i for i, d in enumerate(r0["own_first_draw"]) if d)
    assert own0 == first_drop["dropped"] and own != own0


@pytest.mark.parametrize("case", [EXTRA[1], EXTRA[2]], ids=case_id)
def test_mask_fixed_across_accumulation_window(results, case):
    _, r0, r1 = _get(results, case)
    windows_with_drops = 0
    for rec in r0["records"] + r1["records"]:
        assert len(rec["micro_masks"]) == 2
        assert rec["micro_masks"][0] == rec["micro_masks"][1] == rec["dropped"]
        assert rec["micro_flags"][0] == rec["micro_flags"][1]
        windows_with_drops += bool(rec["dropped"])
    assert windows_with_drops > 0


def test_resample_per_epoch_keeps_one_mask(results):
    _, r0, _ = _get(results, EXTRA[4])
    drop = [rec["dropped"] for rec in r0["records"] if rec["mode"] == "DROP"]
    assert len(drop) == 3 and len(set(drop)) == 1


def test_accumulation_batch_scaling(results):
    _, r0, _ = _get(results, EXTRA[5])
    for rec in r0["records"]:
        assert rec["per_rank_batch"] == 4  # micro batch unchanged; DeepSpeed's gas doubles instead
        assert len(rec["micro_masks"]) == (2 if rec["mode"] == "DROP" else 1)
    assert r0["counts"][:2] == (9, 3)


def test_running_counts(results):
    _, r0, _ = _get(results, PARITY[0])
    steps, drop_steps, dropped_unit_steps = r0["counts"]
    assert steps == 9 and drop_steps == 3
    assert dropped_unit_steps == sum(len(rec["dropped"]) for rec in r0["records"])
    for rec in r0["records"]:
        assert (rec["kept_param_fraction"] < 1.0) == bool(rec["dropped"])


@pytest.mark.parametrize("stage", STAGES)
def test_checkpoint_resume_matches_uninterrupted_run(tmp_path, stage):
    from tests.support.core_workers import checkpoint_case

    r0, r1 = run_distributed(checkpoint_case, 2, stage, str(tmp_path), timeout=600)
    for r in (r0, r1):
        assert r["resumed_epoch"] == 1 and "layer_drop_back" in r["client_keys"]
        assert r["masks_b"] == r["masks_a"][4:], "resumed run drew other masks"
        assert any(r["masks_b"]), "no drops after resume: the test would not exercise the generator state"
        for a, b in zip(r["final_a"], r["final_b"]):
            assert torch.equal(a, b)
        assert r["counts_b"] == (8, 6)
        # After the save the dropped units are frozen again (the mask survives the save).
        assert r["mask_at_save"] and not all(r["flags_after_save"])


RESUME_VARIANTS = [{"resample": r, "scaling": sc, "set_epoch": True} for r in ("epoch", "step")
                   for sc in ("accumulation", "micro_batch")] + [
                  {"resample": "epoch", "scaling": "accumulation", "set_epoch": False}]


def test_resume_inside_a_drop_epoch_matches_uninterrupted_run(tmp_path):
    """A checkpoint after the first window of a DROP epoch, loaded into a fresh engine whose loop
    calls set_epoch for that epoch again (or not at all): the same masks, the DROP batch at once,
    bitwise the same weights; with resample "epoch" the epoch's one mask continues, not a new draw."""
    from tests.support.core_workers import mid_epoch_resume_case

    r0, r1 = run_distributed(mid_epoch_resume_case, 2, str(tmp_path), RESUME_VARIANTS, timeout=600)
    for r in (r0, r1):
        for name, v in r.items():
            # masks_a[4:]: epoch 1 from window 1 on, then epoch 2 (epoch 0: 3 windows; window 0 of 1)
            assert v["masks_b"] == v["masks_a"][4:], (name, v["masks_a"], v["masks_b"])
            assert any(m[2] for m in v["masks_b"]), name  # the resumed windows drop something
            assert v["bitwise"], name
            # DeepSpeed's sample count (Train/Samples x-axis, saved in checkpoints) is what was
            # trained: 3 windows of 2 x 4 samples in FULL, twice that per DROP window, either scaling.
            assert v["samples"] == (120, 120), (name, v["samples"])
    assert r0 == r1 or all(r0[n]["masks_b"] == r1[n]["masks_b"] for n in r0)  # every rank drops the same


def test_disabled_is_plain_deepspeed_with_the_same_api():
    from tests.support.core_workers import baseline_case

    r0, _ = run_distributed(baseline_case, 2, timeout=300)
    assert r0["groups"] == 1  # the user's single group, not split by unit
    assert r0["modes"] == [("FULL", (), 4)] * 3


def test_batched_group_norm_equals_deepspeeds_per_group_norm():
    from tests.support.core_workers import grad_norm_case

    r0, r1 = run_distributed(grad_norm_case, 2, timeout=300)
    for r in (r0, r1):
        (full_ours, full_ds, full_calls, full_dropped, full_grad_bytes), \
            (drop_ours, drop_ds, drop_calls, drop_dropped, drop_grad_bytes) = r["norms"]
        assert full_dropped == () and drop_dropped != ()
        assert full_grad_bytes == drop_grad_bytes == 0
        assert full_ours == full_ds and drop_ours == drop_ds  # bitwise: same arithmetic, one collective
        assert full_calls == drop_calls == 1


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_control_naive_freeze_moves_the_layer_under_zero(stage):
    """Without ldb_ds, freezing after initialize does not keep a layer still at ZeRO 1-3.

    This is why the untouched tests above can fail: the same check on plain DeepSpeed sees the
    frozen layer move (momentum and weight decay applied to a zero-filled gradient).
    """
    from tests.support.core_workers import naive_freeze_case

    r0, r1 = run_distributed(naive_freeze_case, 2, stage, timeout=300)
    assert r0["moved"] == r1["moved"] == [True, True]
