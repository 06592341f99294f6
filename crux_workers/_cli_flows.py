"""``crux-workers flows ...``: see and act on flows from a terminal.

Readable tables by default, ``--json`` for scripts. Errors are one line on stderr
and a non-zero exit code: 1 for a refused operation (unknown flow, finished flow,
unreachable record), 2 for bad arguments (bad JSON, bad duration).

What the record holds may come from anyone who can publish (a refused signal message,
a flow id, an error message): every value printed as text goes through ``safe``, so
no control character, escape sequence or bidi override reaches the terminal.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

import click

from . import _json
from ._app import Crux
from ._client import to_state
from ._durations import parse_duration
from ._models import FlowState
from ._settings import Settings
from .errors import CruxError, InvalidDuration


@contextmanager
def operator_app() -> Iterator[Crux]:
    """The app for one CLI command; on the embedded default it never runs flows itself."""
    try:
        app = Crux(Settings.from_env(), record_only=True)
    except CruxError as exc:
        raise click.ClickException(safe(str(exc))) from exc
    try:
        yield app
    except CruxError as exc:
        raise click.ClickException(safe(str(exc))) from exc
    finally:
        app.close()


def _escape(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def safe(text: str) -> str:
    """``text`` with every non-printable character written as an escape (``\\x1b``).

    Non-printable, as Python's ``str.isprintable`` has it: C0 and C1 controls (ESC, CR,
    BEL, ...), DEL, format characters such as bidi overrides, separators other than
    the space, surrogates and unassigned code points.
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else _escape(c) for c in text)


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _span(start: datetime | None, end: datetime | None) -> str:
    if start is None or end is None:
        return "-"
    seconds = (end - start).total_seconds()
    return f"{seconds * 1000:.0f}ms" if seconds < 1 else f"{seconds:.1f}s"


