"""Per-step and per-resume overhead of crux_workers on real Redis + Postgres (issue 2).

Starts its own Postgres and Redis on loopback ports in a temp dir (tests/servers.py),
migrates a fresh database, measures, prints a markdown report and stops everything:

    PYTHONPATH=. .venv/bin/python bench/overhead.py [--reps 3] [--fsync] [--no-celery]

1. In process, no Celery (a dispatcher that only records enqueues), driven by
   ``app.execute``: ms/step of K no-op steps; ms/resume (signal + execute) of a flow
   suspended after 0 or 100 completed steps; the SQL and Redis traffic of each; the
   same for the same flows written as ``async def`` handlers (run on the flow loop).
2. A real ``crux-workers worker`` (prefork, concurrency 1): ``run()`` to completed of
   1- and 10-step flows, signal to completed, and a raw Celery task hop for context.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

import celery
import psycopg
import redis
import sqlalchemy

from bench.overhead_flows import RAW_TASK, Steps, Ticks, define, define_async
from crux_workers import Crux, FlowHandle, Settings
from crux_workers._store._migrate import upgrade
from crux_workers._store._sql import make_engine
from crux_workers._store._types import Claimed
from tests.servers import PostgresServer, RedisServer, free_port

ROOT = Path(__file__).resolve().parent.parent
WAIT = 30.0  # bound of every wait, seconds
Samples = dict[str, list[float]]  # milliseconds, by measurement


def row(label: str, reps: list[list[float]]) -> str:
    """Markdown row: median and p90 of all samples, spread of the per-repetition medians."""
    allv = sorted(v for rep in reps for v in rep)
    p90 = allv[min(len(allv) - 1, int(0.9 * len(allv)))]
    meds = [statistics.median(rep) for rep in reps]
    spread = f"{min(meds):.3f} to {max(meds):.3f}"
    return f"| {label} | {statistics.median(allv):.3f} | {p90:.3f} | {spread} | {len(allv)} |"


class Recorder:
    """A Dispatcher that only records what would have been enqueued."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, str, float | None]] = []

    def enqueue(
        self, flow_name: str, flow_id: str, countdown: float | None = None, *, start: bool = False
    ) -> None:
        self.sent.append((flow_name, flow_id, countdown))

    def close(self) -> None:
        self.sent.clear()


@contextlib.contextmanager
def servers(fsync: bool) -> Iterator[tuple[PostgresServer, RedisServer, str, str]]:
    base = Path(tempfile.mkdtemp(prefix="crux-bench-", dir="/tmp"))
    base.chmod(0o755)
    pg, rs = PostgresServer(base / "pg", free_port()), RedisServer(base / "redis", free_port())
    try:
        pg.start()
        rs.start()
        if fsync:  # tests/servers.py runs Postgres with fsync=off; production does not
            pg.execute("ALTER SYSTEM SET fsync = on")
            pg.execute("ALTER SYSTEM SET full_page_writes = on")
            pg.execute("SELECT pg_reload_conf()")
        pg.create_database("bench")
        engine = make_engine(pg.url("bench"))
        upgrade(engine)
        engine.dispose()
        yield pg, rs, pg.url("bench"), rs.url(0)
    finally:
        rs.stop()
        pg.stop()
        shutil.rmtree(base, ignore_errors=True)


def wait_until(check: Callable[[], object], what: str, poll: float) -> None:
    deadline = time.perf_counter() + WAIT
    while not check():
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{what}: not done in {WAIT}s")
        time.sleep(poll)


def ms_since(t0: float) -> float:
    return (time.perf_counter() - t0) * 1000


# -- 1. in process ---------------------------------------------------------------------


def bench_steps(h: FlowHandle[Steps], k: int, flows: int) -> Samples:
    """ms/step, wall and this process's CPU, of ``flows`` sequential K-step flows."""
    out: Samples = {"step": [], "step_cpu": []}
    for _ in range(flows):
        flow_id = h.run(input=Steps(n=k)).flow_id
        t0, c0 = time.perf_counter(), time.process_time()
        got = h.app.execute(h.name, flow_id)
        out["step"].append(ms_since(t0) / k)
        out["step_cpu"].append((time.process_time() - c0) * 1000 / k)
        assert got is not None and got.kind == "completed", got
    return out


