"""The flow registry: which flows this app defines, by name."""

from __future__ import annotations

import inspect
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from .errors import DuplicateFlowName, InvalidInput, UnknownFlow

Handler = Callable[..., Any]


@dataclass(frozen=True, slots=True)
class FlowDef:
    """A registered flow: its name, handler, input model and queue (None: the app's)."""

    name: str
    fn: Handler
    input_model: type[BaseModel]
    queue: str | None = None

    @property
    def is_async(self) -> bool:
        """Whether the handler is ``async def`` (it gets an ``AsyncFlowContext``)."""
        return inspect.iscoroutinefunction(self.fn)


class FlowRegistry:
    """Flow definitions by name; thread-safe, and re-registering the same code is a no-op."""

    def __init__(self) -> None:
        self._flows: dict[str, FlowDef] = {}
        self._lock = threading.Lock()
        # Called with each new definition (the Celery transport registers its task).
        self._listeners: list[Callable[[FlowDef], None]] = []

    def define(
        self, name: str, fn: Callable[..., Any], input: type[BaseModel], queue: str | None
    ) -> FlowDef:
        """Register ``fn`` as the flow ``name``; ``DuplicateFlowName`` if other code has it."""
        self.check_definition(name, input)
        with self._lock:
            existing = self._flows.get(name)
            if existing is not None and _qualname(existing.fn) != _qualname(fn):
                raise DuplicateFlowName(
                    f"flow {name!r} is already defined by {_qualname(existing.fn)}", flow=name
                )
            defn = FlowDef(name, fn, input, queue)
            self._flows[name] = defn
            listeners = list(self._listeners)
        for listener in listeners:
            listener(defn)
        return defn

    @staticmethod
    def check_definition(name: object, input: object) -> None:
        """Refuse a flow name the record cannot hold, or an input that is not a model."""
        if not isinstance(name, str) or not name or len(name) > 200 or not name.isprintable():
            raise InvalidInput("flow name must be a printable, non-empty string (<= 200 chars)")
        if not (isinstance(input, type) and issubclass(input, BaseModel)):
            raise InvalidInput(f"flow {name!r}: input must be a pydantic model class")

    def on_define(self, listener: Callable[[FlowDef], None]) -> None:
        """Call ``listener`` for every flow defined from now on."""
        with self._lock:
            self._listeners.append(listener)

    def all(self) -> list[FlowDef]:
        """Every flow registered."""
        with self._lock:
            return list(self._flows.values())

    def queues(self) -> set[str]:
        """The queues flows are routed to (besides the app's default queue)."""
        return {d.queue for d in self.all() if d.queue is not None}

    def lookup(self, name: str) -> FlowDef:
        """The registered flow called ``name``; ``UnknownFlow`` if none."""
        try:
            return self._flows[name]
        except KeyError:
            raise UnknownFlow(
                f"no flow {name!r} is registered in this process", flow=name
            ) from None

    def get(self, name: str) -> FlowDef | None:
        """The registered flow called ``name``, or None."""
        return self._flows.get(name)


def _qualname(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"
