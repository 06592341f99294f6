"""``crux-workers check``: would the recorded flows resume under the code as it is now?

Gates a deploy: replays every unfinished flow of the configured record (or exported
histories, ``--history``) against the flows the ``--import`` modules define, with every
step stubbed to its recorded result: no step runs and nothing is written. Exit status
0 when every flow replays cleanly, 1 when one would fail (or the check could not run).
"""

from __future__ import annotations

import importlib
import json

import click

from ._cli_flows import operator_app, safe
from .errors import CruxError


@click.command()
@click.option("--import", "imports", multiple=True, metavar="MODULE", help="module defining flows")
@click.option(
    "--history",
    "histories",
    multiple=True,
    metavar="FILE",
    type=click.Path(exists=True, dir_okay=False),
    help="an exported history (crux-workers flows export) to replay instead of the record",
)
@click.option(
    "--name", "names", multiple=True, metavar="FLOW", help="check only flows of this name"
)
@click.option("--limit", default=100_000, show_default=True, help="flows read per status")
@click.option("--json", "as_json", is_flag=True, help="print the problems as JSON")
def check(
    imports: tuple[str, ...],
    histories: tuple[str, ...],
    names: tuple[str, ...],
    limit: int,
    as_json: bool,
) -> None:
    """Replay recorded flows against the imported code; exit 1 if any would fail.

    Reports, per flow: a checkpoint that differs from the recorded one at its position
    (a renamed, reordered, added or removed step, suspend, sleep or child), a recorded
    step result that no longer fits the step function's return annotation, a recorded
    signal that no longer fits its suspend's schema, stored input that no longer fits
    the flow's input model, and flows the imported code does not define.
    """
    from ._app import default_app
    from .testing import check_flows, check_history

    for module in imports:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise click.ClickException(f"cannot import {module!r}: {exc}") from exc
    try:
        flows = default_app()
        if histories:
            report = check_history(list(histories), flows)
        else:
            with operator_app() as app:
                report = check_flows(flows, store=app.store, names=names, limit=limit)
    except CruxError as exc:
        raise click.ClickException(safe(str(exc))) from exc
    if as_json:
        click.echo(
            json.dumps(
                {
                    "ok": report.ok,
                    "checked": len(report.checked),
                    "truncated": report.truncated,
                    "problems": [
                        {
                            "flow_id": p.flow_id,
                            "flow_name": p.flow_name,
                            "kind": p.kind,
                            "position": p.position,
                            "expected": p.expected,
                            "actual": p.actual,
                            "message": p.message,
                        }
                        for p in report.problems
                    ],
                },
                indent=2,
            )
        )
    else:
        click.echo(safe_lines(str(report)))
    if not report.ok:
        raise SystemExit(1)


def safe_lines(text: str) -> str:
    """``safe`` on each line: what the record holds reaches the terminal escaped."""
    return "\n".join(safe(line) for line in text.split("\n"))
