"""The environment's transport: executions and children queue up, and run when driven.

Nothing runs on a thread or on wall-clock time. An execution asked for "now" waits in
the queue until the environment drains it; one asked for after a countdown is dropped,
because the record holds the same timer and the environment's sweep fires it on
virtual time. Children run inline when drained: a test-supplied result first, else the
Celery task object's own function, else they stay pending for ``complete_task``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .._store._lifecycle import flow_of_task_id
from .._transport import PublishedSignal


@dataclass(frozen=True, slots=True)
class PendingTask:
    """A ``run_task`` child sent by a flow and not yet completed."""

    task_id: str
    task: str
    args: list[Any]
    kwargs: dict[str, Any]

    @property
    def flow_id(self) -> str:
        """The flow that sent it (named by its task id)."""
        return flow_of_task_id(self.task_id) or ""


@dataclass(slots=True)
class _Queues:
    runs: deque[tuple[str, str]] = field(default_factory=deque)
    children: deque[tuple[str, dict[str, Any], Any]] = field(default_factory=deque)
    signals: deque[PublishedSignal] = field(default_factory=deque)


class InlineTransport:
    """A ``Transport`` that queues; ``FlowEnvironment`` drains it deterministically."""

    def __init__(self, tasks: Mapping[str, Any] | None = None, *, run_tasks: bool = True) -> None:
        self.queues = _Queues()
        self.tasks: dict[str, Any] = dict(tasks or {})
        self.run_tasks = run_tasks
        self.pending: dict[str, PendingTask] = {}
        self.dropped_countdowns = 0

    # -- Transport -------------------------------------------------------------------------

    def enqueue(
        self, flow_name: str, flow_id: str, countdown: float | None = None, *, start: bool = False
    ) -> None:
        """Queue an execution asked for now; drop one asked for later (the record has it)."""
        if countdown:
            self.dropped_countdowns += 1
            return
        if (flow_name, flow_id) not in self.queues.runs:
            self.queues.runs.append((flow_name, flow_id))

    def send_child(self, task_id: str, call: dict[str, Any], child: Any) -> None:
        """Queue the child; it runs (or waits for the test) when the environment drains."""
        self.queues.children.append((task_id, call, child))

    def publish_signal(self, signal: PublishedSignal) -> None:
        """Queue the signal; the environment records it as the ingress would."""
        self.queues.signals.append(signal)

    def start(self) -> None:
        """Nothing to start."""

    def close(self) -> None:
        """Forget what is queued."""
        self.queues = _Queues()

    # -- children --------------------------------------------------------------------------

    def resolve(self, task_id: str, call: dict[str, Any], child: Any) -> Callable[[], Any] | None:
        """How to run this child now, or None to leave it pending for the test."""
        name = call["task"]
        args, kwargs = list(call.get("args", [])), dict(call.get("kwargs", {}))
        if name in self.tasks:
            supplied = self.tasks[name]
            if isinstance(supplied, BaseException):

                def _raise() -> Any:
                    raise supplied

                return _raise
            if callable(supplied):
                return lambda: supplied(*args, **kwargs)
            return lambda: supplied
        if self.run_tasks and child is not None and callable(child):
            return lambda: child(*args, **kwargs)
        self.pending[task_id] = PendingTask(task_id, name, args, kwargs)
        return None
