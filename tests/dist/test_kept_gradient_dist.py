"""A DROP step whose first kept unit gets no gradient is stopped before its update (ldb_ds.kept_gradient).

Reentrant activation checkpointing behind a dropped first unit (``keep_first=0``) gives a
checkpointed segment's weights no gradient; without the check the kept blocks would be stepped
with momentum and weight decay alone. Real DeepSpeed engines at ZeRO 0, 2 and 3 on 2 gloo ranks.
"""

from __future__ import annotations

import pytest
import torch

from tests.support import kept_gradient_workers as W
from tests.support.dist import run_distributed

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_reentrant_checkpointing_behind_a_dropped_first_unit_stops_before_the_update(stage):
    r0, r1 = run_distributed(W.run, 2, stage, "reentrant", timeout=300)
    for r in (r0, r1):
        assert r["error"] is not None, r["masks"]  # the seed's masks drop the first unit within 6 steps
        assert "'blocks.0.0'" in r["error"] and "use_reentrant=False" in r["error"], r["error"]
        assert 0 in r["masks"][-1]  # the failing window dropped the first unit
        assert r["unchanged_by_failed_step"]  # no update was applied
    assert r0["error_step"] == r1["error_step"] and r0["masks"] == r1["masks"]  # every rank stops at once


@pytest.mark.parametrize("stage", [0, 2])
def test_non_reentrant_checkpointing_passes_the_check_and_trains_as_without(stage):
    plain = run_distributed(W.run, 2, stage, "none", timeout=300)
    checkpointed = run_distributed(W.run, 2, stage, "non-reentrant", timeout=300)
    for r in plain + checkpointed:
        assert r["error"] is None
        assert r["first_dropped_windows"] >= 2  # the check was armed, and passed, in several windows
        assert r["hooks_left"] == 0  # every hook it registered is gone
    for a, b in zip(plain, checkpointed):
        assert a["masks"] == b["masks"]
        assert all(torch.equal(x, y) for x, y in zip(a["weights"], b["weights"]))
