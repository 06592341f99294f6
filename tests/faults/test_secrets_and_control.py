"""Issue 11, defects 2, 8 and 11: remote control, leaked secrets, weak secrets at start.

- A plain broker client's ``broadcast("shutdown")`` must not stop a worker (remote
  control only answers questions unless ``CRUX_REMOTE_CONTROL=full``); health comes from
  a heartbeat file.
- No settings error, ``repr``, ``redact()`` or ``crux-workers dev`` line prints a password
  or the signal secret.
- A placeholder or short signal secret is refused at start, without printing it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from celery import Celery

from crux_workers import Settings
from crux_workers._settings import redact
from crux_workers.errors import ConfigurationError
from tests.faults.conftest import FaultFleet
from tests.servers import PostgresServer
from tests.workers import REPO

DB_PASSWORD = "Db-Pa55word-that-must-not-leak"
SECRET_TAIL = "TAIL-OF-THE-SIGNAL-SECRET-0123456789"


def cli(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "crux_workers", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def clean_env(**crux: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRUX_")}
    env.update(PYTHONPATH=str(REPO), **crux)
    return env


def wait_until(what: str, check: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s"
        time.sleep(0.1)


# -- defect 2: remote control --------------------------------------------------------------


def test_shutdown_broadcast_from_a_broker_client_leaves_the_worker_running(
    fleet: FaultFleet,
) -> None:
    # The worker as shipped: no CRUX_REMOTE_CONTROL anywhere in its environment.
    assert not any(k == "CRUX_REMOTE_CONTROL" for k in fleet.env)
    worker = fleet.worker()
    attacker = Celery("attacker", broker=fleet.redis_url, set_as_current=False)
    try:
        attacker.control.broadcast("shutdown")
        # The same from a client configured like the fleet (its transport options).
        fleet.app.celery.control.broadcast("shutdown")
        # With remote control on, the worker exits within a second of this; give it five.
        deadline = time.monotonic() + 5
        while worker.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert worker.proc.poll() is None, f"the broadcast stopped the worker:\n{worker.tail()}"
        # Orders that change the worker are refused too; questions are answered (Flower,
        # celery inspect), so the refusals above are not just an absent mailbox.
        refused = fleet.app.celery.control.pool_shrink(1, reply=True, timeout=2.0)
        assert refused and all("error" in next(iter(r.values())) for r in refused), refused
        assert fleet.app.celery.control.ping(timeout=2.0), "inspect mode answers a ping"
        assert "KeyError('shutdown')" in worker.log.read_text()  # refused, logged
    finally:
        attacker.close()

    # And it still processes flows.
    run = fleet.flows["fault-chain"].run(input={"steps": 2, "seconds": 0})
    assert run.wait(timeout=60).status == "completed"
    assert worker.proc.poll() is None


def test_remote_control_is_there_when_turned_on(fleet: FaultFleet) -> None:
    # The opt-in (for Flower's buttons) works, so the test above is not vacuous.
    fleet.env["CRUX_REMOTE_CONTROL"] = "full"
    worker = fleet.worker("rc")
    control = fleet.app.celery.control
    deadline = time.monotonic() + 20
    replies: list[object] = []
    while not replies and time.monotonic() < deadline:
        replies = control.ping(timeout=1.0)
    assert replies, f"no reply to a ping with CRUX_REMOTE_CONTROL=full\n{worker.tail()}"
    shrunk = control.pool_shrink(1, reply=True, timeout=2.0)
    assert shrunk and "ok" in next(iter(shrunk[0].values())), shrunk


def test_health_command_follows_the_worker_heartbeat(fleet: FaultFleet, tmp_path: Path) -> None:
    beat_file = tmp_path / "run" / "worker.alive"
    fleet.env["CRUX_HEALTH_FILE"] = str(beat_file)
    env = dict(fleet.env)

    # Before any worker: unhealthy, with a reason.
    done = cli("health", env=env)
    assert done.returncode == 1 and "no heartbeat" in done.stderr, done

    worker = fleet.worker("alive")
    done = cli("health", "--max-age", "30s", env=env)
    assert done.returncode == 0, done
    assert "healthy" in done.stdout and str(beat_file) in done.stdout
    # The worker keeps it fresh (a thread refreshes it every few seconds).
    first = beat_file.stat().st_mtime
    wait_until("a refreshed heartbeat", lambda: beat_file.stat().st_mtime > first, 20)

    # A warm shutdown removes it: unhealthy at once.
    worker.stop()
    assert worker.proc.returncode == 0, worker.tail()
    done = cli("health", env=env)
    assert done.returncode == 1 and "no heartbeat" in done.stderr, done

    # A worker killed -9 leaves it behind: unhealthy once it is older than --max-age.
    killed = fleet.worker("killed")
    assert cli("health", env=env).returncode == 0
    fleet.kill_group(killed)
    assert beat_file.exists()
    wait_until(
        "the stale heartbeat reported",
        lambda: cli("health", "--max-age", "1s", env=env).returncode == 1,
        20,
    )
    done = cli("health", "--max-age", "1s", env=env)
    assert "old, more than 1s" in done.stderr, done


# -- defect 8: secrets in messages ----------------------------------------------------------


def test_a_settings_error_prints_no_password_and_no_secret() -> None:
    secret = "x" * 40 + SECRET_TAIL
    cases = [
        # pydantic printed the whole input: the URL with its password...
        {"CRUX_DATABASE_URL": f"mysql://u:{DB_PASSWORD}@h/d"},
        # ...or, shortened in the middle, the tail of the signal secret.
        {"CRUX_DATABASE_URL": f"mysql://crux:{DB_PASSWORD}@h/crux", "CRUX_SIGNAL_SECRET": secret},
    ]
    for crux in cases:
        done = cli("flows", "list", env=clean_env(**crux))
        output = done.stdout + done.stderr
        assert done.returncode != 0 and "database_url must be" in output, output
        assert DB_PASSWORD not in output and secret[-12:] not in output, output

    # The same through the API, and for a field error next to a URL with a password.
    for kwargs in (
        {"database_url": f"mysql://crux:{DB_PASSWORD}@h/crux", "signal_secret": secret},
        {"redis_url": f"redis://:{DB_PASSWORD}@h/0", "signal_max_bytes": SECRET_TAIL},
        {"signal_secret": SECRET_TAIL[:20]},
    ):
        with pytest.raises(ConfigurationError) as caught:
            Settings(**kwargs)
        text = str(caught.value) + repr(caught.value)
        assert DB_PASSWORD not in text and SECRET_TAIL[:20] not in text, text
        assert secret[-12:] not in text, text


@pytest.mark.parametrize(
    "url",
    [
        "postgresql+psycopg://crux:{pw}@db:5432/crux",
        "postgresql+psycopg://crux@db:5432/crux?password={pw}",
        "postgresql+psycopg://crux@db/crux?sslmode=require&sslpassword={pw}",
        "postgresql://db/crux?user=crux&pass={pw}",
        "postgresql://db/crux?pwd={pw}&application_name=x",
        "redis://:{pw}@cache:6379/0",
        "redis://{pw}@cache:6379/0",
        "redis://cache:6379/0?password={pw}",
        "rediss://cache/0?token={pw}",
        "amqp://broker//?secret={pw}",
        "redis://cache/0?api_key={pw}",
        "redis://cache/0?Password={pw}#frag",
        "host=db user=crux password={pw}",
    ],
)
def test_redact_masks_every_password(url: str) -> None:
    shown = redact(url.format(pw=DB_PASSWORD))
    assert DB_PASSWORD not in shown and "***" in shown, shown


def test_redact_keeps_what_is_not_secret() -> None:
    assert redact("redis://:pw@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"
    assert redact("postgresql+psycopg://crux:pw@db/crux?sslmode=require") == (
        "postgresql+psycopg://crux:***@db/crux?sslmode=require"
    )
    assert redact("sqlite:///.crux/crux.db") == "sqlite:///.crux/crux.db"
    assert redact(None) == "<unset>"


def test_settings_repr_and_str_mask_passwords() -> None:
    s = Settings(
        database_url=f"postgresql+psycopg://crux:{DB_PASSWORD}@db/crux",
        redis_url=f"redis://:{DB_PASSWORD}@cache/0",
        broker_url=f"redis://broker/0?password={DB_PASSWORD}",
        broker_options={"sentinel_kwargs": {"password": DB_PASSWORD}},
        signal_secret="y" * 32 + SECRET_TAIL,
    )
    for text in (repr(s), str(s), f"{s!r}"):
        assert DB_PASSWORD not in text and SECRET_TAIL not in text, text
        assert "db/crux" in text  # still says which server
    assert s.database_url is not None and DB_PASSWORD in s.database_url  # the value itself


def test_dev_prints_the_database_url_without_its_password(
    fault_pg: PostgresServer, fault_db: str, tmp_path: Path
) -> None:
    # The test cluster trusts loopback, so any password connects; none may be printed.
    url = fault_pg.url(fault_db).replace("postgres@", f"postgres:{DB_PASSWORD}@")
    log = tmp_path / "dev.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "crux_workers", "dev"],
            cwd=tmp_path,
            env=clean_env(CRUX_DATABASE_URL=url),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            wait_until(
                "dev's banner",
                lambda: b"Ctrl-C to stop" in log.read_bytes() or proc.poll() is not None,
                60,
            )
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    text = log.read_text(errors="replace")
    assert "dev: embedded default at" in text, text
    assert DB_PASSWORD not in text, text


# -- defect 11: weak secrets at start --------------------------------------------------------


@pytest.mark.parametrize(
    "secret",
    [
        "CHANGE-ME-to-a-long-random-string",  # deploy/base/secret.yaml as shipped
        "change-me-please-this-is-long-enough-to-pass",
        "short-" + SECRET_TAIL[:10],  # 16 bytes
    ],
)
def test_a_placeholder_or_short_signal_secret_is_refused_at_start(secret: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Settings(signal_secret=secret)
    assert secret not in str(caught.value)
    done = cli("ingress", env=clean_env(CRUX_SIGNAL_SECRET=secret), timeout=60)
    output = done.stdout + done.stderr
    assert done.returncode != 0 and "signal_secret is" in output, output
    assert secret not in output, output


def test_a_long_random_signal_secret_is_accepted() -> None:
    secret = os.urandom(32).hex()
    settings = Settings(signal_secret=secret)
    assert settings.signal_secret is not None
    assert settings.signal_secret.get_secret_value() == secret


def test_placeholder_passwords_in_urls_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="placeholder password"):
        Settings(database_url="postgresql+psycopg://crux:CHANGE-ME@postgres:5432/crux")
    with pytest.raises(ConfigurationError, match="placeholder password"):
        Settings(broker_url="redis://crux:change-me-broker@redis:6379/0")
