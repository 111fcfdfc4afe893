"""fp16 with dynamic loss scaling on one GPU (world size 1): forced overflows at ZeRO 0-3.

Run by scripts/gpu_check.sh (``DS_ACCELERATOR=cuda``; tests/conftest.py defaults to DeepSpeed's
CPU accelerator). Skipped where DeepSpeed's accelerator reports no fp16 support, which is probed,
not assumed: on an AMD EPYC the CPU accelerator's ``is_fp16_supported()`` is falsy; on an Intel Xeon
with AVX512-FP16 it is true, and all seven cases run (and passed, 2026-12-05) in the CPU suite. bf16 with skipped steps is
tested on the CPU at world size 2 (tests/dist/test_field_dist.py); plain fp32/bf16 parity on the
GPU is tests/gpu/test_ws1_parity.py.

What is checked, following DeepSpeed 0.19.8's code paths (docs/design.md, section 4):

* stage 0 with SGD is FP16_UnfusedOptimizer; with DeepSpeed's FusedAdam it is FP16_Optimizer
  (``fp16/fused_optimizer.py:256``). DeepSpeed 0.19.8's ``engine.backward`` does not scale the
  loss for either (only for ZeRO optimizers), while both divide the gradients by the loss scale:
  without ``zero_hooks.zero0_step.install_fp16_loss_scaling`` every stage-0 update is 256 times too
  small here (issue 16, item 6: distance 0.312 against 0.113 for the known-wrong run; the same
  numbers on the CPU, tests/dist/test_zero_step_dist.py::test_zero0_fp16_loss_is_scaled_as_the_step_expects).
  Both detect the overflow before calling the basic optimizer
  (``_skip_invalid_grad_norm``), so ldb_ds's step filter (hidden dropped groups, DROP LR factor)
  is never entered: nothing moves, no factor is left in the groups' ``lr``;
* ZeRO 1/2 (``stage_1_and_2.py:3013``) and ZeRO 3 (``stage3.py:2873``) return before
  ``_optimizer_step`` likewise;
* DeepSpeed counts the skip (``skipped_steps``, ``was_step_applied()`` False); ldb_ds counts it
  in ``engine.ldb.skipped_steps``, not in ``steps``, and the next window draws the next mask;
* the weights match the plain mixed-precision reference that skips the same windows, far closer
  than a run with one missed DROP LR factor;
* ``zero3-sgd-stale``: ZeRO 3's fp16 overflow check reads its whole gradient partition buffer
  (``stage3.py:3013``), where a dropped unit keeps the inf of an earlier skipped step. The case
  overflows once at the last FULL step, then drops units for a whole DROP epoch (one mask per
  epoch); without ``zero_hooks.clear_stale_gradient_partitions`` every step of that epoch would
  be skipped too.
"""

from __future__ import annotations

import pytest
import torch
from deepspeed.accelerator import get_accelerator

from tests.support.core_workers import train_case
from tests.support.dist import run_distributed
from tests.support.reference_ldb import reference_run

ACCEL = get_accelerator()
pytestmark = pytest.mark.skipif(
    not ACCEL.is_fp16_supported(),
    reason=f"DeepSpeed's {ACCEL.device_name()!r} accelerator has no fp16 support here (is_fp16_supported() = "
           f"{ACCEL.is_fp16_supported()!r}); run on a GPU with DS_ACCELERATOR=cuda (scripts/gpu_check.sh)")

OVERFLOW = (2, 7)  # a FULL step and a DROP step of 9 (epochs FULL, FULL, DROP)
CASES = [{"stage": s, "optimizer": "sgd", "fp16": True, "overflow_steps": OVERFLOW} for s in (0, 1, 2, 3)] + [
    {"stage": 2, "optimizer": "adamw", "fp16": True, "overflow_steps": OVERFLOW},
    # Stage 0 with DeepSpeed's FusedAdam: FP16_Optimizer instead of FP16_UnfusedOptimizer.
    {"stage": 0, "optimizer": "adamw", "torch_adam": False, "fp16": True, "overflow_steps": OVERFLOW},
    # Overflow at the last FULL step (5), then one mask for the whole DROP epoch (steps 6-8).
    {"stage": 3, "optimizer": "sgd", "fp16": True, "overflow_steps": (5,), "ldb": {"resample": "epoch"},
     "stale": True},
]
for c in CASES:
    c["snapshots"] = True


