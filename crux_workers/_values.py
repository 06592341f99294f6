"""What a checkpoint stores: a step's result, a child's call, a signal's payload, as JSON."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ValidationError

from . import _json
from .errors import InvalidInput, StepResultNotSerializable

_ROUTING = ("queue", "routing_key", "exchange", "priority")


def task_call(
    step: str, task: Any, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[str, str, Any]:
    """The child's name, its call as JSON (what a resend needs), and the object if any."""
    child: Any = None
    options: dict[str, Any] = {}
    if isinstance(task, str) and task:
        name = task
    elif isinstance(task, dict) and isinstance(task.get("task"), str):
        # A Celery signature (a dict subclass): its arguments come first.
        name = task["task"]
        args = (*task.get("args", ()), *args)
        kwargs = {**task.get("kwargs", {}), **kwargs}
        options = {k: v for k, v in task.get("options", {}).items() if k in _ROUTING}
    elif isinstance(getattr(task, "name", None), str) and callable(
        getattr(task, "apply_async", None)
    ):
        name, child = task.name, task
        if getattr(task, "queue", None):
            options["queue"] = task.queue
    else:
        raise InvalidInput(
            f"run_task {step!r}: task must be a Celery task, a signature or a task name, "
            f"got {type(task).__name__}"
        )
    try:
        call = _json.dumps({"task": name, "args": list(args), "kwargs": kwargs, "options": options})
    except (TypeError, ValueError) as exc:
        raise InvalidInput(
            f"run_task {step!r}: arguments of {name!r} must be JSON-able: {exc}"
        ) from None
    return name, call, child


def encode_result(value: Any, what: str, step: str, limit: int) -> str:
    try:
        text = _json.dumps(value)
    except (TypeError, ValueError) as exc:
        raise StepResultNotSerializable(
            f"{what} returned a {type(value).__name__} that cannot be stored as JSON: {exc}",
            step=step,
        ) from None
    return _json.check_size(text, limit, f"the result of {what}")


def validator(schema: type[BaseModel] | None) -> Callable[[str], str]:
    def validate(payload: str) -> str:
        try:
            value = _json.loads(payload)
            _json.check_depth(value)
        except (ValueError, RecursionError) as exc:
            raise ValueError(f"payload is not JSON (or too deep): {exc}") from None
        if schema is None:
            return payload
        try:
            return schema.model_validate(value).model_dump_json()
        except ValidationError as exc:
            raise ValueError(str(exc)) from None
        except RecursionError:
            raise ValueError("payload is nested too deeply to validate") from None

    return validate
