"""``crux-workers health``: is this machine's worker consuming? No broker, no remote control."""

from __future__ import annotations

import sys

import click

from ._durations import parse_duration
from ._health import DEFAULT_MAX_AGE, check
from ._settings import Settings
from .errors import CruxError


@click.command()
@click.option(
    "--max-age",
    default=f"{DEFAULT_MAX_AGE:g}s",
    show_default=True,
    metavar="DURATION",
    help="oldest heartbeat still counted as alive",
)
@click.option(
    "--file",
    "path",
    default=None,
    metavar="PATH",
    help="heartbeat file (default: CRUX_HEALTH_FILE)",
)
def health(max_age: str, path: str | None) -> None:
    """Exit 0 if the worker's heartbeat (CRUX_HEALTH_FILE) is fresh, 1 otherwise.

    For container health checks and Kubernetes probes. The worker touches the file
    every few seconds while it consumes, and removes it when it stops.
    """
    try:
        limit = parse_duration(max_age, what="--max-age")
        target = path or Settings.from_env().health_file
    except CruxError as exc:
        click.echo(f"unhealthy: {exc}", err=True)
        sys.exit(1)
    if not target:
        click.echo("unhealthy: no heartbeat file: set CRUX_HEALTH_FILE (or pass --file)", err=True)
        sys.exit(1)
    result = check(target, limit)
    click.echo(result.message, err=not result.healthy)
    sys.exit(0 if result.healthy else 1)
