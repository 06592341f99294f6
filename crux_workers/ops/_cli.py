"""``crux-workers metrics`` and ``crux-workers due``: the fleet's numbers from the record."""

from __future__ import annotations

import json
import signal
import threading

import click

from .._app import Crux
from .._settings import Settings
from ..errors import CruxError


def _record_app() -> Crux:
    try:
        return Crux(Settings.from_env(), record_only=True)
    except CruxError as exc:
        raise click.ClickException(str(exc)) from exc


@click.command()
@click.option("--port", type=click.IntRange(0, 65535), default=9464, show_default=True)
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--once", is_flag=True, help="print the metrics once to stdout and exit")
def metrics(port: int, host: str, once: bool) -> None:
    """Serve the fleet's Prometheus metrics on http://HOST:PORT/metrics.

    Flows by status, waits, the due backlog (crux_flows_due: what to autoscale on),
    refused ingress messages and the last sweep, read from the record by one query
    per scrape. Run one per fleet; workers serve their own counters on
    CRUX_METRICS_PORT (docs/observability.md).
    """
    from prometheus_client import generate_latest

    from .metrics import metrics_registry, serve_metrics

    app = _record_app()
    try:
        if once:
            click.echo(generate_latest(metrics_registry(app)).decode(), nl=False)
            return
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        server = serve_metrics(app, port, host)
        click.echo(f"metrics: http://{host}:{server.server_port}/metrics", err=True)
        stop.wait()
        server.shutdown()
    finally:
        app.close()


@click.command()
@click.option("--flow", "flow_name", default=None, help="only flows of this name")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def due(flow_name: str | None, as_json: bool) -> None:
    """Print how many flows are runnable and unclaimed now (the autoscaling signal).

    Suspended and sleeping flows do not count until they are due; running ones
    with a live lease do not count either.
    """
    app = _record_app()
    try:
        snap = app.store.metrics_snapshot()
    except CruxError as exc:
        raise click.ClickException(str(exc)) from exc
    finally:
        app.close()
    count = snap.due.get(flow_name, 0) if flow_name else sum(snap.due.values())
    if as_json:
        oldest = snap.oldest_due_at
        age = 0.0 if oldest is None else (snap.taken_at - oldest).total_seconds()
        click.echo(json.dumps({"due": count, "by_flow": snap.due, "oldest_age_seconds": age}))
    else:
        click.echo(str(count))


commands = (metrics, due)
