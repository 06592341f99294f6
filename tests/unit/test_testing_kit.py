"""The testing kit for users' flows: FlowEnvironment, crash_test, the flow_env fixture.

The seed's onboarding flow (sync and async) is driven through its verified, expired
and retried paths on virtual time; each test prints how long it took (``-s``).
"""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from pydantic import BaseModel

from crux_workers import (
    Crux,
    FlowContext,
    Retry,
    Settings,
    current_step,
    default_app,
    set_default_app,
)
from crux_workers.errors import WaitTimeout
from crux_workers.testing import (
    FlowEnvironment,
    TestingError,
    check_flows,
    check_history,
    crash_test,
    export_history,
)


def _import_example(name: str) -> ModuleType:
    # The examples define their flows on the default app, as users do. In this process
    # the suite's own flows (tests/integration/flows.py) hold those names on it already:
    # the examples get an app of their own, which the kit re-registers from anyway.
    previous = default_app()
    set_default_app(Crux(Settings(database_url="sqlite://")))
    try:
        return importlib.import_module(name)
    finally:
        set_default_app(previous)


onboarding_sync = _import_example("examples.onboarding")
onboarding_async = _import_example("examples.onboarding_async")
_writer = _import_example("examples.writer")
plan_draft, writer = _writer.plan_draft, _writer.writer

SIGNUP = {"email": "u@example.com", "name": "Henri", "goal": "shipping"}
VERIFIED = {"verified_at": "2026-11-21T10:00:00Z"}
REPO = Path(__file__).resolve().parents[2]

FLAVOURS = {"sync": onboarding_sync, "async": onboarding_async}


@pytest.fixture(params=["sync", "async"])
def mod(request: pytest.FixtureRequest) -> Iterator[Any]:
    began = time.perf_counter()
    yield FLAVOURS[request.param]
    print(f"\n{request.node.name}: {time.perf_counter() - began:.3f}s")


# -- FlowEnvironment on the onboarding flow ------------------------------------------------------


def test_unverified_signup_expires(mod: Any) -> None:
    with FlowEnvironment() as env:
        run = env.start(mod.onboarding, input=SIGNUP)
        assert run.state().status == "suspended"
        assert run.state().waiting_on == "email-verified"
        report = env.advance("24h")
        outcome = run.outcome()
        assert outcome is not None and outcome.status == "expired"
        assert [p.kind for p in report.fired] == ["expire"]
        assert report.fired[0].at == report.started_at + (report.ended_at - report.started_at)
        assert report.upcoming == []
        assert env.now() > report.started_at


def test_not_yet_expired_one_second_early(mod: Any) -> None:
    with FlowEnvironment() as env:
        run = env.start(mod.onboarding, input=SIGNUP)
        report = env.advance(24 * 3600 - 1)
        assert report.fired == []
        assert [p.kind for p in report.upcoming] == ["expire"]
        assert run.outcome() is None
        env.advance("1s")
        assert run.outcome() is not None


def test_verified_signup_gets_paced_checkins(mod: Any) -> None:
    with FlowEnvironment() as env:
        run = env.start(mod.onboarding, input=SIGNUP)
        env.signal(run.flow_id, "email-verified", VERIFIED)
        state = run.state()
        assert state.status == "suspended" and state.wake_kind == "sleep"
        assert [s.name for s in state.steps] == [
            "send-welcome",
            "email-verified",
            "first-week-plan",
            "until-checkin",
        ]
        report = env.advance("2d")
        assert [p.kind for p in report.fired] == ["sleep"]
        assert [s.name for s in run.state().steps].count("checkin") == 1
        report = env.advance("4d")
        assert [p.kind for p in report.fired] == ["sleep", "sleep"]
        outcome = run.outcome()
        assert outcome is not None and outcome.status == "completed"
        assert (
            outcome.result["checkins"] == 3
            and outcome.result["verified_at"] == VERIFIED["verified_at"]
        )


