"""Immediate compositions: ``parallel``, ``consensus`` and ``swarm``.

They run several calls at once on a bounded thread pool, inside whatever step or task
calls them, and return when every call has finished. They are *not* durable by
themselves: wrap one in a step (``f.step("votes", lambda: consensus(ask, 5))``) so its
result is committed once and a replay returns it without running the branches again.

Each branch runs in a copy of the caller's ``contextvars`` context, so
``current_step()`` (and any other context variable) reads the same as in the caller,
and a value a branch sets stays in that branch. A branch may be sync or async; an
async one runs to completion on its own event loop, in its own thread.

Failures: every branch is waited for, then the ``Exception`` failures are raised
together as one ``ExceptionGroup``, in branch order. Control flow (``Suspended``,
``LeaseLost``, ``FlowStopped``, any non-``Exception``) is never wrapped: the first one,
in branch order, is re-raised as it is, and branches that had not started yet are
skipped.
"""

from __future__ import annotations

import contextvars
import json
import logging
import threading
from collections import Counter
from collections.abc import Awaitable, Callable, Hashable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeAlias, TypeVar, overload

from pydantic_core import to_jsonable_python

from ._context import _branch, call_maybe_async
from .errors import InvalidInput, NoConsensus

log = logging.getLogger("crux_workers.compose")

T = TypeVar("T")

#: Upper bound on threads per call when ``max_workers`` is not given. Branches are
#: expected to wait on I/O (model calls, HTTP), so this is above the CPU count, but
#: bounded: a worker may run several flows, each fanning out.
DEFAULT_MAX_WORKERS = 32


# -- the runner shared by all three ----------------------------------------------------


@dataclass(slots=True)
class _Outcome:
    value: Any = None
    error: BaseException | None = None


def _check_max_workers(max_workers: int | None, what: str) -> None:
    if max_workers is not None and (
        isinstance(max_workers, bool) or not isinstance(max_workers, int) or max_workers < 1
    ):
        raise InvalidInput(f"{what}: max_workers must be an int >= 1, got {max_workers!r}")


def _enter_branch(label: str, fn: Callable[[], Any]) -> Any:
    # Runs inside the branch's copied context, so setting _branch here is invisible to
    # the caller and to the other branches.
    _branch.set(label)
    return call_maybe_async(fn)


def _run_branches(
    kind: str, calls: Sequence[tuple[str, Callable[[], Any]]], max_workers: int | None
) -> list[_Outcome]:
    """Run every call concurrently; return one outcome per call, in call order.

    A non-``Exception`` raised by a branch is re-raised here after the running branches
    have finished; every other failure is returned in its outcome.
    """
    if not calls:
        return []
    # Set when control flow leaves a branch (or the caller): the flow is stopping, so
    # queued branches must not start side effects whose results nobody will record.
    stop = threading.Event()

    def run(label: str, fn: Callable[[], Any], ctx: contextvars.Context) -> _Outcome | None:
        if stop.is_set():
            return None
        try:
            return _Outcome(value=ctx.run(_enter_branch, label, fn))
        except Exception as exc:
            exc.add_note(f"in {label}")
            return _Outcome(error=exc)
        except BaseException as exc:
            stop.set()
            return _Outcome(error=exc)

    workers = min(len(calls), max_workers or DEFAULT_MAX_WORKERS)
    # Leaving the with-block joins every worker thread: none outlives the call.
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix=f"crux-{kind}") as pool:
        # One context copy per branch, taken here in the caller's thread: a Context
        # cannot be entered by two threads at once.
        futures = [pool.submit(run, label, fn, contextvars.copy_context()) for label, fn in calls]
        try:
            results = [future.result() for future in futures]
        except BaseException:
            stop.set()
            raise
    for result in results:
        if result is not None and not isinstance(result.error, Exception | None):
            raise result.error
    # Only a control-flow exit skips branches, and it was re-raised above.
    return [r for r in results if r is not None]


def _failures(outcomes: Sequence[_Outcome]) -> list[Exception]:
    return [o.error for o in outcomes if isinstance(o.error, Exception)]


def _check_callable(fn: object, what: str) -> None:
    if not callable(fn):
        raise InvalidInput(f"{what} must be callable, got {type(fn).__name__}")


# -- parallel ----------------------------------------------------------------------------


