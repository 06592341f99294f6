"""``crux-workers flows retry|fork|waiting``: the operations of docs/operations.md.

Registered on the ``flows`` group of ``_cli_flows``; the same conventions (tables or
``--json``, every printed value escaped, exit 1 for a refused operation).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import click

from ._app import Crux
from ._cli_flows import (
    _emit_json,
    _json_arg,
    _when,
    flows,
    json_option,
    operator_app,
    safe,
    table,
)


@flows.command()
@click.argument("flow_id", required=False)
@click.option(
    "--status",
    default="failed",
    show_default=True,
    type=click.Choice(["failed"]),
    help="without ID: retry every flow with this status",
)
@click.option("--name", help="without ID: only flows of this flow name")
@click.option("--limit", default=1000, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--yes", is_flag=True, help="without ID: do not ask for confirmation")
@json_option
def retry(
    flow_id: str | None, status: str, name: str | None, limit: int, yes: bool, as_json: bool
) -> None:
    """Retry a failed flow (ID), or every failed flow matching --name, after a fix.

    The flow resumes from its last checkpoint: the failed step runs again with a fresh
    attempt count, earlier steps are not run again.
    """
    from ._store._types import FlowFilter

    with operator_app() as app:
        if flow_id is not None:
            new_status = app.retry_flow(flow_id)
            if as_json:
                _emit_json({"flow_id": flow_id, "status": new_status})
            else:
                click.echo(f"flow {safe(flow_id)}: {new_status}, from its last checkpoint")
            return
        count = len(app.store.list_flows(FlowFilter(status=status, name=name, limit=limit)))
        which = f"{status} flow(s)" + (f" named {safe(repr(name))}" if name else "")
        if count == 0:
            retried: list[str] = []
        else:
            if not yes:
                click.confirm(f"retry {count} {which}?", abort=True, err=True)
            retried = app.retry_flows(status=status, name=name, limit=limit)
    if as_json:
        _emit_json({"retried": retried, "count": len(retried)})
    else:
        click.echo(f"retried {len(retried)} {which}")
        for one in retried[:20]:
            click.echo(f"  {safe(one)}")
        if len(retried) > 20:
            click.echo(f"  ... and {len(retried) - 20} more")


def _registered(app: Crux, imports: tuple[str, ...]) -> None:
    """Register on ``app`` the flows the ``--import`` modules define (to validate input)."""
    import importlib

    from ._app import default_app

    for module in imports:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise click.ClickException(f"cannot import {module!r}: {exc}") from exc
    for defn in default_app().flow_defs():
        if app.registry.get(defn.name) is None:
            app.registry.define(defn.name, defn.fn, defn.input_model, defn.queue)


@flows.command()
@click.argument("flow_id")
@click.option("--at", "at", required=True, type=click.IntRange(0), help="checkpoints to copy")
@click.option(
    "--input",
    "new_input",
    callback=lambda ctx, param, value: None if value is None else _json_arg(ctx, param, value),
    metavar="JSON",
    help="replace the input (validated: needs --import of the module defining the flow)",
)
@click.option("--id", "new_id", help="the fork's flow id (default: a new uuid)")
@click.option("--import", "imports", multiple=True, metavar="MODULE", help="module defining flows")
@json_option
def fork(
    flow_id: str,
    at: int,
    new_input: Any,
    new_id: str | None,
    imports: tuple[str, ...],
    as_json: bool,
) -> None:
    """Start a new flow from the first --at checkpoints of FLOW_ID (copied, not run again).

    Forking at a suspend point lets you send the fork a different signal. The original
    flow is left untouched; `flows show` of the fork says where it came from.
    """
    with operator_app() as app:
        if imports:
            _registered(app, imports)
        run = app.fork_flow(flow_id, at, new_input, flow_id=new_id)
    if as_json:
        _emit_json({"flow_id": run.flow_id, "forked_from": flow_id, "at": at})
    else:
        click.echo(f"flow {safe(run.flow_id)}: forked from {safe(flow_id)} at checkpoint {at}")


def _ago(since: datetime, now: datetime) -> str:
    seconds = max(0.0, (now - since).total_seconds())
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86400:.0f}d"


@flows.command()
@click.option("--name", help="only flows of this flow name")
@json_option
def waiting(name: str | None, as_json: bool) -> None:
    """Who is waiting on what, since when, until when: suspended flows grouped."""
    with operator_app() as app:
        groups = app.waiting(name=name)
        now = app.store.now()
    if as_json:
        _emit_json([g.model_dump(mode="json") for g in groups])
        return
    if not groups:
        click.echo("no flow is waiting")
        return
    click.echo(
        table(
            ["NAME", "WAITS ON", "FLOWS", "OLDEST", "NEAREST DEADLINE", "NEXT WAKE"],
            [
                [
                    g.name,
                    f"{g.kind} {g.on}".rstrip(),
                    str(g.count),
                    f"{_when(g.oldest_since)} ({_ago(g.oldest_since, now)} ago)",
                    _when(g.nearest_deadline),
                    _when(g.next_wake),
                ]
                for g in groups
            ],
        )
    )
