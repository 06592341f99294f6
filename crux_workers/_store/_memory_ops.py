"""The in-memory store's bulk and operator actions: create flows in a batch, retry a
failed flow, fork one at a checkpoint."""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import FlowIdConflict, FlowNotRetryable, InvalidInput
from . import _lifecycle as life
from ._batch import NewFlow, check_distinct, refuse_taken
from ._lifecycle import FlowStatus, WakeKind
from ._memory_state import MemoryFlow, MemoryState, flow_row
from ._memory_tasks import MemoryTasks
from ._types import FlowRow


class MemoryOps:
    """Batches, retry and fork on the memory store's rows (the SQL side: ``_sql_client``)."""

    def __init__(self, state: MemoryState, tasks: MemoryTasks) -> None:
        self._s = state
        self._tasks = tasks

    def create_flows(self, items: Sequence[NewFlow]) -> list[tuple[FlowRow, bool]]:
        """Insert many pending flows under the lock; all or nothing."""
        check_distinct(items)
        with self._s.lock:
            flows = self._s.flows
            refuse_taken(items, {i: flows[i].name for i, _, _ in items if i in flows})
            now = self._s.now()
            out = []
            for flow_id, name, input_json in items:
                if flow_id in flows:
                    out.append((flow_row(flows[flow_id], details=False), False))
                    continue
                flow = MemoryFlow(
                    flow_id,
                    name,
                    FlowStatus.PENDING,
                    input_json,
                    now,
                    now,
                    wake_at=now,
                    wake_kind=WakeKind.RUN,
                )
                flows[flow_id] = flow
                out.append((flow_row(flow, details=False), True))
            return out

    def retry_flow(self, flow_id: str) -> str:
        """Make a failed flow due again from its last checkpoint; return its flow name."""
        with self._s.lock:
            flow = self._s.get(flow_id)
            if not life.retryable(flow.status):
                raise FlowNotRetryable(
                    f"flow {flow_id!r} is {flow.status}; only a failed flow can be retried",
                    flow_id=flow_id,
                    status=str(flow.status),
                )
            now = self._s.now()
            flow.status = FlowStatus.PENDING
            flow.result = flow.error = flow.cancel_reason = flow.finished_at = None
            flow.lease_owner = flow.lease_until = flow.waiting_on = flow.deadline = None
            flow.waiting_schema = None
            flow.retry_attempt = 0
            flow.lapses = 0  # a flow parked after a crash loop starts counting again
            flow.retries += 1
            flow.wake_at, flow.wake_kind, flow.updated_at = now, WakeKind.RUN, now
            self._tasks.forget_failed(flow_id, flow.next_seq)
            return flow.name

    def fork_flow(self, source_id: str, new_id: str, at: int, input_json: str | None) -> FlowRow:
        """A new pending flow with the first ``at`` checkpoints of ``source_id``, due now."""
        with self._s.lock:
            src = self._s.get(source_id)
            if not life.fork_point_ok(at, src.next_seq):
                raise InvalidInput(
                    f"flow {source_id!r} has {src.next_seq} checkpoint(s); fork at "
                    f"0..{src.next_seq}, not {at}",
                    flow_id=source_id,
                    at=at,
                )
            if new_id in self._s.flows:
                raise FlowIdConflict(
                    f"flow id {new_id!r} is taken; a fork needs a new id", flow_id=new_id
                )
            now = self._s.now()
            flow = MemoryFlow(
                new_id,
                src.name,
                FlowStatus.PENDING,
                src.input if input_json is None else input_json,
                now,
                now,
                wake_at=now,
                wake_kind=WakeKind.RUN,
                next_seq=at,
                forked_from=source_id,
                forked_at=at,
                steps=[s for s in src.steps if s.seq < at],
            )
            self._s.flows[new_id] = flow
            return flow_row(flow, details=False)
