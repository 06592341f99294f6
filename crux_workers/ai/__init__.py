"""crux_workers.ai: call a chat model from a flow step.

``generate(prompt, model=..., input=...)`` fills a ``str.format`` template and returns the
model's text, and ``await generate_async(...)`` does the same from async code;
``OpenAICompatible`` talks to any ``/v1/chat/completions`` server (needs
``pip install 'crux_workers[ai]'``); any object with ``complete(messages) -> str`` is a
``Model``, and one with ``async complete_async(messages) -> str`` an ``AsyncModel``.
Errors are typed so ``f.step(..., retry=Retry(...))`` retries only what may succeed
next time. See docs/ai.md.
"""

from ..errors import (
    ModelError,
    ModelHTTPError,
    ModelRequestRejected,
    ModelResponseError,
    ModelTimeout,
)
from ._generate import AsyncModel, Message, Model, generate, generate_async
from ._openai import OpenAICompatible
from ._template import TemplateInput

__all__ = [
    # calling a model
    "AsyncModel",
    "Message",
    "Model",
    "TemplateInput",
    "generate",
    "generate_async",
    # providers
    "OpenAICompatible",
    # errors (defined in crux_workers.errors)
    "ModelError",
    "ModelHTTPError",
    "ModelRequestRejected",
    "ModelResponseError",
    "ModelTimeout",
]
