"""What the console reads and does, as plain data: shared by its pages and its JSON API.

Every call here blocks (the record, the broker); the web layer runs them off its event
loop. The operations that later versions add to ``Crux`` (retry, fork, waiting) are
looked up by name, so the console offers them exactly when the app has them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from .._durations import parse_duration
from .._models import TERMINAL, FlowState
from .._settings import redact
from .._store._types import FlowPage, FlowRow, RecordOverview, RejectedRow
from ..errors import InvalidDuration, InvalidInput
from ._format import decode_cursor, encode_cursor

if TYPE_CHECKING:
    from .._app import Crux

STATUSES = ("pending", "running", "suspended", "completed", "failed", "cancelled", "expired")
MAX_LIMIT = 500
# How far back a bulk action by filter looks, at most, in one confirmation.
BULK_LIMIT = 1000

WAKE_WORDS = {
    "run": "due now",
    "expire": "deadline",
    "retry": "retry at",
    "sleep": "sleeps until",
    "poll": "checks again",
    "task": "task resend",
}


@dataclass(frozen=True)
class ListQuery:
    """The flows list's filter, as read (and checked) from a query string."""

    status: str | None = None
    name: str | None = None
    waiting_on: str | None = None
    q: str | None = None
    since: str | None = None
    created_from: datetime | None = None
    created_to: datetime | None = None
    after: str | None = None
    limit: int = 50

    @classmethod
    def parse(cls, params: dict[str, str], now: datetime) -> ListQuery:
        """Read a query string; ``InvalidInput`` names the parameter that is wrong."""

        def text(key: str) -> str | None:
            value = params.get(key, "").strip()
            return value or None

        status = text("status")
        if status is not None and status not in STATUSES:
            raise InvalidInput(f"status must be one of {', '.join(STATUSES)}")
        try:
            limit = int(params.get("limit") or 50)
        except ValueError:
            raise InvalidInput("limit must be a whole number") from None
        if not 1 <= limit <= MAX_LIMIT:
            raise InvalidInput(f"limit must be between 1 and {MAX_LIMIT}")
        since = text("since")
        created_from = _time(text("created_from"), "created_from")
        if since is not None:
            try:
                created_from = now - timedelta(seconds=parse_duration(since, what="since"))
            except InvalidDuration as exc:
                raise InvalidInput(str(exc)) from None
        after = text("after")
        if after is not None:
            try:
                decode_cursor(after)
            except ValueError as exc:
                raise InvalidInput(f"after: {exc}") from None
        return cls(
            status=status,
            name=text("name"),
            waiting_on=text("waiting_on"),
            q=text("q"),
            since=since,
            created_from=created_from,
            created_to=_time(text("created_to"), "created_to"),
            after=after,
            limit=limit,
        )

    def page(self, *, limit: int | None = None) -> FlowPage:
        """The store's page for this filter."""
        return FlowPage(
            status=self.status,
            name=self.name,
            waiting_on=self.waiting_on,
            id_prefix=self.q,
            created_from=self.created_from,
            created_to=self.created_to,
            after=decode_cursor(self.after) if self.after else None,
            limit=self.limit if limit is None else limit,
        )

    def params(self, **changes: str | None) -> dict[str, str]:
        """The query string of this filter (without the cursor), with ``changes``."""
        base: dict[str, str | None] = {
            "status": self.status,
            "name": self.name,
            "waiting_on": self.waiting_on,
            "q": self.q,
            "since": self.since,
        }
        base.update(changes)
        return {k: v for k, v in base.items() if v}

    @property
    def filtered(self) -> bool:
        """Whether any filter is set."""
        return bool(self.params())


def _time(value: str | None, what: str) -> datetime | None:
    if value is None:
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidInput(f"{what} must be an ISO 8601 time, e.g. 2026-12-01T10:00:00Z") from None
    if when.tzinfo is None:
        raise InvalidInput(f"{what} needs a time zone, e.g. 2026-12-01T10:00:00Z")
    return when


@dataclass
class FlowList:
    """One page of the flows list and what the page around it shows."""

    rows: list[FlowRow]
    next_cursor: str | None
    overview: RecordOverview
    names: list[str] = field(default_factory=list)


def flow_summary(row: FlowRow) -> dict[str, Any]:
    """A flow as a list shows it (the API's list item)."""
    return {
        "flow_id": row.id,
        "name": row.name,
        "status": row.status,
        "waiting_on": row.waiting_on,
        "deadline": _iso(row.deadline),
        "wake_at": _iso(row.wake_at),
        "wake_kind": row.wake_kind,
        "cancel_reason": row.cancel_reason,
        "created_at": _iso(row.created_at),
        "updated_at": _iso(row.updated_at),
        "finished_at": _iso(row.finished_at),
    }


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