def _short(value: Any, width: int = 48) -> str:
    text = safe(value if isinstance(value, str) else _json.dumps(value))
    return text if len(text) <= width else text[: width - 1] + "…"


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Left-aligned columns, two spaces apart; every cell escaped (``safe``)."""
    headers = [safe(h) for h in headers]
    rows = [[safe(c) for c in r] for r in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def _emit_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


json_option = click.option("--json", "as_json", is_flag=True, help="print JSON, for scripts")


@click.group()
def flows() -> None:
    """See and act on flows in the record (CRUX_DATABASE_URL, or the embedded default)."""
    import logging

    # Warnings (a broker that cannot be reached, say) as one readable line on stderr.
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")


@flows.command("list")
@click.option(
    "--status",
    type=click.Choice(
        ["pending", "running", "suspended", "completed", "failed", "cancelled", "expired"]
    ),
)
@click.option("--name", help="only flows of this flow name")
@click.option("--waiting-on", "waiting_on", metavar="SIGNAL", help="only flows waiting on it")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10_000))
@json_option
def list_flows(
    status: str | None, name: str | None, waiting_on: str | None, limit: int, as_json: bool
) -> None:
    """List flows, newest first."""
    from ._store._types import FlowFilter

    with operator_app() as app:
        rows = app.store.list_flows(FlowFilter(status, name, waiting_on, limit))
        states = [to_state(r) for r in rows]
    if as_json:
        _emit_json(
            [s.model_dump(mode="json", exclude={"steps", "signals", "step_errors"}) for s in states]
        )
        return
    if not states:
        click.echo("no flows match")
        return
    click.echo(
        table(
            ["ID", "NAME", "STATUS", "WAITING ON", "WAKE", "CREATED", "UPDATED"],
            [
                [
                    s.flow_id,
                    s.name,
                    s.status,
                    s.waiting_on or "-",
                    f"{s.wake_kind} {_when(s.wake_at)}" if s.wake_at else "-",
                    _when(s.created_at),
                    _when(s.updated_at),
                ]
                for s in states
            ],
        )
    )


def _show(s: FlowState) -> str:
    out = [
        f"flow      {safe(s.flow_id)}",
        f"name      {safe(s.name)}",
        f"status    {s.status}",
        f"input     {_short(s.input, 100)}",
        f"created   {_when(s.created_at)}   updated {_when(s.updated_at)}"
        + (f"   finished {_when(s.finished_at)}" if s.finished_at else ""),
    ]
    if s.forked_from is not None:
        out.append(
            f"forked    from {safe(s.forked_from.flow_id)} at checkpoint {s.forked_from.at}"
            " (the first checkpoints copied, not run)"
        )
    if s.retries:
        out.append(f"retried   {s.retries} time(s)")
    if s.waiting_on:
        out.append(
            f"waiting   {safe(s.waiting_on)}"
            + (f" (deadline {_when(s.deadline)})" if s.deadline else "")
        )
    if s.waiting_schema is not None:
        out.append(f"schema    {_short(s.waiting_schema, 200)}")
    if s.wake_at:
        out.append(f"wake      {s.wake_kind} at {_when(s.wake_at)}")
    if s.result is not None:
        out.append(f"result    {_short(s.result, 100)}")
    if s.error is not None:
        out.append(f"error     {safe(s.error.type)}: {safe(s.error.message)}")
    if s.cancel_reason:
        out.append(f"cancelled {safe(s.cancel_reason)}")
    out += ["", "steps"]
    out.append(
        table(
            ["SEQ", "KIND", "NAME", "ATTEMPTS", "STARTED", "TOOK", "RESULT"],
            [
                [
                    str(st.seq),
                    st.kind,
                    st.name if st.occurrence == 0 else f"{st.name} #{st.occurrence + 1}",
                    str(st.attempts),
                    _when(st.started_at),
                    _span(st.started_at, st.completed_at),
                    _short(st.result),
                ]
                for st in s.steps
            ],
        )
        if s.steps
        else "  (none yet)"
    )
    if s.signals:
        out += ["", "signals"]
        out.append(
            table(
                ["ID", "NAME", "KEY", "STATUS", "RECEIVED", "USED AT", "NOTE"],
                [
                    [
                        str(sg.id),
                        sg.name,
                        sg.key or "-",
                        sg.status,
                        _when(sg.created_at),
                        "-" if sg.consumed_seq is None else f"seq {sg.consumed_seq}",
                        _short(sg.error or "", 60) or "-",
                    ]
                    for sg in s.signals
                ],
            )
        )
    if s.step_errors:
        out += ["", "failed attempts"]
        out.append(
            table(
                ["STEP", "ATTEMPT", "ERROR"],
                [
                    [
                        e.step or "-",
                        str(e.details.get("attempt", "-")),
                        _short(f"{e.type}: {e.message}", 80),
                    ]
                    for e in s.step_errors
                ],
            )
        )
    return "\n".join(out)


@flows.command()
@click.argument("flow_id")
@json_option
def show(flow_id: str, as_json: bool) -> None:
    """One flow: its step timeline with durations, signals, wake time and kind."""
    with operator_app() as app:
        state = app.get_flow(flow_id)
    if as_json:
        _emit_json(state.model_dump(mode="json"))
    else:
        click.echo(_show(state))


@flows.command()
@click.argument("flow_id")
@click.option(
    "-o", "--output", type=click.Path(dir_okay=False), help="write to FILE instead of stdout"
)
def export(flow_id: str, output: str | None) -> None:
    """A flow's recorded history as JSON, for `crux-workers check --history FILE`."""
    from .testing import export_history

    with operator_app() as app:
        text = json.dumps(export_history(app, flow_id), indent=2)
    if output is None:
        click.echo(text)
    else:
        with open(output, "w", encoding="utf-8") as fh:
            fh.write(text + "\n")