def case_id(c):
    extra = "-fusedadam" if c.get("torch_adam") is False else "-stale" if c.get("stale") else ""
    return f"zero{c['stage']}-{c['optimizer']}{extra}"


def fp16_cases(rank: int, cases: list[dict]) -> list[dict]:
    """All cases in one process (start-up dominates); a case whose optimizer cannot be built is marked."""
    out = []
    for case in cases:
        if case.get("torch_adam") is False:
            # DeepSpeed's FusedAdam is an extension of the accelerator, built on first use: on a GPU
            # it needs nvcc (and about a minute), unless the installed DeepSpeed has it prebuilt.
            builder = get_accelerator().create_op_builder("FusedAdamBuilder")
            if builder is None or not builder.is_compatible(verbose=False):
                out.append({"unavailable": "DeepSpeed's FusedAdam is not compatible with this machine"})
                continue
            try:
                builder.load(verbose=False)
            except Exception as err:  # noqa: BLE001 - reported as the skip reason
                out.append({"unavailable": f"DeepSpeed's FusedAdam cannot be built here: {type(err).__name__}: "
                                           f"{str(err)[:300]}"})
                continue
        out.append(train_case(rank, case))
    return out


@pytest.fixture(scope="module")
def results():
    (per_case,) = run_distributed(fp16_cases, 1, CASES, timeout=300, accelerator=ACCEL.device_name())
    return {case_id(c): r for c, r in zip(CASES, per_case)}


def _reference(case):
    # ZeRO-0's FP16 wrappers step the optimizer once with zero gradients when they are built.
    return reference_run(case, world_size=1, device=ACCEL.current_device_name(), dtype=torch.float16,
                         zero_grad_step_at_init=case["stage"] == 0)


def _distance(a, b):
    return sum(float((a[n].float().cpu() - b[n].float().cpu()).pow(2).sum()) for n in b) ** 0.5


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_fp16_overflow_skips_are_exact(results, case):
    r = results[case_id(case)]
    if "unavailable" in r:
        pytest.skip(r["unavailable"])
    records = r["records"]
    skipped = list(case["overflow_steps"])
    assert [i for i, rec in enumerate(records) if not rec["applied"]] == skipped
    assert r["skipped"] == (len(skipped), len(skipped))  # ldb_ds's count, DeepSpeed's skipped_steps
    assert r["counts"][0] == len(records) - len(skipped)
    for i, rec in enumerate(records):
        assert rec["group_lrs_after"] == [rec["scheduler_lr_after"]], (i, rec["group_lrs_after"])
        if i in skipped:
            assert all(rec["dropped_untouched"].values()) and all(rec["kept_untouched"].values()), i
        elif rec["dropped"]:
            assert all(rec["dropped_untouched"].values()) and all(rec["kept_changed"].values()), i
    ref = _reference(case)
    assert [rec["dropped"] for rec in records] == ref["masks"] and any(ref["masks"])
    # fp16 kernels may round differently here and there, and Adam turns a tiny gradient difference
    # near zero into a full step: the distance to the reference is measured against that of a
    # known-wrong run (one missed DROP-epoch LR factor), as in tests/gpu/test_ws1_parity.py.
    wrong = _reference({**case, "ldb": {**case.get("ldb", {}), "kappa": 1.0}})
    d_ok, d_wrong = _distance(r["final"], ref["final"]), _distance(wrong["final"], ref["final"])
    assert d_wrong > 0.01, "the known-wrong run must differ clearly, or this check could not fail"
    assert d_ok < 0.1 * d_wrong, (d_ok, d_wrong)
    if case.get("stale"):
        drop = [rec for rec in records if rec["mode"] == "DROP"]
        assert drop[0]["dropped"] and all(rec["applied"] for rec in drop), [rec["applied"] for rec in drop]
