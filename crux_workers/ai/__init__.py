"""crux_workers.ai: call a chat model from a flow step.

``generate(prompt, model=..., input=...)`` fills a ``str.format`` template and returns the
model's text; ``OpenAICompatible`` talks to any ``/v1/chat/completions`` server (needs
``pip install 'crux_workers[ai]'``); any object with ``complete(messages) -> str`` is a
``Model``. Errors are typed so ``f.step(..., retry=Retry(...))`` retries only what may
succeed next time. See docs/ai.md.
"""

from ..errors import (
    ModelError,
    ModelHTTPError,
    ModelRequestRejected,
    ModelResponseError,
    ModelTimeout,
)
from ._generate import Message, Model, generate
from ._openai import OpenAICompatible
from ._template import TemplateInput

__all__ = [
    # calling a model
    "Message",
    "Model",
    "TemplateInput",
    "generate",
    # providers
    "OpenAICompatible",
    # errors (defined in crux_workers.errors)
    "ModelError",
    "ModelHTTPError",
    "ModelRequestRejected",
    "ModelResponseError",
    "ModelTimeout",
]
