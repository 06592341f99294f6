"""Module-level calls on the default app: signals, cancellation, reads."""

from __future__ import annotations

from typing import Any

from ._app import default_app
from ._models import FlowState, SignalReceipt


def signal_flow(
    flow_id: str, name: str, payload: Any = None, *, key: str | None = None
) -> SignalReceipt:
    """Record a signal for a flow durably, then wake the flow if it waits for it.

    Raises ``FlowNotFound`` for an unknown flow and ``FlowNotWaiting`` for a finished
    one. With ``key``, a repeated signal is recorded once (``duplicate=True``).
    """
    return default_app().signal_flow(flow_id, name, payload, key=key)


def cancel_flow(flow_id: str, reason: str = "") -> str:
    """Cancel a flow: at once when nothing runs it, else at its next step boundary.

    Returns "cancelled" or "cancelling". The outcome becomes
    ``FlowOutcome(status="cancelled", cancel_reason=reason)``. Raises
    ``FlowAlreadyFinished`` for a finished flow and ``FlowNotFound`` for an unknown one.
    """
    return default_app().cancel_flow(flow_id, reason)


def get_flow(flow_id: str) -> FlowState:
    """Everything the record holds about a flow; ``FlowNotFound`` if there is none."""
    return default_app().get_flow(flow_id)


def publish_signal(flow_id: str, name: str, payload: Any = None, *, key: str | None = None) -> str:
    """Publish a signal for the ingress to record: for services that reach only the broker.

    Needs ``CRUX_REDIS_URL`` or ``CRUX_BROKER_URL`` (no database, no flow code). The
    message is signed with ``CRUX_SIGNAL_SECRET`` when set (wire format v2: a timestamp
    the ingress checks for freshness; docs/signals.md). Returns the signal's key (a
    fresh one when none is given), which deduplicates redelivered and replayed messages.
    """
    return default_app().publish_signal(flow_id, name, payload, key=key)


async def signal_flow_async(
    flow_id: str, name: str, payload: Any = None, *, key: str | None = None
) -> SignalReceipt:
    """``signal_flow`` for async code: the record is written off the event loop."""
    return await default_app().client.signal_flow_async(flow_id, name, payload, key=key)


async def cancel_flow_async(flow_id: str, reason: str = "") -> str:
    """``cancel_flow`` for async code."""
    return await default_app().client.cancel_flow_async(flow_id, reason)


async def get_flow_async(flow_id: str) -> FlowState:
    """``get_flow`` for async code."""
    return await default_app().client.get_flow_async(flow_id)
