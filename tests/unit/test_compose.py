"""parallel, consensus and swarm: concurrency, context, errors; a step makes them durable."""

from __future__ import annotations

import asyncio
import contextvars
import pickle
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import pytest
from pydantic import BaseModel

from crux_workers import InvalidInput, current_step
from crux_workers._compose import (
    SwarmMessage,
    SwarmResult,
    consensus,
    consensus_async,
    parallel,
    parallel_async,
    swarm,
    swarm_async,
)
from crux_workers._loop import flow_loop
from crux_workers.errors import NoConsensus, Suspended
from tests.support.harness import Harness

# Long enough never to trip on a slow machine; reached only when branches do not overlap.
BARRIER_TIMEOUT = 10


class Empty(BaseModel):
    pass


class Calls:
    """A counter several branch threads may bump at once."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()

    def hit(self, name: str) -> None:
        with self._lock:
            self.counts[name] += 1


def compose_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("crux-")]


def const(value: Any) -> Callable[[], Any]:
    return lambda: value


def fail(exc: BaseException) -> Callable[[], Any]:
    def raiser() -> Any:
        raise exc

    return raiser


# -- parallel --------------------------------------------------------------------------


def test_parallel_returns_results_in_argument_order() -> None:
    # The first branch finishes last: order follows the arguments, not completion.
    second_done = threading.Event()

    def slow() -> str:
        assert second_done.wait(BARRIER_TIMEOUT)
        return "first"

    def fast() -> str:
        second_done.set()
        return "second"

    assert parallel(slow, fast, const(3)) == ["first", "second", 3]
    assert parallel() == []


def test_parallel_branches_run_at_the_same_time() -> None:
    n = 6
    barrier = threading.Barrier(n, timeout=BARRIER_TIMEOUT)
    # Each branch waits until all n are inside: only possible if all run at once.
    assert sorted(parallel(*[barrier.wait for _ in range(n)])) == list(range(n))


def test_max_workers_bounds_how_many_branches_run_at_once() -> None:
    lock = threading.Lock()
    running = 0
    peak = 0
    pair = threading.Barrier(2, timeout=BARRIER_TIMEOUT)

    def branch() -> None:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        pair.wait()  # two at a time meet here; a third would need a free worker
        with lock:
            running -= 1

    parallel(*[branch] * 4, max_workers=2)
    assert peak == 2


def test_no_thread_outlives_the_call() -> None:
    before = compose_threads()
    parallel(*[const(i) for i in range(5)])
    with pytest.raises(ExceptionGroup):
        parallel(const(1), fail(ValueError("x")))
    consensus(const("a"), 3)
    swarm([lambda task, t: task], "t", rounds=2)
    assert compose_threads() == before


def test_async_branches_are_awaited() -> None:
    async def later(value: int) -> int:
        await asyncio.sleep(0)
        return value * 10

    assert parallel(lambda: later(1), const(2), lambda: later(3)) == [10, 2, 30]


def test_branches_see_the_callers_context_and_do_not_leak_into_it() -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("test_var", default="unset")
    var.set("caller")

    def read_then_set(i: int) -> Callable[[], str]:
        def branch() -> str:
            seen = var.get()
            var.set(f"branch {i}")
            return seen

        return branch

    async def read_async() -> str:
        return var.get()

    assert parallel(read_then_set(0), read_then_set(1), read_async) == ["caller"] * 3
    assert var.get() == "caller"


def test_every_failure_is_raised_together_after_the_others_finish() -> None:
    met = threading.Barrier(3, timeout=BARRIER_TIMEOUT)
    finished = threading.Event()
    first, second = ValueError("bad one"), KeyError("bad two")

    def failing(exc: Exception) -> Callable[[], Any]:
        def branch() -> Any:
            met.wait()
            raise exc

        return branch

    def ok() -> str:
        met.wait()  # the failures are being raised while this one still works
        finished.set()
        return "ok"

    with pytest.raises(ExceptionGroup) as info:
        parallel(failing(first), ok, failing(second))
    group = info.value
    assert group.message == "parallel: 2 of 3 branches failed"
    assert group.exceptions == (first, second)
    assert finished.is_set()
    assert "in parallel branch 0" in (first.__notes__ or [])
    assert "in parallel branch 2" in (second.__notes__ or [])


def test_control_flow_is_reraised_unwrapped_and_stops_queued_branches() -> None:
    calls = Calls()
    stop = Suspended("approval")

    def later() -> None:
        calls.hit("later")

    # One worker: the queued branch would run after the suspension if nothing stopped it.
    with pytest.raises(Suspended) as info:
        parallel(fail(ValueError("ignored")), fail(stop), later, max_workers=1)
    assert info.value is stop
    assert calls.counts["later"] == 0


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_parallel_refuses_bad_max_workers(bad: Any) -> None:
    with pytest.raises(InvalidInput, match="max_workers"):
        parallel(const(1), max_workers=bad)


def test_parallel_refuses_what_is_not_callable() -> None:
    with pytest.raises(InvalidInput, match="argument 1"):
        parallel(const(1), 2)  # type: ignore[arg-type]


# -- consensus -------------------------------------------------------------------------


def answers(*values: Any) -> Callable[[], Any]:
    """A fn whose k-th call (in any thread) returns values[k]; Exceptions are raised."""
    it = iter(values)
    lock = threading.Lock()

    def next_answer() -> Any:
        with lock:
            value = next(it)
        if isinstance(value, Exception):
            raise value
        return value

    return next_answer


def test_consensus_returns_the_majority_value() -> None:
    assert consensus(answers("yes", "no", "yes", "yes", "no"), 5) == "yes"


def test_consensus_runs_at_the_same_time() -> None:
    barrier = threading.Barrier(4, timeout=BARRIER_TIMEOUT)
    assert consensus(lambda: barrier.wait() >= 0, 4) is True


def test_consensus_compares_dicts_by_value_by_default() -> None:
    winner = consensus(answers({"a": 1, "b": 2}, {"b": 2, "a": 1}, {"a": 2}), 3)
    assert winner == {"a": 1, "b": 2}


def test_consensus_groups_by_key_and_returns_the_first_of_the_winners() -> None:
    winner = consensus(answers("Yes", "no", "YES", "yes"), 4, key=str.lower)
    assert winner in ("Yes", "YES", "yes")
    assert winner.lower() == "yes"


def test_consensus_accepts_async_fns() -> None:
    async def ask() -> str:
        await asyncio.sleep(0)
        return "same"

    assert consensus(ask, 3) == "same"


def test_a_lower_quorum_accepts_a_plurality() -> None:
    fn = answers("a", "a", "b", "c", "d")
    assert consensus(fn, 5, quorum=2) == "a"


def test_no_consensus_carries_the_tally() -> None:
    with pytest.raises(NoConsensus) as info:
        consensus(answers("a", "a", "b", "b", "c"), 5)
    err = info.value
    assert err.counts == {'"a"': 2, '"b"': 2, '"c"': 1}
    assert (err.quorum, err.n, err.failed) == (3, 5, 0)
    assert "quorum of 3 of 5" in str(err)
    back = pickle.loads(pickle.dumps(err))
    assert back.counts == err.counts and back.quorum == 3


def test_a_tie_at_the_top_is_no_consensus_even_above_the_quorum() -> None:
    with pytest.raises(NoConsensus, match="tie"):
        consensus(answers("a", "b", "a", "b"), 4, quorum=2)


def test_custom_keys_are_tallied_as_text() -> None:
    with pytest.raises(NoConsensus) as info:
        consensus(answers("x", "yy", "zzz"), 3, key=len)
    assert info.value.counts == {"1": 1, "2": 1, "3": 1}


def test_failed_runs_are_non_votes() -> None:
    boom = RuntimeError("model down")
    assert consensus(answers("a", boom, "a", boom, "a"), 5) == "a"
    with pytest.raises(NoConsensus) as info:
        consensus(answers("a", boom, "a", boom, boom), 5)
    assert info.value.failed == 3 and info.value.counts == {'"a"': 2}
    cause = info.value.__cause__
    assert isinstance(cause, ExceptionGroup) and len(cause.exceptions) == 3


def test_a_run_whose_key_fails_is_a_non_vote() -> None:
    def first_word(text: str) -> str:
        return text.split()[0]

    assert consensus(answers("yes sir", "", "yes indeed"), 3, key=first_word) == "yes sir"


def test_consensus_raises_the_group_when_every_run_fails() -> None:
    with pytest.raises(ExceptionGroup, match="consensus: 3 of 3 runs failed") as info:
        consensus(fail(ValueError("no")), 3)
    assert len(info.value.exceptions) == 3


@pytest.mark.parametrize(
    ("n", "quorum", "match"),
    [(0, None, "n must"), (-2, None, "n must"), (True, None, "n must"), (2.0, None, "n must"),
     (3, 0, "quorum"), (3, 4, "quorum"), (3, True, "quorum")],
)  # fmt: skip
def test_consensus_refuses_bad_arguments(n: Any, quorum: Any, match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        consensus(const(1), n, quorum=quorum)


def test_consensus_refuses_what_is_not_callable() -> None:
    with pytest.raises(InvalidInput, match="fn"):
        consensus("ask", 3)  # type: ignore[call-overload]
    with pytest.raises(InvalidInput, match="key"):
        consensus(const(1), 3, key="lower")  # type: ignore[call-overload]


# -- swarm -----------------------------------------------------------------------------


def test_swarm_rounds_see_only_earlier_rounds() -> None:
    def echo(name: str) -> Callable[[str, tuple[SwarmMessage, ...]], str]:
        def agent(task: str, transcript: tuple[SwarmMessage, ...]) -> str:
            return f"{name}:{task}:{len(transcript)}"

        return agent

    result = swarm({"a": echo("a"), "b": echo("b")}, "plan", rounds=3)
    assert isinstance(result, SwarmResult)
    assert (result.rounds, result.converged) == (3, False)
    assert [(m.round, m.agent, m.output) for m in result.transcript] == [
        (1, "a", "a:plan:0"), (1, "b", "b:plan:0"),
        (2, "a", "a:plan:2"), (2, "b", "b:plan:2"),
        (3, "a", "a:plan:4"), (3, "b", "b:plan:4"),
    ]  # fmt: skip
    assert result.last == {"a": "a:plan:4", "b": "b:plan:4"}


def test_swarm_agents_of_a_round_run_at_the_same_time() -> None:
    barrier = threading.Barrier(3, timeout=BARRIER_TIMEOUT)

    def meet(task: Any, transcript: Any) -> int:
        return barrier.wait()

    result = swarm([("x", meet), ("y", meet), ("z", meet)], None, rounds=2)
    assert sorted(m.output for m in result.transcript if m.round == 2) == [0, 1, 2]


def test_until_stops_the_swarm_early() -> None:
    calls = Calls()

    def proposer(task: int, transcript: tuple[SwarmMessage, ...]) -> int:
        calls.hit("proposer")
        return task + len(transcript)

    async def agreed(transcript: tuple[SwarmMessage, ...]) -> bool:
        return bool(transcript[-1].output >= 12)

    result = swarm([proposer], 10, rounds=5, until=agreed)
    assert (result.rounds, result.converged) == (3, True)
    assert [m.output for m in result.transcript] == [10, 11, 12]
    assert calls.counts["proposer"] == 3


def test_swarm_names_agents_from_functions_pairs_and_positions() -> None:
    def critic(task: Any, transcript: Any) -> str:
        return "c"

    result = swarm([critic, ("writer", lambda task, t: "w"), lambda task, t: "anon"], 0, rounds=1)
    assert result.last == {"critic": "c", "writer": "w", "agent-2": "anon"}


def test_swarm_async_agents() -> None:
    async def agent(task: str, transcript: Any) -> str:
        await asyncio.sleep(0)
        return task.upper()

    assert swarm({"up": agent}, "go", rounds=1).last == {"up": "GO"}


def test_a_failing_agent_fails_its_round_with_every_failure() -> None:
    calls = Calls()

    def fine(task: Any, transcript: Any) -> str:
        calls.hit("fine")
        return "ok"

    def flaky(task: Any, transcript: tuple[SwarmMessage, ...]) -> str:
        if transcript:
            raise ValueError("second round")
        return "ok"

    with pytest.raises(ExceptionGroup, match=r"swarm round 2: 1 of 2 agents failed") as info:
        swarm({"fine": fine, "flaky": flaky}, None, rounds=3)
    (err,) = info.value.exceptions
    assert "in swarm round 2 agent 'flaky'" in (err.__notes__ or [])
    assert calls.counts["fine"] == 2  # the round's other agent finished; round 3 never ran


@pytest.mark.parametrize(
    ("agents", "rounds", "match"),
    [({}, 1, "at least one"), ("ab", 1, "agents must"), ([("a", print, 1)], 1, "pair"),
     ([("a", print), ("a", print)], 1, "named 'a'"), ({"": print}, 1, "non-empty"),
     ({"a": 3}, 1, "callable"), ({"a": print}, 0, "rounds"), ({"a": print}, True, "rounds")],
)  # fmt: skip
def test_swarm_refuses_bad_arguments(agents: Any, rounds: Any, match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        swarm(agents, None, rounds=rounds)


# -- inside flows ----------------------------------------------------------------------


def test_branches_read_the_active_step(h: Harness) -> None:
    @h.app.flow("keys", input=Empty)
    def keys(f: Any) -> Any:
        def key() -> str:
            return current_step().idempotency_key

        async def key_async() -> str:
            return current_step().idempotency_key

        def agent(task: Any, transcript: Any) -> str:
            return current_step().name

        return f.step(
            "fan-out",
            lambda: {
                "parallel": parallel(key, key_async, key),
                "consensus": consensus(key, 3),
                "swarm": swarm([agent], None, rounds=1).last,
            },
        )

    run = keys.run(input={}, flow_id="flow-1")
    h.drain()
    outcome = run.outcome()
    assert outcome is not None and outcome.status == "completed"
    assert outcome.result == {
        "parallel": ["flow-1:fan-out:0"] * 3,
        "consensus": "flow-1:fan-out:0",
        "swarm": {"agent": "fan-out"},
    }


def test_a_step_using_consensus_is_not_rerun_on_replay(h: Harness) -> None:
    calls = Calls()

    @h.app.flow("vote", input=Empty)
    def vote(f: Any) -> Any:
        def ask() -> dict[str, str]:
            calls.hit("ask")
            return {"answer": "yes"}

        winner = f.step("votes", lambda: consensus(ask, 5))
        transcript = f.step("debate", lambda: swarm([("a", lambda task, t: task)], 1, rounds=2))
        f.suspend("go")
        return {"winner": winner, "debate": transcript}

    run = vote.run(input={})
    h.drain()
    assert run.state().status == "suspended"
    h.app.signal_flow(run.flow_id, "go", {})
    h.drain()
    outcome = run.outcome()
    assert outcome is not None and outcome.status == "completed"
    assert calls.counts["ask"] == 5
    # A stored SwarmResult comes back as JSON, like any step result.
    assert outcome.result == {
        "winner": {"answer": "yes"},
        "debate": {
            "transcript": [
                {"round": 1, "agent": "a", "output": 1},
                {"round": 2, "agent": "a", "output": 1},
            ],
            "rounds": 2,
            "converged": False,
        },
    }


def test_the_checkpoint_api_is_refused_inside_a_branch(h: Harness) -> None:
    @h.app.flow("nested", input=Empty)
    def nested(f: Any) -> Any:
        return f.step("outer", lambda: parallel(lambda: f.step("inner", const(1))))

    run = nested.run(input={})
    h.drain()
    state = run.state()
    assert state.status == "failed"
    assert state.error is not None and state.error.traceback is not None
    assert "called from parallel branch 0" in state.error.traceback


# -- async branches: tasks on a loop, no thread each -----------------------------------


def meeting(n: int) -> Callable[[], Awaitable[int]]:
    """An async branch that returns only once all n of its kind are running at once."""
    barrier: asyncio.Barrier | None = None

    async def branch() -> int:
        nonlocal barrier
        barrier = barrier or asyncio.Barrier(n)  # made on the loop the branches run on
        return await asyncio.wait_for(barrier.wait(), BARRIER_TIMEOUT)

    return branch


def test_parallel_async_runs_coroutine_functions_as_tasks_of_the_callers_loop() -> None:
    seen: list[tuple[str, int]] = []

    async def branch() -> int:
        seen.append((threading.current_thread().name, threading.active_count()))
        return await meeting_of_three()

    meeting_of_three = meeting(3)

    async def main() -> list[Any]:
        seen.append((threading.current_thread().name, threading.active_count()))
        return await parallel_async(branch, branch, branch)

    assert sorted(asyncio.run(main())) == [0, 1, 2]
    caller, *branches = seen
    # Every branch ran on the caller's thread, and no thread was started for them.
    assert branches == [caller] * 3


def test_the_blocking_forms_run_coroutine_functions_on_the_flow_loop() -> None:
    flow_loop.loop()  # started once per process; not a thread of this call
    before = threading.active_count()
    threads: list[tuple[str, int]] = []
    meet = meeting(3)

    async def branch() -> int:
        threads.append((threading.current_thread().name, threading.active_count()))
        return await meet()

    class Branch:
        async def __call__(self) -> int:
            return await branch()

    # A coroutine function, a partial of one, and an object with an async __call__.
    assert sorted(parallel(branch, partial(branch), Branch())) == [0, 1, 2]
    assert threads == [("crux-flow-loop", before)] * 3
    threads.clear()
    assert consensus(meeting(3), 3, key=lambda _: "same") in (0, 1, 2)

    async def agent(task: Any, transcript: Any) -> str:
        threads.append((threading.current_thread().name, threading.active_count()))
        return threading.current_thread().name

    result = swarm([("a", agent), ("b", agent)], None, rounds=2)
    assert set(result.last.values()) == {"crux-flow-loop"}
    assert threads == [("crux-flow-loop", before)] * 4


def test_three_async_sleeps_of_0_3_s_overlap() -> None:
    async def nap() -> str:
        await asyncio.sleep(0.3)
        return "rested"

    # Run one after another they would take at least 0.9 s.
    started = time.monotonic()
    assert parallel(nap, nap, nap) == ["rested"] * 3
    assert time.monotonic() - started < 0.9

    async def main() -> list[Any]:
        return await parallel_async(nap, nap, nap)

    started = time.monotonic()
    assert asyncio.run(main()) == ["rested"] * 3
    assert time.monotonic() - started < 0.9


def test_plain_branches_of_the_awaitable_forms_run_in_threads() -> None:
    loop_thread: list[str] = []
    met = threading.Barrier(2, timeout=BARRIER_TIMEOUT)

    def blocking() -> str:
        met.wait()  # would deadlock the loop if called on it
        return threading.current_thread().name

    async def on_loop() -> str:
        return threading.current_thread().name

    async def main() -> list[Any]:
        loop_thread.append(threading.current_thread().name)
        # A lambda returning a coroutine is called in a thread, then awaited as a task.
        return await parallel_async(blocking, on_loop, blocking, lambda: on_loop())

    first, second, third, fourth = asyncio.run(main())
    assert first.startswith("crux-parallel") and third.startswith("crux-parallel")
    assert second == fourth == loop_thread[0]
    assert not [name for name in compose_threads() if name.startswith("crux-parallel")]


def test_max_workers_bounds_async_branches_too() -> None:
    running = 0
    peak = 0

    async def branch() -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.01)
        running -= 1

    async def main() -> None:
        await parallel_async(*[branch] * 5, max_workers=2)

    asyncio.run(main())
    assert peak == 2
    peak = 0
    parallel(*[branch] * 5, max_workers=2)
    assert peak == 2


def test_async_branches_see_the_callers_context_and_do_not_leak_into_it() -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("test_async_var", default="unset")

    def read_then_set(i: int) -> Callable[[], Any]:
        async def branch() -> str:
            seen = var.get()
            var.set(f"branch {i}")
            await asyncio.sleep(0)
            assert var.get() == f"branch {i}"
            return seen

        return branch

    def plain() -> str:
        return var.get()

    async def main() -> list[Any]:
        var.set("async caller")
        values = await parallel_async(read_then_set(0), read_then_set(1), plain)
        assert var.get() == "async caller"
        return values

    assert asyncio.run(main()) == ["async caller"] * 3
    var.set("caller")
    assert parallel(read_then_set(0), read_then_set(1), plain) == ["caller"] * 3
    assert var.get() == "caller"


def test_async_failures_are_raised_together_after_the_others_finish() -> None:
    finished = asyncio.Event()
    first, second = ValueError("bad one"), KeyError("bad two")

    def failing(exc: Exception) -> Callable[[], Any]:
        async def branch() -> Any:
            await asyncio.sleep(0)
            raise exc

        return branch

    async def ok() -> str:
        await asyncio.sleep(0.05)  # still working when the failures are raised
        finished.set()
        return "ok"

    async def main() -> None:
        await parallel_async(failing(first), ok, failing(second))

    with pytest.raises(ExceptionGroup) as info:
        asyncio.run(main())
    group = info.value
    assert group.message == "parallel: 2 of 3 branches failed"
    assert group.exceptions == (first, second)
    assert finished.is_set()
    assert "in parallel branch 0" in (first.__notes__ or [])
    assert "in parallel branch 2" in (second.__notes__ or [])

    with pytest.raises(ExceptionGroup, match="parallel: 1 of 2 branches failed"):
        parallel(ok, failing(ValueError("sync form")))


def test_async_control_flow_is_reraised_unwrapped_and_stops_queued_branches() -> None:
    calls = Calls()
    stop = Suspended("approval")

    async def raising(exc: BaseException) -> None:
        raise exc

    async def later() -> None:
        calls.hit("later")

    async def main() -> None:
        await parallel_async(
            partial(raising, ValueError("ignored")), partial(raising, stop), later, max_workers=1
        )

    with pytest.raises(Suspended) as info:
        asyncio.run(main())
    assert info.value is stop
    with pytest.raises(Suspended):
        parallel(partial(raising, stop), later, max_workers=1)
    assert calls.counts["later"] == 0


def test_cancelling_the_awaitable_form_cancels_the_branches_and_runs_their_finally() -> None:
    cleaned: list[int] = []
    started = 0

    async def endless(i: int) -> None:
        nonlocal started
        started += 1
        try:
            await asyncio.sleep(3600)
        finally:
            cleaned.append(i)

    async def main() -> None:
        fan_out = asyncio.ensure_future(parallel_async(*[partial(endless, i) for i in range(3)]))
        for _ in range(100):  # bounded: the branches start on the next loop iterations
            if started == 3:
                break
            await asyncio.sleep(0.01)
        fan_out.cancel()
        with pytest.raises(asyncio.CancelledError):
            await fan_out

    asyncio.run(main())
    assert sorted(cleaned) == [0, 1, 2]


def test_consensus_async_votes_like_consensus() -> None:
    boom = RuntimeError("model down")

    def voter(*values: Any) -> Callable[[], Any]:
        plain = answers(*values)

        async def ask() -> Any:
            await asyncio.sleep(0)
            return plain()

        return ask

    async def main() -> None:
        assert await consensus_async(voter("yes", "no", "yes"), 3) == "yes"
        assert await consensus_async(meeting(4), 4, key=lambda _: 1) in range(4)
        assert await consensus_async(answers("a", "a", "b"), 3) == "a"  # plain fn, threads
        with pytest.raises(NoConsensus) as info:
            await consensus_async(voter("a", boom, "b", "", "a"), 5, key=lambda s: s[0])
        assert info.value.counts == {"a": 2, "b": 1}
        assert info.value.failed == 2
        with pytest.raises(ExceptionGroup, match="3 of 3 runs failed"):
            await consensus_async(voter(boom, boom, boom), 3)
        with pytest.raises(InvalidInput, match="quorum"):
            await consensus_async(voter("a"), 1, quorum=2)

    asyncio.run(main())


def test_swarm_async_runs_rounds_until_agreement() -> None:
    rounds_seen: list[int] = []

    async def proposer(task: int, transcript: tuple[SwarmMessage, ...]) -> int:
        await asyncio.sleep(0)
        return task + len(transcript)

    def critic(task: int, transcript: tuple[SwarmMessage, ...]) -> str:  # plain: a thread
        return "ok" if len(transcript) >= 4 else "again"

    def agreed(transcript: tuple[SwarmMessage, ...]) -> bool:
        rounds_seen.append(transcript[-1].round)
        return bool(transcript[-1].output == "ok")

    async def main() -> SwarmResult:
        return await swarm_async({"p": proposer, "c": critic}, 10, rounds=5, until=agreed)

    result = asyncio.run(main())
    assert (result.rounds, result.converged) == (3, True)
    assert result.last == {"p": 14, "c": "ok"}
    assert rounds_seen == [1, 2, 3]

    async def flaky(task: Any, transcript: Any) -> str:
        if transcript:
            raise ValueError("second round")
        return "ok"

    async def failing() -> SwarmResult:
        return await swarm_async({"flaky": flaky}, None, rounds=3)

    with pytest.raises(ExceptionGroup, match=r"swarm round 2: 1 of 1 agents failed"):
        asyncio.run(failing())


def test_sync_compositions_called_on_the_flow_loop_still_finish() -> None:
    # Plain code inside an async step runs on the loop; it cannot wait for the loop it
    # blocks, so the async branches get a private one.
    async def branch() -> str:
        await asyncio.sleep(0)
        return "done"

    async def on_loop() -> list[Any]:
        return parallel(branch, branch)

    assert flow_loop.run(on_loop()) == ["done", "done"]


# -- async branches inside flows -------------------------------------------------------


def test_async_branches_of_an_async_step_read_the_active_step(h: Harness) -> None:
    @h.app.flow("keys-async", input=Empty)
    async def keys(f: Any) -> Any:
        async def key() -> str:
            await asyncio.sleep(0)
            return current_step().idempotency_key

        async def agent(task: Any, transcript: Any) -> str:
            return current_step().name

        async def fan_out() -> dict[str, Any]:
            return {
                "parallel": await parallel_async(key, key, lambda: key()),
                "consensus": await consensus_async(key, 3),
                "swarm": (await swarm_async([agent], None, rounds=1)).last,
                "blocking": parallel(key),
            }

        return await f.step("fan-out", fan_out)

    run = keys.run(input={}, flow_id="flow-2")
    h.drain()
    outcome = run.outcome()
    assert outcome is not None and outcome.status == "completed", run.state().error
    assert outcome.result == {
        "parallel": ["flow-2:fan-out:0"] * 3,
        "consensus": "flow-2:fan-out:0",
        "swarm": {"agent": "fan-out"},
        "blocking": ["flow-2:fan-out:0"],
    }


def test_the_checkpoint_api_is_refused_inside_an_async_branch(h: Harness) -> None:
    @h.app.flow("nested-async", input=Empty)
    async def nested(f: Any) -> Any:
        async def inner() -> Any:
            return await f.step("inner", const(1))

        return await f.step("outer", lambda: parallel_async(const(0), inner))

    run = nested.run(input={})
    h.drain()
    state = run.state()
    assert state.status == "failed"
    assert state.error is not None and state.error.traceback is not None
    assert "step 'inner' called from parallel branch 1" in state.error.traceback


def test_the_checkpoint_api_is_refused_inside_an_async_branch_of_a_sync_step(
    h: Harness,
) -> None:
    @h.app.flow("nested-sync", input=Empty)
    def nested(f: Any) -> Any:
        async def inner() -> Any:
            return f.step("inner", const(1))

        return f.step("outer", lambda: parallel(inner))

    run = nested.run(input={})
    h.drain()
    state = run.state()
    assert state.status == "failed"
    assert state.error is not None and state.error.traceback is not None
    assert "step 'inner' called from parallel branch 0" in state.error.traceback
