"""Durations, settings, errors and the public surface."""

from __future__ import annotations

import pickle
from datetime import timedelta

import pytest

import crux_workers
from crux_workers import (
    ConfigurationError,
    Crux,
    FlowNotWaiting,
    InvalidDuration,
    InvalidInput,
    NonDeterminismError,
    Retry,
    Settings,
    StepFailed,
)
from crux_workers._durations import parse_duration
from crux_workers._store._cache import decode, encode
from crux_workers._store._types import Checkpoint
from crux_workers.errors import Suspended


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("90s", 90), ("15m", 900), ("24h", 86400), ("7d", 604800), ("1.5h", 5400)],
)
def test_durations_parse(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_timedelta_and_numbers_are_durations() -> None:
    assert parse_duration(timedelta(minutes=2)) == 120
    assert parse_duration(3) == 3


@pytest.mark.parametrize("bad", ["", "10", "ten minutes", "5 weeks", "-1s", "0s", True, None, []])
def test_bad_durations_are_clear_errors(bad: object) -> None:
    with pytest.raises(InvalidDuration):
        parse_duration(bad)  # type: ignore[arg-type]


def test_settings_refuse_unknown_crux_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRUX_DATABSE_URL", "postgresql://typo")
    with pytest.raises(ConfigurationError, match="CRUX_DATABSE_URL"):
        Settings.from_env()


def test_settings_parse_durations_and_refuse_bad_urls(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CRUX_LEASE_TTL", "2m")
    assert Settings.from_env().lease_ttl == 120
    with pytest.raises(ConfigurationError):
        Settings.from_env(database_url="mysql://x")
    with pytest.raises(ConfigurationError):
        Settings.from_env(signal_secret="")


def test_a_broker_only_app_publishes_but_refuses_to_record() -> None:
    # A service that only publishes signals has the broker and no database.
    app = Crux(Settings(broker_url="redis://127.0.0.1:1/0"))
    assert not app.settings.embedded and not app.settings.fleet_ready
    with pytest.raises(ConfigurationError, match="CRUX_DATABASE_URL"):
        app.get_flow("x")
    with pytest.raises(InvalidInput, match="CRUX_SIGNAL_MAX_BYTES"):
        app.publish_signal("f", "n", "x" * 300_000)


def test_embedded_default_without_urls() -> None:
    s = Settings()
    assert s.embedded and s.effective_database_url.startswith("sqlite:///")
    fleet = Settings(database_url="postgresql+psycopg://u@127.0.0.1/db", redis_url="redis://x/0")
    assert not fleet.embedded and fleet.effective_broker_url == "redis://x/0"


def test_errors_survive_pickling_with_their_attributes() -> None:
    err = NonDeterminismError("diverged", flow_id="f", expected="step 'a'#0", actual="x")
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is NonDeterminismError
    assert (back.flow_id, back.expected, str(back)) == ("f", "step 'a'#0", "diverged")
    nw = pickle.loads(pickle.dumps(FlowNotWaiting("done", flow_id="f", status="completed")))
    assert nw.status == "completed"
    sf = StepFailed.from_exception(ValueError("bad"), step="s", attempt=2)
    back_sf = pickle.loads(pickle.dumps(sf))
    assert back_sf.error_type == "builtins.ValueError" and back_sf.attempt == 2


def test_control_flow_is_not_an_exception() -> None:
    assert not issubclass(Suspended, Exception)


def test_retry_backoffs() -> None:
    exp = Retry(attempts=5, backoff="exponential", initial="1s", max="5s")
    assert [exp.delay(n) for n in (1, 2, 3, 4)] == [1, 2, 4, 5]
    assert Retry(backoff="linear", initial="2s").delay(3) == 6
    assert Retry(backoff="fixed", initial="500ms").delay(9) == 0.5
    with pytest.raises(ValueError):
        Retry(initial="soon")


def test_cache_entries_round_trip_unusual_names() -> None:
    cp = Checkpoint(7, "step", 'we"ird\nname', 3, '{"a":[1,"x\\ny"]}')
    assert decode(7, encode(cp).encode()) == cp


def test_public_names_are_pinned() -> None:
    assert sorted(crux_workers.__all__) == sorted(
        [
            "AsyncFlowContext",
            "ConfigurationError",
            "CrashLoop",
            "RecordRefused",
            "Crux",
            "CruxError",
            "DuplicateFlowName",
            "FlowAlreadyFinished",
            "ErrorInfo",
            "FlowContext",
            "FlowHandle",
            "FlowIdConflict",
            "FlowNotFound",
            "FlowNotRetryable",
            "FlowNotWaiting",
            "ForkOrigin",
            "InvalidSignal",
            "WaitGroup",
            "fork_flow",
            "purge_finished",
            "retry_flow",
            "retry_flows",
            "waiting",
            "FlowOutcome",
            "FlowRun",
            "FlowState",
            "InvalidDuration",
            "InvalidInput",
            "NoConsensus",
            "NonDeterminismError",
            "NonRetryableError",
            "Retry",
            "Settings",
            "SignalReceipt",
            "SignalRejected",
            "SignalState",
            "StepFailed",
            "StepInfo",
            "StepResultNotSerializable",
            "StepState",
            "StoreError",
            "ValueTooLarge",
            "SwarmMessage",
            "SwarmResult",
            "UnknownFlow",
            "WaitTimeout",
            "cancel_flow",
            "cancel_flow_async",
            "get_flow_async",
            "signal_flow_async",
            "consensus",
            "consensus_async",
            "current_step",
            "default_app",
            "flow",
            "get_flow",
            "parallel",
            "parallel_async",
            "publish_signal",
            "set_default_app",
            "signal_flow",
            "swarm",
            "swarm_async",
        ]
    )
    for name in crux_workers.__all__:
        assert getattr(crux_workers, name).__doc__, name


def test_each_app_runs_its_own_tasks() -> None:
    import warnings

    from pydantic import BaseModel

    from crux_workers import Crux

    class Empty(BaseModel):
        pass

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            app = Crux(Settings(database_url="sqlite://", redis_url="redis://127.0.0.1:1/0"))
            handle = app.flow("same-name", input=Empty)(lambda f: None)
            assert handle.task.name == "crux.flow.same-name"
            app.celery.tasks["crux.sweep"]
    assert [w for w in caught if "already registered" in str(w.message)] == []
