"""The store's trust rules in memory: the checkpoint chain, cache checks, crash loops."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from crux_workers._engine import Engine
from crux_workers._store import _lifecycle as life
from crux_workers._store._cache import MemoryStepCache
from crux_workers._store._memory import MemoryStore
from crux_workers._store._types import Checkpoint, Claimed


def test_the_checkpoint_encoding_is_unambiguous() -> None:
    base = life.cp_digest(1, "step", "a\n2", 0, "x")
    assert base != life.cp_digest(1, "step", "a", 0, "2\nx")
    assert base != life.cp_digest(1, "step", "a\n2", 0, "x ")
    assert life.cp_digest(0, "step", "s", 0, '"\\ud800"') != life.cp_digest(
        0, "step", "s", 0, '"\\ud801"'
    )
    assert len(base) == 64 and base == life.cp_digest(1, "step", "a\n2", 0, "x")


def test_the_chain_starts_at_checkpoint_zero_and_an_old_row_keeps_none() -> None:
    first = life.next_digest(None, 0, "step", "s", 0, "1")
    assert first == life.chain_link(life.EMPTY_HISTORY, life.cp_digest(0, "step", "s", 0, "1"))
    assert life.next_digest("anything", 0, "step", "s", 0, "1") == first
    assert first is not None
    second = life.next_digest(first, 1, "step", "t", 0, "2")
    assert second is not None and second != first
    assert life.next_digest(None, 1, "step", "t", 0, "2") is None


def _engine(store: MemoryStore, cache: MemoryStepCache) -> Engine:
    def lookup(name: str) -> Any:
        raise AssertionError(name)

    return Engine(store, cache, lookup)


def _two_checkpoints(store: MemoryStore) -> Claimed:
    store.create_flow("f", "demo", "{}")
    got = store.claim("f", "w", 10)
    assert isinstance(got, Claimed)
    for seq, result in enumerate(["false", '"x"']):
        cp = Checkpoint(seq, "step", f"s{seq}", 0, result)
        store.commit_checkpoint(got.lease, cp, started_at=store.now(), attempts=1, ttl=10)
    store.release(got.lease)
    again = store.claim("f", "w", 10)
    assert isinstance(again, Claimed) and again.next_seq == 2
    return again


def test_a_matching_cache_is_used_and_a_tampered_one_is_a_miss(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store, cache = MemoryStore(), MemoryStepCache()
    claimed = _two_checkpoints(store)
    record = store.load_checkpoints("f")
    cache.fill("f", record)
    engine = _engine(store, cache)
    assert engine.load_history("f", 2, claimed.history_digest) == record
    cache.fill("f", [Checkpoint(0, "step", "s0", 0, "true")])
    with caplog.at_level(logging.WARNING, logger="crux_workers"):
        assert engine.load_history("f", 2, claimed.history_digest) == record
    assert any("do not match the record" in r.getMessage() for r in caplog.records)
    assert cache.load("f")[0].result == "false", "the cache is refilled from the record"
    # No digest (a row from before digests): the cache is never trusted.
    cache.fill("f", [Checkpoint(0, "step", "s0", 0, "true")])
    assert engine.load_history("f", 2, None) == record


def test_progress_resets_the_lapses_so_only_consecutive_deaths_park() -> None:
    assert life.lapses_after_claim(None, 2) == 2 and life.lapses_after_claim("w", 2) == 3
    assert life.parks(5, 5) and not life.parks(4, 5) and not life.parks(99, None)
    assert "parked after 5 executions" in life.crash_loop_error(5)
