"""Pure schedule rules: epoch mode, LR and batch factors, the mask draw."""

import random

import pytest

from ldb_ds.config import LDBConfig
from ldb_ds.schedule import Mode, batch_factor, draw_dropped, epoch_mode, kept_fraction, lr_factor, \
    sampleable_range


def cfg(**kw):
    return LDBConfig(enabled=True, **kw)


def test_epoch_mode_follows_the_paper():
    c = cfg(sampling_rate=2)
    assert [epoch_mode(e, c).value for e in range(6)] == ["FULL", "FULL", "DROP", "FULL", "DROP", "FULL"]
    c1 = cfg(sampling_rate=1)
    assert [epoch_mode(e, c1) for e in range(3)] == [Mode.FULL, Mode.DROP, Mode.DROP]
    assert epoch_mode(2, LDBConfig(enabled=False)) is Mode.FULL
    with pytest.raises(ValueError, match="epoch must be an integer >= 0, got -1"):
        epoch_mode(-1, c)
    for wrong in (1.5, True, "2", None):  # refused, not truncated or converted
        with pytest.raises(TypeError, match="epoch must be an integer"):
            epoch_mode(wrong, c)


def test_lr_and_batch_factors():
    assert lr_factor(Mode.DROP, cfg(kappa=2.0)) == 2.0
    assert lr_factor(Mode.DROP, cfg(lr_policy="inverse_keep", drop_rate=0.3)) == pytest.approx(1 / 0.7)
    assert lr_factor(Mode.DROP, cfg(lr_policy="none")) == 1.0
    assert lr_factor(Mode.FULL, cfg(kappa=3.0)) == 1.0
    assert batch_factor(Mode.DROP, cfg(batch_kappa=2)) == 2 and batch_factor(Mode.FULL, cfg()) == 1


def test_keep_first_and_last_never_dropped():
    c = cfg(drop_rate=0.99, keep_first=2, keep_last=1)
    assert sampleable_range(6, c) == range(2, 5)
    for seed in range(50):
        d = draw_dropped(random.Random(seed), 6, c)
        assert d[:2] == [False, False] and d[-1] is False


def test_draw_is_seeded_and_has_rate_p():
    c = cfg(drop_rate=0.3, keep_first=1, keep_last=0)
    assert draw_dropped(random.Random(5), 21, c) == draw_dropped(random.Random(5), 21, c)
    rng = random.Random(0)
    draws = [x for _ in range(500) for x in draw_dropped(rng, 21, c)[1:]]  # unit 0 is kept
    assert abs(sum(draws) / len(draws) - 0.3) < 0.02


def test_kept_fraction():
    assert kept_fraction([False, True, False, True]) == 0.5
    assert kept_fraction([False, True], [3, 1]) == 0.75
