"""Prometheus metrics: gauges read from the record per scrape, counters fed by hooks.

Two sources, kept apart because they scale differently:

- ``RecordCollector``: the fleet's state (flows by status, waits, the due backlog,
  refusals, the last sweep), computed from the record by one query per scrape
  (``AdminStore.metrics_snapshot``). One exporter serves it for the whole fleet
  (``crux-workers metrics``); a worker does not, or every pod would repeat it.
- ``FlowMetrics``: what this process did (executions, steps, latencies, sweeps), an
  ``Observer`` of the runtime. In a prefork worker each pool process counts in its
  own mmapped file (prometheus-client's multiprocess mode) and the worker's main
  process serves their sum (``crux_workers.ops._worker``).

Label values are flow names, statuses, wait kinds, signal names, refusal reasons and
outcomes, all bounded by the code; never flow ids or step names (a loop may make
step names without bound).

``prometheus-client`` is a dependency of the package (pure Python, no dependencies).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .._observe import Claim

if TYPE_CHECKING:
    from .._app import Crux
    from .._store._types import MetricsSnapshot

log = logging.getLogger("crux_workers.metrics")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)
_DURATION_BUCKETS = (0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600)


class RecordCollector(Collector):
    """Gauges from the record, one ``metrics_snapshot`` query per scrape.

    A failed query does not fail the scrape: ``crux_record_up`` is 0 and the other
    gauges are left out (absent, not zero, so alerts on them do not fire falsely).
    """

    def __init__(self, snapshot: Callable[[], MetricsSnapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        """The gauges, fresh from the record."""
        started = time.perf_counter()
        up = GaugeMetricFamily("crux_record_up", "1 if the record answered the metrics query")
        try:
            snap = self._snapshot()
        except Exception as exc:
            log.warning("metrics query failed: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from snapshot_metrics(snap)
        took = GaugeMetricFamily(
            "crux_record_query_seconds", "How long the metrics query of this scrape took"
        )
        took.add_metric([], time.perf_counter() - started)
        yield took


def snapshot_metrics(snap: MetricsSnapshot) -> Iterator[Metric]:
    """The gauge families of one snapshot."""
    flows = GaugeMetricFamily(
        "crux_flows", "Flows in the record by flow name and status", labels=["flow", "status"]
    )
    for (name, status), n in sorted(snap.flows.items()):
        flows.add_metric([name, status], n)
    yield flows
    waits = GaugeMetricFamily(
        "crux_flows_waiting",
        "Suspended flows not yet due, by what they wait for (kind: signal, sleep, poll, "
        "task, retry; on: the signal, poll or child task name)",
        labels=["kind", "on"],
    )
    for (kind, on), n in sorted(snap.waits.items()):
        waits.add_metric([kind, on], n)
    yield waits
    due = GaugeMetricFamily(
        "crux_flows_due",
        "Runnable flows nobody is running (new, woken, timer passed, or stalled): the "
        "backlog to scale workers on",
        labels=["flow"],
    )
    for name, n in sorted(snap.due.items()):
        due.add_metric([name], n)
    yield due
    oldest = GaugeMetricFamily(
        "crux_flows_due_oldest_age_seconds",
        "How long the longest-waiting runnable flow has been due (0 when none is)",
    )
    age = 0.0
    if snap.oldest_due_at is not None:
        age = max(0.0, (snap.taken_at - snap.oldest_due_at).total_seconds())
    oldest.add_metric([], age)
    yield oldest
    refused = GaugeMetricFamily(
        "crux_ingress_refused_messages",
        "Refused ingress messages kept in the record, by reason (purging lowers it)",
        labels=["reason"],
    )
    for reason, n in sorted(snap.refused.items()):
        refused.add_metric([reason], n)
    yield refused
    if snap.last_sweep_at is not None:
        swept = GaugeMetricFamily(
            "crux_sweep_last_timestamp_seconds", "When the last sweep tick was taken (Unix time)"
        )
        swept.add_metric([], snap.last_sweep_at.timestamp())
        yield swept


class FlowMetrics:
    """This process's counters and histograms; an ``Observer`` of the runtime."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        self.executions = Counter(
            "crux_executions",
            "Flow executions (one start or resume task each) by flow and outcome",
            ["flow", "outcome"],
            registry=r,
        )
        self.execution_seconds = Histogram(
            "crux_execution_duration_seconds",
            "How long one execution took, claim to suspend or finish",
            ["flow"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.steps_committed = Counter(
            "crux_steps_committed",
            "Checkpoints committed (kind: step, suspend, sleep, wait, task)",
            ["flow", "kind"],
            registry=r,
        )
        self.steps_failed = Counter(
            "crux_steps_failed",
            "Failed step attempts (outcome: retry, or failed when no attempt is left)",
            ["flow", "outcome"],
            registry=r,
        )
        self.step_seconds = Histogram(
            "crux_step_duration_seconds",
            "How long a step's function ran (committed steps)",
            ["flow"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.resume_latency = Histogram(
            "crux_resume_latency_seconds",
            "From the moment a flow became due (signal recorded, timer passed, child done, "
            "created) to an execution claiming it, by what woke it",
            ["flow", "wake"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.sweeps = Counter(
            "crux_sweeps",
            "Sweeps by outcome (swept, or skipped: another beat's)",
            ["outcome"],
            registry=r,
        )
        self.sweep_lag = Histogram(
            "crux_sweep_lag_seconds",
            "From beat sending a sweep to a worker starting it",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.sweep_repairs = Counter(
            "crux_sweep_repairs",
            "What sweeps did (action: expired, published = due or stalled flows re-sent)",
            ["action"],
            registry=r,
        )

    # Observer --------------------------------------------------------------------------

    def execution_claimed(self, claim: Claim) -> None:
        """Resume latency, when the claim consumed a wake."""
        if claim.latency is not None:
            wake = (claim.woke_by or "run") if claim.resumed else "start"
            self.resume_latency.labels(claim.flow, wake).observe(claim.latency)

    def step_committed(
        self, flow: str, flow_id: str, step: str, kind: str, seconds: float | None
    ) -> None:
        """Count the checkpoint; time the step."""
        self.steps_committed.labels(flow, kind).inc()
        if seconds is not None and kind == "step":
            self.step_seconds.labels(flow).observe(max(0.0, seconds))

    def step_failed(
        self, flow: str, flow_id: str, step: str, attempt: int, error: str, retrying: bool
    ) -> None:
        """Count the failed attempt."""
        self.steps_failed.labels(flow, "retry" if retrying else "failed").inc()

    def suspended(self, flow: str, flow_id: str, point: str, wake_in: float | None) -> None:
        """Counted as the execution's outcome."""

    def execution_finished(self, flow: str, flow_id: str, outcome: str, seconds: float) -> None:
        """Count the execution by outcome; time it."""
        self.executions.labels(flow, outcome).inc()
        self.execution_seconds.labels(flow).observe(seconds)

    def sweep_done(self, lag: float, expired: int, published: int, skipped: bool) -> None:
        """Count the sweep, its lag and its repairs."""
        self.sweeps.labels("skipped" if skipped else "swept").inc()
        if not skipped:
            self.sweep_lag.observe(lag)
            self.sweep_repairs.labels("expired").inc(expired)
            self.sweep_repairs.labels("published").inc(published)


def _installed(app: Crux) -> FlowMetrics | None:
    return next((o for o in app.runtime.observers if isinstance(o, FlowMetrics)), None)


def install_metrics(app: Crux) -> FlowMetrics:
    """Count what this process executes for ``app`` (idempotent); returns the counters."""
    found = _installed(app)
    if found is None:
        found = FlowMetrics()
        app.runtime.observers.add(found)
    return found


class _Merged(Collector):
    """Another registry's metrics, collected into this one."""

    def __init__(self, source: CollectorRegistry) -> None:
        self._source = source

    def collect(self) -> Iterable[Metric]:
        return self._source.collect()


def metrics_registry(app: Crux, *, record: bool = True) -> CollectorRegistry:
    """A registry for ``app``: the record's gauges, and this process's counters if any.

    In multiprocess mode (``PROMETHEUS_MULTIPROC_DIR`` set) the counters are the sum
    over every process writing to that directory.
    """
    registry = CollectorRegistry(auto_describe=False)
    if record:
        registry.register(RecordCollector(lambda: app.store.metrics_snapshot()))
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    else:
        counters = _installed(app)
        if counters is not None:
            registry.register(_Merged(counters.registry))
    return registry


def metrics_asgi_app(app: Crux) -> Any:
    """An ASGI app serving ``app``'s metrics (mount it at ``/metrics``)."""
    from prometheus_client import make_asgi_app

    return make_asgi_app(metrics_registry(app))


def metrics_wsgi_app(app: Crux) -> Any:
    """A WSGI app serving ``app``'s metrics (mount it at ``/metrics``)."""
    from prometheus_client import make_wsgi_app

    return make_wsgi_app(metrics_registry(app))


def serve_metrics(app: Crux, port: int, host: str = "127.0.0.1", *, record: bool = True) -> Any:
    """Serve ``/metrics`` on a thread of this process; returns the server (``shutdown()``)."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(
        port, addr=host, registry=metrics_registry(app, record=record)
    )
    return server
