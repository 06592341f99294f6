"""``check_flows`` and ``check_history``: would the recorded flows resume under this code?

``check_flows`` reads every unfinished flow of a record; ``check_history`` reads
histories exported with ``export_history`` (``crux-workers flows export``), so a project
can keep production histories as test fixtures. Both replay with ``_replay.replay``:
no step runs and nothing is written.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import _json
from .._app import Crux, default_app
from .._flow import FlowHandle
from .._registry import FlowDef
from .._store._lifecycle import ACTIVE
from .._store._roles import CruxStore
from .._store._types import Checkpoint, FlowFilter
from ..errors import InvalidInput
from ._replay import Problem, replay

FORMAT = "crux-workers.history"
VERSION = 1

Flows = Crux | FlowHandle[Any] | FlowDef | Iterable[Crux | FlowHandle[Any] | FlowDef]


@dataclass(frozen=True, slots=True)
class History:
    """A flow's recorded history: what a replay needs (exported as JSON)."""

    flow_id: str
    name: str
    status: str
    input: str  # JSON text
    checkpoints: list[Checkpoint]
    waiting_on: str | None = None
    signals: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The export format: JSON values, not JSON texts, so a person can read it."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "flow_id": self.flow_id,
            "name": self.name,
            "status": self.status,
            "waiting_on": self.waiting_on,
            "input": _json.loads(self.input),
            "checkpoints": [
                {
                    "seq": c.seq,
                    "kind": c.kind,
                    "name": c.name,
                    "occurrence": c.occurrence,
                    "result": _json.loads(c.result),
                }
                for c in self.checkpoints
            ],
            "signals": self.signals,
        }

    @classmethod
    def from_json(cls, data: Any) -> History:
        """Read the export format back; ``InvalidInput`` if it is not one."""
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise InvalidInput(f'not an exported flow history (no "format": {FORMAT!r})')
        if data.get("version") != VERSION:
            raise InvalidInput(f"unsupported history version {data.get('version')!r}")
        try:
            cps = [
                Checkpoint(
                    int(c["seq"]),
                    str(c["kind"]),
                    str(c["name"]),
                    int(c["occurrence"]),
                    _json.dumps(c["result"]),
                )
                for c in data["checkpoints"]
            ]
            return cls(
                str(data["flow_id"]),
                str(data["name"]),
                str(data.get("status", "?")),
                _json.dumps(data["input"]),
                sorted(cps, key=lambda c: c.seq),
                data.get("waiting_on"),
                list(data.get("signals", [])),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidInput(f"malformed flow history: {exc!r}") from None


def history_of(store: CruxStore, flow_id: str) -> History:
    """The recorded history of one flow, read from ``store`` (nothing is written)."""
    row = store.get_flow(flow_id, details=True)
    return History(
        row.id,
        row.name,
        str(row.status),
        row.input,
        [Checkpoint(s.seq, s.kind, s.name, s.occurrence, s.result) for s in row.steps],
        row.waiting_on,
        [
            {
                "name": s.name,
                "payload": _json.loads(s.payload),
                "key": s.key,
                "status": s.status,
                "consumed_seq": s.consumed_seq,
            }
            for s in row.signals
        ],
    )


def export_history(store: CruxStore | Crux, flow_id: str) -> dict[str, Any]:
    """A flow's recorded history as a JSON-able dict (``crux-workers flows export``)."""
    record = store.store if isinstance(store, Crux) else store
    return history_of(record, flow_id).to_json()


@dataclass(slots=True)
class CheckReport:
    """What a check found; ``ok`` when every flow replays cleanly."""

    checked: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    # Set when a status had more unfinished flows than ``limit``: the newest were checked.
    truncated: bool = False

    @property
    def ok(self) -> bool:
        """No flow would fail."""
        return not self.problems

    @property
    def failing(self) -> list[str]:
        """The ids of the flows that would fail, in the order checked."""
        return list(dict.fromkeys(p.flow_id for p in self.problems))

    def __str__(self) -> str:
        n = len(self.checked)
        more = " (more unfinished flows than the limit: the newest were checked)"
        more = more if self.truncated else ""
        if self.ok:
            return f"{n} flow(s) checked{more}: all replay cleanly"
        lines = [f"{n} flow(s) checked{more}: {len(self.failing)} would fail"]
        lines += [f"  {p}".replace("\n", "\n  ") for p in self.problems]
        return "\n".join(lines)


def _definitions(flows: Flows | None) -> dict[str, FlowDef]:
    if flows is None:
        flows = default_app()
    items: Iterable[Any] = (
        [flows] if isinstance(flows, Crux | FlowHandle | FlowDef) else list(flows)
    )
    defs: dict[str, FlowDef] = {}
    for item in items:
        if isinstance(item, Crux):
            defs.update({d.name: d for d in item.flow_defs()})
        elif isinstance(item, FlowHandle):
            defs[item.name] = item.defn
        elif isinstance(item, FlowDef):
            defs[item.name] = item
        else:
            raise InvalidInput(f"cannot check against {type(item).__name__}: pass flows or an app")
    return defs


def _check_one(defs: dict[str, FlowDef], h: History, report: CheckReport) -> None:
    report.checked.append(h.flow_id)
    defn = defs.get(h.name)
    if defn is None:
        report.problems.append(
            Problem(
                h.flow_id,
                h.name,
                "unknown-flow",
                f"no flow {h.name!r} is defined in the code checked (removed or renamed? "
                "missing --import?)",
            )
        )
        return
    report.problems += replay(defn, h.flow_id, h.input, h.checkpoints)


def check_history(
    histories: Iterable[History | dict[str, Any] | str | Path], flows: Flows | None = None
) -> CheckReport:
    """Replay exported histories (dicts, ``History`` objects, or JSON files) against
    ``flows`` (handles, definitions or apps; default: the default app's flows)."""
    defs = _definitions(flows)
    report = CheckReport()
    for item in histories:
        if isinstance(item, str | Path):
            item = json.loads(Path(item).read_text(encoding="utf-8"))
        h = item if isinstance(item, History) else History.from_json(item)
        _check_one(defs, h, report)
    return report


def check_flows(
    flows: Flows | None = None,
    *,
    store: CruxStore | str | None = None,
    names: Iterable[str] = (),
    limit: int = 100_000,
) -> CheckReport:
    """Replay every unfinished flow of a record against ``flows``.

    ``store`` is a record or a database URL (default: the default app's record);
    ``names`` limits the check to flows of those names, ``limit`` the flows read per
    status (newest first). Nothing is written.
    """
    opened: CruxStore | None = None
    if store is None:
        record: CruxStore = default_app().store
    elif isinstance(store, str):
        from .._store._sql import SqlStore

        record = opened = SqlStore(store)
    else:
        record = store
    try:
        defs = _definitions(flows)
        wanted = set(names)
        report = CheckReport()
        for status in ACTIVE:
            rows = record.list_flows(FlowFilter(status=str(status), limit=limit))
            report.truncated |= len(rows) >= limit
            for row in rows:
                if wanted and row.name not in wanted:
                    continue
                _check_one(defs, history_of(record, row.id), report)
        return report
    finally:
        if opened is not None:
            opened.close()
