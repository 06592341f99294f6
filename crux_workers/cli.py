"""``crux-workers``: run the fleet (worker, beat, ingress, dev), operate flows, migrate."""

from __future__ import annotations

import importlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import click

from ._app import Crux, default_app, set_default_app
from ._cli_check import check
from ._cli_flows import flows
from ._cli_health import health
from ._cli_ops import retry  # noqa: F401  (registers flows retry, fork, waiting)
from ._cli_ui import ui
from ._settings import Settings, redact
from .errors import CruxError
from .ops._cli import commands as ops_commands


def _import_all(modules: tuple[str, ...]) -> None:
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise click.ClickException(f"cannot import {name!r}: {exc}") from exc


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """crux_workers: durable flows on Celery, Redis and Postgres.

    Configuration comes from CRUX_* environment variables (CRUX_DATABASE_URL,
    CRUX_REDIS_URL, CRUX_BROKER_URL, ...). With none set, the embedded default
    (SQLite under .crux/, flows on local threads) is used.
    """


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--import", "imports", multiple=True, metavar="MODULE", help="module defining flows")
@click.pass_context
def worker(ctx: click.Context, imports: tuple[str, ...]) -> None:
    """Start a Celery worker for the flows defined in the --import modules.

    Extra options go to `celery worker` unchanged, e.g. `--concurrency 4 -Q crux`.
    """
    _import_all(imports)
    app = _fleet_app("a worker")
    if not app.flow_defs():
        click.echo("warning: no flows registered; pass --import myapp.flows", err=True)
    argv = ["worker", *ctx.args]
    if not any(a in ("-Q", "--queues") or a.startswith("--queues=") for a in ctx.args):
        queues = {app.settings.queue} | app.registry.queues()
        argv += ["-Q", ",".join(sorted(queues))]
    app.celery.worker_main(argv)


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--import", "imports", multiple=True, metavar="MODULE", help="module defining flows")
@click.pass_context
def beat(ctx: click.Context, imports: tuple[str, ...]) -> None:
    """Start Celery beat, which runs the sweeper every CRUX_SWEEP_INTERVAL.

    The sweeper expires overdue flows and re-publishes due and stalled ones. Running
    two beats is harmless. The schedule lives in memory: nothing to persist or pickle.
    """
    _import_all(imports)
    app = _fleet_app("beat")
    app.celery.start(["beat", "--scheduler", "celery.beat:Scheduler", *ctx.args])


def _fleet_app(role: str) -> Crux:
    """The default app, checked to have what a fleet process needs, with the record ready."""
    try:
        app = default_app()
    except CruxError as exc:
        raise click.ClickException(str(exc)) from exc
    if app.settings.embedded:
        raise click.ClickException(
            f"no broker configured: set CRUX_REDIS_URL (and CRUX_DATABASE_URL) for {role}"
        )
    try:
        app.store  # noqa: B018 - brings the schema to head, and fails early if unreachable
    except CruxError as exc:
        raise click.ClickException(str(exc)) from exc
    return app


def _stop_on_signals(stop: threading.Event) -> None:
    def _handler(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _handler)
    signal.signal(signal.SIGINT, _handler)


