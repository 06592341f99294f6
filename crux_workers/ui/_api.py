"""The console's JSON API: the paths of issue 15, over the same actions as the pages."""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from ..errors import InvalidInput
from ._data import ListQuery, flow_summary
from ._http import SafeJSONResponse
from ._pages import Console


class Api:
    """The JSON endpoints; bodies are read (and checked) by the console."""

    def __init__(self, console: Console) -> None:
        self.c = console

    async def api_flows(self, request: Request) -> Response:
        """``GET /api/flows``: one page, newest first, and the cursor of the next."""
        now = await run_in_threadpool(self.c.data.now)
        query = ListQuery.parse(dict(request.query_params), now)
        listing = await run_in_threadpool(self.c.data.list_flows, query)
        return SafeJSONResponse(
            {
                "flows": [flow_summary(r) for r in listing.rows],
                "next": listing.next_cursor,
                "counts": listing.overview.counts,
            }
        )

    async def api_flow(self, request: Request) -> Response:
        """``GET /api/flows/{id}``: everything the record holds about the flow."""
        state = await run_in_threadpool(self.c.data.get_flow, request.path_params["flow_id"])
        return SafeJSONResponse(state.model_dump(mode="json"))

    async def api_signal(self, request: Request) -> Response:
        """``POST /api/flows/{id}/signal`` with ``{"name", "payload", "key"}``."""
        body = await self.c.body(request)
        if not isinstance(body, dict) or not isinstance(body.get("name"), str):
            raise InvalidInput('the body must be {"name": ..., "payload": ..., "key": ...}')
        key = body.get("key")
        if key is not None and not isinstance(key, str):
            raise InvalidInput("key must be a string")
        receipt = await run_in_threadpool(
            self.c.data.signal,
            request.path_params["flow_id"],
            body["name"],
            body.get("payload"),
            key,
        )
        return SafeJSONResponse(receipt)

    async def api_cancel(self, request: Request) -> Response:
        """``POST /api/flows/{id}/cancel`` with ``{"reason"}``."""
        body = await self.c.body(request)
        reason = body.get("reason", "") if isinstance(body, dict) else None
        if not isinstance(reason, str):
            raise InvalidInput('the body must be {"reason": "..."}')
        flow_id = request.path_params["flow_id"]
        status = await run_in_threadpool(self.c.data.cancel, flow_id, reason)
        return SafeJSONResponse({"flow_id": flow_id, "status": status})

    async def api_retry(self, request: Request) -> Response:
        """``POST /api/flows/{id}/retry``: resume a failed flow from its last checkpoint."""
        await self.c.body(request)
        flow_id = request.path_params["flow_id"]
        status = await run_in_threadpool(self.c.data.retry, flow_id)
        return SafeJSONResponse({"flow_id": flow_id, "status": status})

    async def api_fork(self, request: Request) -> Response:
        """``POST /api/flows/{id}/fork`` with ``{"at", "input"}``: the new flow's id."""
        body = await self.c.body(request)
        at = body.get("at") if isinstance(body, dict) else None
        if not isinstance(at, int) or isinstance(at, bool):
            raise InvalidInput('the body must be {"at": N, "input": ... (optional)}')
        new_id = await run_in_threadpool(
            self.c.data.fork, request.path_params["flow_id"], at, body.get("input")
        )
        return SafeJSONResponse({"flow_id": new_id, "forked_from": request.path_params["flow_id"]})

    async def api_waiting(self, request: Request) -> Response:
        """``GET /api/waiting``: flows grouped by what they wait on."""
        groups = await run_in_threadpool(self.c.data.waiting, request.query_params.get("name"))
        return SafeJSONResponse({"groups": groups})

    async def api_rejected(self, request: Request) -> Response:
        """``GET /api/rejected``: refused signal messages, newest first."""
        try:
            limit = min(max(int(request.query_params.get("limit") or 100), 1), 1000)
        except ValueError:
            raise InvalidInput("limit must be a whole number") from None
        rows = await run_in_threadpool(self.c.data.rejected, limit)
        return SafeJSONResponse({"rejected": [r.as_json() for r in rows]})

    async def api_fleet(self, request: Request) -> Response:
        """``GET /api/fleet``: backlog, queue depths, the sweeper."""
        return SafeJSONResponse(await run_in_threadpool(self.c.data.fleet))

    async def api_purge(self, request: Request) -> Response:
        """``POST /api/purge`` with ``{"finished_before": "30d"}``."""
        body = await self.c.body(request)
        age = body.get("finished_before") if isinstance(body, dict) else None
        if not isinstance(age, str):
            raise InvalidInput('the body must be {"finished_before": "30d"}')
        count, cutoff = await run_in_threadpool(self.c.data.purge, age)
        return SafeJSONResponse({"purged": count, "finished_before": cutoff.isoformat()})
