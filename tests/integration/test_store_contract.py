"""One contract, every backend: the in-memory reference, SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Generic, Protocol

import pytest

from crux_workers import FlowAlreadyFinished, FlowNotFound, FlowNotWaiting
from crux_workers._starts import MAX_BATCH
from crux_workers._store import _lifecycle as life
from crux_workers._store._memory import MemoryStore
from crux_workers._store._migrate import upgrade
from crux_workers._store._roles import CruxStore
from crux_workers._store._sql import SqlStore
from crux_workers._store._types import (
    Checkpoint,
    Claimed,
    FlowFilter,
    FlowPage,
    Lease,
    NotClaimed,
    StepCommit,
    Suspension,
    SweepResult,
    TaskError,
    TaskPoint,
    TaskSend,
)
from crux_workers.errors import (
    FlowIdConflict,
    FlowNotRetryable,
    InvalidInput,
    InvalidSignal,
    LeaseLost,
    NonDeterminismError,
)


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


def test_create_flows_records_a_batch_and_returns_existing_rows(
    store: tuple[CruxStore, Clock],
) -> None:
    s, _ = store
    s.create_flow("old", "demo", '{"a":0}')
    lease = _claim(s, "old")
    got = s.create_flows(
        [("b1", "demo", '{"a":1}'), ("old", "demo", '{"a":9}'), ("b2", "demo", "{}")]
    )
    assert [(row.id, created) for row, created in got] == [
        ("b1", True),
        ("old", False),
        ("b2", True),
    ]
    new, old, _ = (row for row, _ in got)
    assert new.status == "pending" and new.wake_kind == "run" and new.input == '{"a":1}'
    assert old.status == "running" and old.input == '{"a":0}'  # the existing row, untouched
    assert s.get_flow("b2").status == "pending"
    assert isinstance(s.claim("b1", "w", 10), Claimed)
    s.finish(lease, "completed", result="1")
    assert s.create_flows([]) == []


def test_create_flows_takes_a_batch_of_the_client_limit(store: tuple[CruxStore, Clock]) -> None:
    s, _ = store
    items = [(f"m{i}", "demo", f'{{"i":{i}}}') for i in range(MAX_BATCH)]
    got = s.create_flows(items)
    assert [(row.id, row.input, created) for row, created in got] == [
        (i, j, True) for i, _, j in items
    ]
    assert len(s.list_flows(FlowFilter(limit=MAX_BATCH + 10))) == MAX_BATCH


def test_create_flows_refuses_the_whole_batch(store: tuple[CruxStore, Clock]) -> None:
    s, _ = store
    s.create_flow("taken", "other", "{}")
    with pytest.raises(FlowIdConflict):
        s.create_flows([("c1", "demo", "{}"), ("taken", "demo", "{}")])
    with pytest.raises(InvalidInput):
        s.create_flows([("c2", "demo", "{}"), ("c2", "demo", "{}")])
    for flow_id in ("c1", "c2"):
        with pytest.raises(FlowNotFound):
            s.get_flow(flow_id)
    assert {r.id for r in s.list_flows(FlowFilter(limit=10))} == {"taken"}


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


def _task(seq: int, name: str = "child", attempt: int = 1) -> TaskPoint:
    return TaskPoint(seq, name, 0, attempt, "tasks.child", '{"args":[1]}', resend_after=30.0)


def test_now_is_the_records_clock(store: tuple[CruxStore, Clock]) -> None:
    s, clock = store
    assert s.now() == clock()
    clock.now += timedelta(seconds=5)
    assert s.now() == clock()


def test_release_frees_the_lease_and_marks_the_flow_due(store: tuple[CruxStore, Clock]) -> None:
    s, clock = store
    s.create_flow("f", "demo", "{}")
    lease = _claim(s, "f")
    s.release(lease)
    row = s.get_flow("f", details=False)
    assert (row.status, row.wake_kind, row.wake_at) == ("running", "run", clock())
    again = _claim(s, "f", owner="other")  # no wait for the released lease to run out
    assert again.epoch == lease.epoch + 1
    s.release(lease)  # a stale release changes nothing
    assert s.claim("f", "third", 10).reason == "busy"  # type: ignore[union-attr]


def test_a_child_is_sent_once_resent_when_stale_and_its_outcome_wakes_the_flow(
    store: tuple[CruxStore, Clock],
) -> None:
    s, clock = store
    s.create_flow("f", "demo", "{}")
    point = _task(0)
    send = s.take_task_or_send(_claim(s, "f"), point, 10)
    assert isinstance(send, TaskSend) and send.call == point.call
    row = s.get_flow("f", details=False)
    assert (row.status, row.wake_kind, row.waiting_on) == ("suspended", "task", "task:child")
    assert row.wake_at == clock() + timedelta(seconds=30)
    s.request_resume("f")  # a stray resume must not send the child again
    assert s.take_task_or_send(_claim(s, "f"), point, 10) == "suspended"
    clock.now += timedelta(seconds=31)
    again = s.take_task_or_send(_claim(s, "f"), point, 10)
    assert isinstance(again, TaskSend) and again.task_id == send.task_id
    assert s.complete_task("crux:nope:0:1", result="1", error=None) is None
    # The id without its secret part (all a forger who knows the flow id can make) and
    # the id with another secret are refused; the flow is not woken.
    assert s.complete_task(send.task_id.rsplit(":", 1)[0], result="1", error=None) is None
    assert s.complete_task(send.task_id[:-32] + "0" * 32, result="1", error=None) is None
    assert s.get_flow("f", details=False).wake_kind == "task"
    assert s.complete_task(send.task_id, result='"done"', error=None) == ("demo", "f")
    assert s.complete_task(send.task_id, result='"late"', error=None) is None  # first stands
    assert s.get_flow("f", details=False).wake_kind == "run"
    cp = s.take_task_or_send(_claim(s, "f"), point, 10)
    assert isinstance(cp, Checkpoint) and (cp.kind, cp.result) == ("task", '"done"')
    assert s.load_checkpoints("f") == [cp]


def test_a_failed_child_is_reported_and_a_new_attempt_sends_its_own(
    store: tuple[CruxStore, Clock],
) -> None:
    s, clock = store
    s.create_flow("f", "demo", "{}")
    first_sent = clock()
    first = s.take_task_or_send(_claim(s, "f"), _task(0), 10)
    assert isinstance(first, TaskSend)
    assert s.complete_task(first.task_id, result=None, error='{"type":"E"}') == ("demo", "f")
    clock.now += timedelta(seconds=5)
    lease = _claim(s, "f")
    assert s.take_task_or_send(lease, _task(0), 10) == TaskError('{"type":"E"}')
    second = s.take_task_or_send(lease, _task(0, attempt=2), 10)
    assert isinstance(second, TaskSend) and second.task_id != first.task_id
    s.complete_task(second.task_id, result="2", error=None)
    cp = s.take_task_or_send(_claim(s, "f"), _task(0, attempt=2), 10)
    assert isinstance(cp, Checkpoint) and cp.result == "2"
    step = s.get_flow("f").steps[0]
    assert (step.attempts, step.started_at) == (2, first_sent)  # from the first attempt


def test_a_replay_asking_for_another_child_is_refused_with_both_names(
    store: tuple[CruxStore, Clock],
) -> None:
    s, _ = store
    s.create_flow("f", "demo", "{}")
    assert isinstance(s.take_task_or_send(_claim(s, "f"), _task(0), 10), TaskSend)
    s.request_resume("f")
    with pytest.raises(NonDeterminismError) as err:
        s.take_task_or_send(_claim(s, "f"), _task(0, name="other"), 10)
    got = err.value
    assert (got.flow_id, got.seq, got.expected, got.actual) == (  # type: ignore[attr-defined]
        "f",
        0,
        "task 'child'",
        "task 'other'",
    )


def test_list_flows_filters_newest_first_and_purge_deletes_the_finished(
    store: tuple[CruxStore, Clock],
) -> None:
    s, clock = store
    for i, name in enumerate(["a", "b", "a"]):
        s.create_flow(f"f{i}", name, "{}")
        clock.now += timedelta(seconds=1)
    lease = _claim(s, "f0")
    s.commit_checkpoint(lease, _cp(0), started_at=clock(), attempts=1, ttl=10)
    s.fail_step(lease, 1, "x", 1, "{}", retry_in=0)
    lease = _claim(s, "f0")
    s.take_task_or_send(lease, _task(1), 10)
    s.request_resume("f0")
    lease = _claim(s, "f0")
    s.record_signal("f0", "n", "1", None)
    s.finish(lease, "completed", result="1")
    lease = _claim(s, "f1")
    s.take_signal_or_suspend(lease, Suspension(0, "go", 0, None), accept, 10)

    def ids(where: FlowFilter) -> list[str]:
        return [r.id for r in s.list_flows(where)]

    assert ids(FlowFilter()) == ["f2", "f1", "f0"]
    assert ids(FlowFilter(name="a")) == ["f2", "f0"]
    assert ids(FlowFilter(status="completed")) == ["f0"]
    assert ids(FlowFilter(waiting_on="go")) == ["f1"]
    assert ids(FlowFilter(limit=1)) == ["f2"]
    assert all(not r.steps and not r.signals for r in s.list_flows(FlowFilter()))
    assert s.purge_finished(clock()) == 0  # finished at this instant, not before it
    clock.now += timedelta(seconds=1)
    assert s.purge_finished(clock()) == 1
    with pytest.raises(FlowNotFound):
        s.get_flow("f0")
    assert ids(FlowFilter()) == ["f2", "f1"]
    assert s.purge_finished(clock()) == 0


def test_page_flows_walks_the_filter_newest_first_by_keyset_and_overview_counts(
    store: tuple[CruxStore, Clock],
) -> None:
    s, clock = store
    start = clock()
    # Two flows share each creation time: the id breaks the tie, so no page skips one.
    for i in range(6):
        s.create_flow(f"p{i}", "b" if i == 4 else "a", "{}")
        if i % 2:
            clock.now += timedelta(seconds=1)
    s.create_flow("q_%", "a", "{}")
    lease = _claim(s, "p1")
    s.take_signal_or_suspend(lease, Suspension(0, "go", 0, None), accept, 10)

    def walk(page: FlowPage) -> list[list[str]]:
        pages, after = [], None
        while True:
            rows = s.page_flows(replace(page, after=after))
            if not rows:
                return pages
            pages.append([r.id for r in rows])
            after = (rows[-1].created_at, rows[-1].id)

    everything = [["q_%", "p5", "p4"], ["p3", "p2", "p1"], ["p0"]]
    assert walk(FlowPage(limit=3)) == everything
    assert walk(FlowPage(limit=2, name="a")) == [["q_%", "p5"], ["p3", "p2"], ["p1", "p0"]]
    assert walk(FlowPage(status="suspended", waiting_on="go")) == [["p1"]]
    assert walk(FlowPage(id_prefix="q_")) == [["q_%"]]
    assert walk(FlowPage(id_prefix="p_")) == []  # the prefix is literal, not a LIKE pattern
    assert walk(FlowPage(created_from=start + timedelta(seconds=1))) == [
        ["q_%", "p5", "p4", "p3", "p2"]
    ]
    assert walk(FlowPage(created_to=start + timedelta(seconds=1))) == [["p1", "p0"]]
    assert all(not r.steps for r in s.page_flows(FlowPage()))

    seen = s.overview()
    assert seen.counts == {"pending": 6, "suspended": 1}
    assert (seen.due, seen.oldest_due) == (6, start)  # pending flows are due at creation
    assert seen.now == clock()
    if not isinstance(s, MemoryStore):
        assert seen.last_sweep is None
        assert s.claim_tick(7)
        assert s.overview().last_sweep == clock()


def test_refused_messages_are_kept_newest_first_and_bounded(
    store: tuple[CruxStore, Clock],
) -> None:
    s, clock = store
    first = s.record_rejected("bad_json", "Expecting value", "{nope\x00")
    clock.now += timedelta(seconds=1)
    second = s.record_rejected(
        "unknown_flow", "no flow", '{"flow_id":"x"}', flow_id="x" * 500, name="n", key="k"
    )
    assert second > first
    rows = s.list_rejected()
    assert [r.id for r in rows] == [second, first]
    newest, oldest = rows
    assert (newest.reason, newest.flow_id, newest.name, newest.key) == (
        "unknown_flow",
        "x" * 200,
        "n",
        "k",
    )
    assert newest.received_at == clock()
    assert (oldest.flow_id, oldest.detail, oldest.raw) == (None, "Expecting value", "{nope\\x00")
    assert [r.id for r in s.list_rejected(limit=1)] == [second]


def test_metrics_snapshot_counts_flows_waits_and_the_due_backlog(
    store: tuple[CruxStore, Clock],
) -> None:
    s, clock = store
    empty = s.metrics_snapshot()
    assert (empty.flows, empty.waits, empty.due, empty.refused) == ({}, {}, {}, {})
    assert empty.oldest_due_at is None and empty.last_sweep_at is None
    first = clock()
    s.create_flow("p1", "a", "{}")
    clock.now += timedelta(seconds=5)
    s.create_flow("p2", "a", "{}")
    for flow_id in ("sig", "sl", "rt", "pl", "tk", "run"):
        s.create_flow(flow_id, "b", "{}")
    lease = _claim(s, "sig")
    assert s.take_signal_or_suspend(lease, Suspension(0, "approve", 0, 3600), accept, 10)
    s.suspend_until(_claim(s, "sl"), clock() + timedelta(hours=1), "sleep")
    s.fail_step(_claim(s, "rt"), 0, "x", 1, "{}", retry_in=60)
    s.poll_later(_claim(s, "pl"), Suspension(0, "ready", 0, None), 30)
    assert isinstance(s.take_task_or_send(_claim(s, "tk"), _task(0), 10), TaskSend)
    _claim(s, "run")
    s.create_flow("done", "a", "{}")
    s.finish(_claim(s, "done"), "completed", result="1")
    s.record_rejected("bad_json", "not JSON", "{")
    assert s.claim_tick(7)
    snap = s.metrics_snapshot()
    assert snap.taken_at == clock()
    assert snap.flows == {
        ("a", "pending"): 2,
        ("a", "completed"): 1,
        ("b", "suspended"): 5,
        ("b", "running"): 1,
    }
    assert snap.waits == {
        ("signal", "approve"): 1,
        ("sleep", ""): 1,
        ("retry", ""): 1,
        ("poll", "ready"): 1,
        ("task", "child"): 1,
    }
    assert snap.due == {"a": 2} and snap.oldest_due_at == first
    assert snap.refused == {"bad_json": 1} and snap.last_sweep_at == clock()
    # The retry, the poll and the child's resend come due; the running flow's lease
    # runs out (stalled): runnable too. The signal wait and the sleep are not.
    clock.now += timedelta(seconds=61)
    later = s.metrics_snapshot()
    assert later.due == {"a": 2, "b": 4}
    assert later.waits == {("signal", "approve"): 1, ("sleep", ""): 1}
    # A claim says which wake it consumed, and since when (the resume latency).
    claimed = s.claim("rt", "w", 10)
    assert isinstance(claimed, Claimed)
    assert (claimed.woke_at, claimed.woke_by) == (clock() - timedelta(seconds=1), "retry")
    assert claimed.runs == 2
    started = s.claim("p1", "w", 10)
    assert isinstance(started, Claimed)
    assert (started.woke_at, started.woke_by, started.runs) == (first, "run", 1)


def test_purge_rejected_deletes_refused_messages_received_before_the_cutoff(
    store: tuple[CruxStore, Clock],
) -> None:
    s, clock = store
    old = s.record_rejected("bad_json", "x", "{")
    clock.now += timedelta(seconds=10)
    new = s.record_rejected("bad_json", "y", "[")
    assert s.purge_rejected(clock() - timedelta(seconds=10)) == 0  # received at, not before
    assert s.purge_rejected(clock()) == 1
    assert [r.id for r in s.list_rejected()] == [new]
    assert old != new and s.purge_rejected(clock()) == 0


def _lapse(s: CruxStore, clock: Clock, flow_id: str, max_lapses: int | None = 3) -> object:
    """Let the current lease run out, then claim again (the previous holder died)."""
    clock.now += timedelta(seconds=11)
    return s.claim(flow_id, "w", 10, max_lapses=max_lapses)


def test_a_flow_whose_executions_keep_dying_is_parked_failed(
    store: tuple[CruxStore, Clock],
) -> None:
    s, clock = store
    s.create_flow("f", "demo", "{}")
    _claim(s, "f")
    # A takeover of a lapsed lease counts; progress (a checkpoint) starts again.
    assert isinstance(_lapse(s, clock, "f"), Claimed)
    got = _lapse(s, clock, "f")
    assert isinstance(got, Claimed)
    s.commit_checkpoint(got.lease, _cp(0), started_at=clock(), attempts=1, ttl=10)
    # A release (the lease given back) is no lapse; neither is a suspend.
    s.release(got.lease)
    again = s.claim("f", "after-release", 10, max_lapses=1)
    assert isinstance(again, Claimed), again
    s.suspend_until(again.lease, clock() + timedelta(seconds=1), "sleep")
    clock.now += timedelta(seconds=2)
    _claim(s, "f")
    assert isinstance(_lapse(s, clock, "f"), Claimed)  # lapse 1
    assert isinstance(_lapse(s, clock, "f"), Claimed)  # lapse 2
    assert _lapse(s, clock, "f") == NotClaimed("parked")  # the third in a row parks it
    row = s.get_flow("f", details=False)
    assert row.status == "failed" and row.finished_at == clock()
    assert row.error is not None and "CrashLoop" in row.error and "3 executions" in row.error
    assert s.claim("f", "w", 10, max_lapses=3) == NotClaimed("finished")
    # Without a limit a lapse never parks.
    s.create_flow("g", "demo", "{}")
    _claim(s, "g")
    assert all(isinstance(_lapse(s, clock, "g", None), Claimed) for _ in range(6))


def test_the_claim_returns_the_chained_digest_of_every_checkpoint(
    store: tuple[CruxStore, Clock],
) -> None:
    s, clock = store
    s.create_flow("f", "demo", "{}")
    first = s.claim("f", "w", 10)
    assert isinstance(first, Claimed) and first.history_digest is None
    lease = first.lease
    s.commit_checkpoint(
        lease, _cp(0, result='"caf\u00e9 \\ud800"'), started_at=clock(), attempts=1, ttl=10
    )
    s.take_signal_or_suspend(lease, Suspension(1, "go", 0, None), accept, 10)
    s.record_signal("f", "go", '{"ok":true}', None)
    woken = s.claim("f", "w", 10)
    assert isinstance(woken, Claimed)
    lease = woken.lease
    # Postgres takes the waking signal in the claim; the others at the suspend point.
    got = woken.consumed or s.take_signal_or_suspend(
        lease, Suspension(1, "go", 0, None), accept, 10
    )
    assert isinstance(got, Checkpoint)
    send = s.take_task_or_send(lease, _task(2), 10)
    assert isinstance(send, TaskSend)
    s.complete_task(send.task_id, result="[1]", error=None)
    lease = _claim(s, "f")
    assert isinstance(s.take_task_or_send(lease, _task(2), 10), Checkpoint)
    s.release(lease)
    claimed = s.claim("f", "w", 10)
    assert isinstance(claimed, Claimed) and claimed.next_seq == 3
    digest: str | None = None
    for cp in s.load_checkpoints("f"):
        digest = life.next_digest(digest, cp.seq, cp.kind, cp.name, cp.occurrence, cp.result)
    assert claimed.history_digest == digest and digest is not None and len(digest) == 64


def test_close_releases_connections_and_the_record_stays(store: tuple[CruxStore, Clock]) -> None:
    s, clock = store
    s.create_flow("f", "demo", "{}")
    s.close()
    if isinstance(s, SqlStore):
        assert s.engine.pool.checkedout() == 0
        reopened = SqlStore(s.url, clock=clock)
        assert reopened.get_flow("f", details=False).status == "pending"
        reopened.close()
    else:
        assert s.get_flow("f", details=False).status == "pending"


SCHEMA = '{"type":"object","required":["ok"]}'


def test_a_signal_to_a_flow_waiting_with_a_schema_is_checked_under_its_lock(
    store: tuple[CruxStore, Clock],
) -> None:
    s, _ = store
    s.create_flow("f", "demo", "{}")
    seen: list[str] = []

    def refuse(schema: str) -> None:
        seen.append(schema)
        raise InvalidSignal("no", errors=[])

    # Not waiting yet: kept without a check (validated when consumed).
    early = s.record_signal("f", "n", '"early"', None, check=refuse)
    assert not early.wake and seen == []
    lease = _claim(s, "f")
    got = s.take_signal_or_suspend(lease, Suspension(0, "n", 0, None, SCHEMA), accept, 10)
    assert isinstance(got, Checkpoint) and got.result == '"early"'
    assert s.get_flow("f", details=False).waiting_schema is None
    assert s.take_signal_or_suspend(lease, Suspension(1, "n", 1, None, SCHEMA), accept, 10) == (
        "suspended"
    )
    assert s.get_flow("f", details=False).waiting_schema == SCHEMA
    with pytest.raises(InvalidSignal):
        s.record_signal("f", "n", '"bad"', "k1", check=refuse)
    assert seen == [SCHEMA]
    assert [g.payload for g in s.get_flow("f").signals] == ['"early"']  # nothing recorded
    other = s.record_signal("f", "other", "1", None, check=refuse)  # another name: kept
    assert not other.wake and seen == [SCHEMA]
    ok = s.record_signal("f", "n", '"good"', "k1", check=lambda schema: seen.append(schema))
    assert ok.wake and not ok.duplicate and seen == [SCHEMA, SCHEMA]
    again = s.record_signal("f", "n", '"good"', "k1", check=refuse)  # the key dedupes first
    assert again.duplicate and again.signal_id == ok.signal_id
    s.cancel("f", "done")
    assert s.get_flow("f", details=False).waiting_schema is None


def test_retry_makes_a_failed_flow_due_at_its_last_checkpoint_with_fresh_attempts(
    store: tuple[CruxStore, Clock],
) -> None:
    s, clock = store
    s.create_flow("f", "demo", "{}")
    lease = _claim(s, "f")
    s.commit_checkpoint(lease, _cp(0, "a"), started_at=clock(), attempts=1, ttl=10)
    first = s.take_task_or_send(lease, _task(1), 10)
    assert isinstance(first, TaskSend)
    with pytest.raises(FlowNotRetryable):
        s.retry_flow("f")
    s.complete_task(first.task_id, result=None, error='{"type":"E"}')
    lease = _claim(s, "f")
    assert s.take_task_or_send(lease, _task(1), 10) == TaskError('{"type":"E"}')
    assert s.fail_step(lease, 1, "child", 1, '{"type":"E","message":"1"}', None) == "failed"
    with pytest.raises(FlowNotFound):
        s.retry_flow("nope")
    clock.now += timedelta(seconds=1)
    assert s.retry_flow("f") == "demo"
    row = s.get_flow("f")
    assert (row.status, row.error, row.finished_at, row.retries) == ("pending", None, None, 1)
    assert (row.wake_kind, row.wake_at) == ("run", clock())
    again = s.claim("f", "w", 10)
    assert isinstance(again, Claimed)
    assert (again.next_seq, again.failed_attempts) == (1, 0)  # the failed step, attempt 1
    # The failed child is superseded: attempt 1 sends a new one.
    send = s.take_task_or_send(again.lease, _task(1), 10)
    assert isinstance(send, TaskSend)
    s.request_resume("f")  # a stray resume while the child runs: fail it on the replay
    lease = _claim(s, "f")
    assert s.fail_step(lease, 1, "child", 1, '{"type":"E","message":"2"}', None) == "failed"
    # The failed attempts' history stays, numbered on.
    assert [(e.seq, e.attempt) for e in s.get_flow("f").step_errors] == [(1, 1), (1, 2)]
    assert [c.seq for c in s.load_checkpoints("f")] == [0]


def test_a_fork_copies_the_first_checkpoints_and_is_due_with_its_origin(
    store: tuple[CruxStore, Clock],
) -> None:
    s, clock = store
    s.create_flow("src", "demo", '{"a":1}')
    lease = _claim(s, "src")
    s.commit_checkpoint(lease, _cp(0, "a", '"x"'), started_at=clock(), attempts=1, ttl=10)
    s.record_signal("src", "go", '"yes"', None)
    assert isinstance(
        s.take_signal_or_suspend(lease, Suspension(1, "go", 0, None), accept, 10), Checkpoint
    )
    s.commit_checkpoint(lease, _cp(2, "b", '"y"'), started_at=clock(), attempts=1, ttl=10)
    s.finish(lease, "completed", result="1")
    with pytest.raises(InvalidInput):
        s.fork_flow("src", "bad", 4, None)
    with pytest.raises(FlowNotFound):
        s.fork_flow("nope", "x", 0, None)
    clock.now += timedelta(seconds=1)
    fork = s.fork_flow("src", "fork", 2, '{"a":2}')
    assert (fork.id, fork.name, fork.status, fork.input) == ("fork", "demo", "pending", '{"a":2}')
    assert (fork.forked_from, fork.forked_at, fork.wake_kind, fork.wake_at) == (
        "src",
        2,
        "run",
        clock(),
    )
    with pytest.raises(FlowIdConflict):
        s.fork_flow("src", "fork", 1, None)
    copied = s.load_checkpoints("fork")
    assert [(c.seq, c.kind, c.result) for c in copied] == [
        (0, "step", '"x"'),
        (1, "suspend", '"yes"'),
    ]
    assert s.get_flow("fork").signals == []  # the suspend's payload is its checkpoint
    claimed = s.claim("fork", "w", 10)
    assert isinstance(claimed, Claimed) and claimed.next_seq == 2
    assert s.fork_flow("src", "fresh", 0, None).input == '{"a":1}'
    assert s.load_checkpoints("fresh") == []
    assert len(s.load_checkpoints("src")) == 3  # the source is untouched
    assert s.get_flow("src", details=False).status == "completed"


def test_waiting_groups_suspended_flows_by_what_they_wait_on(
    store: tuple[CruxStore, Clock],
) -> None:
    s, clock = store
    start = clock()
    for i in range(3):
        s.create_flow(f"sig{i}", "demo", "{}")
        timeout = 60.0 if i == 1 else None
        s.take_signal_or_suspend(_claim(s, f"sig{i}"), Suspension(0, "go", 0, timeout), accept, 10)
        clock.now += timedelta(seconds=1)
    s.create_flow("nap", "other", "{}")
    s.suspend_until(_claim(s, "nap"), start + timedelta(hours=1), "sleep")
    s.create_flow("kid", "demo", "{}")
    s.take_task_or_send(_claim(s, "kid"), _task(0), 10)
    s.create_flow("poll", "demo", "{}")
    s.poll_later(_claim(s, "poll"), Suspension(0, "ready", 0, None), 30)
    s.create_flow("back", "demo", "{}")
    s.fail_step(_claim(s, "back"), 0, "x", 1, "{}", retry_in=5)
    s.create_flow("woken", "demo", "{}")
    s.take_signal_or_suspend(_claim(s, "woken"), Suspension(0, "go", 0, None), accept, 10)
    s.record_signal("woken", "go", "1", None)  # due now: not waiting any more
    s.create_flow("new", "demo", "{}")  # pending: not waiting
    groups = {(w.name, w.kind, w.on): w for w in s.waiting()}
    assert {k: w.count for k, w in groups.items()} == {
        ("demo", "signal", "go"): 3,
        ("other", "sleep", ""): 1,
        ("demo", "task", "child"): 1,
        ("demo", "poll", "ready"): 1,
        ("demo", "retry", ""): 1,
    }
    go = groups[("demo", "signal", "go")]
    assert go.oldest_since == start
    assert go.nearest_deadline == start + timedelta(seconds=61)
    assert go.next_wake == go.nearest_deadline
    assert groups[("other", "sleep", "")].next_wake == start + timedelta(hours=1)
    assert s.waiting()[0].count == 3  # most flows first
    assert [(w.kind, w.on) for w in s.waiting("other")] == [("sleep", "")]


def test_purge_takes_every_table_and_old_refusals(store: tuple[CruxStore, Clock]) -> None:
    s, clock = store
    s.record_rejected("bad_json", "old", "{")
    s.create_flow("f", "demo", "{}")
    lease = _claim(s, "f")
    s.record_signal("f", "n", "1", None)
    s.fail_step(lease, 0, "x", 1, "{}", retry_in=0)
    lease = _claim(s, "f")
    s.take_task_or_send(lease, _task(0), 10)
    s.cancel("f", "stop")
    clock.now += timedelta(seconds=10)
    kept = s.record_rejected("bad_json", "new", "{")
    assert s.purge_finished(clock()) == 1
    assert s.purge_rejected(clock()) == 1
    assert [r.id for r in s.list_rejected()] == [kept]
    if isinstance(s, SqlStore):
        with s.engine.connect() as conn:
            for table in ("crux_steps", "crux_signals", "crux_step_errors", "crux_tasks"):
                assert conn.exec_driver_sql(f"SELECT count(*) FROM {table}").scalar() == 0
    # A task id freed by the purge can be used again.
    s.create_flow("f", "demo", "{}")
    assert isinstance(s.take_task_or_send(_claim(s, "f"), _task(0), 10), TaskSend)


# Every method of the store protocol, each called above with an assertion on its effect.
# A new store method fails the test below until it gets its contract test here.
EXERCISED = {
    "create_flow",
    "create_flows",
    "claim",
    "renew",
    "release",
    "load_checkpoints",
    "now",
    "commit_checkpoint",
    "fail_step",
    "suspend_until",
    "poll_later",
    "cancel",
    "claim_tick",
    "sweep",
    "take_signal_or_suspend",
    "finish",
    "record_signal",
    "request_resume",
    "get_flow",
    "take_task_or_send",
    "complete_task",
    "retry_flow",
    "fork_flow",
    "list_flows",
    "page_flows",
    "overview",
    "purge_finished",
    "waiting",
    "purge_rejected",
    "record_rejected",
    "list_rejected",
    "metrics_snapshot",
    "close",
}


def test_the_contract_exercises_every_store_method() -> None:
    declared = {
        name
        for cls in CruxStore.__mro__
        if cls not in (object, Protocol, Generic)
        for name, value in vars(cls).items()
        if callable(value) and not name.startswith("_")
    }
    assert declared == EXERCISED
    source = Path(__file__).read_text()
    assert [name for name in sorted(EXERCISED) if f".{name}(" not in source] == []


def test_the_waking_signal_is_taken_once_by_the_claim_or_at_the_suspend_point(
    store: tuple[CruxStore, Clock],
) -> None:
    s, clock = store
    s.create_flow("f", "demo", "{}")
    lease = _claim(s, "f")
    # A step of the same name first: the wait is the name's occurrence 1.
    s.commit_checkpoint(
        lease, Checkpoint(0, "step", "go", 0, "1"), started_at=clock(), attempts=1, ttl=10
    )
    assert s.take_signal_or_suspend(lease, Suspension(1, "go", 1, None), accept, 10) == "suspended"
    first = s.record_signal("f", "go", '{"n": 1}', None)
    second = s.record_signal("f", "go", '{"n": 2}', None)
    woken = s.claim("f", "w", 10)
    assert isinstance(woken, Claimed)
    expected = Checkpoint(1, "suspend", "go", 1, '{"n": 1}')
    if woken.consumed is not None:  # in the claim (Postgres, a wait with no schema)
        assert woken.consumed == expected and woken.next_seq == 2
    else:  # at the suspend point
        assert woken.next_seq == 1
        point = Suspension(1, "go", 1, None)
        assert s.take_signal_or_suspend(woken.lease, point, accept, 10) == expected
    assert s.load_checkpoints("f") == [Checkpoint(0, "step", "go", 0, "1"), expected]
    signals = {sig.id: sig for sig in s.get_flow("f").signals}
    assert signals[first.signal_id].status == "consumed"
    assert signals[first.signal_id].consumed_seq == 1
    assert signals[second.signal_id].status == "pending"
    # The digest the next claim returns is the chain of what the record holds.
    s.release(woken.lease)
    again = s.claim("f", "w", 10)
    assert isinstance(again, Claimed) and again.consumed is None and again.next_seq == 2
    digest: str | None = None
    for cp in s.load_checkpoints("f"):
        digest = life.next_digest(digest, cp.seq, cp.kind, cp.name, cp.occurrence, cp.result)
    assert again.history_digest == digest


def test_a_wait_with_a_schema_is_never_taken_by_the_claim(
    store: tuple[CruxStore, Clock],
) -> None:
    s, _ = store
    s.create_flow("f", "demo", "{}")
    lease = _claim(s, "f")
    point = Suspension(0, "go", 0, None, '{"type": "object"}')
    assert s.take_signal_or_suspend(lease, point, accept, 10) == "suspended"
    s.record_signal("f", "go", '{"n": 1}', None)
    woken = s.claim("f", "w", 10)
    assert isinstance(woken, Claimed) and woken.consumed is None and woken.next_seq == 0
    got = s.take_signal_or_suspend(woken.lease, point, lambda p: p.replace("1", "2"), 10)
    assert got == Checkpoint(0, "suspend", "go", 0, '{"n": 2}')


def test_a_claim_under_a_cancel_request_takes_no_signal(store: tuple[CruxStore, Clock]) -> None:
    s, _ = store
    s.create_flow("f", "demo", "{}")
    lease = _claim(s, "f")
    assert s.take_signal_or_suspend(lease, Suspension(0, "go", 0, None), accept, 10) == "suspended"
    s.record_signal("f", "go", "1", None)
    s.cancel("f", "stop")
    woken = s.claim("f", "w", 10)
    if isinstance(woken, Claimed):
        assert woken.consumed is None and woken.cancel_requested
    assert s.load_checkpoints("f") == []


def test_a_step_rides_with_the_suspend_and_with_the_finish(store: tuple[CruxStore, Clock]) -> None:
    s, clock = store
    s.create_flow("f", "demo", "{}")
    lease = _claim(s, "f")
    point = Suspension(1, "go", 0, None)
    step = StepCommit(_cp(0), clock(), 2)
    assert s.take_signal_or_suspend(lease, point, accept, 10, step=step) == "suspended"
    assert s.load_checkpoints("f") == [_cp(0)]
    assert s.get_flow("f").steps[0].attempts == 2
    s.record_signal("f", "go", "2", None)
    woken = s.claim("f", "w", 10)
    assert isinstance(woken, Claimed)
    got = woken.consumed or s.take_signal_or_suspend(woken.lease, point, accept, 10)
    assert got == Checkpoint(1, "suspend", "go", 0, "2")
    last = StepCommit(_cp(2, "t", "3"), clock(), 1)
    assert s.finish(woken.lease, "completed", result="4", step=last) == "completed"
    assert s.load_checkpoints("f") == [_cp(0), got, _cp(2, "t", "3")]
    row = s.get_flow("f")
    assert row.status == "completed" and row.result == "4" and row.finished_at == clock()
    # A failure with its last step: the step is kept for a retry to replay.
    s.create_flow("g", "demo", "{}")
    lease = _claim(s, "g")
    assert s.finish(lease, "failed", error='{"x":1}', step=StepCommit(_cp(0), clock(), 1)) == (
        "failed"
    )
    assert s.load_checkpoints("g") == [_cp(0)] and s.get_flow("g").error == '{"x":1}'


def test_a_cancel_seen_at_a_joined_write_ends_the_flow_cancelled(
    store: tuple[CruxStore, Clock],
) -> None:
    s, clock = store
    for flow_id in ("f", "g"):
        s.create_flow(flow_id, "demo", "{}")
        lease = _claim(s, flow_id)
        assert s.cancel(flow_id, "stop") == "cancelling"
        step = StepCommit(_cp(0), clock(), 1)
        if flow_id == "f":
            got = s.finish(lease, "completed", result="1", step=step)
        else:
            got = s.take_signal_or_suspend(
                lease, Suspension(1, "go", 0, None), accept, 10, step=step
            )
        assert got == "cancelled"
        # The step is written, as its own commit would have been; the flow is cancelled.
        assert s.load_checkpoints(flow_id) == [_cp(0)]
        row = s.get_flow(flow_id)
        assert row.status == "cancelled" and row.result is None


def test_a_joined_write_under_a_lost_lease_writes_nothing(store: tuple[CruxStore, Clock]) -> None:
    s, clock = store
    s.create_flow("f", "demo", "{}")
    lease = _claim(s, "f")
    step = StepCommit(_cp(0), clock(), 1)
    # The same epoch under another owner (a claim lost with Postgres's unflushed WAL and
    # handed out again) holds nothing either.
    for stale in (Lease("f", "someone-else", lease.epoch), Lease("f", "w", lease.epoch - 1)):
        with pytest.raises(LeaseLost):
            s.finish(stale, "completed", result="1", step=step)
        with pytest.raises(LeaseLost):
            s.take_signal_or_suspend(stale, Suspension(1, "go", 0, None), accept, 10, step=step)
        with pytest.raises(LeaseLost):
            s.commit_checkpoint(stale, _cp(0), started_at=clock(), attempts=1, ttl=10)
    assert s.load_checkpoints("f") == []
    assert s.get_flow("f").status == "running"