@main.command()
@click.option("--import", "imports", multiple=True, metavar="MODULE", help="module defining flows")
@click.option(
    "--loglevel", default="INFO", show_default=True, type=click.Choice(["DEBUG", "INFO", "WARNING"])
)
def ingress(imports: tuple[str, ...], loglevel: str) -> None:
    """Record signals published by other services (publish_signal, or any client).

    Consumes CRUX_SIGNAL_QUEUE on the broker. Each message is recorded durably (or
    refused, with its reason, in crux_rejected_signals) and acknowledged only after
    the commit. With CRUX_SIGNAL_SECRET set, unsigned messages are refused. Stops
    cleanly on SIGTERM. Wire format: docs/signals.md.
    """
    from ._ingress import Ingress

    logging.basicConfig(level=loglevel, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _import_all(imports)
    app = _fleet_app("the ingress")
    stop = threading.Event()
    _stop_on_signals(stop)
    s = app.settings
    click.echo(
        f"ingress: {redact(s.effective_broker_url)} queue {s.signal_queue!r} -> "
        f"{redact(s.database_url)}; signing {'required' if s.signal_secret else 'off'}",
        err=True,
    )
    Ingress(app).run(stop)


@main.command()
@click.option("--import", "imports", multiple=True, metavar="MODULE", help="module defining flows")
@click.option("--concurrency", default=2, show_default=True, type=click.IntRange(1, 64))
def dev(imports: tuple[str, ...], concurrency: int) -> None:
    """Worker, beat and ingress together in one terminal, for local development.

    With CRUX_DATABASE_URL and CRUX_REDIS_URL set, starts the three fleet processes
    and stops them all on Ctrl-C (or when one of them exits). On the embedded default
    (no servers) it serves the imported flows from this process instead: due and
    stalled flows in .crux/crux.db are picked up every second, and signals sent with
    `crux-workers flows signal` reach them (there is no broker, so no ingress).
    """
    try:
        settings = Settings.from_env()
    except CruxError as exc:
        raise click.ClickException(str(exc)) from exc
    if settings.embedded:
        _dev_embedded(imports)
    else:
        _dev_fleet(imports, concurrency)


def _dev_embedded(imports: tuple[str, ...]) -> None:
    app = Crux(Settings.from_env(sweep_interval=1.0, redrive_after=1.0))
    set_default_app(app)
    _import_all(imports)
    stop = threading.Event()
    _stop_on_signals(stop)
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app.store  # noqa: B018
        app.transport.start()  # the executor threads and the sweeper
    except CruxError as exc:
        raise click.ClickException(str(exc)) from exc
    names = ", ".join(d.name for d in app.flow_defs()) or "none (pass --import)"
    click.echo(
        f"dev: embedded default at {redact(app.settings.effective_database_url)}; "
        f"flows: {names}. "
        "Ctrl-C to stop.",
        err=True,
    )
    try:
        stop.wait()
    finally:
        app.close()


def _dev_fleet(imports: tuple[str, ...], concurrency: int) -> None:
    args = [a for m in imports for a in ("--import", m)]
    base = [sys.executable, "-m", "crux_workers"]
    commands = {
        "worker": [*base, "worker", *args, "--concurrency", str(concurrency), "--loglevel", "INFO"],
        "beat": [*base, "beat", *args, "--loglevel", "INFO"],
        "ingress": [*base, "ingress", *args],
    }
    procs = {name: subprocess.Popen(cmd, start_new_session=True) for name, cmd in commands.items()}
    stop = threading.Event()
    _stop_on_signals(stop)
    click.echo(
        f"dev: started {', '.join(f'{n} (pid {p.pid})' for n, p in procs.items())}", err=True
    )
    exited = None
    while not stop.is_set() and exited is None:
        exited = next((n for n, p in procs.items() if p.poll() is not None), None)
        stop.wait(0.5)
    for proc in procs.values():
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 20
    for proc in procs.values():
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if exited is not None:
        raise click.ClickException(f"{exited} exited with code {procs[exited].returncode}")


main.add_command(flows)
main.add_command(health)
main.add_command(check)
main.add_command(ui)


@main.group()
def db() -> None:
    """The durable record's schema."""


@db.command()
def upgrade() -> None:
    """Apply the migrations (safe to run from many processes at once)."""
    from ._store._migrate import head_revision
    from ._store._migrate import upgrade as do_upgrade
    from ._store._sql import SqlStore

    app = default_app()
    url = app.settings.effective_database_url
    store = SqlStore(url)
    try:
        do_upgrade(store.engine)
    except Exception as exc:
        raise click.ClickException(f"cannot migrate {redact(url)}: {exc}") from exc
    finally:
        store.close()
    click.echo(f"{redact(url)} is at revision {head_revision()}")


@main.command()
def demo() -> None:
    """Run the onboarding flow end to end on the embedded default."""
    from ._demo import run_demo

    sys.exit(run_demo())


for _command in ops_commands:  # metrics, due (crux_workers/ops/_cli.py)
    main.add_command(_command)
