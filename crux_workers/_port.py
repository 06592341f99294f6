"""``ExecutionPort``: what the flow API asks of the execution that runs it.

The engine's ``Execution`` implements it over the record. The context modules depend
on this port only, never on the engine (as a workflow API talks to an abstract runtime).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import datetime
from typing import Any, NoReturn, Protocol

from ._models import Retry
from ._store._types import Checkpoint, Suspension, TaskError, TaskPoint, Validator
from .errors import StepFailed


class ExecutionPort(Protocol):
    """What a ``FlowContext`` asks of the execution that runs it.

    The engine's ``Execution`` implements it over the record; the context knows
    nothing of leases, stores or transports beyond these calls. Calls that end the
    execution (suspend, stop, fail) raise the control-flow exceptions of ``errors``.
    """

    @property
    def task_resend_after(self) -> float:
        """The default ``resend_after`` of ``run_task`` children, in seconds."""
        ...

    @property
    def max_value_bytes(self) -> int:
        """The largest step result the record takes, as JSON bytes."""
        ...

    def recorded(self, seq: int) -> Checkpoint | None:
        """The checkpoint recorded at ``seq`` (replayed or committed), or None past them."""
        ...

    def recorded_count(self) -> int:
        """How many checkpoints are recorded so far."""
        ...

    def before_step(self) -> None:
        """Raise ``LeaseLost`` if this execution may no longer run user code."""
        ...

    def keep_lease(self) -> AbstractContextManager[None]:
        """Keep the lease alive, and watch for a cancel request, while user code runs."""
        ...

    @property
    def cancel_seen(self) -> threading.Event:
        """Set once a cancel request was seen while a step runs."""
        ...

    def on_cancel(self, callback: Callable[[], None]) -> AbstractContextManager[None]:
        """Call ``callback`` (from another thread) if a cancel request is seen meanwhile."""
        ...

    def stop_cancelled(self, point: str) -> NoReturn:
        """End the flow ``cancelled`` after its running step was interrupted."""
        ...

    def attempt_for(self, seq: int) -> int:
        """The attempt number of the step at ``seq``."""
        ...

    def now(self) -> datetime:
        """The record's clock."""
        ...

    def commit(self, cp: Checkpoint, *, started_at: datetime, attempts: int) -> None:
        """Commit a checkpoint, fenced; stop here if cancellation was asked."""
        ...

    def step_failed(
        self, seq: int, name: str, attempt: int, exc: StepFailed, retry: Retry | None
    ) -> NoReturn:
        """Record a failed attempt: suspend for a retry, or fail the flow."""
        ...

    def sleep_until(self, name: str, until: datetime) -> None:
        """Suspend until ``until`` unless it has passed."""
        ...

    def poll_later(self, point: Suspension, every: float) -> NoReturn:
        """A ``wait_until`` condition was false: suspend until the next check."""
        ...

    def take_task(self, point: TaskPoint, child: Any) -> Checkpoint | TaskError:
        """The child's result as the checkpoint, its failure, or (re)send and suspend."""
        ...

    def take_signal_or_suspend(self, point: Suspension, validate: Validator) -> Checkpoint:
        """Consume a waiting signal as the checkpoint, or suspend."""
        ...
