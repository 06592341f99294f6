"""Client calls from async code: starting, signalling, reading and waiting off the loop."""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import BaseModel

from crux_workers import Crux, FlowContext, Settings


class Empty(BaseModel):
    pass


def test_200_concurrent_waits_on_one_loop_leave_it_responsive(pg_url: str) -> None:
    # Postgres record, flows on embedded executor threads: the waits poll the real record.
    app = Crux(Settings(database_url=pg_url, embedded_threads=8))

    @app.flow("waits-for-go", input=Empty)
    def waits(f: FlowContext[Empty]) -> Any:
        return f.suspend("go")

    lags: list[float] = []

    async def ticker(stop: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            before = loop.time()
            await asyncio.sleep(0.01)
            lags.append(loop.time() - before - 0.01)

    async def main() -> list[Any]:
        stop = asyncio.Event()
        tick = asyncio.create_task(ticker(stop))
        runs = await asyncio.gather(*(waits.run_async(input={}) for _ in range(200)))
        waiting = [asyncio.create_task(run.wait_async(timeout=120)) for run in runs]
        pending = list(runs)
        while pending:
            states = await asyncio.gather(*(run.state_async() for run in pending))
            pending = [r for r, st in zip(pending, states, strict=True) if st.status != "suspended"]
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # 200 waits polling, the loop ticking meanwhile
        assert not any(w.done() for w in waiting), "a wait returned before its signal"
        await asyncio.gather(
            *(app.signal_flow_async(run.flow_id, "go", {"n": i}) for i, run in enumerate(runs))
        )
        outcomes = await asyncio.gather(*waiting)
        stop.set()
        await tick
        return outcomes

    try:
        outcomes = asyncio.run(main())
    finally:
        app.close()
    assert [o.status for o in outcomes] == ["completed"] * 200
    assert sorted(o.result["n"] for o in outcomes) == list(range(200))
    assert len(lags) > 50
    # A blocking wait would stall the loop for as long as the flows take (seconds).
    assert max(lags) < 0.25, f"the loop stalled for {max(lags):.3f}s"


def test_async_forms_of_get_and_cancel(pg_url: str) -> None:
    app = Crux(Settings(database_url=pg_url))

    @app.flow("cancel-me", input=Empty)
    def cancel_me(f: FlowContext[Empty]) -> Any:
        return f.suspend("never")

    async def main() -> tuple[str, str]:
        run = await cancel_me.run_async(input={})
        while (await app.get_flow_async(run.flow_id)).status != "suspended":
            await asyncio.sleep(0.02)
        status = await app.cancel_flow_async(run.flow_id, "not needed")
        outcome = await run.wait_async(timeout=30)
        return status, outcome.status

    try:
        assert asyncio.run(main()) == ("cancelled", "cancelled")
    finally:
        app.close()
