"""What a Celery worker of the fleet observes: events, spans, and its counters on a port.

Connected to Celery's ``worker_init`` signal, which fires in the worker's main
process before the pool forks, so every pool process inherits the observers.

Counters with prefork: each pool process is its own Python process, so in-memory
counters would be per process, lost when a process is replaced, and a scrape of one
port would see one of them at random. prometheus-client's multiprocess mode is made
for this: every process writes its values to an mmapped file in one directory, and
the main process serves their sum (counters of replaced processes included). The
directory is ``PROMETHEUS_MULTIPROC_DIR`` if set, else a fresh temporary one; it is
emptied at start, which Prometheus reads as a counter reset.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .._runtime import Runtime
    from .._settings import Settings

log = logging.getLogger("crux_workers.metrics")


def instrument_celery(celery: Any, runtime: Runtime, settings: Settings) -> None:
    """Install the worker's observers when ``celery`` starts a worker."""
    from celery.signals import worker_init

    def on_worker_init(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is not celery:
            return
        from .events import CeleryEvents

        runtime.observers.add(CeleryEvents(celery, enabled=bool(sender.task_events)))
        try:
            from .tracing import FlowTracing
        except ImportError:
            pass  # opentelemetry-api is not installed: no spans
        else:
            runtime.observers.add(FlowTracing())
        if settings.metrics_port is not None:
            serve_worker_metrics(runtime, settings.metrics_port, settings.metrics_host)

    # Held by the Celery app, connected weakly: an app that goes away takes it along.
    celery.crux_on_worker_init = on_worker_init
    worker_init.connect(on_worker_init, weak=True)


def serve_worker_metrics(runtime: Runtime, port: int, host: str) -> Any:
    """Count in multiprocess mode and serve the sum of every pool process on ``port``."""
    from .metrics import MULTIPROC_ENV

    directory = os.environ.get(MULTIPROC_ENV) or tempfile.mkdtemp(prefix="crux-metrics-")
    Path(directory).mkdir(parents=True, exist_ok=True)
    for stale in Path(directory).glob("*.db"):
        stale.unlink()
    os.environ[MULTIPROC_ENV] = directory
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server, values

    # prometheus-client picks the value class when it is imported: if something imported
    # it before the directory was set, switch to the mmapped values now, before any of
    # the worker's metrics exist.
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]
    from .metrics import FlowMetrics

    runtime.observers.add(FlowMetrics())
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=directory)  # type: ignore[no-untyped-call]
    server, _thread = start_http_server(port, addr=host, registry=registry)
    log.info("worker metrics on http://%s:%d/metrics (multiprocess dir %s)", host, port, directory)
    return server