def test_plan_is_retried_with_backoff_on_virtual_time(
    mod: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    failures = {"left": 2}
    real = mod.make_plan

    def flaky(signup: Any) -> Any:
        if failures["left"]:
            failures["left"] -= 1
            raise ConnectionError("planner unavailable")
        return real(signup)

    monkeypatch.setattr(mod, "make_plan", flaky)
    with FlowEnvironment() as env:
        run = env.start(mod.onboarding, input=SIGNUP)
        env.signal(run.flow_id, "email-verified", VERIFIED)
        state = run.state()
        assert state.wake_kind == "retry" and len(state.step_errors) == 1
        first = env.advance("1s")  # attempt 1's backoff: at most 1s (jitter halves it at most)
        assert [p.kind for p in first.fired] == ["retry"]
        second = env.advance("2s")
        assert [p.kind for p in second.fired] == ["retry"]
        state = run.state()
        assert len(state.step_errors) == 2
        assert "first-week-plan" in [s.name for s in state.steps]
        outcome = run.wait()  # the check-ins' sleeps, on virtual time
        assert outcome.status == "completed"


def test_wait_runs_timers_until_the_end(mod: Any) -> None:
    with FlowEnvironment() as env:
        run = env.start(mod.onboarding, input={**SIGNUP, "verify_within": "1h"})
        assert run.wait().status == "expired"
        run = env.start(mod.onboarding, input=SIGNUP)
        env.signal(run.flow_id, "email-verified", VERIFIED)
        assert run.wait().status == "completed"


def test_cancel_ends_a_suspended_flow(mod: Any) -> None:
    with FlowEnvironment() as env:
        run = env.start(mod.onboarding, input=SIGNUP, flow_id="to-cancel")
        assert env.cancel("to-cancel", "changed their mind") == "cancelled"
        outcome = run.outcome()
        assert outcome is not None and outcome.status == "cancelled"
        assert outcome.cancel_reason == "changed their mind"


def test_sqlite_record(mod: Any, tmp_path: Path) -> None:
    with FlowEnvironment(store=tmp_path / "record.db") as env:
        run = env.start(mod.onboarding, input=SIGNUP)
        env.signal(run.flow_id, "email-verified", VERIFIED)
        assert run.wait().status == "completed"
    assert (tmp_path / "record.db").exists()


# -- flows of an explicit app: children, polls --

app = Crux(Settings.model_construct())


class Topic(BaseModel):
    topic: str


READY: dict[str, Any] = {"value": None}


@app.flow("kit-poll", input=Topic)
def poll(f: FlowContext[Topic]) -> Any:
    return f.wait_until("ready", lambda: READY["value"], every="10m", timeout="1h")


@app.flow("kit-child", input=Topic)
def child_flow(f: FlowContext[Topic]) -> Any:
    # The task object itself: the environment calls its function inline.
    return f.run_task("plan", plan_draft, f.input.topic, "testers", retry=Retry(attempts=2))


def test_one_flow_per_name_in_an_environment() -> None:
    other = Crux(Settings.model_construct())

    @other.flow("kit-poll", input=Topic)
    def impostor(f: FlowContext[Topic]) -> None:
        return None

    with FlowEnvironment(app) as env:
        env.register(poll)  # the same flow again: nothing to do
        with pytest.raises(TestingError, match="another flow called 'kit-poll'"):
            env.start(impostor, input={"topic": "x"})


def test_wait_until_polls_on_virtual_time() -> None:
    READY["value"] = None
    with FlowEnvironment(app) as env:
        run = env.start("kit-poll", input={"topic": "x"})
        assert run.state().wake_kind == "poll"
        report = env.advance("25m")
        assert [p.kind for p in report.fired] == ["poll", "poll"]
        READY["value"] = {"ok": True}
        env.advance("10m")
        assert run.wait().result == {"ok": True}
        READY["value"] = None
        late = env.start("kit-poll", input={"topic": "y"})
        assert late.wait().status == "expired"


def test_children_run_inline_or_are_supplied() -> None:
    with FlowEnvironment(app) as env:
        outcome = env.start("kit-child", input={"topic": "tests"}).wait()
        assert outcome.result["title"] == "Tests, explained for testers"
        assert env.child_calls["writer.plan_draft"] == 1
    with FlowEnvironment(app, tasks={"writer.plan_draft": {"title": "given"}}) as env:
        assert env.start("kit-child", input={"topic": "t"}).wait().result == {"title": "given"}
    with FlowEnvironment(app, tasks={"writer.plan_draft": RuntimeError("down")}) as env:
        outcome = env.start("kit-child", input={"topic": "t"}).wait()
        assert (
            outcome.status == "failed" and len(env.app.get_flow(outcome.flow_id).step_errors) == 2
        )


def test_writer_child_completed_by_the_test() -> None:
    article = {"topic": "durability", "author": "ada", "publication": "crux-weekly"}
    with FlowEnvironment(run_tasks=False) as env:
        run = env.start(writer, input=article)
        [pending] = env.pending_tasks()
        assert pending.task == "writer.plan_draft" and pending.flow_id == run.flow_id
        assert pending.args == ["durability", "engineers"]
        # Nobody completes it: the child is re-sent every resend_after, on virtual time.
        with pytest.raises(WaitTimeout):
            env.advance_until_done(run.flow_id, timeout=3600)
        assert [p.task_id for p in env.pending_tasks()] == [pending.task_id]
        assert env.complete_task("writer.plan_draft", result=plan_draft(*pending.args))
        assert run.state().waiting_on == "approval"
        env.signal(run.flow_id, "approval", {"approved": True, "editor": "henri"})
        outcome = run.outcome()
        assert outcome is not None and outcome.result["status"] == "written"


# -- crash_test --


def test_crash_test_onboarding(mod: Any) -> None:
    report = crash_test(mod.onboarding, input=SIGNUP, signals=[("email-verified", VERIFIED)])
    print(report)
    assert report.ok, report
    assert report.clean.outcome is not None and report.clean.outcome.status == "completed"
    # send-welcome with the suspend (one write: the step rides with it), signal, plan,
    # 3 x (sleep, timer, checkin), the last checkin with the finish: 12 writes.
    assert report.boundaries == 24
    assert all(r.crashed for r in report.runs)
    assert set(report.reruns) == {"send-welcome", "first-week-plan", "checkin"}
    assert len(report.reruns["checkin"]) == 3
    assert "before its commit" in report.reruns["send-welcome"][0]


def test_crash_test_writer_with_supplied_child() -> None:
    report = crash_test(
        writer,
        input={"topic": "durability", "author": "ada", "publication": "crux-weekly"},
        signals=[("approval", {"approved": True, "editor": "henri"})],
        tasks={"writer.plan_draft": plan_draft},
    )
    print(report)
    assert report.ok, report
    assert report.clean.outcome is not None
    assert report.clean.outcome.result["status"] == "written"
    assert report.reruns == {"write": [report.reruns["write"][0]]}


LEDGER: list[int] = []
FLIPS = {"n": 0}


@app.flow("kit-charge", input=Topic)
def charge(f: FlowContext[Topic]) -> int:
    base = f.step("baseline", lambda: len(LEDGER))
    f.step("charge", lambda: LEDGER.append(1))
    return int(f.step("count", lambda: len(LEDGER) - base))


@app.flow("kit-flip", input=Topic)
def flip(f: FlowContext[Topic]) -> str:
    FLIPS["n"] += 1  # the outside world, read outside a step
    first = "heads" if FLIPS["n"] % 2 else "tails"
    f.step(first, lambda: first)
    return str(f.step("done", lambda: "done"))


def test_crash_test_finds_a_side_effect_that_changes_the_outcome() -> None:
    report = crash_test(charge, input={"topic": "x"})
    assert not report.ok
    [bad] = report.differing
    assert bad.where == "after step 'charge'#0 ran, before its commit"
    text = str(report)
    assert "DIFFERENT OUTCOME, killed after step 'charge'#0 ran, before its commit" in text
    assert "'charge': 1 of" in text


def test_crash_test_finds_non_determinism() -> None:
    FLIPS["n"] = 0
    report = crash_test(flip, input={"topic": "x"})
    assert not report.ok
    assert report.nondeterministic
    assert "NON-DETERMINISM" in str(report)
    assert any(r.nondeterminism for r in report.nondeterministic)


def test_crash_test_on_the_retried_path(mod: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    real = mod.make_plan

    def flaky(signup: Any) -> Any:
        # Deterministic per run: the first two attempts of the step fail.
        if current_step().attempt < 3:
            raise ConnectionError("planner unavailable")
        return real(signup)

    monkeypatch.setattr(mod, "make_plan", flaky)
    report = crash_test(mod.onboarding, input=SIGNUP, signals=[("email-verified", VERIFIED)])
    assert report.ok, report
    # The two failed attempts are recorded: two more writes, four more boundaries.
    assert report.boundaries == 28
    assert any("failed attempt 1 of step 'first-week-plan'" in r.where for r in report.runs)
    # Killed before a failed attempt is recorded, that attempt runs again.
    assert len(report.reruns["first-week-plan"]) == 3


def test_crash_test_says_when_the_clean_run_does_not_end(mod: Any) -> None:
    report = crash_test(mod.onboarding, input={**SIGNUP, "verify_within": "1h"}, max_boundaries=2)
    assert report.clean.outcome is not None and report.clean.outcome.status == "expired"
    assert report.ok and report.boundaries == 2
    stuck = crash_test(
        writer, input={"topic": "t", "author": "ada", "publication": "crux-weekly"}, run_tasks=False
    )
    assert not stuck.ok
    assert stuck.boundaries == 0
    assert "THE CLEAN RUN DID NOT END: children ['writer.plan_draft'] never completed" in str(stuck)


# -- check_history --


def test_check_history_of_a_suspended_onboarding(mod: Any) -> None:
    with FlowEnvironment() as env:
        run = env.start(mod.onboarding, input=SIGNUP)
        env.signal(run.flow_id, "email-verified", VERIFIED)
        env.advance("2d")
        exported = export_history(env.app, run.flow_id)
        assert check_flows(mod.onboarding, store=env.store).ok
    assert [c["name"] for c in exported["checkpoints"]] == [
        "send-welcome",
        "email-verified",
        "first-week-plan",
        "until-checkin",
        "checkin",
        "until-checkin",
    ]
    assert check_history([exported], mod.onboarding).ok
    # A step result that no longer fits the step function's declared return type.
    broken = json.loads(json.dumps(exported))
    broken["checkpoints"][2]["result"] = {"not": "a list"}
    report = check_history([broken], mod.onboarding)
    [problem] = report.problems
    assert (problem.kind, problem.position) == ("step-result", 2)
    assert "first-week-plan" in str(report) and "list" in (problem.expected or "")
    # A recorded signal that no longer fits the suspend's schema.
    broken["checkpoints"][1]["result"] = {"verified": True}
    kinds = [p.kind for p in check_history([broken], mod.onboarding).problems]
    assert kinds == ["signal"]
    # An unknown flow, and stored input that no longer fits.
    other = {**exported, "name": "renamed-flow"}
    assert [p.kind for p in check_history([other], mod.onboarding).problems] == ["unknown-flow"]
    bad_input = {**exported, "input": {"email": "x"}}
    assert [p.kind for p in check_history([bad_input], mod.onboarding).problems] == ["input"]


# -- the pytest plugin --


def docs_test_file() -> str:
    """The onboarding tests of docs/testing.md, as written there."""
    text = (REPO / "docs" / "testing.md").read_text()
    [block] = re.findall(r"```python\n(# tests/test_onboarding.py\n.*?)```", text, flags=re.S)
    return block


def test_the_docs_onboarding_tests_pass_with_the_installed_plugin(tmp_path: Path) -> None:
    # A subprocess pytest in an empty directory: flow_env comes from the entry point.
    (tmp_path / "test_onboarding.py").write_text(docs_test_file())
    done = subprocess.run(
        [
            *(sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"),
            *("--durations=0", "--durations-min=0"),
        ],
        cwd=tmp_path,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "6 passed" in done.stdout
    # Each test's setup, call and teardown (the flow_env fixture's start and close).
    took: dict[str, float] = {}
    for secs, name in re.findall(r"^([\d.]+)s (?:setup|call|teardown)\s+(\S+)$", done.stdout, re.M):
        took[name] = took.get(name, 0.0) + float(secs)
    assert len(took) == 6
    print("\n" + "\n".join(f"{t:.2f}s {name}" for name, t in took.items()))
    print(f"the docs' onboarding tests: {sum(took.values()):.2f}s in all")


def test_the_in_memory_environment_loads_no_driver() -> None:
    probe = (
        "import sys\n"
        "from crux_workers.testing import FlowEnvironment\n"
        "from examples.onboarding import onboarding\n"
        "with FlowEnvironment() as env:\n"
        "    env.start(onboarding, input={'email': 'a', 'name': 'b', 'goal': 'c'})\n"
        "print(sorted({m.split('.')[0] for m in sys.modules}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    loaded = done.stdout.strip().splitlines()[-1]
    # examples.onboarding imports no driver; the environment must not either.
    for driver in ("sqlalchemy", "alembic", "kombu", "redis", "psycopg", "pytest"):
        assert f"'{driver}'" not in loaded, driver
