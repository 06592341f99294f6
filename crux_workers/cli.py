"""``crux-workers``: run workers, migrate the record, try the demo."""

from __future__ import annotations

import importlib
import sys

import click

from ._app import default_app
from ._settings import redact
from .errors import CruxError


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
    app = default_app()
    if app.settings.embedded:
        raise click.ClickException(
            "no broker configured: set CRUX_REDIS_URL (and CRUX_DATABASE_URL) for a worker"
        )
    try:
        app.store  # noqa: B018 - brings the schema to head before taking work
    except CruxError as exc:
        raise click.ClickException(str(exc)) from exc
    if not app.flow_defs():
        click.echo("warning: no flows registered; pass --import myapp.flows", err=True)
    argv = ["worker", *ctx.args]
    if not any(a in ("-Q", "--queues") or a.startswith("--queues=") for a in ctx.args):
        queues = {app.settings.queue} | {
            h.queue for h in app._handles.values() if h.queue is not None
        }
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
    app = default_app()
    if app.settings.embedded:
        raise click.ClickException("no broker configured: set CRUX_REDIS_URL for beat")
    try:
        app.store  # noqa: B018 - brings the schema to head first
    except CruxError as exc:
        raise click.ClickException(str(exc)) from exc
    app.celery.start(["beat", "--scheduler", "celery.beat:Scheduler", *ctx.args])


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
