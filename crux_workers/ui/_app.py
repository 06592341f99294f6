"""The console as an ASGI app: its routes, behind the guard.

Pages are rendered on the server (Jinja, autoescaped; ``_pages``); forms post to the
same actions the JSON API offers (``_api``), so everything works without JavaScript,
and the small vendored script only refreshes the live parts of a page and ticks its
clocks.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from .._app import Crux
from ..errors import CruxError
from ._api import Api
from ._data import ConsoleData
from ._http import AsgiEndpoint, Guard, Refused, api_error, problem, status_of
from ._pages import _HERE, Console

Handler = Callable[[Request], Awaitable[Response]]


def _api(fn: Handler) -> Handler:
    """An API handler whose errors come back as JSON with the status that fits."""

    async def handle(request: Request) -> Response:
        try:
            return await fn(request)
        except Refused as exc:
            return problem(exc.status, str(exc))
        except CruxError as exc:
            return api_error(exc)

    return handle


def _page(console: Console, fn: Handler) -> Handler:
    """A page handler: refusals and record errors as a readable page, not a trace."""

    async def handle(request: Request) -> Response:
        try:
            return await fn(request)
        except Refused as exc:
            return console.render(
                request,
                "refused.html",
                {"title": "Refused", "nav": "", "message": str(exc)},
                status=exc.status,
            )
        except CruxError as exc:
            return console.render(
                request,
                "refused.html",
                {"title": "Error", "nav": "", "message": str(exc)},
                status=status_of(exc),
            )

    return handle


def create_app(
    crux_app: Crux,
    *,
    token: str | None = None,
    read_only: bool = False,
    hosts: tuple[str, ...] | None = None,
) -> Starlette:
    """The operator console for ``crux_app`` as an ASGI app, to serve or mount.

    ``token``: required on every page and API call (Bearer header or the login
    cookie); leave it unset only where the console is reachable from loopback
    alone. ``read_only``: no actions are shown, and action endpoints answer 403.
    ``hosts``: the Host names it answers to (``crux-workers ui`` pins loopback when
    it runs without a token); None accepts any.
    """
    from ..ops.metrics import metrics_asgi_app

    data = ConsoleData(crux_app)
    c = Console(data, token=token, read_only=read_only)
    a = Api(c)

    def page(fn: Handler) -> Handler:
        return _page(c, fn)

    routes: list[BaseRoute] = [
        Route("/", page(c.home)),
        Route("/flows", page(c.flows_page)),
        Route("/flows/{flow_id:path}/signal", page(c.signal_form), methods=["POST"]),
        Route("/flows/{flow_id:path}/cancel", page(c.cancel_form), methods=["POST"]),
        Route("/flows/{flow_id:path}/retry", page(c.retry_form), methods=["POST"]),
        Route("/flows/{flow_id:path}/fork", page(c.fork_form), methods=["POST"]),
        Route("/flows/{flow_id:path}", page(c.flow_page)),
        Route("/bulk", page(c.bulk_page), methods=["GET", "POST"]),
        Route("/purge", page(c.purge_form), methods=["POST"]),
        Route("/waiting", page(c.waiting_page)),
        Route("/rejected", page(c.rejected_page)),
        Route("/fleet", page(c.fleet_page)),
        Route("/login", c.login_page, methods=["GET", "POST"]),
        Route("/logout", page(c.logout), methods=["POST"]),
        Route("/api/flows", _api(a.api_flows)),
        Route("/api/flows/{flow_id:path}/signal", _api(a.api_signal), methods=["POST"]),
        Route("/api/flows/{flow_id:path}/cancel", _api(a.api_cancel), methods=["POST"]),
        Route("/api/flows/{flow_id:path}/retry", _api(a.api_retry), methods=["POST"]),
        Route("/api/flows/{flow_id:path}/fork", _api(a.api_fork), methods=["POST"]),
        Route("/api/flows/{flow_id:path}", _api(a.api_flow)),
        Route("/api/waiting", _api(a.api_waiting)),
        Route("/api/rejected", _api(a.api_rejected)),
        Route("/api/fleet", _api(a.api_fleet)),
        Route("/api/purge", _api(a.api_purge), methods=["POST"]),
        Route("/metrics", AsgiEndpoint(metrics_asgi_app(crux_app))),
        Mount("/static", StaticFiles(directory=_HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes)
    app.add_middleware(Guard, token=token, hosts=hosts)
    return app


__all__ = ["create_app"]
