"""The cost of the metrics query (``AdminStore.metrics_snapshot``) on a large record.

Starts its own Postgres on a loopback port in a temp dir (tests/servers.py), inserts
N flows directly with SQL (a production-like mix: mostly finished, some waiting on
signals, sleeps, polls, retries and child tasks, some pending and running, a few
stalled), refused messages and sweep ticks, runs VACUUM ANALYZE, then times the
snapshot: the whole call (query and reduction) and the statement alone on the
server (EXPLAIN ANALYZE). Prints a Markdown table.

    PYTHONPATH=. .venv/bin/python bench/metrics_query.py               # 100k flows, 21 runs
    PYTHONPATH=. .venv/bin/python bench/metrics_query.py --flows 1000000 --runs 11
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from sqlalchemy import text  # noqa: E402

from crux_workers._store._migrate import upgrade  # noqa: E402
from crux_workers._store._sql import SqlStore  # noqa: E402
from tests.servers import PostgresServer, free_port  # noqa: E402

# i % 100 decides a flow's state: 80 completed, 5 failed, 1 cancelled, 1 expired, 4 waiting
# for a signal, 1 sleeping, 1 polling, 1 in a retry's backoff (due), 1 waiting for a child,
# 1 woken (due), 2 pending (due), 2 running (every other one stalled: due).
INSERT = text(
    """
    INSERT INTO crux_flows (id, name, status, input, waiting_on, deadline, wake_at, wake_kind,
                            lease_owner, lease_until, epoch, next_seq, runs, retry_attempt,
                            created_at, updated_at, finished_at)
    SELECT 'flow-' || i, 'flow-' || (i % 10),
           CASE WHEN m < 80 THEN 'completed' WHEN m < 85 THEN 'failed'
                WHEN m = 85 THEN 'cancelled' WHEN m = 86 THEN 'expired'
                WHEN m < 96 THEN 'suspended' WHEN m < 98 THEN 'pending' ELSE 'running' END,
           '{}',
           CASE WHEN m BETWEEN 87 AND 90 THEN 'approval' WHEN m = 92 THEN 'ready'
                WHEN m = 94 THEN 'task:charge' END,
           CASE WHEN m BETWEEN 87 AND 90 THEN now() + interval '1 day' END,
           CASE WHEN m BETWEEN 87 AND 90 THEN now() + interval '1 day'
                WHEN m = 91 THEN now() + interval '1 hour'
                WHEN m = 92 THEN now() + interval '1 minute'
                WHEN m = 93 THEN now() - interval '5 seconds'
                WHEN m = 94 THEN now() + interval '5 minutes'
                WHEN m = 95 THEN now() - interval '1 second'
                WHEN m IN (96, 97) THEN now() - (i % 60) * interval '1 second' END,
           CASE WHEN m BETWEEN 87 AND 90 THEN 'expire' WHEN m = 91 THEN 'sleep'
                WHEN m = 92 THEN 'poll' WHEN m = 93 THEN 'retry' WHEN m = 94 THEN 'task'
                WHEN m IN (95, 96, 97) THEN 'run' END,
           CASE WHEN m >= 98 THEN 'host:1:abc' END,
           CASE WHEN m >= 98 AND i % 200 < 100 THEN now() + interval '30 seconds'
                WHEN m >= 98 THEN now() - interval '1 minute' END,
           1, 3, 1, 0,
           now() - i * interval '1 second', now(),
           CASE WHEN m < 87 THEN now() - i * interval '1 second' END
      FROM (SELECT i, i % 100 AS m FROM generate_series(1, :n) AS i) AS g
    """
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flows", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=21)
    parser.add_argument("--plan", action="store_true", help="print the query plan to stderr")
    a = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="crux-bench-metrics-", dir="/tmp"))
    base.chmod(0o755)
    pg = PostgresServer(base / "pg", free_port())
    try:
        pg.start()
        pg.create_database("bench")
        store = SqlStore(pg.url("bench"))
        upgrade(store.engine)
        t0 = time.perf_counter()
        with store.engine.begin() as conn:
            conn.execute(INSERT, {"n": a.flows})
            conn.execute(
                text(
                    "INSERT INTO crux_rejected_signals (reason, detail, raw, received_at) "
                    "SELECT (ARRAY['bad_json','bad_signature','too_large','unknown_flow'])"
                    "[1 + i % 4], 'x', '{}', now() FROM generate_series(1, 1000) AS i"
                )
            )
            conn.execute(
                text(
                    "INSERT INTO crux_sweeps (tick, swept_at) "
                    "SELECT i, now() FROM generate_series(1, 10000) AS i"
                )
            )
        with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE"))
        print(f"inserted {a.flows} flows in {time.perf_counter() - t0:.1f}s", file=sys.stderr)

        snap = store.metrics_snapshot()  # warm: connection, plan cache
        samples = []
        for _ in range(a.runs):
            t = time.perf_counter()
            snap = store.metrics_snapshot()
            samples.append((time.perf_counter() - t) * 1000)
        server = []
        statement, params = _statement(store)
        with store.engine.connect() as conn:
            for _ in range(a.runs):
                explain = "EXPLAIN (ANALYZE, FORMAT JSON) " + statement
                plan = conn.exec_driver_sql(explain, params).scalar()
                server.append(float(plan[0]["Execution Time"]))
        if a.plan:
            with store.engine.connect() as conn:
                text_plan = conn.exec_driver_sql("EXPLAIN ANALYZE " + statement, params).all()
            print("\n".join(r[0] for r in text_plan), file=sys.stderr)
        total = sum(snap.flows.values())
        assert total == a.flows, (total, a.flows)
        print(f"| measurement (ms), {a.flows} flows | median | p90 | min | runs |")
        print("|---|---|---|---|---|")
        for label, values in (
            ("`metrics_snapshot()` (client: round trip, rows, reduction)", samples),
            ("the statement on the server (EXPLAIN ANALYZE execution time)", server),
        ):
            s = sorted(values)
            p90 = s[min(len(s) - 1, int(0.9 * len(s)))]
            print(f"| {label} | {statistics.median(s):.1f} | {p90:.1f} | {s[0]:.1f} | {len(s)} |")
        print(
            f"\nsnapshot: due={sum(snap.due.values())} waits={sum(snap.waits.values())} "
            f"groups={len(snap.flows)} refused={sum(snap.refused.values())}",
            file=sys.stderr,
        )
        store.close()
    finally:
        pg.stop()
        shutil.rmtree(base, ignore_errors=True)


def _statement(store: SqlStore) -> tuple[str, object]:
    """The snapshot's SQL and parameters, as sent (for EXPLAIN)."""
    captured: list[tuple[str, object]] = []

    from sqlalchemy import event

    def grab(conn: object, cursor: object, statement: str, params: object, *_: object) -> None:
        if "UNION ALL" in statement:
            captured.append((statement, params))

    event.listen(store.engine, "before_cursor_execute", grab)
    try:
        store.metrics_snapshot()
    finally:
        event.remove(store.engine, "before_cursor_execute", grab)
    return captured[-1]


if __name__ == "__main__":
    main()
