"""Replay recorded flows against the code as it is now, with no side effects.

The handler runs on a read-only ``ExecutionPort`` over the recorded checkpoints: each
recorded step returns its stored result (its function is never called), and the
first call past the record (a step to run, a suspend, a sleep to set) stops the
replay, cleanly. What would fail on resume is reported: a checkpoint that differs
from the recorded one at that position, a recorded step result that no longer fits
the step function's declared return type, a recorded signal that no longer fits its
suspend's schema, stored input that no longer fits the flow's input model.
"""

from __future__ import annotations

import functools
import inspect
import threading
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NoReturn

from pydantic import TypeAdapter, ValidationError

from .._context import FlowContext
from .._context_async import AsyncFlowContext
from .._loop import flow_loop
from .._models import Retry
from .._registry import FlowDef
from .._store._clock import utcnow
from .._store._types import Checkpoint, Suspension, TaskError, TaskPoint, Validator
from ..errors import NonDeterminismError, StepFailed


class _Frontier(BaseException):
    """The handler reached past the recorded history: the replay ends here, cleanly."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One reason a recorded flow would fail under the code as it is now."""

    flow_id: str
    flow_name: str
    kind: str  # "checkpoint", "step-result", "signal", "input", "unknown-flow", "error"
    message: str
    position: int | None = None
    expected: str | None = None
    actual: str | None = None

    def __str__(self) -> str:
        where = f" at position {self.position}" if self.position is not None else ""
        text = f"flow {self.flow_id} ({self.flow_name}){where}: {self.message}"
        if self.expected is not None or self.actual is not None:
            text += f"\n    expected: {self.expected}\n    actual:   {self.actual}"
        return text


def describe(cp: Checkpoint) -> str:
    """A checkpoint as errors name it: ``step 'charge'#0``."""
    return f"{cp.kind} {cp.name!r}#{cp.occurrence}"


class _ReadOnlyPort:
    """An ``ExecutionPort`` over a recorded history that writes nothing and runs no step."""

    def __init__(self, history: list[Checkpoint]) -> None:
        self.history = history
        self._cancel = threading.Event()

    @property
    def task_resend_after(self) -> float:
        return 300.0

    @property
    def max_value_bytes(self) -> int:
        return 1 << 62

    @property
    def cancel_seen(self) -> threading.Event:
        return self._cancel

    def recorded(self, seq: int) -> Checkpoint | None:
        return self.history[seq] if seq < len(self.history) else None

    def recorded_count(self) -> int:
        return len(self.history)

    def _stop(self, *_: Any, **__: Any) -> NoReturn:
        raise _Frontier()

    def before_step(self) -> None:
        # Only reached for a checkpoint past the record: its function must not run.
        self._stop()

    def keep_lease(self) -> nullcontext[None]:
        return nullcontext()

    @contextmanager
    def on_cancel(self, callback: Callable[[], None]) -> Iterator[None]:
        yield

    def stop_cancelled(self, point: str) -> NoReturn:
        self._stop()

    def attempt_for(self, seq: int) -> int:
        return 1

    def now(self) -> datetime:
        return utcnow()

    def commit(self, cp: Checkpoint, *, started_at: datetime, attempts: int) -> None:
        self._stop()

    def step_failed(
        self, seq: int, name: str, attempt: int, exc: StepFailed, retry: Retry | None
    ) -> NoReturn:
        self._stop()

    def sleep_until(self, name: str, until: datetime) -> None:
        self._stop()

    def poll_later(self, point: Suspension, every: float) -> NoReturn:
        self._stop()

    def take_task(self, point: TaskPoint, child: Any) -> Checkpoint | TaskError:
        self._stop()

    def take_signal_or_suspend(self, point: Suspension, validate: Validator) -> Checkpoint:
        self._stop()


def declared_return(fn: Any) -> Any:
    """The return type a step function declares, or None if it declares none.

    A lambda that calls exactly one module-level function (``lambda: charge(x)``)
    is taken to declare that function's return type.
    """
    target = fn.func if isinstance(fn, functools.partial) else fn
    if getattr(target, "__name__", None) == "<lambda>":
        scope = getattr(target, "__globals__", {})
        called = {
            id(scope[n]): scope[n]
            for n in target.__code__.co_names
            if n in scope and inspect.isfunction(scope[n])
        }
        if len(called) != 1:
            return None
        [target] = called.values()
    if not (inspect.isfunction(target) or inspect.ismethod(target)):
        return None
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # an annotation that does not resolve: nothing to check
        return None
    return hints.get("return")


