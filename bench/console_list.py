"""The console's flows list on a large record: server time of the page and of its API.

Starts its own Postgres 15 on a loopback port, inserts N flows with one SQL statement
(statuses, names, waits and creation times spread as a busy record has them), then
times the list page handler (in process, through the ASGI app: no network, no browser)
for the filters an operator uses, first page and a deep keyset page: first without the
console's two indexes (migration 0006), then with them, as shipped.

    PYTHONPATH=. .venv/bin/python bench/console_list.py            # N=100000
    PYTHONPATH=. .venv/bin/python bench/console_list.py --n 20000 --reps 10
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from crux_workers import Crux, Settings
from crux_workers._store._migrate import upgrade
from crux_workers._store._sql_db import make_engine
from crux_workers._store._types import FlowPage
from crux_workers.ui import create_app
from tests.servers import PostgresServer, free_port

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

INSERT = """
INSERT INTO crux_flows (id, name, status, input, waiting_on, deadline, wake_at, wake_kind,
                        created_at, updated_at, finished_at, epoch, next_seq, runs, retry_attempt)
SELECT 'flow-' || lpad(i::text, 7, '0'),
       (ARRAY['onboarding', 'payment', 'approval', 'report', 'sync'])[1 + i % 5],
       s.status,
       '{"order": "' || i || '"}',
       CASE WHEN s.status = 'suspended' THEN 'approval' END,
       CASE WHEN s.status = 'suspended' THEN now() + interval '1 hour' END,
       CASE WHEN s.status = 'suspended' THEN now() + interval '1 hour'
            WHEN s.status = 'pending' THEN now() END,
       CASE WHEN s.status = 'suspended' THEN 'expire' WHEN s.status = 'pending' THEN 'run' END,
       c.at, c.at,
       CASE WHEN s.status IN ('completed', 'failed', 'cancelled') THEN c.at + interval '2 s' END,
       1, 1, 1, 0
FROM generate_series(1, %(n)s) AS i
CROSS JOIN LATERAL (SELECT now() - (%(n)s - i) * interval '25 s' AS at) AS c
CROSS JOIN LATERAL (SELECT CASE
    WHEN i % 20 < 12 THEN 'completed'
    WHEN i % 20 < 16 THEN 'suspended'
    WHEN i % 20 < 18 THEN 'failed'
    WHEN i % 20 < 19 THEN 'cancelled'
    ELSE 'pending' END AS status) AS s
"""

# The console's indexes (migration 0006): the bench times the list without them first.
INDEXES = ("ix_crux_flows_created", "ix_crux_flows_status_created")


def timed(fn: Callable[[], object], reps: int) -> tuple[float, float]:
    fn()  # warm: connection pool, plan cache, templates
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    return statistics.median(times), times[max(0, int(len(times) * 0.95) - 1)]


def deep_cursor(client: TestClient, pages: int) -> str:
    after = None
    for _ in range(pages):
        got = client.get("/api/flows", params={"limit": 50, **({"after": after} if after else {})})
        after = got.json()["next"]
    assert after is not None
    return after


def scenarios(client: TestClient, app: Crux, reps: int) -> list[tuple[str, float, float]]:
    deep = deep_cursor(client, 200)  # page 201: 10,000 flows in

    def page(params: dict[str, str]) -> Callable[[], object]:
        def go() -> object:
            got = client.get("/flows", params=params)
            assert got.status_code == 200, got.status_code
            return got

        return go

    rows = [
        ("list page, no filter, first 50", page({})),
        ("list page, status=suspended", page({"status": "suspended"})),
        ("list page, name=payment & status=failed", page({"name": "payment", "status": "failed"})),
        ("list page, created in the last hour", page({"since": "1h"})),
        ("list page, id prefix search", page({"q": "flow-00500", "jump": "0"})),
        ("list page, page 201 (keyset cursor)", page({"after": deep})),
        ("API /api/flows, first 50", lambda: client.get("/api/flows")),
        ("store.page_flows() alone, first 51", lambda: app.store.page_flows(FlowPage(limit=51))),
        ("store.overview() alone (counts, backlog)", app.store.overview),
    ]
    return [(label, *timed(fn, reps)) for label, fn in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--reps", type=int, default=30)
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="crux-console-bench-", dir="/tmp"))
    base.chmod(0o755)
    pg = PostgresServer(base / "pg", free_port())
    try:
        pg.start()
        pg.create_database("bench")
        url = pg.url("bench")
        engine = make_engine(url)
        upgrade(engine)
        engine.dispose()
        t0 = time.perf_counter()
        pg.execute(INSERT.replace("%(n)s", str(args.n)), dbname="bench")
        pg.execute("VACUUM ANALYZE crux_flows", dbname="bench")  # autovacuum's steady state
        print(f"inserted {args.n} flows in {time.perf_counter() - t0:.1f}s", flush=True)
        app = Crux(Settings(database_url=url), record_only=True)
        client = TestClient(create_app(app), base_url="http://127.0.0.1")
        load = os.getloadavg()[0]
        print(f"load average {load:.2f}; median and p95 of {args.reps} requests, ms\n")
        saved = pg.execute(
            "SELECT indexdef FROM pg_indexes WHERE indexname = ANY(%s)",
            dbname="bench",
            params=[list(INDEXES)],
        )
        assert len(saved) == len(INDEXES), saved
        for name in INDEXES:
            pg.execute(f"DROP INDEX {name}", dbname="bench")
        before = scenarios(client, app, args.reps)
        for (definition,) in saved:
            pg.execute(definition, dbname="bench")
        pg.execute("ANALYZE crux_flows", dbname="bench")
        after = scenarios(client, app, args.reps)
        print("| request | without the indexes: median | p95 | as shipped: median | p95 |")
        print("|---|---:|---:|---:|---:|")
        for (label, m, p), (_, m2, p2) in zip(before, after, strict=True):
            print(f"| {label} | {m:.1f} | {p:.1f} | {m2:.1f} | {p2:.1f} |")
        app.close()
    finally:
        pg.stop()
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
