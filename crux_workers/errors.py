"""One hierarchy for every error crux_workers raises.

Each exception keeps its structured attributes through pickling (Celery and
multiprocessing ship exceptions between processes), which is why each defines
``__reduce__`` over the keyword arguments it was built with.

Control flow that user code must not swallow by accident (a flow suspending,
an execution losing its lease) derives from ``BaseException``, like
``KeyboardInterrupt``: a broad ``except Exception`` in a step does not stop it.
"""

from __future__ import annotations

from typing import Any


class CruxError(Exception):
    """Base class of every crux_workers error."""

    def __init__(self, message: str = "", **attrs: Any) -> None:
        super().__init__(message)
        self.message = message
        self._attrs = attrs
        for name, value in attrs.items():
            setattr(self, name, value)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self._attrs))


def _rebuild(cls: type[CruxError], message: str, attrs: dict[str, Any]) -> CruxError:
    err = cls.__new__(cls)
    CruxError.__init__(err, message, **attrs)
    return err


class ConfigurationError(CruxError):
    """The settings are invalid or incomplete."""


class InvalidDuration(CruxError, ValueError):
    """A duration string or value could not be understood."""


class InvalidInput(CruxError, ValueError):
    """Flow input or a call argument failed validation; nothing was recorded."""


class InvalidSignal(InvalidInput):
    """A signal's payload failed the schema its flow waits with; nothing was recorded.

    ``errors`` lists what failed, each as ``{"loc": [...], "msg": ..., "type": ...}``.
    """

    errors: list[dict[str, object]]


class ValueTooLarge(InvalidInput):
    """A value to store (input, step result, signal payload, child result) is over the limit."""


class FlowNotFound(CruxError, LookupError):
    """No flow with this id exists in the record."""


class FlowNotWaiting(CruxError):
    """The flow has finished and accepts no more signals."""


class FlowAlreadyFinished(CruxError):
    """The flow has already finished; there is nothing to cancel."""


class FlowNotRetryable(CruxError):
    """Only a failed flow can be retried; this one is in another status."""


class FlowIdConflict(CruxError):
    """A flow with this id exists already, under another flow name."""


class UnknownFlow(CruxError, LookupError):
    """No flow definition with this name is registered in this process."""


class DuplicateFlowName(CruxError):
    """Two different flow functions were registered under one name."""


class NonDeterminismError(CruxError):
    """A replay asked for checkpoints in a different order than the recorded one."""


class StepResultNotSerializable(CruxError, TypeError):
    """A step returned a value that cannot be stored as JSON."""


class StepFailed(CruxError):
    """A step raised; the original error's type, message and traceback are attached."""

    step: str
    attempt: int
    error_type: str
    error_message: str
    traceback: str
    retryable: bool

    @classmethod
    def from_exception(cls, exc: BaseException, *, step: str, attempt: int) -> StepFailed:
        """Wrap ``exc`` raised by ``step``, keeping what is needed to report it."""
        import traceback

        try:
            message = str(exc)
            trace = "".join(traceback.format_exception(exc))
        except Exception:  # an exception whose __str__ raises still fails its step
            message = trace = f"<unprintable {type(exc).__name__}>"
        return cls(
            f"step {step!r} failed on attempt {attempt}: {type(exc).__name__}: {message}",
            step=step,
            attempt=attempt,
            error_type=f"{type(exc).__module__}.{type(exc).__qualname__}",
            error_message=message,
            traceback=trace,
            retryable=_retryable(exc),
        )


class NonRetryableError(CruxError):
    """Raise (or subclass) in a step to fail it at once, skipping remaining retries."""


def _retryable(exc: BaseException) -> bool:
    # A group (from parallel, consensus, swarm) is retryable unless every error in it is not.
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(NonRetryableError)[1] is not None
    return not isinstance(exc, NonRetryableError)


class WaitTimeout(CruxError, TimeoutError):
    """``FlowRun.wait`` gave up before the flow finished."""


class StoreError(CruxError):
    """The durable record could not be reached or refused an operation."""


class RecordRefused(StoreError):
    """The record refused this write for what it holds; retrying cannot help.

    A data error (a value the database will not store, a check or key it violates), as
    opposed to a connection-level error (the database unreachable, a connection lost,
    a serialization failure or deadlock), which means "try again later".
    """


class CrashLoop(CruxError):
    """A flow was parked ``failed``: its executions kept dying without progress."""


class NoConsensus(CruxError):
    """``consensus`` found no value that reached the quorum; ``counts`` holds the tally."""

    counts: dict[str, int]
    quorum: int
    n: int
    failed: int


class SignalRejected(CruxError):
    """A published signal message was refused (bad JSON, fields, signature, size, flow)."""

    reason: str
    detail: str


class TaskFailed(CruxError):
    """A child task started with ``run_task`` failed; its error type and message are attached."""


class ModelError(CruxError):
    """A model call for ``crux_workers.ai.generate`` failed."""


class ModelHTTPError(ModelError):
    """The model server answered with an HTTP error status (``status``, ``body``)."""


class ModelRequestRejected(ModelHTTPError, NonRetryableError):
    """The model server refused the request itself (a 4xx other than 408, 409, 429)."""


class ModelTimeout(ModelError, TimeoutError):
    """The model server did not answer in time."""


class ModelResponseError(ModelError, NonRetryableError):
    """The model server answered with something that is not a usable completion."""


class ControlFlow(BaseException):
    """Base of the non-local exits the engine uses; user code must let them pass."""


class Suspended(ControlFlow):
    """The flow checkpointed and ends this execution until something wakes it."""

    def __init__(self, point: str = "", wake_in: float | None = None) -> None:
        super().__init__(point)
        self.point = point
        self.wake_in = wake_in


class LeaseLost(ControlFlow):
    """Another executor took over this flow; this one must stop without writing."""


class FlowStopped(ControlFlow):
    """The flow reached a terminal status (failed, cancelled, expired) mid-execution."""

    def __init__(self, status: str = "failed") -> None:
        super().__init__(status)
        self.status = status
