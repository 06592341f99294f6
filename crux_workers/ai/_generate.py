"""``generate``: fill a prompt template, ask a model, return the completion text.

``generate_async`` does the same from async code, without blocking the event loop.
"""

from __future__ import annotations

import asyncio
from typing import Protocol, TypeAlias, runtime_checkable

from ..errors import InvalidInput, ModelResponseError
from ._template import TemplateInput, fields_of, fill

Message: TypeAlias = dict[str, str]
"""One chat message: ``{"role": "system" | "user" | "assistant", "content": text}``."""


@runtime_checkable
class Model(Protocol):
    """A chat model: anything with ``complete(messages) -> str``.

    Implement it to plug in a provider of your own, or a fake in tests. Raise the
    ``crux_workers.errors`` model errors so step retry policies can tell a transient
    failure (``ModelError``, ``ModelTimeout``) from a final one (``NonRetryableError``).
    """

    def complete(self, messages: list[Message]) -> str:
        """Return the assistant's reply to ``messages``, oldest first."""
        ...


@runtime_checkable
class AsyncModel(Protocol):
    """A chat model that can be awaited: anything with ``async complete_async(messages)``.

    ``generate_async`` awaits it on the caller's loop. ``OpenAICompatible`` is both a
    ``Model`` and an ``AsyncModel``; a ``Model`` without this method still works with
    ``generate_async``, called in a worker thread.
    """

    async def complete_async(self, messages: list[Message]) -> str:
        """Return the assistant's reply to ``messages``, oldest first."""
        ...


def generate(
    prompt: str,
    *,
    model: Model,
    input: TemplateInput | None = None,
    system: str | None = None,
) -> str:
    """Fill ``prompt`` (and ``system``) from ``input``, ask ``model``, return its text.

    Templates use ``str.format`` placeholders, ``{field}`` or ``{field.sub}``, filled from
    a dict or a pydantic model; ``{{`` and ``}}`` are literal braces. A placeholder with
    no value raises ``InvalidInput`` before the model is called. Without ``input`` the
    prompts are sent exactly as written, braces and all.

    Errors from the model are the ``ModelError`` family: inside ``f.step(..., retry=...)``
    transient ones are retried and ``NonRetryableError`` ones fail the step at once.
    """
    if not isinstance(model, Model):
        raise InvalidInput(
            f"model must have a complete(messages) method, got {type(model).__name__}"
        )
    messages = _messages(prompt, input, system)
    return _checked(model, "complete", model.complete(messages))


async def generate_async(
    prompt: str,
    *,
    model: AsyncModel | Model,
    input: TemplateInput | None = None,
    system: str | None = None,
) -> str:
    """``generate`` for async code: the same templates, messages and errors, awaited.

    An ``AsyncModel`` (``OpenAICompatible`` is one) is awaited on the running loop; a
    ``Model`` with only ``complete`` is called in a worker thread (``asyncio.to_thread``)
    so it does not block the loop.
    """
    if isinstance(model, AsyncModel):
        messages = _messages(prompt, input, system)
        return _checked(model, "complete_async", await model.complete_async(messages))
    if isinstance(model, Model):
        messages = _messages(prompt, input, system)
        return _checked(model, "complete", await asyncio.to_thread(model.complete, messages))
    raise InvalidInput(
        "model must have a complete_async(messages) or complete(messages) method, "
        f"got {type(model).__name__}"
    )


def _messages(prompt: str, input: TemplateInput | None, system: str | None) -> list[Message]:
    if input is not None:
        values = fields_of(input)
        prompt = fill(prompt, values, what="prompt")
        if system is not None:
            system = fill(system, values, what="system prompt")
    elif not isinstance(prompt, str):
        raise InvalidInput(f"prompt must be a string, got {type(prompt).__name__}")

    messages: list[Message] = []
    if system is not None:
        if not isinstance(system, str):
            raise InvalidInput(f"system prompt must be a string, got {type(system).__name__}")
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": prompt})
    return messages


def _checked(model: object, method: str, text: object) -> str:
    if not isinstance(text, str):
        # A custom Model broke its contract; a step would fail later, with a vaguer error,
        # when a non-JSON value reached the record.
        raise ModelResponseError(
            f"{type(model).__name__}.{method} returned {type(text).__name__}, not str"
        )
    return text