def _json_arg(_ctx: click.Context, _param: click.Parameter, value: str) -> Any:
    try:
        parsed = json.loads(value)
        _json.check_depth(parsed)
    except (ValueError, RecursionError) as exc:
        # JSONDecodeError, a 5000-digit integer (ValueError), nesting too deep: exit 2.
        shown = value if len(value) <= 80 else value[:80] + f"... ({len(value)} chars)"
        raise click.BadParameter(f"not valid JSON ({str(exc)[:200]}): {shown!r}") from None
    return parsed


@flows.command()
@click.argument("flow_id")
@click.argument("name")
@click.argument("payload", metavar="JSON", callback=_json_arg, default="null")
@click.option("--key", help="idempotency key: the same key twice is recorded once")
@json_option
def signal(flow_id: str, name: str, payload: Any, key: str | None, as_json: bool) -> None:
    """Record signal NAME with JSON payload for a flow, then wake it."""
    with operator_app() as app:
        receipt = app.signal_flow(flow_id, name, payload, key=key)
    if as_json:
        _emit_json(receipt.model_dump(mode="json"))
    else:
        what = "already recorded (same key)" if receipt.duplicate else "recorded"
        line = f"signal {safe(repr(name))} {what} as #{receipt.signal_id} for flow {safe(flow_id)}"
        if receipt.delivered:
            line += ": delivered, the flow was waiting for it"
        elif not receipt.duplicate:
            line += ": kept until the flow waits for it"
        click.echo(line)


@flows.command()
@click.argument("flow_id")
@click.option("--reason", required=True, help="why; kept as the flow's cancel_reason")
@json_option
def cancel(flow_id: str, reason: str, as_json: bool) -> None:
    """Cancel a flow: at once, or at its next step boundary if it is running."""
    with operator_app() as app:
        status = app.cancel_flow(flow_id, reason)
    if as_json:
        _emit_json({"flow_id": flow_id, "status": status})
    else:
        click.echo(f"flow {safe(flow_id)}: {status}")


def _age(_ctx: click.Context, _param: click.Parameter, value: str) -> timedelta:
    try:
        return timedelta(seconds=parse_duration(value, what="--finished-before"))
    except InvalidDuration as exc:
        raise click.BadParameter(str(exc)) from None


@flows.command()
@click.option(
    "--finished-before",
    "age",
    required=True,
    callback=_age,
    metavar="AGE",
    help="delete flows that finished longer ago than this (e.g. 30d)",
)
@json_option
def purge(age: timedelta, as_json: bool) -> None:
    """Delete finished flows (steps and signals too) older than AGE. Active ones stay.

    Refused ingress messages received before the same cutoff go too.
    CRUX_RETENTION=AGE makes beat do this periodically.
    """
    with operator_app() as app:
        cutoff = app.store.now() - age
        count = app.store.purge_finished(cutoff)
        refused = app.store.purge_rejected(cutoff)
    if as_json:
        _emit_json(
            {"purged": count, "purged_rejected": refused, "finished_before": cutoff.isoformat()}
        )
    else:
        click.echo(f"purged {count} flow(s) finished before {_when(cutoff)} UTC")
        click.echo(f"purged {refused} refused message(s) received before {_when(cutoff)} UTC")


@flows.command()
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10_000))
@json_option
def rejected(limit: int, as_json: bool) -> None:
    """Signal messages the ingress refused, newest first, with the reason."""
    with operator_app() as app:
        rows = app.store.list_rejected(limit)
    if as_json:
        _emit_json([r.as_json() for r in rows])
        return
    if not rows:
        click.echo("no refused messages")
        return
    click.echo(
        table(
            ["ID", "RECEIVED", "REASON", "FLOW", "NAME", "DETAIL"],
            [
                [
                    str(r.id),
                    _when(r.received_at),
                    r.reason,
                    r.flow_id or "-",
                    r.name or "-",
                    _short(r.detail, 70),
                ]
                for r in rows
            ],
        )
    )