def bench_resumes(h: FlowHandle[Ticks], pre: int, ticks: int, flows: int) -> Samples:
    """Per resume (ms): signal + execute, and each alone; ``pre`` steps before the suspends."""
    out: Samples = {f"r{pre}": [], f"r{pre}_sig": [], f"r{pre}_exe": []}
    for _ in range(flows):
        flow_id = h.run(input=Ticks(pre=pre, ticks=ticks + 1)).flow_id
        got = h.app.execute(h.name, flow_id)
        for i in range(ticks + 1):
            assert got is not None and got.kind == "suspended", got
            t0 = time.perf_counter()
            h.app.signal_flow(flow_id, "tick", i)
            t1 = time.perf_counter()
            got = h.app.execute(h.name, flow_id)
            if i < ticks:  # the last resume completes the flow: not measured
                out[f"r{pre}"].append(ms_since(t0))
                out[f"r{pre}_sig"].append((t1 - t0) * 1000)
                out[f"r{pre}_exe"].append(ms_since(t1))
        assert got is not None and got.kind == "completed", got
    return out


def baselines(h: FlowHandle[Steps], pg_url: str, r: redis.Redis, n: int = 300) -> Samples:
    """A ``SELECT 1`` and a PING round trip; a step's writes by hand (psycopg + redis-py)."""
    claimed = h.app.store.claim(h.run(input=Steps(n=0)).flow_id, "bench", 3600.0)
    assert isinstance(claimed, Claimed)
    flow_id, epoch = claimed.lease.flow_id, claimed.lease.epoch
    out: Samples = {"pg_rt": [], "redis_rt": [], "raw_step": []}
    with psycopg.connect(pg_url.replace("+psycopg", ""), autocommit=True) as conn:
        for seq in range(n):
            t0 = time.perf_counter()
            conn.execute("SELECT 1").fetchall()
            out["pg_rt"].append(ms_since(t0))
            t0 = time.perf_counter()
            r.ping()
            out["redis_rt"].append(ms_since(t0))
            t0 = time.perf_counter()
            now = datetime.now(UTC)
            with conn.transaction():  # BEGIN, the statements of commit_checkpoint, COMMIT
                conn.execute(
                    "UPDATE crux_flows SET lease_until = %s, updated_at = %s, next_seq = %s "
                    "WHERE id = %s AND epoch = %s AND status = 'running' "
                    "RETURNING waiting_on, deadline, cancel_reason",
                    (now + timedelta(seconds=30), now, seq + 1, flow_id, epoch),
                ).fetchone()
                conn.execute(
                    "INSERT INTO crux_steps (flow_id, seq, kind, name, occurrence, result, "
                    "attempts, epoch, started_at, completed_at) "
                    "VALUES (%s, %s, 'step', %s, 0, %s, 1, %s, %s, %s)",
                    (flow_id, seq, f"s{seq}", str(seq), epoch, now, now),
                )
            pipe = r.pipeline(transaction=False)  # what RedisStepCache.add sends
            pipe.hset(f"bench:{flow_id}", str(seq), str(seq))
            pipe.expire(f"bench:{flow_id}", 600)
            pipe.execute()
            out["raw_step"].append(ms_since(t0))
    return out


def traffic(steps: FlowHandle[Steps], ticks: FlowHandle[Ticks], r: redis.Redis) -> list[str]:
    """SQL statements and transactions (engine events), Redis commands (server stats)."""
    app, engine = steps.app, steps.app.store.engine  # type: ignore[attr-defined]
    seen: list[str] = []
    txs = [0]

    def on_stmt(_c: Any, _cur: Any, statement: str, *_: Any) -> None:
        table = re.search(r"(?:FROM|INTO|UPDATE) (\w+)", statement)
        seen.append(f"{statement.split()[0]} {table[1] if table else '?'}")

    def on_begin(_c: Any) -> None:
        txs[0] += 1

    def measure(action: Callable[[], object]) -> tuple[list[str], int, Counter[str]]:
        seen.clear()
        txs[0] = 0
        r.config_resetstat()
        action()
        stats: dict[str, Any] = r.info("commandstats")
        skip = ("cmdstat_config", "cmdstat_info")  # the measuring itself
        cmds = {k[8:]: v["calls"] for k, v in stats.items() if not k.startswith(skip)}
        return list(seen), txs[0], Counter(cmds)

    def line(label: str, stmts: list[str], tx: int, cmds: Counter[str]) -> str:
        trips = len(stmts) + 2 * tx  # psycopg 3 sends BEGIN and COMMIT on their own
        redis_cmds = ", ".join(f"{k} {v}" for k, v in sorted(cmds.items())) or "none"
        cells = [label, len(stmts), tx, trips, redis_cmds]
        return "| " + " | ".join(map(str, [*cells, ", ".join(stmts)])) + " |"

    flow_id = ticks.run(input=Ticks(ticks=3)).flow_id
    app.execute(ticks.name, flow_id)
    app.signal_flow(flow_id, "tick", 0)
    app.execute(ticks.name, flow_id)  # a resume in the steady state follows
    one, two = (steps.run(input=Steps(n=n)).flow_id for n in (1, 2))
    sqlalchemy.event.listen(engine, "before_cursor_execute", on_stmt)
    sqlalchemy.event.listen(engine, "begin", on_begin)
    try:
        s1, t1, c1 = measure(lambda: app.execute(steps.name, one))
        s2, t2, c2 = measure(lambda: app.execute(steps.name, two))
        sig = measure(lambda: app.signal_flow(flow_id, "tick", 1))
        exe = measure(lambda: app.execute(ticks.name, flow_id))
    finally:
        sqlalchemy.event.remove(engine, "before_cursor_execute", on_stmt)
        sqlalchemy.event.remove(engine, "begin", on_begin)
    extra = list((Counter(s2) - Counter(s1)).elements())
    return [
        "| unit of work | SQL statements | transactions | PG round trips | Redis commands "
        "| statements |",
        "|---|---|---|---|---|---|",
        line("one step (2-step minus 1-step flow)", extra, t2 - t1, c2 - c1),
        line("1-step flow, `execute` (claim, step, finish)", s1, t1, c1),
        line("resume: `signal_flow`", *sig),
        line("resume: `execute`", *exe),
    ]


