"""Durable commits, WAL flushes, round trips and CPU per flow, in process (issue 16).

The flows of ``bench/peers.py`` (W1: step, suspend, two steps; W2: ten steps) run in
this process against a Postgres with ``fsync=on`` (``tests/servers.py`` in a temp dir),
driven by ``app.execute`` as a worker would be, with no Celery. Postgres's own counters
say what each flow cost the record:

- commits: ``pg_stat_database.xact_commit`` of the bench database (every transaction,
  durable or not, read-only ones included);
- WAL flushes: ``pg_stat_wal.wal_sync``, the ``fdatasync`` calls of the WAL: what a
  durable commit waits for (the WAL writer's background flushes are spaced out to
  10 s for the run, so they barely count);
- round trips: the statements the engine sent (SQLAlchemy events, and the prebuilt
  statements run on the driver), plus BEGIN/COMMIT;
- CPU: this process's CPU time inside ``execute`` only, per committed step.

    PYTHONPATH=. .venv/bin/python bench/commits.py [--flows 200]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.overhead import Recorder, servers
from bench.peers_crux import APPROVAL, GO, W1Input, W2Input, W3Input, define
from crux_workers import Crux, Settings
from crux_workers._store._sql_pg import PgDb


class Counters:
    """Postgres's commit and flush counters, read on a separate connection."""

    def __init__(self, pg: Any, engine: Any) -> None:
        self.pg = pg
        self.engine = engine

    def read(self) -> tuple[int, int]:
        # A backend reports its counters when idle, at most once a second, and surely
        # when it exits: close the engine's connections (their backends exit), wait for
        # that, then read both counters in one statement.
        self.engine.dispose()
        time.sleep(1.5)
        got = self.pg.execute(
            "SELECT (SELECT xact_commit FROM pg_stat_database WHERE datname = 'bench'),"
            " (SELECT wal_sync FROM pg_stat_wal)"
        )
        return int(got[0][0]), int(got[0][1])


def measure(
    label: str, counters: Counters, flows: int, steps_per_flow: int, one: Callable[[], float]
) -> dict[str, Any]:
    """Run ``one`` ``flows`` times; it returns the CPU seconds it spent inside execute."""
    c0, f0 = counters.read()
    cpu = 0.0
    t0 = time.perf_counter()
    for _ in range(flows):
        cpu += one()
    wall = time.perf_counter() - t0
    c1, f1 = counters.read()
    # The counter connection's own statements (one per read) are not the flows'.
    return {
        "label": label,
        "commits": (c1 - c0 - 2) / flows,
        "flushes": (f1 - f0) / flows,
        "cpu_ms_per_step": cpu * 1000 / (flows * steps_per_flow),
        "wall_ms_per_flow": wall * 1000 / flows,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--flows", type=int, default=200, help="flows of each kind")
    ap.add_argument("--resumes", type=int, default=30, help="W3 resumes timed per K")
    a = ap.parse_args()
    with servers(fsync=True) as (pg, _rs, pg_url, redis_url):
        # The WAL writer also flushes, in the background, every wal_writer_delay (200 ms):
        # nobody waits for those. Spaced out here, so that wal_sync counts the flushes a
        # commit waited for (a commit made without waiting is flushed by the next one
        # that waits, or by the WAL writer later).
        pg.execute("ALTER SYSTEM SET wal_writer_delay = '10s'")
        pg.execute("SELECT pg_reload_conf()")
        app = Crux(Settings(database_url=pg_url, redis_url=redis_url), dispatcher=Recorder())
        w1, w2, w3 = define(app)
        engine = app.store.engine  # type: ignore[attr-defined]
        trips = [0]

        def on_stmt(*_: Any) -> None:
            trips[0] += 1

        def on_tx(conn: Any) -> None:
            # psycopg sends BEGIN and COMMIT on their own, except in autocommit (the event
            # fires there too, with nothing sent).
            if conn.get_execution_options().get("isolation_level") != "AUTOCOMMIT":
                trips[0] += 2

        # The hot path's prebuilt statements run on the driver, past SQLAlchemy's events.
        first = getattr(PgDb, "first", None)
        if first is not None:

            def counted(db: Any, stmt: Any, params: Any) -> Any:
                trips[0] += 1
                return first(db, stmt, params)

            PgDb.first = counted  # type: ignore[method-assign]

        def execute(name: str, flow_id: str, want: str) -> float:
            c = time.process_time()
            got = app.execute(name, flow_id)
            spent = time.process_time() - c
            assert got is not None and got.kind == want, (flow_id, got)
            return spent

        def w1_flow() -> float:
            flow_id = w1.run(input=W1Input()).flow_id
            cpu = execute(w1.name, flow_id, "suspended")
            app.signal_flow(flow_id, APPROVAL, {"ok": True})
            return cpu + execute(w1.name, flow_id, "completed")

        def w2_flow() -> float:
            flow_id = w2.run(input=W2Input(steps=10)).flow_id
            return execute(w2.name, flow_id, "completed")

        for _ in range(20):  # warm-up: connections, prepared statements, caches
            w1_flow()
            w2_flow()
        counters = Counters(pg, engine)
        rows = []
        for label, fn, steps in (("W1", w1_flow, 3), ("W2", w2_flow, 10)):
            sqlalchemy.event.listen(engine, "before_cursor_execute", on_stmt)
            sqlalchemy.event.listen(engine, "begin", on_tx)
            trips[0] = 0
            try:
                got = measure(label, counters, a.flows, steps, fn)
            finally:
                sqlalchemy.event.remove(engine, "before_cursor_execute", on_stmt)
                sqlalchemy.event.remove(engine, "begin", on_tx)
            got["trips"] = trips[0] / a.flows
            rows.append(got)
        resumes = {k: w3_resumes(app, w3, k, a.resumes + 2) for k in (10, 1000)}
        app.close()
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {os.cpu_count()} vCPU; load {load}")
    print(" ".join(["command: PYTHONPATH=. python bench/commits.py", *sys.argv[1:]]))
    print(f"flows: {a.flows} of each kind, after 20 of each to warm up\n")
    print(
        "| flow (whole life: run, executions, signal) | commits | WAL flushes | PG round trips "
        "| CPU per step in execute (ms) | wall per flow (ms) |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['label']} | {r['commits']:.2f} | {r['flushes']:.2f} | {r['trips']:.1f} "
            f"| {r['cpu_ms_per_step']:.3f} | {r['wall_ms_per_flow']:.2f} |"
        )

    print(
        "\nA resume after K steps (W3: K steps, then a suspend; `execute` of the resume, "
        f"the signal not included, median of {a.resumes}, ms):\n"
    )
    print("| K | resume `execute`, wall (ms) |\n|---|---|")
    for k, ms in resumes.items():
        print(f"| {k} | {ms:.2f} |")
    print(f"| ratio K=1000 / K=10 | {resumes[1000] / resumes[10]:.2f}x |")


def w3_resumes(app: Crux, w3: Any, k: int, flows: int = 12) -> float:
    """Median wall ms of ``execute`` resuming a flow with ``k`` steps behind it (cache warm)."""
    ids = [w3.run(input=W3Input(k=k)).flow_id for _ in range(flows)]
    for flow_id in ids:
        assert app.execute(w3.name, flow_id).kind == "suspended"
    took = []
    for flow_id in ids:
        app.signal_flow(flow_id, GO, 1)
        t0 = time.perf_counter()
        assert app.execute(w3.name, flow_id).kind == "completed"
        took.append((time.perf_counter() - t0) * 1000)
    return statistics.median(took[2:])  # the first two: warm-up


if __name__ == "__main__":
    main()
