"""Every statement of the hot path names one flow: the record stays distributable.

A distributed Postgres (Citus, every crux table distributed by flow id) can route a
statement to one node only when it filters on, or inserts, a single flow id. This test
records every statement a start, a step, a suspend, a signal, a resume and a finish send
to Postgres, and checks that each carries the flow's id among its parameters.
"""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel
from sqlalchemy import event

from crux_workers import Crux, FlowContext, Settings
from crux_workers._store._sql import SqlStore
from crux_workers._store._sql_pg import PgDb


class Empty(BaseModel):
    pass


class Queue:
    def __init__(self) -> None:
        self.sent: list[tuple[str, str]] = []

    def enqueue(
        self, flow_name: str, flow_id: str, countdown: float | None = None, *, start: bool = False
    ) -> None:
        self.sent.append((flow_name, flow_id))

    def close(self) -> None:
        pass


def _values(params: Any) -> list[Any]:
    if isinstance(params, dict):
        return list(params.values())
    if isinstance(params, list | tuple):
        out: list[Any] = []
        for p in params:
            out += _values(p) if isinstance(p, dict | list | tuple) else [p]
        return out
    return [params]


def test_every_hot_path_statement_is_scoped_to_one_flow(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = SqlStore(pg_url)
    queue = Queue()
    app = Crux(Settings(database_url=pg_url), store=store, dispatcher=queue)

    @app.flow("hot", input=Empty)
    def hot(f: FlowContext[Empty]) -> Any:
        f.step("a", lambda: 1)
        got = f.suspend("go")
        f.step("b", lambda: 2)
        return got

    seen: list[tuple[str, list[Any]]] = []

    def record(_c: Any, _cur: Any, statement: str, params: Any, *_: Any) -> None:
        seen.append((statement, _values(params)))

    # The prebuilt statements run on the driver's connection, past SQLAlchemy's events.
    first = PgDb.first

    def record_first(db: PgDb, stmt: Any, params: dict[str, Any]) -> Any:
        seen.append((stmt.text, _values(params)))
        return first(db, stmt, params)

    monkeypatch.setattr(PgDb, "first", record_first)

    try:
        app.store  # noqa: B018 - the schema exists before recording starts
        event.listen(store.engine, "before_cursor_execute", record)
        run = hot.run(input={}, flow_id="hot-1")
        app.execute("hot", run.flow_id)  # claim, step a, suspend
        app.signal_flow(run.flow_id, "go", {"ok": True})
        app.execute("hot", run.flow_id)  # claim, consume the signal, step b, finish
        event.remove(store.engine, "before_cursor_execute", record)
        assert run.state().status == "completed"
        statements = [s for s, _ in seen if not s.strip().upper().startswith(("BEGIN", "COMMIT"))]
        assert len(statements) >= 6, statements
        prebuilt = [s for s in statements if "WITH" in s]
        assert len(prebuilt) >= 4, statements  # the claims, the step, the signal, the finish
        unscoped = [s for s, values in seen if "hot-1" not in values and s.strip()]
        unscoped = [s for s in unscoped if not s.strip().upper().startswith(("BEGIN", "COMMIT"))]
        assert unscoped == [], "statements not scoped to the flow id:\n" + "\n---\n".join(unscoped)
    finally:
        app.close()
