"""Immediate compositions: ``parallel``, ``consensus`` and ``swarm``, and their awaitable
forms ``parallel_async``, ``consensus_async`` and ``swarm_async``.

They run several calls at once, inside whatever step or task calls them, and return when
every call has finished. They are *not* durable by themselves: wrap one in a step
(``f.step("votes", lambda: consensus(ask, 5))``) so its result is committed once and a
replay returns it without running the branches again.

How a branch runs depends on what it is, not on which form is called:

- a coroutine function (``async def``, a ``functools.partial`` of one, an object with an
  ``async def __call__``) runs as an asyncio task: on the caller's loop for the
  awaitable forms, on the process's flow loop (``_loop.flow_loop``) for the blocking
  ones. Async branches cost no thread each.
- any other callable may block, so it is called in a thread of a pool private to the
  call; if it returns an awaitable (``lambda: fetch(x)``), that is then awaited as a
  task. A blocking call whose branches are all plain never touches an event loop.

Each branch runs in a copy of the caller's ``contextvars`` context, so
``current_step()`` (and any other context variable) reads the same as in the caller,
and a value a branch sets stays in that branch.

Failures: every branch is waited for, then the ``Exception`` failures are raised
together as one ``ExceptionGroup``, in branch order. Control flow (``Suspended``,
``LeaseLost``, ``FlowStopped``, ``CancelledError``, any non-``Exception``) is never
wrapped: the first one, in branch order, is re-raised as it is, and branches that had
not started yet are skipped. Cancelling an awaitable form cancels its async branches at
their current ``await`` and waits for them (their ``finally`` blocks run) before the
``CancelledError`` goes on; a plain branch already running in a thread cannot be
interrupted and finishes on its own.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeAlias, TypeVar, overload

from pydantic_core import to_jsonable_python

from ._branches import (
    Calls,
    _check_callable,
    _check_max_workers,
    _failures,
    _maybe_await,
    _Outcome,
    _run_branches,
    _run_branches_async,
)
from ._context import call_maybe_async
from .errors import InvalidInput, NoConsensus

log = logging.getLogger("crux_workers.compose")

T = TypeVar("T")

# -- parallel ----------------------------------------------------------------------------


def _parallel_calls(fns: Sequence[Callable[[], Any]], max_workers: int | None) -> Calls:
    _check_max_workers(max_workers, "parallel")
    for i, fn in enumerate(fns):
        _check_callable(fn, f"parallel: argument {i}")
    return [(f"parallel branch {i}", fn) for i, fn in enumerate(fns)]


def _parallel_result(outcomes: Sequence[_Outcome]) -> list[Any]:
    failed = _failures(outcomes)
    if failed:
        raise ExceptionGroup(f"parallel: {len(failed)} of {len(outcomes)} branches failed", failed)
    return [o.value for o in outcomes]


def parallel(*fns: Callable[[], Any], max_workers: int | None = None) -> list[Any]:
    """Call every ``fn()`` concurrently and return their results in argument order.

    Each ``fn`` takes no arguments and may be sync or async: async ones run as tasks on
    the flow loop, plain ones in threads. Each runs in a copy of the caller's context
    (``current_step()`` works in it). At most ``max_workers`` run at once (default:
    every async fn, and up to ``DEFAULT_MAX_WORKERS`` threads for plain ones). If any
    fn raises, the others are still waited for, then an ``ExceptionGroup`` of every
    failure is raised. Blocks the calling thread: in async code, await
    ``parallel_async``. Not durable: call it inside ``f.step``.
    """
    calls = _parallel_calls(fns, max_workers)
    return _parallel_result(_run_branches("parallel", calls, max_workers))


async def parallel_async(*fns: Callable[[], Any], max_workers: int | None = None) -> list[Any]:
    """``parallel`` for async code: await every ``fn()`` concurrently on the running loop.

    Async fns run as tasks of the caller's loop (no thread each), plain ones in threads;
    results, errors, context and ``max_workers`` are as for ``parallel``. Cancelling
    the caller cancels the async branches and waits for them. Not durable: call it
    inside ``await f.step``.
    """
    calls = _parallel_calls(fns, max_workers)
    return _parallel_result(await _run_branches_async("parallel", calls, max_workers))


# -- consensus ---------------------------------------------------------------------------


def _json_key(value: Any) -> str:
    """The default vote key: canonical JSON, so equal dicts compare equal in any order."""
    return json.dumps(
        to_jsonable_python(value), sort_keys=True, separators=(",", ":"), allow_nan=False
    )


def _label(key: Hashable) -> str:
    # Tallies go into NoConsensus.counts, which must stay JSON- and pickle-friendly.
    return key if isinstance(key, str) else repr(key)


def _consensus_plan(
    fn: Callable[[], Any],
    n: int,
    key: Callable[[Any], Hashable] | None,
    quorum: int | None,
    max_workers: int | None,
) -> tuple[Calls, int]:
    """Check the arguments; return the runs and the quorum."""
    _check_callable(fn, "consensus: fn")
    if key is not None:
        _check_callable(key, "consensus: key")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InvalidInput(f"consensus: n must be an int >= 1, got {n!r}")
    need = n // 2 + 1 if quorum is None else quorum
    if isinstance(need, bool) or not isinstance(need, int) or not 1 <= need <= n:
        raise InvalidInput(f"consensus: quorum must be an int from 1 to n={n}, got {quorum!r}")
    _check_max_workers(max_workers, "consensus")
    return [(f"consensus run {i}", fn) for i in range(n)], need


def _consensus_result(
    outcomes: Sequence[_Outcome], need: int, key: Callable[[Any], Hashable] | None
) -> Any:
    n = len(outcomes)
    keyfn = key or _json_key
    failed: list[Exception] = []
    first: dict[Hashable, Any] = {}
    tally: Counter[Hashable] = Counter()
    for i, o in enumerate(outcomes):
        if isinstance(o.error, Exception):
            failed.append(o.error)
            continue
        try:
            k = keyfn(o.value)
            hash(k)  # an unhashable key fails this run here, not the tally later
        except Exception as exc:
            exc.add_note(f"in consensus run {i}")
            failed.append(exc)
            continue
        first.setdefault(k, o.value)
        tally[k] += 1
    if len(failed) == n:
        raise ExceptionGroup(f"consensus: {n} of {n} runs failed", failed)
    if failed:
        log.info("consensus: %d of %d runs failed and did not vote", len(failed), n)

    ranked = tally.most_common()
    top_key, top = ranked[0]
    tie = len(ranked) > 1 and ranked[1][1] == top
    if top >= need and not tie:
        return first[top_key]

    counts: Counter[str] = Counter()
    for k, c in ranked:
        counts[_label(k)] += c
    why = f"a tie at {top} votes" if tie and top >= need else f"the largest group has {top}"
    group = (
        ExceptionGroup(f"consensus: {len(failed)} of {n} runs failed", failed) if failed else None
    )
    raise NoConsensus(
        f"consensus: no value reached the quorum of {need} of {n} runs ({why}; "
        f"{len(failed)} failed)",
        counts=dict(counts),
        quorum=need,
        n=n,
        failed=len(failed),
    ) from group


@overload
def consensus(
    fn: Callable[[], Awaitable[T]],
    n: int,
    *,
    key: Callable[[T], Hashable] | None = None,
    quorum: int | None = None,
    max_workers: int | None = None,
) -> T: ...


@overload
def consensus(
    fn: Callable[[], T],
    n: int,
    *,
    key: Callable[[T], Hashable] | None = None,
    quorum: int | None = None,
    max_workers: int | None = None,
) -> T: ...


def consensus(
    fn: Callable[[], Any],
    n: int,
    *,
    key: Callable[[Any], Hashable] | None = None,
    quorum: int | None = None,
    max_workers: int | None = None,
) -> Any:
    """Run ``fn()`` ``n`` times concurrently and return the value most runs agree on.

    Results are grouped by ``key(result)`` (default: their canonical JSON, so dicts
    compare by value). The largest group wins if it has at least ``quorum`` members
    (default: a strict majority, ``n // 2 + 1``) and no other group is as large; its
    first result in run order is returned. A run that raises, or whose ``key`` raises,
    is a non-vote: the quorum still counts out of ``n``. An async ``fn`` runs as ``n``
    tasks on the flow loop, a plain one in threads.

    Raises ``NoConsensus`` (with ``counts``, ``quorum``, ``n``, ``failed``) when no group
    wins, an ``ExceptionGroup`` when every run failed, and ``InvalidInput`` for bad
    arguments. Blocks the calling thread: in async code, await ``consensus_async``.
    Not durable: call it inside ``f.step``.
    """
    calls, need = _consensus_plan(fn, n, key, quorum, max_workers)
    return _consensus_result(_run_branches("consensus", calls, max_workers), need, key)


@overload
async def consensus_async(
    fn: Callable[[], Awaitable[T]],
    n: int,
    *,
    key: Callable[[T], Hashable] | None = None,
    quorum: int | None = None,
    max_workers: int | None = None,
) -> T: ...


@overload
async def consensus_async(
    fn: Callable[[], T],
    n: int,
    *,
    key: Callable[[T], Hashable] | None = None,
    quorum: int | None = None,
    max_workers: int | None = None,
) -> T: ...


async def consensus_async(
    fn: Callable[[], Any],
    n: int,
    *,
    key: Callable[[Any], Hashable] | None = None,
    quorum: int | None = None,
    max_workers: int | None = None,
) -> Any:
    """``consensus`` for async code: ``n`` concurrent runs on the running loop.

    The same vote, quorum and errors as ``consensus``. An async ``fn`` runs as ``n``
    tasks of the caller's loop, a plain one in threads; ``key`` is called on the loop,
    so it must not block. Not durable: call it inside ``await f.step``.
    """
    calls, need = _consensus_plan(fn, n, key, quorum, max_workers)
    return _consensus_result(await _run_branches_async("consensus", calls, max_workers), need, key)


# -- swarm -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SwarmMessage:
    """One agent's output in one round of a ``swarm`` (rounds count from 1)."""

    round: int
    agent: str
    output: Any


Transcript: TypeAlias = tuple[SwarmMessage, ...]
Agent: TypeAlias = Callable[[Any, Transcript], Any]
Agents: TypeAlias = Mapping[str, Agent] | Sequence[Agent | tuple[str, Agent]]


@dataclass(frozen=True, slots=True)
class SwarmResult:
    """What a ``swarm`` produced: every message, how many rounds ran, whether it converged."""

    transcript: Transcript
    rounds: int
    converged: bool

    @property
    def last(self) -> dict[str, Any]:
        """The outputs of the last round that ran, by agent name."""
        return {m.agent: m.output for m in self.transcript if m.round == self.rounds}


def _named_agents(agents: Agents) -> list[tuple[str, Agent]]:
    if isinstance(agents, Mapping):
        pairs = list(agents.items())
    elif isinstance(agents, Sequence) and not isinstance(agents, str | bytes):
        pairs = []
        for i, item in enumerate(agents):
            if isinstance(item, tuple):
                if len(item) != 2:
                    raise InvalidInput(f"swarm: agent {i} must be a (name, callable) pair")
                pairs.append((item[0], item[1]))
            else:
                name = getattr(item, "__name__", None)
                # A lambda or a callable object has no usable name: use its position.
                if not isinstance(name, str) or not name.isidentifier():
                    name = f"agent-{i}"
                pairs.append((name, item))
    else:
        raise InvalidInput(
            "swarm: agents must be a dict of name to callable, or a list of callables "
            f"or (name, callable) pairs, got {type(agents).__name__}"
        )
    if not pairs:
        raise InvalidInput("swarm: at least one agent is needed")
    seen: set[str] = set()
    for name, agent in pairs:
        if not isinstance(name, str) or not name:
            raise InvalidInput(f"swarm: agent names must be non-empty strings, got {name!r}")
        if name in seen:
            raise InvalidInput(f"swarm: two agents are named {name!r}; name them apart")
        seen.add(name)
        _check_callable(agent, f"swarm: agent {name!r}")
    return pairs


def _swarm_plan(
    agents: Agents, rounds: int, until: Callable[[Transcript], Any] | None, max_workers: int | None
) -> list[tuple[str, Agent]]:
    named = _named_agents(agents)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise InvalidInput(f"swarm: rounds must be an int >= 1, got {rounds!r}")
    if until is not None:
        _check_callable(until, "swarm: until")
    _check_max_workers(max_workers, "swarm")
    return named


def _round_calls(named: Sequence[tuple[str, Agent]], task: Any, seen: Transcript, r: int) -> Calls:
    # `seen` is bound now: every agent of round r gets the same snapshot. A partial of
    # an async agent is still recognised as async.
    return [
        (f"swarm round {r} agent {name!r}", partial(agent, task, seen)) for name, agent in named
    ]


def _round_messages(
    named: Sequence[tuple[str, Agent]], outcomes: Sequence[_Outcome], r: int
) -> Transcript:
    failed = _failures(outcomes)
    if failed:
        raise ExceptionGroup(
            f"swarm round {r}: {len(failed)} of {len(named)} agents failed", failed
        )
    return tuple(
        SwarmMessage(r, name, o.value) for (name, _), o in zip(named, outcomes, strict=True)
    )


def swarm(
    agents: Agents,
    task: Any,
    *,
    rounds: int,
    until: Callable[[Transcript], Any] | None = None,
    max_workers: int | None = None,
) -> SwarmResult:
    """Run agents in rounds; each round calls every agent concurrently.

    ``agents`` is a dict of name to callable, or a list of callables (named by their
    ``__name__``, else ``agent-<i>``) or of ``(name, callable)`` pairs. In round ``r``
    (from 1) each agent is called as ``agent(task, transcript)``, where ``transcript``
    is the tuple of ``SwarmMessage`` from rounds before ``r``: agents of one round do not see
    each other. Their outputs are appended in agent order. After each round,
    ``until(transcript)`` (sync or async) is called if given; a truthy value ends the
    swarm there with ``converged=True``. If any agent raises, the round's others are
    waited for and an ``ExceptionGroup`` of the round's failures is raised. Async agents
    run as tasks on the flow loop, plain ones in threads. Blocks the calling thread: in
    async code, await ``swarm_async``. Not durable: call it inside ``f.step``.
    """
    named = _swarm_plan(agents, rounds, until, max_workers)
    transcript: Transcript = ()
    for r in range(1, rounds + 1):
        outcomes = _run_branches("swarm", _round_calls(named, task, transcript, r), max_workers)
        transcript += _round_messages(named, outcomes, r)
        if until is not None and call_maybe_async(partial(until, transcript)):
            return SwarmResult(transcript, r, converged=True)
    return SwarmResult(transcript, rounds, converged=False)


async def swarm_async(
    agents: Agents,
    task: Any,
    *,
    rounds: int,
    until: Callable[[Transcript], Any] | None = None,
    max_workers: int | None = None,
) -> SwarmResult:
    """``swarm`` for async code: each round's agents run concurrently on the running loop.

    The same rounds, transcript, ``until`` and errors as ``swarm``. Async agents run as
    tasks of the caller's loop, plain ones in threads; ``until`` is called on the loop
    (awaited if async), so a plain one must not block. Not durable: call it inside
    ``await f.step``.
    """
    named = _swarm_plan(agents, rounds, until, max_workers)
    transcript: Transcript = ()
    for r in range(1, rounds + 1):
        outcomes = await _run_branches_async(
            "swarm", _round_calls(named, task, transcript, r), max_workers
        )
        transcript += _round_messages(named, outcomes, r)
        if until is not None and await _maybe_await(until(transcript)):
            return SwarmResult(transcript, r, converged=True)
    return SwarmResult(transcript, rounds, converged=False)


__all__ = [
    "SwarmMessage",
    "SwarmResult",
    "consensus",
    "consensus_async",
    "parallel",
    "parallel_async",
    "swarm",
    "swarm_async",
]
