"""One contract, every backend: the in-memory reference, SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from crux_workers import FlowAlreadyFinished, FlowNotFound, FlowNotWaiting
from crux_workers._store._memory import MemoryStore
from crux_workers._store._migrate import upgrade
from crux_workers._store._sql import SqlStore
from crux_workers._store._types import (
    Checkpoint,
    Claimed,
    CruxStore,
    Lease,
    Suspension,
    SweepResult,
)
from crux_workers.errors import LeaseLost


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture(params=["memory", "sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[CruxStore, Clock]]:
    clock = Clock()
    s: CruxStore
    if request.param == "memory":
        s = MemoryStore(clock=clock)
    else:
        url = (
            f"sqlite:///{tmp_path}/contract.db"
            if request.param == "sqlite"
            else request.getfixturevalue("pg_url")
        )
        sql = SqlStore(url, clock=clock)
        upgrade(sql.engine)
        s = sql
    yield s, clock
    s.close()


def _claim(s: CruxStore, flow_id: str, owner: str = "w", ttl: float = 10) -> Lease:
    got = s.claim(flow_id, owner, ttl)
    assert isinstance(got, Claimed), got
    return got.lease


def _cp(seq: int, name: str = "s", result: str = "1") -> Checkpoint:
    return Checkpoint(seq, "step", name, 0, result)


def accept(payload: str) -> str:
    return payload


def test_create_is_idempotent(store: tuple[CruxStore, Clock]) -> None:
    s, _ = store
    row, created = s.create_flow("f", "demo", '{"a":1}')
    assert created and row.status == "pending" and row.wake_kind == "run"
    again, created_again = s.create_flow("f", "demo", '{"a":2}')
    assert not created_again and again.input == '{"a":1}'


def test_claim_refusals(store: tuple[CruxStore, Clock]) -> None:
    s, _ = store
    assert s.claim("nope", "w", 10).reason == "missing"  # type: ignore[union-attr]
    s.create_flow("f", "demo", "{}")
    lease = _claim(s, "f")
    busy = s.claim("f", "other", 10)
    assert busy.reason == "busy" and busy.retry_after == pytest.approx(10)  # type: ignore[union-attr]
    assert s.take_signal_or_suspend(lease, Suspension(0, "go", 0, None), accept, 10) == "suspended"
    assert s.claim("f", "w", 10).reason == "idle"  # type: ignore[union-attr]
    s.request_resume("f")
    lease = _claim(s, "f")
    s.finish(lease, "completed", result="null")
    assert s.claim("f", "w", 10).reason == "finished"  # type: ignore[union-attr]


def test_each_claim_bumps_the_epoch_and_fences_the_previous(
    store: tuple[CruxStore, Clock],
) -> None:
    s, clock = store
    s.create_flow("f", "demo", "{}")
    old = _claim(s, "f", ttl=5)
    s.commit_checkpoint(old, _cp(0), started_at=clock(), attempts=1, ttl=5)
    clock.now += timedelta(seconds=6)
    new = _claim(s, "f")
    assert new.epoch == old.epoch + 1
    with pytest.raises(LeaseLost):
        s.commit_checkpoint(old, _cp(1), started_at=clock(), attempts=1, ttl=5)
    assert not s.renew(old, 5)
    assert s.renew(new, 5)
    s.commit_checkpoint(new, _cp(1, "t"), started_at=clock(), attempts=1, ttl=5)
    assert [c.seq for c in s.load_checkpoints("f")] == [0, 1]
    with pytest.raises(LeaseLost):
        s.finish(old, "completed", result="1")


def test_signals_wait_for_their_suspend_in_arrival_order(store: tuple[CruxStore, Clock]) -> None:
    s, _ = store
    s.create_flow("f", "demo", "{}")
    a = s.record_signal("f", "n", '"first"', None)
    b = s.record_signal("f", "n", '"second"', None)
    assert not a.wake and b.signal_id > a.signal_id
    lease = _claim(s, "f")
    one = s.take_signal_or_suspend(lease, Suspension(0, "n", 0, None), accept, 10)
    two = s.take_signal_or_suspend(lease, Suspension(1, "n", 1, None), accept, 10)
    assert isinstance(one, Checkpoint) and isinstance(two, Checkpoint)
    assert (one.result, two.result) == ('"first"', '"second"')
    assert s.take_signal_or_suspend(lease, Suspension(2, "n", 2, None), accept, 10) == "suspended"
    woke = s.record_signal("f", "n", '"third"', None)
    assert woke.wake
    assert s.record_signal("f", "other", "1", None).wake is False


def test_rejected_payloads_are_marked_and_skipped(store: tuple[CruxStore, Clock]) -> None:
    s, _ = store
    s.create_flow("f", "demo", "{}")
    s.record_signal("f", "n", '"bad"', None)
    s.record_signal("f", "n", '"good"', None)

    def only_good(payload: str) -> str:
        if payload != '"good"':
            raise ValueError("not good")
        return payload

    lease = _claim(s, "f")
    got = s.take_signal_or_suspend(lease, Suspension(0, "n", 0, None), only_good, 10)
    assert isinstance(got, Checkpoint) and got.result == '"good"'
    sigs = s.get_flow("f").signals
    assert [(g.status, g.error, g.consumed_seq) for g in sigs] == [
        ("rejected", "not good", None),
        ("consumed", None, 0),
    ]


def test_keys_deduplicate_and_unknown_or_finished_flows_refuse(
    store: tuple[CruxStore, Clock],
) -> None:
    s, _ = store
    with pytest.raises(FlowNotFound):
        s.record_signal("nope", "n", "1", None)
    s.create_flow("f", "demo", "{}")
    first = s.record_signal("f", "n", "1", "k")
    dup = s.record_signal("f", "n", "2", "k")
    assert dup.duplicate and dup.signal_id == first.signal_id
    assert len(s.get_flow("f").signals) == 1
    lease = _claim(s, "f")
    s.finish(lease, "completed", result="1")
    with pytest.raises(FlowNotWaiting):
        s.record_signal("f", "n", "3", None)
    assert s.record_signal("f", "n", "4", "k").duplicate  # an idempotent retry still answers


def test_deadlines_are_kept_across_re_suspends_and_expire(store: tuple[CruxStore, Clock]) -> None:
    s, clock = store
    s.create_flow("f", "demo", "{}")
    lease = _claim(s, "f")
    point = Suspension(0, "n", 0, 60.0)
    assert s.take_signal_or_suspend(lease, point, accept, 10) == "suspended"
    row = s.get_flow("f", details=False)
    assert row.deadline == clock() + timedelta(seconds=60) and row.wake_kind == "expire"
    clock.now += timedelta(seconds=30)
    s.request_resume("f")
    lease = _claim(s, "f")
    assert s.take_signal_or_suspend(lease, point, accept, 10) == "suspended"
    assert s.get_flow("f", details=False).deadline == row.deadline
    clock.now += timedelta(seconds=31)
    lease = _claim(s, "f")  # due: the deadline passed
    assert s.take_signal_or_suspend(lease, point, accept, 10) == "expired"
    assert s.get_flow("f", details=False).status == "expired"


def test_get_flow_shows_steps_and_signals(store: tuple[CruxStore, Clock]) -> None:
    s, clock = store
    s.create_flow("f", "demo", "{}")
    lease = _claim(s, "f")
    s.commit_checkpoint(lease, _cp(0, "a", '{"x":1}'), started_at=clock(), attempts=2, ttl=10)
    s.record_signal("f", "n", "[1,2]", "key-1")
    row = s.get_flow("f")
    assert [(st.seq, st.name, st.result, st.attempts) for st in row.steps] == [
        (0, "a", '{"x":1}', 2)
    ]
    assert [(g.name, g.payload, g.key, g.status) for g in row.signals] == [
        ("n", "[1,2]", "key-1", "pending")
    ]
    with pytest.raises(FlowNotFound):
        s.get_flow("nope")


def test_failed_attempts_back_off_then_fail(store: tuple[CruxStore, Clock]) -> None:
    s, clock = store
    s.create_flow("f", "demo", "{}")
    lease = _claim(s, "f")
    assert s.fail_step(lease, 0, "x", 1, '{"type":"E","message":"1"}', retry_in=30) == "suspended"
    row = s.get_flow("f", details=False)
    assert (row.status, row.wake_kind) == ("suspended", "retry")
    assert row.wake_at == clock() + timedelta(seconds=30)
    assert s.claim("f", "w", 10).reason == "idle"  # type: ignore[union-attr]
    clock.now += timedelta(seconds=31)
    again = s.claim("f", "w", 10)
    assert isinstance(again, Claimed) and again.failed_attempts == 1
    assert s.fail_step(again.lease, 0, "x", 2, '{"type":"E","message":"2"}', None) == "failed"
    row = s.get_flow("f")
    assert row.status == "failed" and row.error == '{"type":"E","message":"2"}'
    assert [(e.seq, e.attempt) for e in row.step_errors] == [(0, 1), (0, 2)]


def test_a_commit_resets_the_failed_attempts(store: tuple[CruxStore, Clock]) -> None:
    s, clock = store
    s.create_flow("f", "demo", "{}")
    lease = _claim(s, "f")
    s.fail_step(lease, 0, "x", 1, "{}", retry_in=1)
    clock.now += timedelta(seconds=2)
    lease = _claim(s, "f")
    assert not s.commit_checkpoint(lease, _cp(0, "x"), started_at=clock(), attempts=2, ttl=10)
    assert s.suspend_until(lease, clock() + timedelta(seconds=5), "sleep") == "suspended"
    clock.now += timedelta(seconds=6)
    again = s.claim("f", "w", 10)
    assert isinstance(again, Claimed) and again.failed_attempts == 0 and again.next_seq == 1


def test_polls_keep_their_deadline_and_expire(store: tuple[CruxStore, Clock]) -> None:
    s, clock = store
    s.create_flow("f", "demo", "{}")
    point = Suspension(0, "ready", 0, 100.0)
    lease = _claim(s, "f")
    assert s.poll_later(lease, point, 60) == "suspended"
    row = s.get_flow("f", details=False)
    assert row.wake_kind == "poll" and row.wake_at == clock() + timedelta(seconds=60)
    clock.now += timedelta(seconds=61)
    lease = _claim(s, "f")
    assert s.poll_later(lease, point, 60) == "suspended"
    assert s.get_flow("f", details=False).wake_at == row.deadline  # capped by the deadline
    clock.now += timedelta(seconds=40)
    lease = _claim(s, "f")
    assert s.poll_later(lease, point, 60) == "expired"


def test_cancel_now_or_at_the_next_commit(store: tuple[CruxStore, Clock]) -> None:
    s, clock = store
    s.create_flow("idle", "demo", "{}")
    assert s.cancel("idle", "r1") == "cancelled"
    with pytest.raises(FlowAlreadyFinished):
        s.cancel("idle", "again")
    s.create_flow("busy", "demo", "{}")
    lease = _claim(s, "busy")
    assert s.cancel("busy", "r2") == "cancelling"
    assert s.commit_checkpoint(lease, _cp(0), started_at=clock(), attempts=1, ttl=10)
    row = s.get_flow("busy")
    assert (row.status, row.cancel_reason, len(row.steps)) == ("cancelled", "r2", 1)


def test_sweep_expires_wakes_and_redrives(store: tuple[CruxStore, Clock]) -> None:
    s, clock = store
    s.create_flow("timer", "demo", "{}")
    lease = _claim(s, "timer")
    s.take_signal_or_suspend(lease, Suspension(0, "go", 0, 10.0), accept, 10)
    s.create_flow("nap", "demo", "{}")
    s.suspend_until(_claim(s, "nap"), clock() + timedelta(seconds=5), "sleep")
    s.create_flow("lost", "demo", "{}")
    s.create_flow("dead", "demo", "{}")
    _claim(s, "dead", ttl=3)
    assert s.claim_tick(1) and not s.claim_tick(1)
    assert s.sweep(limit=100, redrive_after=30) == SweepResult()
    clock.now += timedelta(seconds=11)
    got = s.sweep(limit=100, redrive_after=30)
    assert got.expired == ["timer"] and sorted(got.due) == [("demo", "dead"), ("demo", "nap")]
    assert s.get_flow("timer", details=False).status == "expired"
    assert s.sweep(limit=100, redrive_after=30) == SweepResult()  # nothing twice
    clock.now += timedelta(seconds=30)
    again = s.sweep(limit=100, redrive_after=30)
    assert sorted(again.due) == [("demo", "dead"), ("demo", "lost"), ("demo", "nap")]
