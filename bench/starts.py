"""Starting flows: ``run()`` in a loop against ``run_many`` batches, on Postgres and Redis.

Starts its own Postgres (fsync on, as in production) and Redis on loopback ports in a
temp dir (tests/servers.py), migrates a fresh database, and times N starts per mode with
the real Celery transport publishing each start task to Redis. No worker runs: only the
starts are measured (record + publish). Prints a markdown table and stops everything:

    PYTHONPATH=. .venv/bin/python bench/starts.py [--n 500] [--reps 3]

Modes:

- ``run()`` loop, transaction path: the single start as it was before the one-statement
  ``create_flow`` (BEGIN, INSERT ... RETURNING id, SELECT the row, COMMIT; kept here as
  ``TransactionClient`` for the A/B);
- ``run()`` loop: one autocommit ``INSERT ... RETURNING`` the row, then one publish;
- ``run_many`` in batches of 100, and of N: one multi-row INSERT per batch, the
  publishes over one producer;
- the single start and the batch of N again, recording only (a dispatcher that
  publishes nothing): what the record costs, and so what the publishing costs.

Commits per start come from ``pg_stat_database.xact_commit`` of the bench database: the
app's connections are closed after each mode, so their backends flush their counters on
exit, and the counter is read (by a connection that commits nothing) until it stops
moving.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psycopg
import redis
from pydantic import BaseModel
from sqlalchemy import select

from crux_workers import Crux, FlowContext, FlowHandle, Settings
from crux_workers._store._migrate import upgrade
from crux_workers._store._schema import flows
from crux_workers._store._sql import SqlStore, make_engine
from crux_workers._store._sql_client import SqlClient
from crux_workers._store._types import FlowRow
from tests.servers import PostgresServer, RedisServer, free_port

WAIT = 10.0  # bound of every wait, seconds


class Order(BaseModel):
    sku: str
    qty: int


@contextlib.contextmanager
def servers() -> Iterator[tuple[str, str, str]]:
    """Postgres with fsync on and Redis, each on a free loopback port; their URLs and DSN."""
    base = Path(tempfile.mkdtemp(prefix="crux-bench-starts-", dir="/tmp"))
    base.chmod(0o755)
    pg, rs = PostgresServer(base / "pg", free_port()), RedisServer(base / "redis", free_port())
    try:
        pg.start()
        rs.start()
        # tests/servers.py runs Postgres with fsync off; production does not.
        pg.execute("ALTER SYSTEM SET fsync = on")
        pg.execute("ALTER SYSTEM SET full_page_writes = on")
        pg.execute("SELECT pg_reload_conf()")
        pg.create_database("bench")
        engine = make_engine(pg.url("bench"))
        upgrade(engine)
        engine.dispose()
        url = pg.url("bench")
        yield url, url.replace("postgresql+psycopg://", "postgresql://", 1), rs.url(0)
    finally:
        rs.stop()
        pg.stop()
        shutil.rmtree(base, ignore_errors=True)


class Commits:
    """Reads ``xact_commit`` of the bench database without committing anything itself.

    One connection in one open transaction, with ``stats_fetch_consistency = none`` so
    that every read sees the counters as they are now.
    """

    def __init__(self, dsn: str) -> None:
        self._conn = psycopg.connect(dsn)
        self._conn.execute("SET stats_fetch_consistency = none")

    def settled(self) -> int:
        """The counter, once it stops moving (the exiting backends have flushed theirs)."""
        last, deadline = -1, time.monotonic() + WAIT
        while True:
            got = self._conn.execute(
                "SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()"
            ).fetchone()
            assert got is not None
            if got[0] == last or time.monotonic() > deadline:
                return int(got[0])
            last = got[0]
            time.sleep(0.1)

    def close(self) -> None:
        self._conn.rollback()
        self._conn.close()


class TransactionClient(SqlClient):
    """``create_flow`` as it was before the one-statement path (for the A/B only)."""

    def create_flow(self, flow_id: str, name: str, input_json: str) -> tuple[FlowRow, bool]:
        db = self._db
        now = db.now()
        stmt = (
            db.insert(flows)
            .values(
                id=flow_id,
                name=name,
                status="pending",
                input=input_json,
                wake_at=now,
                wake_kind="run",
                epoch=0,
                next_seq=0,
                runs=0,
                created_at=now,
                updated_at=now,
            )
            .on_conflict_do_nothing(index_elements=["id"])
            .returning(flows.c.id)
        )
        with db.tx() as conn:
            created = conn.execute(stmt).first() is not None
            row = conn.execute(select(flows).where(flows.c.id == flow_id)).one()
        return db.flow_row(row), created


def queued(r: redis.Redis) -> int:
    """Messages waiting in the broker's queues (every list key)."""
    return sum(int(r.llen(k)) for k in r.scan_iter() if r.type(k) == b"list")


