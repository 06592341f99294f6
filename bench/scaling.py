"""How crux_workers' throughput grows with worker processes, and where one Postgres stops it.

    bash bench/run.sh --help                  # makes bench/.venv once (then prints its help)
    bench/.venv/bin/python bench/scaling.py   # N=300, 2 repetitions, 1, 2 and 4 processes
    bench/.venv/bin/python bench/scaling.py --n 60 --reps 1      # a quick look
    bench/.venv/bin/python bench/scaling.py --json out.json      # then --from-json out.json

Reuses bench/peers.py: its Postgres (fsync on) and Redis on loopback ports, its crux
worker processes, driver and workloads (the flows of bench/peers_crux.py). Three parts:

1. Throughput: for each setting of ``--workers`` (P processes of ``crux-workers worker
   --pool prefork --concurrency 1``) and of ``--concurrency`` (one process with C pool
   children), W1 (step, suspend, signal, two steps; N flows at once) and W2 (10 no-op
   steps; N flows at once), with the CPU split between workers, Postgres, driver, Redis.
2. Commits per flow: with one worker process, the transactions Postgres committed and
   the WAL flushes it made (pg_stat_database.xact_commit, pg_stat_wal.wal_sync) per W1
   and W2 flow, under load (N at once) and one flow at a time (no flush shared). The
   driver's own polling reads are counted and taken off.
3. The commit rate: T client threads, each committing a one-row INSERT in autocommit
   for ``--commit-seconds``: commits/s, WAL flushes/s, and Postgres's CPU.

Then: flows/s one Postgres can take at most ~= commit rate / commits per flow.
Postgres flushes its statistics from an idle backend up to 10 s late, so part 2 waits
``--settle`` seconds before each reading.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script: tests.servers and bench.* from the repo
    sys.path.insert(0, str(ROOT))

import psycopg  # noqa: E402

from bench.peers import (  # noqa: E402
    CLK,
    Cfg,
    Cpu,
    CruxPeer,
    Proc,
    Servers,
    cell,
    code_version,
    machine,
    proc_table,
    servers,
    tree_cpu,
    wait_for,
)

Sample = dict[str, Any]


class CountingConn:
    """The driver's polling connection, counting its statements (one transaction each)."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self.conn = conn
        self.count = 0

    def execute(self, *args: Any, **kwargs: Any) -> Any:
        self.count += 1
        return self.conn.execute(*args, **kwargs)

    def close(self) -> None:
        self.conn.close()


def setting_name(processes: int, concurrency: int, pool: str = "prefork") -> str:
    return f"{processes} x {'t' if pool == 'threads' else 'c'}{concurrency}"


def make_cfg(a: argparse.Namespace, log_dir: Path) -> Cfg:
    return Cfg(
        n=a.n,
        reps=a.reps,
        ks=[],
        w3_samples=0,
        restart_samples=0,
        lat_samples=0,
        hop_samples=0,
        poll=a.poll,
        timeout=a.timeout,
        dbos_concurrency=1,
        dbos_poll=0.01,
        driver_threads=a.driver_threads,
        systems=[],
        profile=None,
        log_dir=log_dir,
    )


# -- part 1: throughput ---------------------------------------------------------------


