"""OpenTelemetry spans of flow executions (when ``opentelemetry-api`` is installed).

One span per execution (``crux.flow <name>``, from the claim to its end), and under
it one span per checkpoint (``crux.step <name>``, timed from the step's start),
failed attempt (``crux.step <name>`` with an error status) and suspend
(``crux.suspend <point>``). Attributes: ``crux.flow``, ``crux.flow_id``,
``crux.step``, ``crux.kind``, ``crux.outcome``. While a sync handler runs, the
execution's span is the current one, so spans of instrumented libraries called in a
step nest under it.

Without an SDK configured, the API hands out non-recording spans: next to free.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from opentelemetry import context, trace

from .._observe import Claim


class FlowTracing:
    """An ``Observer`` making spans with ``tracer`` (default: ``crux_workers``'s)."""

    def __init__(self, tracer: trace.Tracer | None = None) -> None:
        self._tracer = tracer or trace.get_tracer("crux_workers")
        self._lock = threading.Lock()
        # flow id -> (execution span, context token of the thread that claimed it)
        self._spans: dict[str, tuple[trace.Span, Any]] = {}

    def _parent(self, flow_id: str) -> Any:
        with self._lock:
            got = self._spans.get(flow_id)
        return None if got is None else trace.set_span_in_context(got[0])

    def execution_claimed(self, claim: Claim) -> None:
        """Start the execution's span and make it current on this thread."""
        span = self._tracer.start_span(
            f"crux.flow {claim.flow}",
            kind=trace.SpanKind.CONSUMER,
            attributes={
                "crux.flow": claim.flow,
                "crux.flow_id": claim.flow_id,
                "crux.resumed": claim.resumed,
                "crux.woke_by": claim.woke_by or "",
            },
        )
        token = context.attach(trace.set_span_in_context(span))
        with self._lock:
            self._spans[claim.flow_id] = (span, token)

    def _point(self, name: str, flow_id: str, attrs: dict[str, Any], seconds: float | None) -> Any:
        end = time.time_ns()
        start = end - int((seconds or 0.0) * 1e9)
        span = self._tracer.start_span(
            name,
            context=self._parent(flow_id),
            start_time=start,
            attributes={"crux.flow_id": flow_id, **attrs},
        )
        return span, end

    def step_committed(
        self, flow: str, flow_id: str, step: str, kind: str, seconds: float | None
    ) -> None:
        """A span for the checkpoint, as long as the step's function ran."""
        span, end = self._point(
            f"crux.step {step}",
            flow_id,
            {"crux.flow": flow, "crux.step": step, "crux.kind": kind},
            seconds,
        )
        span.end(end_time=end)

    def step_failed(
        self, flow: str, flow_id: str, step: str, attempt: int, error: str, retrying: bool
    ) -> None:
        """A span with an error status for the failed attempt."""
        span, end = self._point(
            f"crux.step {step}",
            flow_id,
            {
                "crux.flow": flow,
                "crux.step": step,
                "crux.kind": "step",
                "crux.attempt": attempt,
                "crux.retrying": retrying,
                "error.type": error,
            },
            None,
        )
        span.set_status(trace.Status(trace.StatusCode.ERROR, error))
        span.end(end_time=end)

    def suspended(self, flow: str, flow_id: str, point: str, wake_in: float | None) -> None:
        """A span for the suspend point."""
        attrs: dict[str, Any] = {"crux.flow": flow, "crux.step": point, "crux.kind": "suspend"}
        if wake_in is not None:
            attrs["crux.wake_in"] = wake_in
        span, end = self._point(f"crux.suspend {point}", flow_id, attrs, None)
        span.end(end_time=end)

    def execution_finished(self, flow: str, flow_id: str, outcome: str, seconds: float) -> None:
        """End the execution's span with its outcome."""
        with self._lock:
            got = self._spans.pop(flow_id, None)
        if got is None:
            return
        span, token = got
        span.set_attribute("crux.outcome", outcome)
        if outcome in ("failed", "error"):
            span.set_status(trace.Status(trace.StatusCode.ERROR, outcome))
        span.end()
        context.detach(token)

    def sweep_done(self, lag: float, expired: int, published: int, skipped: bool) -> None:
        """No span for sweeps."""


def install_tracing(app: Any, tracer: trace.Tracer | None = None) -> FlowTracing:
    """Trace what this process executes for ``app`` (idempotent); returns the observer."""
    for observer in app.runtime.observers:
        if isinstance(observer, FlowTracing):
            return observer
    tracing = FlowTracing(tracer)
    app.runtime.observers.add(tracing)
    return tracing
