"""The rules Postgres runs as SQL agree with the Python rules of ``_lifecycle``.

Generated flow rows go into a real Postgres; the SQL conditions and statements of
``_sql_rules`` run on them, and each answer is compared with the Python function it
encodes.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, delete, insert, select

from crux_workers import FlowNotWaiting
from crux_workers._store import _lifecycle as life
from crux_workers._store import _sql_rules as rules
from crux_workers._store._lifecycle import FlowStatus, WakeKind
from crux_workers._store._schema import flows, signals, steps
from crux_workers._store._sql import SqlStore
from crux_workers._store._types import Checkpoint, Claimed, Lease, NotClaimed
from crux_workers.errors import InvalidSignal, LeaseLost

NOW = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)
CASES = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# Offsets from NOW around the boundaries the rules compare with (now, now - redrive_after).
instants = st.one_of(
    st.none(),
    st.sampled_from([-61, -60, -59, -31, -30, -29, -1, 0, 1, 30]).map(
        lambda s: NOW + timedelta(seconds=s)
    ),
)
flow_rows = st.fixed_dictionaries(
    {
        "status": st.sampled_from(list(FlowStatus)).map(str),
        "wake_kind": st.one_of(st.none(), st.sampled_from(list(WakeKind)).map(str)),
        "wake_at": instants,
        "lease_owner": st.sampled_from([None, "w"]),
        "lease_until": instants,
        "waiting_on": st.sampled_from([None, "a", "b"]),
        "epoch": st.integers(0, 3),
        "cancel_reason": st.sampled_from([None, "stop"]),
        "lapses": st.integers(0, 4),
    }
)


@pytest.fixture
def store(pg_url: str) -> Iterator[SqlStore]:
    s = SqlStore(pg_url, clock=lambda: NOW)
    yield s
    s.close()


def _load(engine: Engine, rows: list[dict[str, Any]]) -> list[str]:
    """Replace every flow with ``rows`` (ids r0, r1, ...)."""
    ids = [f"r{i}" for i in range(len(rows))]
    with engine.begin() as conn:
        conn.execute(delete(flows))  # steps and signals go with them (ON DELETE CASCADE)
        if rows:
            conn.execute(
                insert(flows),
                [
                    dict(
                        row,
                        id=flow_id,
                        name="demo",
                        input="{}",
                        next_seq=0,
                        runs=0,
                        retry_attempt=0,
                        created_at=NOW,
                        updated_at=NOW,
                    )
                    for flow_id, row in zip(ids, rows, strict=True)
                ],
            )
    return ids


def _where(engine: Engine, cond: Any) -> set[str]:
    with engine.connect() as conn:
        return set(conn.execute(select(flows.c.id).where(cond)).scalars())


@CASES
@given(
    rows=st.lists(flow_rows, min_size=4, max_size=16), redrive_after=st.sampled_from([0, 30, 60])
)
def test_sweep_and_claim_conditions_agree_with_the_rules(
    store: SqlStore, rows: list[dict[str, Any]], redrive_after: int
) -> None:
    ids = _load(store.engine, rows)
    by_id = dict(zip(ids, rows, strict=True))

    def python(rule: Any) -> set[str]:
        return {i for i, r in by_id.items() if rule(r)}

    assert _where(store.engine, rules.sweep_due(NOW, redrive_after)) == python(
        lambda r: life.is_due(r["status"], r["wake_kind"], r["wake_at"], NOW, redrive_after)
    )
    assert _where(store.engine, rules.sweep_stalled(NOW)) == python(
        lambda r: life.is_stalled(r["status"], r["lease_until"], r["wake_at"], NOW)
    )
    assert _where(store.engine, rules.has_work(NOW) & rules.lease_free(NOW)) == python(
        lambda r: life.claimable(
            r["status"], r["wake_kind"], r["wake_at"], r["lease_owner"], r["lease_until"], NOW
        )
    )

    def action(r: dict[str, Any]) -> str | None:
        return life.sweep_action(
            r["status"], r["wake_kind"], r["wake_at"], r["lease_until"], NOW, redrive_after
        )

    got = store.sweep(limit=100, redrive_after=redrive_after)
    assert set(got.expired) == python(lambda r: action(r) == "expire")
    assert {flow_id for _, flow_id in got.due} == python(lambda r: action(r) == "publish")
    for flow_id in got.expired:
        assert store.get_flow(flow_id, details=False).status == "expired"
    for _, flow_id in got.due:
        row = store.get_flow(flow_id, details=False)
        assert (row.wake_kind, row.wake_at) == ("run", NOW)


@CASES
@given(
    row=flow_rows,
    name=st.sampled_from(["a", "b"]),
    key=st.sampled_from([None, "k"]),
    keyed_before=st.booleans(),
)
def test_the_one_statement_signal_agrees_with_the_rules(
    store: SqlStore, row: dict[str, Any], name: str, key: str | None, keyed_before: bool
) -> None:
    (flow_id,) = _load(store.engine, [row])
    if keyed_before:
        with store.engine.begin() as conn:
            conn.execute(
                insert(signals).values(
                    flow_id=flow_id,
                    name="a",
                    payload="0",
                    key="k",
                    status="consumed",
                    created_at=NOW,
                )
            )
    duplicate = keyed_before and key == "k"
    if not duplicate and not life.accepts_signal(row["status"]):
        with pytest.raises(FlowNotWaiting):
            store.record_signal(flow_id, name, "1", key)
        return
    got = store.record_signal(flow_id, name, "1", key)
    wakes = not duplicate and life.signal_wakes(row["status"], row["waiting_on"], name)
    assert (got.duplicate, got.wake) == (duplicate, wakes)
    after = store.get_flow(flow_id, details=False)
    if wakes:
        assert (after.wake_kind, after.wake_at) == ("run", NOW)
    else:
        assert (after.wake_kind, after.wake_at) == (row["wake_kind"], row["wake_at"])


@CASES
@given(row=flow_rows, lease_epoch=st.integers(0, 3))
def test_the_one_statement_step_commit_agrees_with_the_fence(
    store: SqlStore, row: dict[str, Any], lease_epoch: int
) -> None:
    (flow_id,) = _load(store.engine, [row])
    lease = Lease(flow_id, "w", lease_epoch)
    cp = Checkpoint(0, "step", "s", 0, "1")
    if not life.holds_lease(row["status"], row["epoch"], lease_epoch, row["lease_owner"], "w"):
        with pytest.raises(LeaseLost):
            store.commit_checkpoint(lease, cp, started_at=NOW, attempts=1, ttl=10)
        assert store.load_checkpoints(flow_id) == []
        return
    cancelled = store.commit_checkpoint(lease, cp, started_at=NOW, attempts=1, ttl=10)
    assert cancelled == (row["cancel_reason"] is not None)
    assert store.load_checkpoints(flow_id) == [cp]
    with store.engine.connect() as conn:
        assert conn.execute(select(steps.c.epoch).where(steps.c.flow_id == flow_id)).scalar() == (
            lease_epoch
        )
    assert store.get_flow(flow_id, details=False).status == (
        "cancelled" if cancelled else "running"
    )


@CASES
@given(
    row=flow_rows,
    schema=st.sampled_from([None, '{"type":"object"}']),
    name=st.sampled_from(["a", "b"]),
    passes=st.booleans(),
)
def test_the_one_statement_signal_checks_at_send_as_the_rule_says(
    store: SqlStore, row: dict[str, Any], schema: str | None, name: str, passes: bool
) -> None:
    (flow_id,) = _load(store.engine, [{**row, "waiting_schema": schema}])
    seen: list[str] = []

    def check(got: str) -> None:
        seen.append(got)
        if not passes:
            raise InvalidSignal("refused", errors=[])

    checks = life.checks_at_send(row["status"], row["waiting_on"], schema, name)
    if not life.accepts_signal(row["status"]):
        with pytest.raises(FlowNotWaiting):
            store.record_signal(flow_id, name, "1", None, check=check)
        assert seen == []
        return
    if checks and not passes:
        with pytest.raises(InvalidSignal):
            store.record_signal(flow_id, name, "1", None, check=check)
    else:
        got = store.record_signal(flow_id, name, "1", None, check=check)
        assert got.wake == life.signal_wakes(row["status"], row["waiting_on"], name)
    assert seen == ([schema] if checks else [])
    recorded = store.get_flow(flow_id).signals
    assert len(recorded) == (0 if checks and not passes else 1)


@CASES
@given(row=flow_rows, max_lapses=st.sampled_from([None, 1, 2, 3, 5]))
def test_the_claim_counts_lapses_and_parks_as_the_rules_say(
    store: SqlStore, row: dict[str, Any], max_lapses: int | None
) -> None:
    (flow_id,) = _load(store.engine, [row])
    with store.engine.connect() as conn:
        sql_after = conn.execute(
            select(rules.lapses_after_claim()).where(flows.c.id == flow_id)
        ).scalar()
    after = life.lapses_after_claim(row["lease_owner"], row["lapses"])
    assert sql_after == after
    claimable = life.claimable(
        row["status"], row["wake_kind"], row["wake_at"], row["lease_owner"], row["lease_until"], NOW
    )
    got = store.claim(flow_id, "x", 10, max_lapses=max_lapses)
    with store.engine.connect() as conn:
        lapses, error = conn.execute(
            select(flows.c.lapses, flows.c.error).where(flows.c.id == flow_id)
        ).one()
    if not claimable:
        assert not isinstance(got, Claimed) and got.reason != "parked"
        assert lapses == row["lapses"]
    elif life.parks(after, max_lapses):
        assert got == NotClaimed("parked")
        assert store.get_flow(flow_id, details=False).status == "failed"
        assert error == life.crash_loop_error(after)
    else:
        assert isinstance(got, Claimed) and lapses == after


storable_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"),
    max_size=40,
)


@CASES
@given(
    seq=st.integers(0, 3),
    previous=st.one_of(
        st.none(), st.just(""), st.text("0123456789abcdef", min_size=64, max_size=64)
    ),
    kind=st.sampled_from(["step", "task", "wait"]),
    name=storable_text.filter(bool),
    occurrence=st.integers(0, 3),
    result=storable_text,
)
def test_the_step_commit_chains_the_digest_as_the_python_rule(
    store: SqlStore,
    seq: int,
    previous: str | None,
    kind: str,
    name: str,
    occurrence: int,
    result: str,
) -> None:
    row = {
        "status": "running",
        "wake_kind": None,
        "wake_at": None,
        "lease_owner": "w",
        "lease_until": NOW,
        "waiting_on": None,
        "epoch": 1,
        "cancel_reason": None,
        "lapses": 2,
    }
    (flow_id,) = _load(store.engine, [row])
    with store.engine.begin() as conn:
        conn.execute(
            flows.update()
            .where(flows.c.id == flow_id)
            .values(next_seq=seq, history_digest=previous)
        )
    cp = Checkpoint(seq, kind, name, occurrence, result)
    want = life.next_digest(previous, seq, kind, name, occurrence, result)
    with store.engine.connect() as conn:
        # The expression the signal and child-task paths use on Postgres.
        cp_hex = life.cp_digest(seq, kind, name, occurrence, result)
        expr = rules.next_digest(seq, cp_hex)
        assert conn.execute(select(expr).where(flows.c.id == flow_id)).scalar() == want
    store.commit_checkpoint(Lease(flow_id, "w", 1), cp, started_at=NOW, attempts=1, ttl=10)
    with store.engine.connect() as conn:
        digest, lapses = conn.execute(
            select(flows.c.history_digest, flows.c.lapses).where(flows.c.id == flow_id)
        ).one()
    assert digest == want
    assert lapses == 0
