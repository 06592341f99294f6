"""The flow life cycle: its enums keep the stored strings, its rules say what they say."""

from __future__ import annotations

import ast
import enum
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import get_args

import pytest

from crux_workers import _models
from crux_workers._store import _lifecycle as life
from crux_workers._store._lifecycle import (
    CheckpointKind,
    FlowStatus,
    SignalStatus,
    TaskStatus,
    WakeKind,
)
from crux_workers._store._types import Checkpoint

NOW = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)
STORE = Path(life.__file__).parent


def at(seconds: float) -> datetime:
    return NOW + timedelta(seconds=seconds)


def test_the_enums_keep_the_strings_the_record_stores() -> None:
    assert [s.value for s in FlowStatus] == [
        "pending",
        "running",
        "suspended",
        "completed",
        "failed",
        "cancelled",
        "expired",
    ]
    assert [k.value for k in WakeKind] == ["run", "expire", "retry", "sleep", "poll", "task"]
    assert [k.value for k in CheckpointKind] == ["step", "suspend", "sleep", "wait", "task"]
    assert [s.value for s in SignalStatus] == ["pending", "consumed", "rejected"]
    assert [s.value for s in TaskStatus] == ["pending", "succeeded", "failed"]
    assert set(get_args(_models.SignalStatus)) == {s.value for s in SignalStatus}
    assert FlowStatus.RUNNING == "running" and f"{WakeKind.RUN}" == "run"
    assert set(get_args(_models.Status)) == {s.value for s in FlowStatus}
    assert {"completed", "failed", "cancelled", "expired"} == _models.TERMINAL
    assert set(life.ACTIVE) | set(life.TERMINAL) == set(FlowStatus)


def test_every_enum_member_is_documented() -> None:
    tree = ast.parse((STORE / "_lifecycle.py").read_text())
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        body = cls.body
        for i, node in enumerate(body):
            if isinstance(node, ast.Assign):
                follows = body[i + 1] if i + 1 < len(body) else None
                documented = isinstance(follows, ast.Expr) and isinstance(
                    follows.value, ast.Constant
                )
                assert documented, f"{cls.name}.{ast.unparse(node.targets[0])} has no docstring"
    enums = (FlowStatus, WakeKind, CheckpointKind, SignalStatus, TaskStatus)
    assert all(issubclass(e, enum.StrEnum) for e in enums)


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            found |= {base} if node.module else {f"{base}{a.name}" for a in node.names}
    return found


def test_the_rules_import_only_the_standard_library() -> None:
    stdlib = {
        "__future__",
        "enum",
        "datetime",
        "typing",
        "hashlib",
        "json",
        "logging",
        "secrets",
        "collections.abc",
    }
    assert _imports(STORE / "_lifecycle.py") <= stdlib


def test_the_memory_store_imports_neither_sql_nor_sqlalchemy() -> None:
    for path in STORE.glob("_memory*.py"):
        bad = {m for m in _imports(path) if "_sql" in m or m.startswith("sqlalchemy")}
        assert bad == set(), f"{path.name} imports {bad}"


@pytest.mark.parametrize(
    ("status", "kind", "wake_at", "expected"),
    [
        ("pending", None, None, True),
        ("running", None, None, True),
        ("suspended", "run", at(60), True),
        ("suspended", "sleep", at(0), True),
        ("suspended", "sleep", at(1), False),
        ("suspended", None, None, False),
        ("completed", "run", at(-1), False),
    ],
)
def test_has_work(status: str, kind: str | None, wake_at: datetime | None, expected: bool) -> None:
    assert life.has_work(status, kind, wake_at, NOW) is expected


def test_a_claim_needs_a_free_or_run_out_lease() -> None:
    assert life.claimable("pending", "run", NOW, None, None, NOW)
    assert life.claimable("running", None, None, "w", at(-1), NOW)
    assert not life.claimable("running", None, None, "w", at(0), NOW)
    assert life.lease_busy("w", at(0), NOW) and not life.lease_busy("w", at(-1), NOW)
    assert not life.lease_busy(None, at(5), NOW)


