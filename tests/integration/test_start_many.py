"""Batch starts on Postgres, Redis and real `crux-workers worker` processes."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import redis
from pydantic import BaseModel
from sqlalchemy import event

from crux_workers import Crux, FlowContext, FlowIdConflict, InvalidInput, Settings
from crux_workers._store._sql import SqlStore
from crux_workers._store._sql_pg import PgDb
from tests.support.fleet import Fleet


def test_a_batch_runs_on_a_real_worker_each_step_once(fleet: Fleet) -> None:
    fleet.worker("w1")
    slow = fleet.flows["slow"]
    runs = slow.run_many([{"seconds": 0}] * 12)
    outcomes = [run.wait(timeout=60) for run in runs]
    assert [o.status for o in outcomes] == ["completed"] * 12
    assert [o.result for o in outcomes] == ["rested"] * 12
    for run in runs:
        assert fleet.effects.count(run.flow_id) == {
            "before": 1,
            "slow-start": 1,
            "slow-end": 1,
            "after": 1,
        }


def _lists(r: redis.Redis) -> dict[bytes, int]:
    return {k: int(r.llen(k)) for k in r.scan_iter() if r.type(k) == b"list"}


def test_a_batch_is_published_where_single_starts_go(fleet: Fleet) -> None:
    # No worker: the messages stay in Redis, where they can be counted.
    r = redis.Redis.from_url(fleet.redis_url)
    try:
        fleet.flows["slow"].run(input={"seconds": 0})
        single = _lists(r)
        assert sum(single.values()) == 1
        fleet.flows["slow"].run_many([{"seconds": 0}] * 30)
        assert _lists(r) == {k: n + 30 for k, n in single.items()}
    finally:
        r.close()


def test_a_refused_batch_records_and_publishes_nothing(fleet: Fleet) -> None:
    slow = fleet.flows["slow"]
    fleet.flows["ticks"].run(input={"n": 1}, flow_id="ticks-1")
    with pytest.raises(InvalidInput, match="input #2"):
        slow.run_many([{"seconds": 0}, {"seconds": 0}, {"seconds": "soon"}])
    with pytest.raises(InvalidInput, match="appears twice"):
        slow.run_many([{"seconds": 0}] * 2, flow_ids=["s-1", "s-1"])
    with pytest.raises(FlowIdConflict, match="ticks-1"):
        slow.run_many([{"seconds": 0}] * 2, flow_ids=["s-2", "ticks-1"])
    assert fleet.statuses() == {"ticks-1": "pending"}


def test_an_existing_id_returns_the_existing_flow(fleet: Fleet) -> None:
    slow = fleet.flows["slow"]
    first = slow.run(input={"seconds": 0}, flow_id="known")
    runs = slow.run_many([{"seconds": 5}, {"seconds": 0}], flow_ids=["known", "fresh"])
    assert [r.flow_id for r in runs] == ["known", "fresh"]
    assert first.state().input == {"seconds": 0}  # not replaced by the batch's input
    fleet.worker("w1")
    assert [r.wait(timeout=60).status for r in runs] == ["completed", "completed"]
    assert fleet.effects.count("known")["slow-start"] == 1


class Empty(BaseModel):
    pass


@contextmanager
def statements(store: SqlStore) -> Iterator[list[str]]:
    """The SQL statements sent while the block runs (BEGIN and COMMIT left out)."""
    seen: list[str] = []

    def record(_c: Any, _cur: Any, statement: str, *_: Any) -> None:
        if not statement.strip().upper().startswith(("BEGIN", "COMMIT")):
            seen.append(statement.strip().split()[0].upper())

    # The prebuilt statements run on the driver's connection, past SQLAlchemy's events.
    first = PgDb.first

    def record_first(db: PgDb, stmt: Any, params: dict[str, Any]) -> Any:
        seen.append(stmt.text.strip().split()[0].upper())
        return first(db, stmt, params)

    event.listen(store.engine, "before_cursor_execute", record)
    PgDb.first = record_first  # type: ignore[method-assign]
    try:
        yield seen
    finally:
        PgDb.first = first  # type: ignore[method-assign]
        event.remove(store.engine, "before_cursor_execute", record)


class Recorder:
    def __init__(self) -> None:
        self.sent: list[str] = []

    def enqueue(
        self, flow_name: str, flow_id: str, countdown: float | None = None, *, start: bool = False
    ) -> None:
        self.sent.append(flow_id)

    def close(self) -> None:
        pass


def test_a_start_on_postgres_is_one_insert_and_a_batch_one_insert(pg_url: str) -> None:
    store = SqlStore(pg_url)
    sent = Recorder()
    app = Crux(Settings(database_url=pg_url), store=store, dispatcher=sent)

    @app.flow("noop", input=Empty)
    def noop(f: FlowContext[Empty]) -> Any:
        return None

    try:
        app.store  # noqa: B018 - the schema exists before counting
        with statements(store) as seen:
            noop.run(input={}, flow_id="one")
        assert seen == ["INSERT"]
        with statements(store) as seen:
            again = noop.run(input={}, flow_id="one")  # the id exists: read its row
        assert seen == ["INSERT", "SELECT"] and again.flow_id == "one"
        with statements(store) as seen:
            runs = noop.run_many([{}] * 50)
        assert seen == ["INSERT"]
        with statements(store) as seen:
            noop.run_many([{}, {}], flow_ids=["one", "two"])
        assert seen == ["INSERT", "SELECT"]
        assert sent.sent == ["one", "one", *[r.flow_id for r in runs], "one", "two"]
        assert {app.get_flow(r.flow_id).status for r in runs} == {"pending"}
    finally:
        app.close()
