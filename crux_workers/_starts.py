"""What a start checks before anything is recorded, and how a batch asks for executions.

``Client.start`` and ``Client.start_many`` share the input's checks (depth, size); a
batch also checks its ids (valid, one per input, none twice) and its size, so that one
bad item refuses the whole batch before the record is touched.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence

from pydantic import BaseModel

from . import _json
from ._ids import check_id
from ._settings import Settings, redact
from ._store._batch import NewFlow, check_distinct
from ._transport import BatchEnqueue, Transport
from .errors import InvalidInput

log = logging.getLogger("crux_workers")

# The most flows one ``start_many`` records: one statement of this many rows stays well
# under the drivers' parameter limits, and one transaction stays short.
MAX_BATCH = 1000


def input_json(flow_name: str, model: BaseModel, limit: int, what: str) -> str:
    """The input as JSON, refused (``InvalidInput``) when too deep or over ``limit`` bytes."""
    try:
        _json.check_depth(model.model_dump(mode="json"))
    except ValueError as exc:
        raise InvalidInput(f"{what}: {exc}", flow=flow_name) from None
    return _json.check_size(model.model_dump_json(), limit, what)


def batch_items(
    flow_name: str, models: Sequence[BaseModel], flow_ids: Sequence[str] | None, limit: int
) -> list[NewFlow]:
    """The batch as (flow id, name, input JSON) rows, every item checked first."""
    if len(models) > MAX_BATCH:
        raise InvalidInput(
            f"start_many takes at most {MAX_BATCH} flows per call, got {len(models)}; "
            "split the batch (nothing was recorded)",
            flow=flow_name,
        )
    if flow_ids is None:
        ids = [str(uuid.uuid4()) for _ in models]
    else:
        if isinstance(flow_ids, str):
            raise InvalidInput("flow_ids must be a sequence of ids, not one string")
        ids = list(flow_ids)
        if len(ids) != len(models):
            raise InvalidInput(
                f"start_many got {len(models)} inputs and {len(ids)} flow ids; "
                "give one id per input, or none",
                flow=flow_name,
            )
        for i, flow_id in enumerate(ids):
            check_id(flow_id, f"flow_ids[{i}]")
    items = [
        (flow_id, flow_name, input_json(flow_name, m, limit, f"input #{i} of flow {flow_name!r}"))
        for i, (flow_id, m) in enumerate(zip(ids, models, strict=True))
    ]
    check_distinct(items)
    return items


def enqueue_many_quietly(
    transport: Transport,
    settings: Settings,
    flow_name: str,
    flow_ids: Sequence[str],
    *,
    start: bool = False,
) -> None:
    """Ask for many executions, over one connection where the transport can.

    As ``enqueue_quietly``: a failure is logged, not raised. The flows are recorded as
    due, and the sweeper sends those the failure left unsent.
    """
    try:
        if isinstance(transport, BatchEnqueue):
            transport.enqueue_many(flow_name, flow_ids, start=start)
        else:
            for flow_id in flow_ids:
                transport.enqueue(flow_name, flow_id, None, start=start)
    except Exception as exc:
        log.warning(
            "%d flow(s) of %r: could not enqueue them all on %s (%s); they are recorded "
            "as due and the sweeper will send those not sent",
            len(flow_ids),
            flow_name,
            redact(settings.effective_broker_url),
            exc,
        )