class _CheckContext(FlowContext[Any]):
    """A ``FlowContext`` that checks each recorded step result against its declared type."""

    def __init__(
        self,
        port: _ReadOnlyPort,
        flow_id: str,
        flow_input: Any,
        found: list[Problem],
        flow_name: str,
    ) -> None:
        super().__init__(port, flow_id, flow_input)
        self._found = found
        self._flow_name = flow_name

    @property
    def position(self) -> int:
        """The position of the checkpoint the handler asked for last."""
        return self._seq - 1

    def _open_step(self, name: str, fn: object) -> tuple[int, int, Checkpoint | None]:
        seq, occurrence, cp = super()._open_step(name, fn)
        if cp is not None:
            self._check_result(cp, fn)
        return seq, occurrence, cp

    def _check_result(self, cp: Checkpoint, fn: object) -> None:
        declared = declared_return(fn)
        if declared is None:
            return
        try:
            TypeAdapter(declared).validate_json(cp.result)
        except ValidationError as exc:
            self._found.append(
                Problem(
                    self.flow_id,
                    self._flow_name,
                    "step-result",
                    f"the recorded result of {describe(cp)} no longer validates against "
                    f"its declared return type {_type_name(declared)}: "
                    f"{exc.error_count()} error(s): {_first_error(exc)}",
                    cp.seq,
                    expected=_type_name(declared),
                    actual=_short(cp.result),
                )
            )
        except Exception:  # a type pydantic cannot build a validator for: not checked
            return


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or repr(tp)


def _first_error(exc: ValidationError) -> str:
    err = exc.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in err["loc"]) or "(value)"
    return f"{loc}: {err['msg']}"


def _short(text: str, width: int = 200) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def replay(
    defn: FlowDef, flow_id: str, input_json: str, history: list[Checkpoint]
) -> list[Problem]:
    """Replay one flow's history under ``defn``; the problems a resume would hit."""
    name = defn.name
    try:
        flow_input = defn.input_model.model_validate_json(input_json)
    except ValidationError as exc:
        return [
            Problem(
                flow_id,
                name,
                "input",
                f"the stored input no longer fits {defn.input_model.__name__}: {_first_error(exc)}",
            )
        ]
    found: list[Problem] = []
    port = _ReadOnlyPort(history)
    ctx = _CheckContext(port, flow_id, flow_input, found, name)
    try:
        if defn.is_async:
            flow_loop.run(defn.fn(AsyncFlowContext(ctx)))
        else:
            defn.fn(ctx)
    except _Frontier:
        return found
    except NonDeterminismError as exc:
        found.append(
            Problem(
                flow_id,
                name,
                "checkpoint",
                "the code asks for another checkpoint than the recorded one",
                getattr(exc, "seq", ctx.position),
                expected=getattr(exc, "expected", None),
                actual=getattr(exc, "actual", None),
            )
        )
        return found
    except ValidationError as exc:
        cp = port.recorded(ctx.position)
        if cp is not None and cp.kind == "suspend":
            found.append(
                Problem(
                    flow_id,
                    name,
                    "signal",
                    f"the recorded signal {cp.name!r} no longer fits its suspend's schema: "
                    f"{_first_error(exc)}",
                    cp.seq,
                    expected="a payload valid under the suspend's schema",
                    actual=_short(cp.result),
                )
            )
            return found
        found.append(_error(flow_id, name, ctx.position, exc))
        return found
    except Exception as exc:
        found.append(_error(flow_id, name, ctx.position, exc))
        return found
    if ctx._seq < len(history):
        found.append(
            Problem(
                flow_id,
                name,
                "checkpoint",
                "the code ends the flow before the recorded checkpoints are replayed",
                ctx._seq,
                expected=describe(history[ctx._seq]),
                actual="the flow's end",
            )
        )
    return found


def _error(flow_id: str, name: str, position: int, exc: Exception) -> Problem:
    return Problem(
        flow_id,
        name,
        "error",
        f"the handler raised {type(exc).__name__} while replaying: {_short(str(exc), 500)}",
        max(position, 0),
    )
