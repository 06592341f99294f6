"""The console's pages and the forms they post: flows, a flow, waiting, refused, fleet.

Forms post to handlers here that call the same actions as the JSON API (``_data``), and
show a refusal in place, next to the form (or the field) it concerns.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import jinja2
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.templating import Jinja2Templates

from ..errors import CruxError, InvalidInput
from . import _security as sec
from ._data import STATUSES, WAKE_WORDS, ConsoleData, ListQuery
from ._format import ago, countdown, error_line, json_text, preview, safe, safe_lines, span
from ._forms import errors_by_field, fields_of, payload_of
from ._http import Refused, status_of

_HERE = Path(__file__).parent


class Console:
    """The console's pages and form handlers over one app, and how requests are read."""

    def __init__(
        self,
        data: ConsoleData,
        *,
        token: str | None,
        read_only: bool,
    ) -> None:
        self.data = data
        self.token = token
        self.read_only = read_only
        env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(_HERE / "templates"),
            autoescape=True,
            undefined=jinja2.StrictUndefined,
        )
        env.filters.update(
            safe_text=lambda v: "" if v is None else safe(str(v)),
            safe_lines=lambda v: "" if v is None else safe_lines(str(v)),
            preview=preview,
            json=json_text,
            quote=lambda v: quote(str(v), safe=""),
            error_line=error_line,
        )
        self.templates = Jinja2Templates(env=env)

    # -- helpers ------------------------------------------------------------------------

    @staticmethod
    def root(request: Request) -> str:
        """The prefix the console is mounted at ("" at the top)."""
        return str(request.scope.get("root_path", ""))

    def render(
        self, request: Request, name: str, context: Mapping[str, Any], status: int = 200
    ) -> Response:
        """A page, with what every page needs; sets the CSRF cookie on first visit."""
        csrf = request.cookies.get(sec.CSRF_COOKIE)
        fresh = not csrf
        if not csrf:
            csrf = sec.new_csrf()
        now = context.get("now") or self.data.now()
        root = self.root(request)

        def url(path: str, **params: Any) -> str:
            query = {k: v for k, v in params.items() if v not in (None, "")}
            return root + path + (f"?{urlencode(query)}" if query else "")

        ctx = {
            "request": request,
            "root": root,
            "url": url,
            "flow_url": lambda flow_id: f"{root}/flows/{quote(str(flow_id), safe='')}",
            "csrf": csrf,
            "csrf_field": sec.CSRF_FIELD,
            "read_only": self.read_only,
            "logged_in": self.token is not None and request.state.crux_auth == "cookie",
            "now": now,
            "ago": lambda t: ago(t, now),
            "countdown": lambda t: countdown(t, now),
            "span": span,
            "wake_words": WAKE_WORDS,
            "statuses": STATUSES,
            "notice": None,
            "error": None,
            **context,
        }
        response = self.templates.TemplateResponse(request, name, ctx, status_code=status)
        response.headers["cache-control"] = "no-store"
        if fresh:
            response.set_cookie(
                sec.CSRF_COOKIE,
                csrf,
                httponly=True,
                samesite="strict",
                secure=request.url.scheme == "https",
                path=root or "/",
            )
        return response

    async def form(self, request: Request) -> dict[str, str]:
        """A POSTed form, after the read-only and CSRF checks (``Refused`` when they fail)."""
        self.check_action(request)
        form = await request.form()
        values = {k: v for k, v in form.items() if isinstance(v, str)}
        if not sec.same(values.get(sec.CSRF_FIELD), request.cookies.get(sec.CSRF_COOKIE)):
            raise Refused(403, "the form's CSRF token is missing or stale: reload the page")
        return values

    async def body(self, request: Request) -> Any:
        """A POSTed JSON body, after the read-only and CSRF checks."""
        self.check_action(request)
        if request.state.crux_auth != "bearer" and not sec.same(
            request.headers.get(sec.CSRF_HEADER), request.cookies.get(sec.CSRF_COOKIE)
        ):
            raise Refused(
                403,
                "a CSRF token is required: the X-CSRF-Token header equal to the "
                f"{sec.CSRF_COOKIE} cookie, or an Authorization: Bearer token",
            )
        raw = await request.body()
        if not raw.strip():
            return {}
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"the request body is not JSON: {exc}") from None

    def check_action(self, request: Request) -> None:
        """Refuse an action in read-only mode."""
        if self.read_only:
            raise Refused(403, "this console is read-only")

    # -- pages --------------------------------------------------------------------------

    async def home(self, request: Request) -> Response:
        """The front page is the flows list."""
        return RedirectResponse(f"{self.root(request)}/flows", status_code=303)

    async def flows_page(self, request: Request) -> Response:
        """Counts by status, the filter, one page of flows."""
        now = await run_in_threadpool(self.data.now)
        problem: str | None = None
        try:
            query = ListQuery.parse(dict(request.query_params), now)
        except InvalidInput as exc:
            query, problem = ListQuery(), str(exc)
        if query.q and not query.after:
            exact = await run_in_threadpool(self.data.find_exact, query.q)
            if exact is not None and request.query_params.get("jump", "1") != "0":
                return RedirectResponse(
                    f"{self.root(request)}/flows/{quote(exact, safe='')}", status_code=303
                )
        listing = await run_in_threadpool(self.data.list_flows, query)
        return self.render(
            request,
            "flows.html",
            {
                "title": "Flows",
                "nav": "flows",
                "query": query,
                "listing": listing,
                "error": problem,
                "notice": _notice(request),
                "now": now,
            },
            status=422 if problem else 200,
        )

    async def flow_page(
        self,
        request: Request,
        *,
        flow_id: str | None = None,
        status: int = 200,
        **extra: Any,
    ) -> Response:
        """One flow: what it waits on, its timeline, signals, input, result, actions."""
        flow_id = flow_id if flow_id is not None else request.path_params["flow_id"]
        try:
            state = await run_in_threadpool(self.data.get_flow, flow_id)
        except CruxError as exc:
            code = status_of(exc)
            return self.render(
                request,
                "missing.html",
                {"title": "Flow not found", "nav": "flows", "flow_id": flow_id, "error": str(exc)},
                status=code,
            )
        schema = getattr(state, "waiting_schema", None)
        context = {
            "title": f"Flow {safe(state.flow_id)}",
            "nav": "flows",
            "flow": state,
            "schema_fields": fields_of(schema) if state.waiting_on else None,
            "schema": schema,
            "forked_from": getattr(state, "forked_from", None),
            "field_errors": {},
            "form_values": {},
            "signal_error": None,
            "cancel_error": None,
            "fork_error": None,
            "fork_values": {},
            "retry_error": None,
            "notice": _notice(request),
            "tasks": [s for s in state.steps if s.kind == "task"],
            **extra,
        }
        return self.render(request, "flow.html", context, status=status)

    async def rejected_page(self, request: Request) -> Response:
        """Signal messages the ingress refused, newest first, with the reason."""
        rows = await run_in_threadpool(self.data.rejected, 200)
        return self.render(
            request, "rejected.html", {"title": "Refused messages", "nav": "rejected", "rows": rows}
        )

    async def fleet_page(self, request: Request) -> Response:
        """Due backlog, queue depths, the sweeper's last run; the purge form."""
        fleet = await run_in_threadpool(self.data.fleet)
        return self.render(
            request,
            "fleet.html",
            {"title": "Fleet", "nav": "fleet", "fleet": fleet, "notice": _notice(request)},
        )

    async def waiting_page(self, request: Request) -> Response:
        """Flows grouped by what they wait on."""
        name = request.query_params.get("name") or None
        groups = await run_in_threadpool(self.data.waiting, name)
        return self.render(
            request,
            "waiting.html",
            {"title": "Waiting", "nav": "waiting", "groups": groups, "name": name},
        )

    async def login_page(self, request: Request) -> Response:
        """The login form (only where a token is set)."""
        target = _local_target(request.query_params.get("next"))
        if request.method == "POST":
            form = await request.form()
            given = form.get("token")
            if self.token is not None and isinstance(given, str) and sec.same(given, self.token):
                response = RedirectResponse(f"{self.root(request)}{target}", status_code=303)
                response.set_cookie(
                    sec.SESSION_COOKIE,
                    sec.session_value(self.token),
                    httponly=True,
                    samesite="strict",
                    secure=request.url.scheme == "https",
                    path=self.root(request) or "/",
                )
                return response
            return self.render(
                request,
                "login.html",
                {"title": "Sign in", "nav": "", "next": target, "error": "That token is not it."},
                status=401,
            )
        return self.render(request, "login.html", {"title": "Sign in", "nav": "", "next": target})

    async def logout(self, request: Request) -> Response:
        """Forget the session cookie."""
        form = await request.form()
        given = form.get(sec.CSRF_FIELD)
        if not isinstance(given, str) or not sec.same(given, request.cookies.get(sec.CSRF_COOKIE)):
            raise Refused(403, "the form's CSRF token is missing or stale: reload the page")
        response = RedirectResponse(f"{self.root(request)}/login", status_code=303)
        response.delete_cookie(sec.SESSION_COOKIE, path=self.root(request) or "/")
        return response

    # -- page actions (forms) ---------------------------------------------------------------

    async def signal_form(self, request: Request) -> Response:
        """Send a signal from the flow page; errors shown in place, next to the field."""
        flow_id = request.path_params["flow_id"]
        form = await self.form(request)
        name = form.get("name", "").strip()
        key = form.get("key", "").strip() or None
        state = await run_in_threadpool(self.data.get_flow, flow_id)
        fields = fields_of(getattr(state, "waiting_schema", None))
        payload: Any
        field_errors: dict[str, str] = {}
        if fields is not None and "payload" not in form:
            payload, field_errors = payload_of(fields, form)
        else:
            try:
                payload = json.loads(form.get("payload", "") or "null")
            except ValueError as exc:
                return await self.flow_page(
                    request,
                    status=422,
                    signal_error=f"The payload is not valid JSON: {exc}",
                    form_values=form,
                )
        if field_errors:
            return await self.flow_page(
                request,
                status=422,
                signal_error="Some fields need fixing.",
                field_errors=field_errors,
                form_values=form,
            )
        try:
            receipt = await run_in_threadpool(self.data.signal, flow_id, name, payload, key)
        except CruxError as exc:
            errors = getattr(exc, "errors", None)
            by_field, general = errors_by_field(errors) if isinstance(errors, list) else ({}, [])
            message = str(exc) if not by_field else "Some fields need fixing."
            if general:
                message += " " + "; ".join(general)
            return await self.flow_page(
                request,
                status=status_of(exc),
                signal_error=message,
                field_errors=by_field,
                form_values=form,
            )
        if receipt.get("duplicate"):
            done = "signal-duplicate"
        else:
            done = "signal" if receipt.get("delivered") else "signal-kept"
        return self._back(request, flow_id, done)

    async def cancel_form(self, request: Request) -> Response:
        """Cancel from the flow page, with a reason."""
        flow_id = request.path_params["flow_id"]
        form = await self.form(request)
        reason = form.get("reason", "").strip()
        if not reason:
            return await self.flow_page(
                request, status=422, cancel_error="Say why: the reason is kept with the flow."
            )
        try:
            status = await run_in_threadpool(self.data.cancel, flow_id, reason)
        except CruxError as exc:
            return await self.flow_page(request, status=status_of(exc), cancel_error=str(exc))
        return self._back(request, flow_id, status)

    async def retry_form(self, request: Request) -> Response:
        """Retry a failed flow from the flow page."""
        flow_id = request.path_params["flow_id"]
        await self.form(request)
        try:
            await run_in_threadpool(self.data.retry, flow_id)
        except CruxError as exc:
            return await self.flow_page(request, status=status_of(exc), retry_error=str(exc))
        return self._back(request, flow_id, "retried")

    async def fork_form(self, request: Request) -> Response:
        """Fork the flow at a checkpoint, optionally with edited input; opens the new flow."""
        flow_id = request.path_params["flow_id"]
        form = await self.form(request)
        try:
            at = int(form.get("at", ""))
        except ValueError:
            return await self.flow_page(
                request, status=422, fork_error="Choose a checkpoint.", fork_values=form
            )
        text = form.get("input", "").strip()
        new_input: Any = None
        if text:
            try:
                new_input = json.loads(text)
            except ValueError as exc:
                return await self.flow_page(
                    request,
                    status=422,
                    fork_error=f"The input is not valid JSON: {exc}",
                    fork_values=form,
                )
        try:
            new_id = await run_in_threadpool(self.data.fork, flow_id, at, new_input)
        except CruxError as exc:
            return await self.flow_page(
                request, status=status_of(exc), fork_error=str(exc), fork_values=form
            )
        return self._back(request, new_id, "forked")

    async def bulk_page(self, request: Request) -> Response:
        """Bulk cancel or retry by the current filter: shows the count, then does it."""
        now = await run_in_threadpool(self.data.now)
        params: Mapping[str, str]
        if request.method == "POST":
            params = await self.form(request)
        else:
            self.check_action(request)
            params = dict(request.query_params)
        action = params.get("action")
        if action not in ("cancel", "retry"):
            raise Refused(422, "action must be cancel or retry")
        query = ListQuery.parse(dict(params), now)
        statuses = ("failed",) if action == "retry" else ("pending", "running", "suspended")
        ids = await run_in_threadpool(self.data.matching, query, statuses)
        if request.method == "POST" and params.get("confirm") == "yes":
            if action == "cancel":
                reason = params.get("reason", "").strip() or "cancelled from the console"
                outcome = await run_in_threadpool(self.data.cancel_many, ids, reason)
                count = sum(1 for v in outcome.values() if not v.startswith("skipped"))
            else:
                count = await run_in_threadpool(self.data.retry_many, ids)
            back = {**query.params(), "done": f"bulk-{action}", "n": count}
            return RedirectResponse(
                f"{self.root(request)}/flows?{urlencode(back)}", status_code=303
            )
        return self.render(
            request,
            "bulk.html",
            {
                "title": f"Bulk {action}",
                "nav": "flows",
                "action": action,
                "query": query,
                "ids": ids,
                "now": now,
            },
        )

    async def purge_form(self, request: Request) -> Response:
        """Delete finished flows older than the age given."""
        form = await self.form(request)
        try:
            count, _cutoff = await run_in_threadpool(
                self.data.purge, form.get("finished_before", "")
            )
        except CruxError as exc:
            fleet = await run_in_threadpool(self.data.fleet)
            return self.render(
                request,
                "fleet.html",
                {"title": "Fleet", "nav": "fleet", "fleet": fleet, "purge_error": str(exc)},
                status=status_of(exc),
            )
        return RedirectResponse(
            f"{self.root(request)}/fleet?{urlencode({'done': 'purged', 'n': count})}",
            status_code=303,
        )

    def _back(self, request: Request, flow_id: str, done: str) -> Response:
        return RedirectResponse(
            f"{self.root(request)}/flows/{quote(flow_id, safe='')}?done={quote(done)}",
            status_code=303,
        )


_NOTICES = {
    "signal": "Signal delivered: the flow resumes with it.",
    "signal-kept": "Signal recorded: it is kept until the flow waits for a signal of that name.",
    "signal-duplicate": "That signal key was already recorded: nothing new was sent.",
    "cancelled": "Flow cancelled.",
    "cancelling": "Cancel requested: the flow stops at its next step boundary.",
    "retried": "Retry requested: the flow resumes from its last checkpoint.",
    "forked": "This is the new flow, forked from the original.",
    "bulk-cancel": "Cancelled {n} flow(s).",
    "bulk-retry": "Retried {n} flow(s).",
    "purged": "Purged {n} finished flow(s).",
}


def _notice(request: Request) -> str | None:
    text = _NOTICES.get(request.query_params.get("done", ""))
    if text is None:
        return None
    n = request.query_params.get("n", "")
    return text.format(n=n if n.isdigit() else "some")


def _local_target(value: str | None) -> str:
    """A path inside the console to go back to after login (never another site)."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/flows"
    return value