class ConsoleData:
    """The console's reads and actions on one app."""

    def __init__(self, crux: Crux) -> None:
        self.crux = crux
        self._redis: Any = None

    # -- reads ------------------------------------------------------------------------

    def now(self) -> datetime:
        """The record's clock (so ages and countdowns agree with the sweeper's)."""
        return self.crux.store.now()

    def list_flows(self, query: ListQuery) -> FlowList:
        """One page of flows for ``query``, newest first, with the counts by status."""
        store = self.crux.store
        rows = store.page_flows(query.page(limit=query.limit + 1))
        more = len(rows) > query.limit
        rows = rows[: query.limit]
        cursor = encode_cursor(rows[-1].created_at, rows[-1].id) if more and rows else None
        names = sorted(d.name for d in self.crux.flow_defs())
        return FlowList(rows, cursor, store.overview(), names)

    def find_exact(self, flow_id: str) -> str | None:
        """``flow_id`` if a flow has exactly that id (the search box jumps to it)."""
        from ..errors import FlowNotFound

        try:
            return self.crux.store.get_flow(flow_id, details=False).id
        except (FlowNotFound, InvalidInput):
            return None

    def get_flow(self, flow_id: str) -> FlowState:
        """Everything the record holds about one flow (``FlowNotFound`` if none)."""
        return self.crux.get_flow(flow_id)

    def rejected(self, limit: int = 100) -> list[RejectedRow]:
        """The most recently refused signal messages, newest first."""
        return self.crux.store.list_rejected(limit)

    def fleet(self) -> dict[str, Any]:
        """Due backlog, oldest due age, queue depths, the sweeper's last run and its lag."""
        s = self.crux.settings
        seen = self.crux.store.overview()
        lag = None
        if seen.last_sweep is not None:
            lag = max(0.0, (seen.now - seen.last_sweep).total_seconds() - s.sweep_interval)
        return {
            "now": seen.now.isoformat(),
            "counts": seen.counts,
            "due": seen.due,
            "oldest_due": _iso(seen.oldest_due),
            "oldest_due_age_s": None
            if seen.oldest_due is None
            else max(0.0, (seen.now - seen.oldest_due).total_seconds()),
            "last_sweep": _iso(seen.last_sweep),
            "sweep_interval_s": s.sweep_interval,
            "sweep_lag_s": lag,
            "embedded": s.embedded,
            "record": redact(s.effective_database_url),
            "broker": redact(s.effective_broker_url) if s.effective_broker_url else None,
            "queues": self.queue_depths(),
        }

    def queue_names(self) -> list[str]:
        """The queues this app's flows, child tasks and signals travel on."""
        s = self.crux.settings
        return sorted({s.queue, s.signal_queue} | self.crux.registry.queues())

    def queue_depths(self) -> list[dict[str, Any]]:
        """Messages waiting in each queue, read from a Redis broker (else an empty list)."""
        url = self.crux.settings.effective_broker_url
        if not url or not url.startswith(("redis://", "rediss://", "unix://")):
            return []
        out: list[dict[str, Any]] = []
        try:
            if self._redis is None:
                import redis

                self._redis = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
            pipe = self._redis.pipeline(transaction=False)
            names = self.queue_names()
            for name in names:
                # Celery's Redis transport keeps each priority level in its own list.
                for suffix in ("", "\x06\x163", "\x06\x166", "\x06\x169"):
                    pipe.llen(name + suffix)
            lengths = pipe.execute()
            for i, name in enumerate(names):
                out.append({"queue": name, "depth": int(sum(lengths[i * 4 : i * 4 + 4]))})
        except Exception as exc:
            return [{"queue": name, "depth": None, "error": type(exc).__name__} for name in names]
        return out

    # -- actions ----------------------------------------------------------------------

    def signal(self, flow_id: str, name: str, payload: Any, key: str | None) -> dict[str, Any]:
        """Record a signal (checked at send where the app does that); the receipt as data."""
        receipt = self.crux.signal_flow(flow_id, name, payload, key=key)
        return receipt.model_dump(mode="json")

    def cancel(self, flow_id: str, reason: str) -> str:
        """Cancel a flow; "cancelled" or "cancelling"."""
        return self.crux.cancel_flow(flow_id, reason)

    def purge(self, age: str) -> tuple[int, datetime]:
        """Delete flows that finished longer ago than ``age``; the count and the cutoff."""
        try:
            seconds = parse_duration(age, what="finished_before")
        except InvalidDuration as exc:
            raise InvalidInput(str(exc)) from None
        cutoff = self.now() - timedelta(seconds=seconds)
        return self.crux.store.purge_finished(cutoff), cutoff

    def matching(self, query: ListQuery, statuses: tuple[str, ...]) -> list[str]:
        """Ids of the flows the filter selects (up to ``BULK_LIMIT``) whose status fits."""
        ids: list[str] = []
        page = replace(query.page(limit=BULK_LIMIT), after=None)
        for row in self.crux.store.page_flows(page):
            if row.status in statuses:
                ids.append(row.id)
        return ids

    def cancel_many(self, ids: list[str], reason: str) -> dict[str, str]:
        """Cancel each flow; what became of each (a finished one is skipped)."""
        from ..errors import CruxError

        done: dict[str, str] = {}
        for flow_id in ids:
            try:
                done[flow_id] = self.crux.cancel_flow(flow_id, reason)
            except CruxError as exc:
                done[flow_id] = f"skipped: {type(exc).__name__}"
        return done

    # -- operations: retry, fork, waiting --------------------------------------------

    def retry(self, flow_id: str) -> str:
        """Resume a failed flow from its last checkpoint; its new status."""
        return self.crux.retry_flow(flow_id)

    def retry_many(self, ids: list[str]) -> int:
        """Retry each failed flow; how many were (one that changed meanwhile is skipped)."""
        from ..errors import CruxError

        done = 0
        for flow_id in ids:
            try:
                self.crux.retry_flow(flow_id)
                done += 1
            except CruxError:
                pass
        return done

    def fork(self, flow_id: str, at: int, input: Any = None) -> str:
        """A new flow from the first ``at`` checkpoints of ``flow_id``; its id."""
        return self.crux.fork_flow(flow_id, at, input).flow_id

    def waiting(self, name: str | None = None) -> list[dict[str, Any]]:
        """Suspended flows grouped by what they wait on, as JSON-able data."""
        return [g.model_dump(mode="json") for g in self.crux.waiting(name=name)]


def is_finished(status: str) -> bool:
    """Whether a status is terminal."""
    return status in TERMINAL


def state_json(state: FlowState) -> dict[str, Any]:
    """A flow's full state as the API returns it."""
    return state.model_dump(mode="json")
