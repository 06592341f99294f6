"""``crux-workers ui``: serve the operator console (needs the ``ui`` extra).

On the embedded default the console's app is record-only: it reads and writes the
record (signals, cancels) but never runs a flow itself; the process that runs the
flows (``crux-workers dev``, a worker) picks up what it records.
"""

from __future__ import annotations

import importlib
import os

import click

from ._app import Crux, set_default_app
from ._cli_flows import safe
from ._settings import Settings, redact
from .errors import CruxError


@click.command()
@click.option("--import", "imports", multiple=True, metavar="MODULE", help="module defining flows")
@click.option("--host", default="127.0.0.1", show_default=True, help="address to listen on")
@click.option("--port", default=8787, show_default=True, type=click.IntRange(0, 65535))
@click.option("--read-only", is_flag=True, help="hide every action and refuse action calls")
@click.option(
    "--token",
    envvar="CRUX_UI_TOKEN",
    metavar="TOKEN",
    help="required on every page and API call [env CRUX_UI_TOKEN]; mandatory off loopback",
)
def ui(imports: tuple[str, ...], host: str, port: int, read_only: bool, token: str | None) -> None:
    """Serve the operator console: flows, their timelines, signals, cancel, fleet health.

    Open http://127.0.0.1:8787 . Binding to an address other than loopback needs a
    token (CRUX_UI_TOKEN or --token); browsers sign in with it once, scripts send
    `Authorization: Bearer TOKEN`.
    """
    try:
        import uvicorn

        from .ui import create_app
        from .ui._security import LOOPBACK_HOSTS, is_loopback
    except ImportError as exc:
        raise click.ClickException(
            f"the console needs the ui extra: pip install 'crux_workers[ui]' ({exc})"
        ) from exc
    if token is not None and len(token) < 16:
        raise click.ClickException("the token must be at least 16 characters long")
    if not is_loopback(host) and token is None:
        raise click.ClickException(
            f"refusing to serve the console on {host} without a token: set CRUX_UI_TOKEN "
            "(or --token), or bind to 127.0.0.1"
        )
    try:
        app = Crux(Settings.from_env(), record_only=True)
    except CruxError as exc:
        raise click.ClickException(safe(str(exc))) from exc
    # The flows' modules decorate on the default app: make it this one, so their
    # names and queues are known here.
    set_default_app(app)
    for name in imports:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise click.ClickException(f"cannot import {name!r}: {exc}") from exc
    try:
        app.store  # noqa: B018 - fails early if the record cannot be reached
    except CruxError as exc:
        app.close()
        raise click.ClickException(safe(str(exc))) from exc
    hosts = None if token is not None else (*LOOPBACK_HOSTS, host)
    asgi = create_app(app, token=token, read_only=read_only, hosts=hosts)
    shown = f"[{host}]" if ":" in host else host
    click.echo(
        f"console: http://{shown}:{port}/ on {redact(app.settings.effective_database_url)}"
        + (" (read-only)" if read_only else "")
        + ("" if token is None else "; sign in with the token"),
        err=True,
    )
    try:
        uvicorn.run(
            asgi,
            host=host,
            port=port,
            log_level=os.environ.get("CRUX_UI_LOG_LEVEL", "warning"),
            server_header=False,
        )
    finally:
        app.close()