def parallel(*fns: Callable[[], Any], max_workers: int | None = None) -> list[Any]:
    """Call every ``fn()`` concurrently and return their results in argument order.

    Each ``fn`` takes no arguments and may be sync or async; it runs in a copy of the
    caller's context (``current_step()`` works in it). At most ``max_workers`` run at
    once (default: one thread per fn, up to ``DEFAULT_MAX_WORKERS``). If any fn raises,
    the others are still waited for, then an ``ExceptionGroup`` of every failure is
    raised. Not durable: call it inside ``f.step``.
    """
    _check_max_workers(max_workers, "parallel")
    for i, fn in enumerate(fns):
        _check_callable(fn, f"parallel: argument {i}")
    outcomes = _run_branches(
        "parallel", [(f"parallel branch {i}", fn) for i, fn in enumerate(fns)], max_workers
    )
    failed = _failures(outcomes)
    if failed:
        raise ExceptionGroup(f"parallel: {len(failed)} of {len(fns)} branches failed", failed)
    return [o.value for o in outcomes]


# -- consensus ---------------------------------------------------------------------------


def _json_key(value: Any) -> str:
    """The default vote key: canonical JSON, so equal dicts compare equal in any order."""
    return json.dumps(
        to_jsonable_python(value), sort_keys=True, separators=(",", ":"), allow_nan=False
    )


def _label(key: Hashable) -> str:
    # Tallies go into NoConsensus.counts, which must stay JSON- and pickle-friendly.
    return key if isinstance(key, str) else repr(key)


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
    is a non-vote: the quorum still counts out of ``n``.

    Raises ``NoConsensus`` (with ``counts``, ``quorum``, ``n``, ``failed``) when no group
    wins, an ``ExceptionGroup`` when every run failed, and ``InvalidInput`` for bad
    arguments. Not durable: call it inside ``f.step``.
    """
    _check_callable(fn, "consensus: fn")
    if key is not None:
        _check_callable(key, "consensus: key")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InvalidInput(f"consensus: n must be an int >= 1, got {n!r}")
    need = n // 2 + 1 if quorum is None else quorum
    if isinstance(need, bool) or not isinstance(need, int) or not 1 <= need <= n:
        raise InvalidInput(f"consensus: quorum must be an int from 1 to n={n}, got {quorum!r}")
    _check_max_workers(max_workers, "consensus")
    keyfn = key or _json_key

    def vote() -> tuple[Any, Hashable]:
        value = call_maybe_async(fn)
        k = keyfn(value)
        hash(k)  # an unhashable key fails this run here, not the tally later
        return value, k

    outcomes = _run_branches(
        "consensus", [(f"consensus run {i}", vote) for i in range(n)], max_workers
    )
    failed = _failures(outcomes)
    if len(failed) == n:
        raise ExceptionGroup(f"consensus: {n} of {n} runs failed", failed)
    if failed:
        log.info("consensus: %d of %d runs failed and did not vote", len(failed), n)

    first: dict[Hashable, Any] = {}
    tally: Counter[Hashable] = Counter()
    for o in outcomes:
        if o.error is None:
            value, k = o.value
            first.setdefault(k, value)
            tally[k] += 1
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
    waited for and an ``ExceptionGroup`` of the round's failures is raised. Not
    durable: call it inside ``f.step``.
    """
    named = _named_agents(agents)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise InvalidInput(f"swarm: rounds must be an int >= 1, got {rounds!r}")
    if until is not None:
        _check_callable(until, "swarm: until")
    _check_max_workers(max_workers, "swarm")

    transcript: Transcript = ()
    for r in range(1, rounds + 1):
        seen = transcript  # bound now: every agent of round r gets the same snapshot
        calls = [
            (f"swarm round {r} agent {name!r}", partial(agent, task, seen)) for name, agent in named
        ]
        outcomes = _run_branches("swarm", calls, max_workers)
        failed = _failures(outcomes)
        if failed:
            raise ExceptionGroup(
                f"swarm round {r}: {len(failed)} of {len(named)} agents failed", failed
            )
        transcript += tuple(
            SwarmMessage(r, name, o.value) for (name, _), o in zip(named, outcomes, strict=True)
        )
        if until is not None and call_maybe_async(partial(until, transcript)):
            return SwarmResult(transcript, r, converged=True)
    return SwarmResult(transcript, rounds, converged=False)


__all__ = [
    "SwarmMessage",
    "SwarmResult",
    "consensus",
    "parallel",
    "swarm",
]
