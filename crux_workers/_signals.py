"""Module-level calls on the default app: ``signal_flow``, ``get_flow``."""

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