class Discard:
    """A dispatcher that publishes nothing (the record-only modes)."""

    def enqueue(
        self, flow_name: str, flow_id: str, countdown: float | None = None, *, start: bool = False
    ) -> None:
        pass

    def enqueue_many(self, flow_name: str, flow_ids: Sequence[str], *, start: bool = False) -> None:
        pass

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class Mode:
    label: str
    run: Callable[[FlowHandle[Order], int], None]
    client: SqlClient
    handle: FlowHandle[Order]
    publishes: bool = True


def mode_loop(h: FlowHandle[Order], n: int) -> None:
    for i in range(n):
        h.run(input=Order(sku=f"sku-{i}", qty=i), flow_id=str(uuid.uuid4()))


def mode_batches(size: int) -> Callable[[FlowHandle[Order], int], None]:
    def run(h: FlowHandle[Order], n: int) -> None:
        for lo in range(0, n, size):
            h.run_many([Order(sku=f"sku-{i}", qty=i) for i in range(lo, min(n, lo + size))])

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500, help="starts per mode and repetition")
    parser.add_argument("--reps", type=int, default=5, help="repetitions of every mode")
    args = parser.parse_args()
    n = args.n
    with servers() as (url, dsn, redis_url):
        store = SqlStore(url)
        app = Crux(Settings(database_url=url, redis_url=redis_url), store=store)

        @app.flow("order", input=Order)
        def order(f: FlowContext[Order]) -> int:
            return f.input.qty

        # The same flow on an app that publishes nothing: what the record alone costs.
        quiet = Crux(Settings(database_url=url), store=store, dispatcher=Discard())
        quiet_order = quiet.flow("order", input=Order)(order.fn)

        r = redis.Redis.from_url(redis_url)
        fast = store._client  # the bench swaps the client paths for the A/B
        slow = TransactionClient(store._db)
        modes: list[Mode] = [
            Mode("`run()` loop, transaction path (before)", mode_loop, slow, order),
            Mode("`run()` loop, one INSERT", mode_loop, fast, order),
            Mode("`run_many`, batches of 100", mode_batches(100), fast, order),
            Mode(f"`run_many`, batches of {n}", mode_batches(n), fast, order),
            Mode("`run()` loop, one INSERT, record only", mode_loop, fast, quiet_order, False),
            Mode(
                f"`run_many`, batches of {n}, record only",
                mode_batches(n),
                fast,
                quiet_order,
                False,
            ),
        ]
        # Warm up: the engine's pool, the Celery app and its broker connection.
        mode_loop(order, 20)
        order.run_many([Order(sku="w", qty=0)] * 20)
        store.engine.dispose()
        counter = Commits(dsn)
        times: dict[str, list[float]] = {m.label: [] for m in modes}
        per_start: dict[str, list[float]] = {m.label: [] for m in modes}
        for _ in range(args.reps):
            for m in modes:
                store._client = m.client
                before_msgs, before_commits = queued(r), counter.settled()
                t0 = time.perf_counter()
                m.run(m.handle, n)
                times[m.label].append(time.perf_counter() - t0)
                store.engine.dispose()  # the backends exit and flush their counters
                per_start[m.label].append((counter.settled() - before_commits) / n)
                sent, want = queued(r) - before_msgs, n if m.publishes else 0
                assert sent == want, f"{m.label}: {sent} start messages in Redis, not {want}"
        store._client = fast
        counter.close()
        quiet.close()
        app.close()
        with psycopg.connect(dsn) as conn:
            got = conn.execute("SELECT count(*) FROM crux_flows").fetchone()
        assert got is not None and got[0] == 40 + args.reps * len(modes) * n, got
        assert queued(r) == 40 + args.reps * sum(m.publishes for m in modes) * n

    print(f"## Starting {n} flows (fsync on, Celery publishing to Redis, no workers)\n")
    print(
        f"{platform.node()}, Python {platform.python_version()}, {args.reps} repetitions "
        "per mode (median; range of the repetitions in brackets)\n"
    )
    print("| mode | starts/s | ms per start | commits per start |")
    print("|---|---|---|---|")
    for label in times:
        secs = times[label]
        rates = sorted(n / s for s in secs)
        ms = sorted(s * 1000 / n for s in secs)
        print(
            f"| {label} | {statistics.median(rates):.0f} ({rates[0]:.0f} to {rates[-1]:.0f}) "
            f"| {statistics.median(ms):.3f} ({ms[0]:.3f} to {ms[-1]:.3f}) "
            f"| {statistics.median(per_start[label]):.3f} |"
        )


if __name__ == "__main__":
    main()
