"""A DROP step whose first kept unit gets no gradient is stopped before its update (ldb_ds.kept_gradient).

Reentrant activation checkpointing behind a dropped first unit (``keep_first=0``) gives a
checkpointed segment's weights no gradient; without the check the kept blocks would be stepped
with momentum and weight decay alone. Real DeepSpeed engines at ZeRO 0-3 on 2 gloo ranks.
"""

from __future__ import annotations

import pytest
import torch

from tests.support import kept_gradient_workers as W
from tests.support.dist import run_distributed

pytestmark = pytest.mark.slow

REENTRANT = [{"stage": s, "checkpointing": "reentrant"} for s in (0, 2, 3)]


def test_reentrant_checkpointing_behind_a_dropped_first_unit_stops_before_the_update():
    r0, r1 = run_distributed(W.run_cases, 2, REENTRANT, timeout=400)
    for case, a, b in zip(REENTRANT, r0, r1):
        for r in (a, b):
            assert r["error"] is not None, (case, r["masks"])  # the seed's masks drop the first unit within 6 steps
            assert "'blocks.0.0'" in r["error"] and "use_reentrant=False" in r["error"], r["error"]
            assert 0 in r["masks"][-1], case  # the failing window dropped the first unit
            assert r["retry"] == "refused", case  # a loop that catches the error cannot step the window
            assert r["unchanged_by_failed_step"], case  # no update was applied, retry included
            assert r["hooks_left"] == 0, case
        assert a["error_step"] == b["error_step"] and a["masks"] == b["masks"], case  # every rank stops at once


def test_a_unit_unused_on_one_rank_stops_every_rank_at_the_same_step():
    """Rank 1's model skips the first block (as a data-dependent branch could): its first kept unit
    gets no gradient there only. The ranks agree (one byte over gloo), so both raise at the same step
    instead of rank 1 raising while rank 0 waits in the next collective."""
    r0, r1 = run_distributed(W.run, 2, 0, "none", 1, False, True, timeout=300)
    assert r0["error"] is not None and r1["error"] is not None, (r0["masks"], r1["masks"])
    assert r0["error_step"] == r1["error_step"] and "on this rank or another" in r0["error"]


NO_FALSE_ALARM = [{"stage": s} for s in (0, 1, 2, 3)] + [{"stage": 3, "gas": 2}, {"stage": 1, "torch_style": True}]


def test_non_reentrant_checkpointing_passes_the_check_and_trains_as_without():
    cases = [{**c, "checkpointing": ck} for c in NO_FALSE_ALARM for ck in ("none", "non-reentrant")]
    per_rank = run_distributed(W.run_cases, 2, cases, timeout=600)
    for results in per_rank:
        for case, r in zip(cases, results):
            assert r["error"] is None, (case, r["error"])
            assert r["first_dropped_windows"] >= 2, case  # the check was armed, and passed, in several windows
            assert r["hooks_left"] == 0, case  # every hook it registered is gone
        for plain, checkpointed in zip(results[0::2], results[1::2]):
            assert plain["masks"] == checkpointed["masks"]
            assert all(torch.equal(a, b) for a, b in zip(plain["weights"], checkpointed["weights"]))
