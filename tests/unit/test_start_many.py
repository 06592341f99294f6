"""Batch starts (``run_many`` / ``start_many``) on the in-memory store: all or nothing."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import pytest
from pydantic import BaseModel

from crux_workers import (
    Crux,
    FlowContext,
    FlowHandle,
    FlowIdConflict,
    FlowNotFound,
    InvalidInput,
    Settings,
)
from crux_workers._starts import MAX_BATCH
from crux_workers._store._types import FlowFilter
from crux_workers.errors import ValueTooLarge
from tests.support.harness import Harness


class Item(BaseModel):
    n: int
    note: Any = None


def _flow(h: Harness, name: str = "double") -> FlowHandle[Item]:
    @h.app.flow(name, input=Item)
    def double(f: FlowContext[Item]) -> Any:
        h.calls[f.flow_id] += 1
        return f.step("double", lambda: f.input.n * 2)

    return double


def _recorded(h: Harness) -> set[str]:
    return {r.id for r in h.store.list_flows(FlowFilter(limit=10_000))}


def _deep(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels):
        value = [value]
    return value


def test_run_many_records_every_flow_and_each_runs_once(h: Harness) -> None:
    double = _flow(h)
    runs = double.run_many([{"n": i} for i in range(5)])
    assert len({r.flow_id for r in runs}) == 5
    # One start request per flow, in the order of the inputs.
    assert [fid for _, fid, _ in h.dispatcher.queue] == [r.flow_id for r in runs]
    assert h.drain() == 5
    assert [r.outcome().result for r in runs] == [0, 2, 4, 6, 8]  # type: ignore[union-attr]
    assert all(h.calls[r.flow_id] == 1 for r in runs)


def test_given_ids_are_kept_and_an_existing_id_returns_the_existing_flow(h: Harness) -> None:
    double = _flow(h)
    first = double.run(input={"n": 1}, flow_id="a")
    h.drain()
    assert first.outcome() is not None
    runs = double.run_many([{"n": 10}, {"n": 20}], flow_ids=["a", "b"])
    assert [r.flow_id for r in runs] == ["a", "b"]
    # "a" finished already: not re-sent, and its input is the first one.
    assert [fid for _, fid, _ in h.dispatcher.queue] == ["b"]
    assert h.app.get_flow("a").input == {"n": 1, "note": None}
    h.drain()
    assert runs[1].outcome().result == 40  # type: ignore[union-attr]


def test_a_repeated_batch_re_sends_the_flows_still_pending(h: Harness) -> None:
    double = _flow(h)
    double.run_many([{"n": 1}, {"n": 2}], flow_ids=["p1", "p2"])
    h.dispatcher.queue.clear()  # as if the first requests were lost
    again = double.run_many([{"n": 1}, {"n": 2}], flow_ids=["p1", "p2"])
    assert [r.flow_id for r in again] == ["p1", "p2"]
    assert [fid for _, fid, _ in h.dispatcher.queue] == ["p1", "p2"]
    assert h.drain() == 2
    assert [h.calls["p1"], h.calls["p2"]] == [1, 1]


@pytest.mark.parametrize(
    ("inputs", "ids", "match"),
    [
        ([{"n": 1}, {"n": "x"}, {"n": 3}], None, "input #1"),
        ([{"n": 1}, {"n": 2, "note": _deep(150)}], None, "input #1 .*nested deeper"),
        ([{"n": 1}, {"n": 2}], ["same", "same"], "appears twice"),
        ([{"n": 1}, {"n": 2}], ["ok", ""], r"flow_ids\[1\]"),
        ([{"n": 1}, {"n": 2}], ["only-one"], "one id per input"),
        ({"n": 1}, None, "a list of inputs"),
    ],
)
def test_one_bad_item_refuses_the_whole_batch(
    h: Harness, inputs: Any, ids: Sequence[str] | None, match: str
) -> None:
    double = _flow(h)
    with pytest.raises(InvalidInput, match=match):
        double.run_many(inputs, flow_ids=ids)
    assert _recorded(h) == set()
    assert h.dispatcher.queue == []


def test_an_input_over_the_size_limit_refuses_the_batch(h: Harness) -> None:
    double = _flow(h)
    big = "x" * (h.app.settings.max_value_bytes + 1)
    with pytest.raises(ValueTooLarge, match="input #2"):
        double.run_many([{"n": 1}, {"n": 2}, {"n": 3, "note": big}])
    assert _recorded(h) == set()


def test_more_than_the_batch_limit_is_refused_before_validation(h: Harness) -> None:
    double = _flow(h)
    with pytest.raises(InvalidInput, match=f"at most {MAX_BATCH}"):
        double.run_many([{"n": "not validated"}] * (MAX_BATCH + 1))
    with pytest.raises(InvalidInput, match=f"at most {MAX_BATCH}"):
        h.app.client.start_many("double", [Item(n=1)] * (MAX_BATCH + 1))
    assert _recorded(h) == set()


def test_an_id_taken_by_another_flow_refuses_the_batch(h: Harness) -> None:
    double = _flow(h)
    other = _flow(h, "other")
    other.run(input={"n": 1}, flow_id="taken")
    h.dispatcher.queue.clear()
    with pytest.raises(FlowIdConflict, match="taken"):
        double.run_many([{"n": 1}, {"n": 2}], flow_ids=["fresh", "taken"])
    with pytest.raises(FlowNotFound):
        h.app.get_flow("fresh")
    assert h.dispatcher.queue == []


def test_an_empty_batch_records_nothing(h: Harness) -> None:
    double = _flow(h)
    assert double.run_many([]) == []
    assert _recorded(h) == set() and h.dispatcher.queue == []


def test_run_many_async_starts_the_batch_off_the_loop(h: Harness) -> None:
    double = _flow(h)

    async def main() -> list[str]:
        runs = await double.run_many_async([{"n": 1}, {"n": 2}], flow_ids=["x1", "x2"])
        return [r.flow_id for r in runs]

    assert asyncio.run(main()) == ["x1", "x2"]
    h.drain()
    assert h.app.get_flow("x2").result == 4


class BatchDispatcher:
    """A dispatcher that takes batches; ``fail`` makes the batch publish raise."""

    def __init__(self, fail: bool = False) -> None:
        self.batches: list[tuple[str, list[str], bool]] = []
        self.single: list[str] = []
        self.fail = fail

    def enqueue(
        self, flow_name: str, flow_id: str, countdown: float | None = None, *, start: bool = False
    ) -> None:
        self.single.append(flow_id)

    def enqueue_many(self, flow_name: str, flow_ids: Sequence[str], *, start: bool = False) -> None:
        if self.fail:
            raise ConnectionError("broker down")
        self.batches.append((flow_name, list(flow_ids), start))

    def close(self) -> None:
        pass


def test_a_batch_goes_to_the_transport_as_one_request(h: Harness) -> None:
    batch = BatchDispatcher()
    app = Crux(Settings(), store=h.store, cache=h.cache, dispatcher=batch)
    try:

        @app.flow("double", input=Item)
        def double(f: FlowContext[Item]) -> Any:
            return f.input.n

        runs = double.run_many([{"n": 1}, {"n": 2}, {"n": 3}])
        assert batch.batches == [("double", [r.flow_id for r in runs], True)]
        assert batch.single == []
    finally:
        app.close()


def test_a_failed_batch_publish_is_logged_and_the_sweeper_sends_the_flows(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    broken = BatchDispatcher(fail=True)
    app = Crux(Settings(lease_ttl=10), store=h.store, cache=h.cache, dispatcher=broken)
    try:

        @app.flow("double", input=Item)
        def double(f: FlowContext[Item]) -> Any:
            return f.input.n * 2

        with caplog.at_level(logging.WARNING, logger="crux_workers"):
            runs = double.run_many([{"n": 1}, {"n": 2}])
        assert "could not enqueue" in caplog.text and "broker down" in caplog.text
        assert [app.get_flow(r.flow_id).status for r in runs] == ["pending", "pending"]
        # The record says they are due: a sweep after redrive_after sends them.
        broken.fail = False
        h.clock.advance(app.settings.redrive_after + 1)
        app.sweep()
        sent = [fid for _, fids, _ in broken.batches for fid in fids] + broken.single
        assert sorted(sent) == sorted(r.flow_id for r in runs)
        for r in runs:
            app.execute("double", r.flow_id)
        assert [r.outcome().result for r in runs] == [2, 4]  # type: ignore[union-attr]
    finally:
        app.close()
