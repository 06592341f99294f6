"""The rules of a batch of new flows, one copy for every backend (``create_flows``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..errors import FlowIdConflict, InvalidInput

# A flow to create: its id, its flow name and its input as JSON.
NewFlow = tuple[str, str, str]


def check_distinct(items: Sequence[NewFlow]) -> None:
    """Refuse a batch that names one flow id twice (``InvalidInput``)."""
    seen: set[str] = set()
    for flow_id, _, _ in items:
        if flow_id in seen:
            raise InvalidInput(
                f"flow id {flow_id!r} appears twice in one batch; nothing was recorded",
                flow_id=flow_id,
            )
        seen.add(flow_id)


def refuse_taken(items: Sequence[NewFlow], existing: Mapping[str, str]) -> None:
    """``FlowIdConflict`` when an id of the batch exists under another flow name.

    ``existing`` maps the ids that exist already to their flow names. Raised before the
    batch commits, so nothing of it is recorded.
    """
    for flow_id, name, _ in items:
        other = existing.get(flow_id)
        if other is not None and other != name:
            raise FlowIdConflict(
                f"flow id {flow_id!r} is taken by a {other!r} flow; nothing of the batch "
                "was recorded",
                flow_id=flow_id,
            )