def cpu_ticks() -> tuple[int, int]:
    """(busy, all) CPU ticks (1/CLK s) of the whole machine since boot (/proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = fields[3] + fields[4]  # idle, iowait
    return sum(fields) - idle, sum(fields)


@contextlib.contextmanager
def machine_busy(into: dict[str, float]) -> Iterator[None]:
    """Add the whole machine's busy CPU seconds to ``into["machine"]``: everyone's, so
    on a shared machine the rest is what other processes took."""
    busy0 = cpu_ticks()[0]
    yield
    into["machine"] = into.get("machine", 0.0) + (cpu_ticks()[0] - busy0) / CLK


def throughput(
    srv: Servers, cfg: Cfg, settings: list[tuple[int, int, str]]
) -> tuple[dict[str, list[Sample]], dict[str, dict[str, dict[str, float]]]]:
    peers = {
        setting_name(p, c, pool): CruxPeer(srv, cfg, c, processes=p, pool=pool)
        for p, c, pool in settings
    }
    results: dict[str, list[Sample]] = {}
    cpu: dict[str, dict[str, dict[str, float]]] = {}
    names = list(peers)
    try:
        for rep in range(cfg.reps):
            for name in names[rep % len(names) :] + names[: rep % len(names)]:
                peer = peers[name]
                peer.rep = rep
                meter = Cpu(srv, peer)
                got: Sample = {}
                t = time.monotonic()
                peer.start()
                try:
                    peer.warmup()
                    into = cpu.setdefault(name, {})
                    with meter.measure(into.setdefault("W1", {})), machine_busy(into["W1"]):
                        got["w1"] = peer.w1(cfg.n)
                    with meter.measure(into.setdefault("W2", {})), machine_busy(into["W2"]):
                        got["w2"] = peer.w2(cfg.n)
                finally:
                    peer.stop()
                results.setdefault(name, []).append(got)
                print(
                    f"rep {rep} {name}: {time.monotonic() - t:.0f}s  "
                    f"W1 {got['w1']['fps']:.1f} flows/s, W2 {got['w2']['sps']:.0f} steps/s",
                    flush=True,
                )
    finally:
        for p in peers.values():
            p.shutdown()
    return results, cpu


# -- part 2: commits and WAL flushes per flow -----------------------------------------


def pg_counters(srv: Servers) -> tuple[int, int]:
    """(transactions committed in the crux database, WAL flushes), as flushed so far."""
    commits = srv.pg.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = 'crux'")
    syncs = srv.pg.execute("SELECT wal_sync FROM pg_stat_wal")
    return int(commits[0][0]), int(syncs[0][0])


def sequential_w2(peer: CruxPeer, m: int) -> None:
    """W2 flows one at a time: nothing else commits while one does."""
    from bench.peers_crux import W2Input

    for _ in range(m):
        fid = peer.h2.run(input=W2Input(steps=10)).flow_id
        wait_for(lambda f=fid: peer._status(f) == "completed", "W2 flow", 60)


def commits_per_flow(srv: Servers, cfg: Cfg, m: int, settle: float) -> dict[str, dict[str, float]]:
    """With one worker process: transactions and WAL flushes per W1 and W2 flow."""
    peer = CruxPeer(srv, cfg, 1, processes=1)
    polls = CountingConn(peer.db)
    peer.db = polls  # type: ignore[assignment]
    out: dict[str, dict[str, float]] = {}
    peer.start()
    try:
        peer.warmup()
        jobs = [
            ("W1, N at once", cfg.n, lambda: peer.w1(cfg.n)),
            ("W2, N at once", cfg.n, lambda: peer.w2(cfg.n)),
            ("W1, one at a time", m, lambda: peer.w1_isolated(m)),
            ("W2, one at a time", m, lambda: sequential_w2(peer, m)),
        ]
        time.sleep(settle)
        before = pg_counters(srv)
        for label, flows, job in jobs:
            reads = polls.count
            job()
            reads = polls.count - reads
            time.sleep(settle)
            after = pg_counters(srv)
            commits, syncs = after[0] - before[0] - reads, after[1] - before[1]
            out[label] = {"flows": flows, "commits": commits / flows, "syncs": syncs / flows}
            print(f"{label}: {out[label]} (driver reads taken off: {reads})", flush=True)
            before = after
    finally:
        peer.stop()
        peer.shutdown()
    return out


# -- part 3: the commit rate -----------------------------------------------------------


def commit_rate(srv: Servers, threads: int, seconds: float) -> dict[str, float]:
    """``threads`` clients, each committing one-row INSERTs in autocommit for ``seconds``."""
    dsn = srv.pg.dsn("rate")
    limit = 5_000_000  # a bound on the count as well as on the time
    done = [0] * threads
    conns = [psycopg.connect(dsn, autocommit=True) for _ in range(threads)]
    go = threading.Event()
    end = [0.0]

    def client(i: int) -> None:
        conn, n = conns[i], 0
        go.wait()
        while n < limit and time.monotonic() < end[0]:
            conn.execute("INSERT INTO commit_rate (v) VALUES (1)")
            n += 1
        done[i] = n

    workers = [threading.Thread(target=client, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    pg_pid = srv.pg.postmaster_pid()
    syncs0 = int(srv.pg.execute("SELECT wal_sync FROM pg_stat_wal")[0][0])
    cpu0 = tree_cpu(proc_table(), [pg_pid] if pg_pid else [])
    t0 = time.monotonic()
    end[0] = t0 + seconds
    go.set()
    for w in workers:
        w.join(seconds + 60)
    wall = time.monotonic() - t0
    cpu1 = tree_cpu(proc_table(), [pg_pid] if pg_pid else [])
    for c in conns:
        c.close()  # a backend's exit flushes its WAL statistics

    def gone() -> bool:
        rows = srv.pg.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = 'rate'")
        return int(rows[0][0]) == 0

    wait_for(gone, "commit-rate backends gone", 30, 0.05)
    time.sleep(0.2)
    syncs1 = int(srv.pg.execute("SELECT wal_sync FROM pg_stat_wal")[0][0])
    commits = sum(done)
    return {
        "threads": threads,
        "commits_s": commits / wall,
        "syncs_s": (syncs1 - syncs0) / wall,
        "per_sync": commits / max(syncs1 - syncs0, 1),
        "pg_cpu": (cpu1 - cpu0) / wall,
    }


# -- the report -------------------------------------------------------------------------


PARTS = ("workers", "postgres", "driver", "redis", "machine")


def report(
    results: dict[str, list[Sample]],
    cpu: dict[str, dict[str, dict[str, float]]],
    commits: dict[str, dict[str, float]],
    rates: list[dict[str, float]],
    meta: dict[str, Any],
) -> str:
    cores = int(meta.get("cores") or os.cpu_count() or 1)
    n = int(meta.get("n") or 0)
    out = [
        f"- **Date:** {meta['date']}; runtime {meta['runtime']}; code {meta['code']}",
        f"- **Machine:** {meta['machine']}; load average before / after: {meta['load']}",
        f"- **Command:** `{meta['command']}`",
        "",
        "Each cell: median over the repetitions (min-max).",
        "",
        "| worker processes x pool (cN: N child processes, tN: N threads) "
        "| W1 flows/s | W2 flows/s | W2 steps/s |",
        "|---|---|---|---|",
    ]
    for name, reps in results.items():
        w1 = [r["w1"]["fps"] for r in reps]
        w2f = [r["w2"]["fps"] for r in reps]
        w2s = [r["w2"]["sps"] for r in reps]
        out.append(f"| {name} | {cell(w1)} | {cell(w2f)} | {cell(w2s, '{:.0f}')} |")
    out += [
        "",
        f"Where the CPU went: each part's CPU seconds over all repetitions as a share of {cores} "
        "cores x wall time, and per flow (ms); machine: every process on it, this run's "
        "and others'.",
        "",
        "| setting, workload | workers | postgres | driver | redis | machine busy "
        "| workers ms/flow | postgres ms/flow |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, reps in results.items():
        for wl in ("W1", "W2"):
            c = cpu.get(name, {}).get(wl, {})
            cap = cores * c.get("wall", 0.0) or 1.0
            shares = [f"{100 * c[k] / cap:.0f}%" if k in c else "n/a" for k in PARTS]
            flows = n * len(reps) or 1
            per = [f"{1000 * c.get(k, 0.0) / flows:.1f}" for k in ("workers", "postgres")]
            out.append(f"| {name}, {wl} | " + " | ".join([*shares, *per]) + " |")
    if commits:
        out += [
            "",
            "Per flow, one worker process (the driver's polling reads taken off):",
            "",
            "| workload | flows | transactions committed | WAL flushes |",
            "|---|---|---|---|",
        ]
        for label, c in commits.items():
            out.append(f"| {label} | {c['flows']:.0f} | {c['commits']:.1f} | {c['syncs']:.1f} |")
    if rates:
        out += [
            "",
            "Commit rate: one-row INSERTs in autocommit, fsync on:",
            "",
            "| client threads | commits/s | WAL flushes/s | commits per flush | postgres CPU |",
            "|---|---|---|---|---|",
        ]
        for r in rates:
            out.append(
                f"| {r['threads']:.0f} | {r['commits_s']:.0f} | {r['syncs_s']:.0f} "
                f"| {r['per_sync']:.2f} | {100 * r['pg_cpu'] / cores:.0f}% of {cores} cores |"
            )
    if commits and rates:
        best = max(r["commits_s"] for r in rates)
        out += [
            "",
            f"Flows/s at most on this Postgres, {best:.0f} commits/s / commits per flow:",
            "",
        ]
        out += [
            "| workload | commits per flow (one at a time) | flows/s at most |",
            "|---|---|---|",
        ]
        for wl in ("W1", "W2"):
            c = commits.get(f"{wl}, one at a time")
            if c and c["commits"] > 0:
                out.append(f"| {wl} | {c['commits']:.1f} | {best / c['commits']:.0f} |")
    return "\n".join(out)


def parse_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    base = Path(tempfile.mkdtemp(prefix="crux-scaling-", dir="/tmp"))
    base.chmod(0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--n", type=int, default=300, help="flows of W1 and of W2 per point")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--workers", default="1,2,4", help="worker processes, each --concurrency 1")
    ap.add_argument(
        "--concurrency", default="", help="also: one process with these pool sizes (e.g. 2,4)"
    )
    ap.add_argument(
        "--threads",
        default="",
        help="also: each --workers count with a pool of these many threads (e.g. 4)",
    )
    ap.add_argument("--sequential", type=int, default=20, help="flows run one at a time (part 2)")
    ap.add_argument("--commit-threads", default="1,4,16", help="client threads of the commit rate")
    ap.add_argument("--commit-seconds", type=float, default=5.0)
    ap.add_argument("--settle", type=float, default=11.0, help="wait for Postgres's statistics")
    ap.add_argument("--skip", default="", help="parts to skip: throughput,commits,rate")
    ap.add_argument("--poll", type=float, default=0.025, help="driver polling, seconds")
    ap.add_argument("--timeout", type=float, default=600, help="bound of one workload, seconds")
    ap.add_argument("--driver-threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="also dump every figure here")
    ap.add_argument("--from-json", type=Path, help="only print the report of an earlier --json")
    a = ap.parse_args()
    if a.from_json:
        blob = json.loads(a.from_json.read_text())
        meta = {"n": a.n, **blob["meta"]}
        print(report(blob["results"], blob["cpu"], blob["commits"], blob["rates"], meta))
        return
    skip = set(a.skip.split(",")) - {""}
    settings = [(p, 1, "prefork") for p in parse_list(a.workers)]
    settings += [
        (1, c, "prefork") for c in parse_list(a.concurrency) if (1, c, "prefork") not in settings
    ]
    settings += [(p, t, "threads") for t in parse_list(a.threads) for p in parse_list(a.workers)]
    started = time.monotonic()
    load_before = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    results: dict[str, list[Sample]] = {}
    cpu: dict[str, dict[str, dict[str, float]]] = {}
    commits: dict[str, dict[str, float]] = {}
    rates: list[dict[str, float]] = []
    with workdir() as base:
        cfg = make_cfg(a, base / "logs")
        cfg.log_dir.mkdir()
        try:
            with servers(base, fsync=True) as srv:
                if "throughput" not in skip:
                    results, cpu = throughput(srv, cfg, settings)
                if "commits" not in skip:
                    commits = commits_per_flow(srv, cfg, a.sequential, a.settle)
                if "rate" not in skip:
                    srv.pg.create_database("rate")
                    srv.pg.execute(
                        "CREATE TABLE commit_rate (id bigserial PRIMARY KEY, v int)", dbname="rate"
                    )
                    for t in parse_list(a.commit_threads):
                        rates.append(commit_rate(srv, t, a.commit_seconds))
                        print(f"commit rate: {rates[-1]}", flush=True)
        except BaseException:
            for log in sorted(cfg.log_dir.glob("*.log")):
                print(Proc(log.stem, [], {}, cfg.log_dir).tail(15), file=sys.stderr)
            raise
    meta: dict[str, Any] = {
        "date": f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        "runtime": f"{time.monotonic() - started:.0f} s",
        "code": code_version(),
        "machine": machine(),
        "load": f"{load_before} / " + ", ".join(f"{x:.2f}" for x in os.getloadavg()),
        "command": " ".join(["python bench/scaling.py", *sys.argv[1:]]),
        "n": a.n,
        "cores": os.cpu_count() or 1,
    }
    print()
    print(report(results, cpu, commits, rates, meta))
    if a.json:
        blob = {"meta": meta, "results": results, "cpu": cpu, "commits": commits, "rates": rates}
        a.json.write_text(json.dumps(blob, indent=1, default=str))


if __name__ == "__main__":
    main()