@pytest.mark.parametrize(
    ("status", "kind", "wake_at", "lease_until", "expected"),
    [
        ("suspended", "expire", at(0), None, "expire"),
        ("suspended", "expire", at(1), None, None),
        ("suspended", "sleep", at(0), None, "publish"),
        ("suspended", "task", at(-5), None, "publish"),
        # marked run: published when marked; again only after redrive_after (30 s)
        ("suspended", "run", at(-29), None, None),
        ("suspended", "run", at(-30), None, "publish"),
        ("pending", "run", at(-30), None, "publish"),
        # a stalled executor: its lease ran out and nothing wakes the flow
        ("running", None, None, at(-1), "publish"),
        ("running", None, None, at(0), None),
        ("running", "run", at(0), at(-1), None),
        ("suspended", None, at(-5), None, None),  # no kind: nothing to do (as the SQL)
        ("expired", "sleep", at(-5), None, None),
    ],
)
def test_what_a_sweep_does(
    status: str,
    kind: str | None,
    wake_at: datetime | None,
    lease_until: datetime | None,
    expected: str | None,
) -> None:
    assert life.sweep_action(status, kind, wake_at, lease_until, NOW, 30) == expected


def test_a_signal_wakes_only_a_flow_suspended_on_its_name() -> None:
    assert life.signal_wakes("suspended", "go", "go")
    assert not life.signal_wakes("suspended", "other", "go")
    assert not life.signal_wakes("running", "go", "go")
    assert life.accepts_signal("running") and not life.accepts_signal("expired")
    assert life.child_outcome_wakes("suspended", "task")
    assert not life.child_outcome_wakes("suspended", "run")


def test_a_deadline_is_kept_at_the_same_point_and_started_at_a_new_one() -> None:
    kept = life.deadline("go", 60, "go", at(10), NOW)
    assert kept == at(10)
    assert life.deadline("go", 60, "other", at(10), NOW) == at(60)
    assert life.deadline("go", None, None, None, NOW) is None
    assert life.expired(at(0), NOW) and not life.expired(at(1), NOW) and not life.expired(None, NOW)
    assert life.signal_wait(at(5)) == (at(5), WakeKind.EXPIRE)
    assert life.signal_wait(None) == (None, None)
    assert life.poll_wake(at(60), at(40)) == at(40) and life.poll_wake(at(60), None) == at(60)


def test_cancel_waits_for_a_live_executor_only() -> None:
    assert life.cancels_at_next_step("running", "w", at(1), NOW)
    assert not life.cancels_at_next_step("running", "w", at(-1), NOW)
    assert not life.cancels_at_next_step("suspended", None, None, NOW)


def test_the_fence_and_child_attempts() -> None:
    assert life.holds_lease("running", 3, 3, "w", "w")
    assert not life.holds_lease("running", 4, 3, "w", "w")
    assert not life.holds_lease("suspended", 3, 3, "w", "w")
    # The same epoch under another owner: a claim lost with an unflushed WAL, given again.
    assert not life.holds_lease("running", 3, 3, "x", "w")
    assert not life.holds_lease("running", 3, 3, None, "w")
    assert life.sends_new_attempt("failed", 1, 2) and not life.sends_new_attempt("failed", 2, 2)
    assert not life.sends_new_attempt("pending", 1, 2)
    assert life.task_send_stale(at(-30), 30, NOW) and not life.task_send_stale(at(-29), 30, NOW)
    assert life.task_id_for("f", 3, 2, "ab" * 16) == "crux:f:3:2:" + "ab" * 16
    one, two = life.task_id_for("f:x", 3, 2), life.task_id_for("f:x", 3, 2)
    assert one != two and len(one.rsplit(":", 1)[1]) == 32, "each send's secret is fresh"
    assert life.flow_of_task_id(one) == "f:x" and life.flow_of_task_id("crux:f:1:1") == "f"
    assert life.flow_of_task_id("crux:1") is None and life.flow_of_task_id("celery-x") is None
    assert life.task_outcome(None) == "succeeded" and life.task_outcome("{}") == "failed"


def test_the_whole_history_digest_is_the_fold_of_next_digest() -> None:
    cps = [
        Checkpoint(0, "step", "a", 0, "1"),
        Checkpoint(1, "suspend", "caf\u00e9", 0, '"\\ud800 x"'),
        Checkpoint(2, "step", "a", 1, '{"k": [1, 2]}'),
        Checkpoint(3, "task", "t\nx", 0, "null"),
    ]
    digest: str | None = None
    for cp in cps:
        digest = life.next_digest(digest, cp.seq, cp.kind, cp.name, cp.occurrence, cp.result)
        assert life.history_digest(cps[: cp.seq + 1]) == digest
    assert life.history_digest([]) == life.EMPTY_HISTORY
    # Any change of any field of any checkpoint changes it.
    changed = [*cps[:1], Checkpoint(1, "suspend", "caf\u00e9", 1, '"\\ud800 x"'), *cps[2:]]
    assert life.history_digest(changed) != digest