# -- 2. through Celery -----------------------------------------------------------------


@contextlib.contextmanager
def worker(pg_url: str, redis_url: str, log: Path) -> Iterator[None]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRUX_")}
    env.update(CRUX_DATABASE_URL=pg_url, CRUX_REDIS_URL=redis_url, BENCH_OVERHEAD_WORKER="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "crux_workers", "worker", "--import", "bench.overhead_flows"]
    cmd += ["--pool", "prefork", "--concurrency", "1", "--loglevel", "WARNING"]
    cmd += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    with log.open("ab") as out:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            yield
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def bench_celery(
    steps: FlowHandle[Steps], ticks: FlowHandle[Ticks], rs: RedisServer, n: int, poll: float
) -> Samples:
    """Polled latencies on a real worker, and in-worker times from the record's timestamps."""
    app, out = steps.app, Samples()

    def add(key: str, ms: float) -> None:
        out.setdefault(key, []).append(ms)

    def status_is(flow_id: str, status: str) -> Callable[[], bool]:
        return lambda: app.store.get_flow(flow_id, details=False).status == status

    with rs.client() as r:
        for i in range(n):
            key = f"bench:hop:{time.time_ns()}"
            t0 = time.perf_counter()
            app.celery.send_task(RAW_TASK, args=[key])
            wait_until(partial(r.exists, key), "raw task hop", poll)
            add("raw", ms_since(t0))
            for k in (1, 10):
                t0 = time.perf_counter()
                flow_id = steps.run(input=Steps(n=k)).flow_id
                wait_until(status_is(flow_id, "completed"), f"{k}-step flow", poll)
                add(str(k), ms_since(t0))
                rec = app.store.get_flow(flow_id, details=True)
                first, last = rec.steps[0], rec.steps[-1]
                if k == 1 and first.started_at is not None:  # created (client) -> step started
                    add("1_start", (first.started_at - rec.created_at).total_seconds() * 1000)
                elif k > 1:  # inside the worker: first step committed -> last step committed
                    span = (last.completed_at - first.completed_at).total_seconds()
                    add("10_step", span * 1000 / (k - 1))
            flow_id = ticks.run(input=Ticks(ticks=1, post=1, signal="go")).flow_id
            wait_until(status_is(flow_id, "suspended"), "suspend on go", poll)
            t0 = time.perf_counter()
            app.signal_flow(flow_id, "go", i)
            wait_until(status_is(flow_id, "completed"), "signal to completed", poll)
            add("signal", ms_since(t0))
    return out


# -- main ------------------------------------------------------------------------------


def repeat(reps: int, fn: Callable[[], Samples]) -> dict[str, list[list[float]]]:
    out: dict[str, list[list[float]]] = {}
    for _ in range(reps):
        for key, samples in fn().items():
            out.setdefault(key, []).append(samples)
    return out


LABELS = {
    "step": "in-process: per step, wall (K={k}, ms/step)",
    "step_cpu": "in-process: per step, CPU of the benchmark process (K={k}, ms/step)",
    "r0": "in-process: per resume (signal + execute), 0 steps before",
    "r0_sig": "... of which `signal_flow`",
    "r0_exe": "... of which `execute`",
    "r100": "in-process: per resume (signal + execute), 100 steps before",
    "r100_sig": "... of which `signal_flow`",
    "r100_exe": "... of which `execute`",
    "a_step": "in-process, async def handler: per step, wall (K={k}, ms/step)",
    "a_step_cpu": "in-process, async def handler: per step, CPU (K={k}, ms/step)",
    "a_r0": "in-process, async def handler: per resume, 0 steps before",
    "a_r100": "in-process, async def handler: per resume, 100 steps before",
    "pg_rt": "baseline: psycopg `SELECT 1` round trip",
    "redis_rt": "baseline: Redis PING round trip",
    "raw_step": "baseline: a step's writes by hand (same 4 PG round trips + 1 Redis pipeline)",
    "raw": "Celery: raw task hop (send -> INCR seen)",
    "1": "Celery: `run()` -> completed, 1-step flow",
    "1_start": "... of which created_at -> step started_at (record timestamps)",
    "10": "Celery: `run()` -> completed, 10-step flow",
    "step_celery": "Celery: per step = (t10 - t1)/9, paired samples",
    "10_step": "Celery: per step inside the worker (steps' completed_at, 10-step flow)",
    "signal": "Celery: `signal_flow` -> completed (resume + 1 step)",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--flows", type=int, default=100, help="K-step flows per repetition")
    ap.add_argument("--k", type=int, default=50, help="steps per flow")
    ap.add_argument("--ticks", type=int, default=20, help="measured resumes per flow")
    ap.add_argument("--resume-flows", type=int, default=5, help="ticking flows per repetition")
    ap.add_argument("--celery-n", type=int, default=40, help="Celery samples per repetition")
    ap.add_argument("--poll", type=float, default=0.001, help="completion polling, seconds")
    ap.add_argument("--fsync", action="store_true", help="Postgres with fsync=on")
    ap.add_argument("--no-celery", action="store_true")
    a = ap.parse_args()
    started = time.perf_counter()
    with servers(a.fsync) as (pg, rs, pg_url, redis_url), rs.client() as r:
        versions = (
            f"Python {platform.python_version()}, celery {celery.__version__}, "
            f"redis-py {redis.__version__}, SQLAlchemy {sqlalchemy.__version__}, "
            f"psycopg {psycopg.__version__}, redis-server {r.info()['redis_version']}, "
            f"PostgreSQL {pg.execute('SHOW server_version')[0][0].split()[0]} "
            f"(fsync={pg.execute('SHOW fsync')[0][0]})"
        )
        settings = Settings(database_url=pg_url, redis_url=redis_url)
        app = Crux(settings, dispatcher=Recorder())
        steps, ticks = define(app)
        asteps, aticks = define_async(app)
        for s_h, t_h in ((steps, ticks), (asteps, aticks)):
            bench_steps(s_h, a.k, 5)  # warm-up: connections, compiled-statement caches
            bench_resumes(t_h, 100, 3, 1)

        def in_process() -> Samples:
            sync = (
                bench_steps(steps, a.k, a.flows)
                | bench_resumes(ticks, 0, a.ticks, a.resume_flows)
                | bench_resumes(ticks, 100, a.ticks, a.resume_flows)
            )
            # The same flows as async def handlers, interleaved with the sync ones.
            asyn = (
                bench_steps(asteps, a.k, a.flows)
                | bench_resumes(aticks, 0, a.ticks, a.resume_flows)
                | bench_resumes(aticks, 100, a.ticks, a.resume_flows)
            )
            return sync | {f"a_{k}": v for k, v in asyn.items()} | baselines(steps, pg_url, r)

        got = repeat(a.reps, in_process)
        counts = traffic(steps, ticks, r)
        app.close()
        if not a.no_celery:
            capp = Crux(settings)
            csteps, cticks = define(capp)
            with worker(pg_url, redis_url, rs.base_dir / "worker.log"):
                bench_celery(csteps, cticks, rs, 3, a.poll)  # waits for the worker; warm-up
                got |= repeat(a.reps, lambda: bench_celery(csteps, cticks, rs, a.celery_n, a.poll))
            capp.close()
            got["step_celery"] = [
                [(ten - one) / 9 for one, ten in zip(ones, tens, strict=True)]
                for ones, tens in zip(got["1"], got["10"], strict=True)
            ]
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"date: {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; {os.cpu_count()} vCPU; load {load}")
    print(f"versions: {versions}")
    print(" ".join(["command: PYTHONPATH=. python bench/overhead.py", *sys.argv[1:]]))
    print(f"runtime: {time.perf_counter() - started:.0f} s\n")
    print("| measurement (ms) | median | p90 | spread of rep medians | n |\n|---|---|---|---|---|")
    for key, label in LABELS.items():
        if key in got:
            print(row(label.format(k=a.k), got[key]))
    print("\n" + "\n".join(counts))


if __name__ == "__main__":
    main()
