"""Fixtures shared by the unit tests."""

from __future__ import annotations

import pytest

from ldb_ds.process import free_port


@pytest.fixture
def single_rank_env(monkeypatch):
    """What a launcher sets for one rank. Were a refusal missing, ``deepspeed.initialize`` would
    build a real 1-rank engine (and the test fail on the missing error) instead of waiting on a
    rendezvous."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    for key in ("RANK", "LOCAL_RANK"):
        monkeypatch.setenv(key, "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
