"""Operating a fleet: Prometheus metrics, OpenTelemetry spans, events for Celery's tools.

- ``metrics_asgi_app(app)`` / ``metrics_wsgi_app(app)``: ``/metrics`` for any ASGI or
  WSGI app; ``serve_metrics(app, port)`` on a thread; ``crux-workers metrics`` as a
  process. ``install_metrics(app)`` counts what this process executes.
- ``install_tracing(app)``: spans per execution, step and suspend (needs
  ``opentelemetry-api``; without an SDK configured they cost next to nothing).
- ``CeleryEvents``: ``task-crux-step`` and ``task-crux-flow`` events for Flower and
  ``celery events``, sent by workers started with ``-E``.

Workers install all three themselves (docs/observability.md). Names load on first
use, so importing this package needs none of the optional libraries.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "FlowMetrics": "metrics",
    "RecordCollector": "metrics",
    "install_metrics": "metrics",
    "metrics_asgi_app": "metrics",
    "metrics_registry": "metrics",
    "metrics_wsgi_app": "metrics",
    "serve_metrics": "metrics",
    "FlowTracing": "tracing",
    "install_tracing": "tracing",
    "CeleryEvents": "events",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'crux_workers.ops' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
