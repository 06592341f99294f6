"""The operator console: ``crux-workers ui``, or mount ``create_app(app)`` in your own ASGI app.

Needs the ``ui`` extra (``pip install 'crux_workers[ui]'``): Starlette, Jinja2, uvicorn.
"""

from __future__ import annotations

from ._app import create_app

__all__ = ["create_app"]
