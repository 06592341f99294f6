"""docker-compose.yml, the Dockerfile and deploy/ taken at their word.

No Docker engine here: each compose service runs as a local process with its command
and environment as written (see tests/deployment.py for the two translations made),
against the test's Postgres and two redis-servers started from the compose file's own
redis commands. A flow then goes through migrate, worker, beat and ingress.
"""

from __future__ import annotations

import importlib
import itertools
import re
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis
from sqlalchemy import create_engine, text

from crux_workers import Crux, FlowHandle, FlowRun, Settings, default_app, set_default_app
from crux_workers._store._migrate import current_revision, head_revision
from crux_workers._tasks import START_PRIORITY
from crux_workers.cli import main as cli_main
from crux_workers.errors import ConfigurationError
from tests.deployment import (
    REPO,
    InterpolationError,
    ServiceProcess,
    copy_sources,
    dockerfile,
    dockerignored,
    final_stage,
    healthcheck_argv,
    image_entrypoint,
    image_env,
    image_workdir,
    import_guard,
    interpolate,
    interpolate_all,
    load_compose,
    load_manifests,
    local_argv,
    localise_paths,
    localise_urls,
    parse_duration,
    process_env,
    running,
    service_argv,
    service_environment,
)
from tests.servers import PostgresServer, free_port

EXAMPLE = "examples.onboarding"
CRUX_SERVICES = ("migrate", "worker", "beat", "ingress")
LONG_RUNNING = ("worker", "beat", "ingress")
SIGNUP = {
    "email": "u@example.com",
    "name": "Henri",
    "goal": "shipping",
    "checkins": 1,
    "checkin_every": "1s",
}
VERIFIED = {"verified_at": "2026-11-21T10:00:00Z"}
SECRET = "compose-test-signal-key-of-32-bytes-or-more"
# The passwords compose requires (no fallbacks), as an operator's .env would hold them.
PASSWORDS = {
    "POSTGRES_PASSWORD": "pg-test-password",
    "REDIS_BROKER_PASSWORD": "broker-test-password",
    "REDIS_CACHE_PASSWORD": "cache-test-password",
    "REDIS_PUBLISHER_PASSWORD": "publisher-test-password",
}
# What an operator would put in .env: a faster sweep so the test sees beat work quickly.
SHELL = {
    **PASSWORDS,
    "CRUX_SWEEP_INTERVAL": "1s",
    "WORKER_CONCURRENCY": "2",
    "CRUX_SIGNAL_SECRET": SECRET,
}
# A user the test adds to its redis-servers (after the compose file's own) to inspect them.
ADMIN = ("test-admin", "test-admin-password")
_db_numbers = itertools.count(1)


# -- helpers ----------------------------------------------------------------------------------


def settings_kwargs(env: dict[str, str]) -> dict[str, Any]:
    """The CRUX_* variables of ``env`` as Settings keyword arguments."""
    return {k.removeprefix("CRUX_").lower(): v for k, v in env.items() if k.startswith("CRUX_")}


def redis_client(url: str, user: tuple[str, str] | None = None) -> redis.Redis:
    """A client of ``url``; as ``user`` (name, password) when given, else the URL's own."""
    parts = urlsplit(url)
    assert parts.hostname == "127.0.0.1" and parts.port, url  # loopback only
    db = int(parts.path.lstrip("/") or 0)
    name, password = user or (parts.username, parts.password)
    return redis.Redis(
        host=parts.hostname,
        port=parts.port,
        db=db,
        username=name,
        password=password,
        socket_timeout=10,
    )


def wait_for(what: str, check: Any, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"{what}: not within {timeout}s (last: {got!r})"
        time.sleep(0.05)


def wait_status(run: FlowRun, status: str, stack: Stack, timeout: float = 60) -> None:
    def reached() -> bool:
        for p in stack.processes:
            if p.name != "migrate":
                p.assert_running()
        return run.state().status == status

    try:
        wait_for(f"flow {run.flow_id} {status}", reached, timeout)
    except AssertionError as exc:
        logs = "\n".join(p.tail() for p in stack.processes)
        raise AssertionError(f"{exc}; flow is {run.state().status}\n{logs}") from None


class Stack:
    """The compose file's services on this machine: its redis commands, our Postgres."""

    def __init__(self, db_url: str, tmp: Path, shell: dict[str, str]) -> None:
        self.compose = load_compose()
        self.services: dict[str, Any] = self.compose["services"]
        self.shell = shell
        self.tmp = tmp
        self.processes: list[ServiceProcess] = []
        self.guard = import_guard(tmp / "image-site")
        self.urls = {"postgres": db_url}

    def start_redis(self) -> None:
        """Both Redis services, from their compose commands."""
        for name in ("redis-broker", "redis-cache"):
            self.urls[name] = self._start_redis(name)

    def _start_redis(self, name: str) -> str:
        service = self.services[name]
        port = free_port()
        data = self.tmp / name
        data.mkdir()
        # As written, then bound to loopback on a free port in a temp dir (later args win).
        argv = [interpolate(a, self.shell) for a in service["command"]] + [
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(data),
            "--daemonize",
            "no",
            "--logfile",
            str(data / "redis.log"),
            "--user",
            ADMIN[0],
            "on",
            f">{ADMIN[1]}",
            "~*",
            "&*",
            "+@all",
        ]
        proc = ServiceProcess(name, argv, {"PATH": "/usr/local/bin:/usr/bin:/bin"}, self.tmp)
        self.processes.append(proc)
        url = f"redis://127.0.0.1:{port}/0"

        def answers() -> bool:
            proc.assert_running()
            try:
                with redis_client(url) as client:
                    return bool(client.ping())
            except redis.ConnectionError:
                return False

        wait_for(f"{name} answers PING", answers)
        return url

    def env(self, name: str) -> dict[str, str]:
        """The service's environment as written, with loopback URLs for the services."""
        written = service_environment(self.services[name], self.shell)
        env = localise_paths(localise_urls(written, self.urls), self.tmp)
        for key, value in env.items():
            if "://" in value:  # nothing may reach past this machine
                assert urlsplit(value).hostname == "127.0.0.1", f"{name}: {key}={value}"
        return env

    def start(self, name: str) -> ServiceProcess:
        argv = local_argv(service_argv(self.services[name], self.shell))
        proc = ServiceProcess(name, argv, process_env(self.env(name), self.guard), self.tmp)
        self.processes.append(proc)
        return proc

    def migrate(self) -> None:
        proc = self.start("migrate")
        code = proc.wait_exit(timeout=120)
        assert code == 0, proc.tail()

    def app(self, service: str, **overrides: Any) -> Crux:
        """An app in the test process configured exactly like ``service``."""
        return Crux(Settings(**{**settings_kwargs(self.env(service)), **overrides}))

    def grace(self, name: str) -> float:
        return parse_duration(self.services[name].get("stop_grace_period", "10s"))


def onboarding_on(app: Crux) -> FlowHandle[Any]:
    """The example's onboarding flow, defined on ``app`` by importing the module as the
    services do (its ``@flow`` uses the default app, swapped for ``app`` meanwhile)."""
    previous = default_app()
    set_default_app(app)
    try:
        module = sys.modules.get(EXAMPLE)
        module = importlib.reload(module) if module else importlib.import_module(EXAMPLE)
    finally:
        set_default_app(previous)
    handle = module.onboarding
    assert isinstance(handle, FlowHandle) and handle.app is app
    return handle


@pytest.fixture
def empty_db(pg: PostgresServer) -> Iterator[str]:
    """A database with no schema at all, so `migrate` has real work to do."""
    name = f"compose_{next(_db_numbers)}_{uuid.uuid4().hex[:8]}"
    pg.create_database(name)
    yield pg.url(name)
    pg.drop_database(name)


@pytest.fixture
def stack(empty_db: str, tmp_path: Path) -> Iterator[Stack]:
    s = Stack(empty_db, tmp_path, dict(SHELL))
    with running(s.processes):
        s.start_redis()
        yield s


def db_revision(url: str) -> str | None:
    engine = create_engine(url)
    try:
        return current_revision(engine)
    finally:
        engine.dispose()


def db_count(url: str, query: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(text(query)).scalar_one())
    finally:
        engine.dispose()


# -- the services, run ---------------------------------------------------------------------------


def test_compose_migrate_worker_and_beat_run_the_onboarding_flow(stack: Stack) -> None:
    db_url = stack.urls["postgres"]
    assert db_revision(db_url) is None
    stack.migrate()
    assert db_revision(db_url) == head_revision()

    app = stack.app("worker")
    broker = redis_client(stack.urls["redis-broker"], ADMIN)
    cache = redis_client(stack.urls["redis-cache"], ADMIN)
    try:
        onboarding = onboarding_on(app)
        queue = stack.env("worker")["CRUX_QUEUE"]
        # The redis-servers run with the compose file's options: a broker that never
        # evicts and persists, a cache that evicts.
        assert broker.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        assert broker.config_get("appendonly")["appendonly"] == "yes"
        assert cache.config_get("maxmemory-policy")["maxmemory-policy"] == "allkeys-lru"
        assert cache.config_get("appendonly")["appendonly"] == "no"

        # Before any worker: the start message waits in the broker Redis, in the starts'
        # list that KEDA watches ("<queue>:9", below the resumes' "<queue>"), and not in
        # the cache Redis.
        run = onboarding.run(input=SIGNUP)
        assert broker.llen(f"{queue}:9") == 1
        assert not cache.exists(f"{queue}:9")

        worker = stack.start("worker")
        worker.wait_log(b"ready.")
        wait_status(run, "suspended", stack)
        assert broker.llen(queue) == 0 and broker.llen(f"{queue}:9") == 0
        # Step results are cached in the cache Redis, never in the broker's.
        prefix = app.settings.redis_prefix
        # Filled after the commit that made the flow "suspended": waited for, not raced.
        wait_for("step cache keys in the cache Redis", lambda: cache.keys(f"{prefix}:*"), 20)
        assert not broker.keys(f"{prefix}:*")

        stack.start("beat")
        app.signal_flow(run.flow_id, "email-verified", VERIFIED)
        outcome = run.wait(timeout=60)
        assert outcome.status == "completed", outcome
        assert outcome.result["verified_at"] == VERIFIED["verified_at"]
        assert outcome.result["checkins"] == 1

        # Beat sends the sweep on its schedule; a worker runs it and claims the tick.
        wait_for("a sweep tick", lambda: db_count(db_url, "SELECT count(*) FROM crux_sweeps"))

        check = stack.services["worker"]["healthcheck"]
        health = local_argv(healthcheck_argv(stack.services["worker"]))
        worker_env = process_env(stack.env("worker"), stack.guard)
        timeout = parse_duration(check["timeout"])
        done = subprocess.run(
            health, cwd=REPO, env=worker_env, capture_output=True, text=True, timeout=timeout
        )
        assert done.returncode == 0, done.stdout + done.stderr
        # Remote control as shipped: questions answered, orders refused.
        assert app.celery.control.ping(timeout=2.0)
        refused = app.celery.control.pool_shrink(1, reply=True, timeout=2.0)
        assert refused and all("error" in next(iter(r.values())) for r in refused), refused

        # `docker stop`: SIGTERM, a warm shutdown within the grace period.
        for name in ("worker", "beat"):
            proc = next(p for p in stack.processes if p.name == name)
            proc.stop_signal()
            assert proc.wait_exit(timeout=stack.grace(name)) == 0, proc.tail()

        # And the health check notices a worker that is gone.
        done = subprocess.run(
            health, cwd=REPO, env=worker_env, capture_output=True, text=True, timeout=timeout
        )
        assert done.returncode != 0, "health check passed with no worker running"
    finally:
        app.close()
        broker.close()
        cache.close()


def test_compose_ingress_records_published_signals_signed_with_the_shared_secret(
    stack: Stack,
) -> None:
    stack.migrate()
    ingress_env = stack.env("ingress")
    assert ingress_env.get("CRUX_SIGNAL_SECRET") == SECRET  # passed through from .env
    publisher_url = broker_url_as(stack, "publisher")
    starter = stack.app("ingress")
    # Other services publish as the broker's `publisher` user, which may only LPUSH.
    publisher = Crux(Settings(broker_url=publisher_url, signal_secret=SECRET))
    forger = Crux(Settings(broker_url=publisher_url, signal_secret="f" * 32 + "not-the-secret"))
    try:
        onboarding = onboarding_on(starter)
        stack.start("worker").wait_log(b"ready.")
        ingress = stack.start("ingress")
        run = onboarding.run(input=SIGNUP)
        wait_status(run, "suspended", stack)

        db_url = stack.urls["postgres"]
        forger.publish_signal(run.flow_id, "email-verified", VERIFIED)
        wait_for(
            "the forged signal refused",
            lambda: db_count(db_url, "SELECT count(*) FROM crux_rejected_signals"),
        )
        assert run.state().status == "suspended"

        publisher.publish_signal(run.flow_id, "email-verified", VERIFIED)
        outcome = run.wait(timeout=60)
        assert outcome.status == "completed", outcome

        ingress.stop_signal()
        assert ingress.wait_exit(timeout=stack.grace("ingress")) == 0, ingress.tail()
    finally:
        starter.close()
        publisher.close()
        forger.close()


def broker_url_as(stack: Stack, user: str) -> str:
    """The local broker's URL as one of the compose file's broker users."""
    local = urlsplit(stack.urls["redis-broker"])
    password = PASSWORDS[f"REDIS_{'BROKER' if user == 'crux' else user.upper()}_PASSWORD"]
    return local._replace(netloc=f"{user}:{password}@{local.netloc}").geturl()


def test_compose_broker_users_publisher_may_only_push_signals(stack: Stack) -> None:
    signals = Settings.model_fields["signal_queue"].default
    flows_queue = stack.env("worker")["CRUX_QUEUE"]
    with (
        redis_client(broker_url_as(stack, "publisher")) as publisher,
        redis_client(broker_url_as(stack, "crux")) as fleet,
        redis_client(stack.urls["redis-broker"]) as anonymous,
    ):
        assert publisher.lpush(signals, "{}") == 1
        refused = [
            ("LPUSH", flows_queue, "{}"),
            ("LPUSH", f"{flows_queue}:{START_PRIORITY}", "{}"),
            ("RPUSH", signals, "{}"),
            ("LRANGE", signals, "0", "-1"),
            ("RPOP", signals),
            ("DEL", signals),
            ("PUBLISH", "/0.celery.pidbox", "{}"),
            ("KEYS", "*"),
            ("SET", "x", "1"),
            ("FLUSHALL",),
            ("CONFIG", "GET", "*"),
        ]
        for command in refused:
            with pytest.raises(redis.exceptions.NoPermissionError):
                publisher.execute_command(*command)
        # Without a password: PING (the health check), nothing else.
        assert anonymous.ping()
        for command in (("LPUSH", signals, "{}"), ("KEYS", "*"), ("GET", "x")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                anonymous.execute_command(*command)
        # The fleet's user works the queues, but cannot administer or wipe the broker.
        assert fleet.llen(signals) == 1 and fleet.rpop(signals) == b"{}"
        for command in (("CONFIG", "GET", "*"), ("FLUSHALL",), ("SHUTDOWN",), ("ACL", "LIST")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                fleet.execute_command(*command)
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis_client(broker_url_as(stack, "crux").replace("broker-test", "wrong")).ping()
    with redis_client(stack.urls["redis-cache"]) as anonymous_cache:
        assert anonymous_cache.ping()
        with pytest.raises(redis.exceptions.NoPermissionError):
            anonymous_cache.get("x")


def test_compose_requires_every_password() -> None:
    services = load_compose()["services"]
    for missing in PASSWORDS:
        shell = {k: v for k, v in PASSWORDS.items() if k != missing}
        refused = []
        for name, service in services.items():
            try:
                interpolate_all(service, shell)
            except InterpolationError as exc:
                assert missing in str(exc)
                refused.append(name)
        assert refused, f"compose starts without {missing}"
    # No fallback password anywhere in the file.
    text = (REPO / "docker-compose.yml").read_text()
    assert not re.findall(r"\$\{\w*PASSWORD:?-", text)


# -- docker-compose.yml, read -----------------------------------------------------------------


def test_compose_file_shape() -> None:
    compose = load_compose()
    services = compose["services"]
    assert set(services) == {
        "postgres",
        "redis-broker",
        "redis-cache",
        *CRUX_SERVICES,
    }

    # One image, one build, for every crux process.
    images = {
        (str(services[n].get("image")), repr(services[n].get("build"))) for n in CRUX_SERVICES
    }
    assert len(images) == 1, images
    assert all(services[n].get("build") for n in CRUX_SERVICES)

    # Scalable worker, single beat.
    worker, beat = services["worker"], services["beat"]
    assert "container_name" not in worker and "ports" not in worker
    assert beat.get("deploy", {}).get("replicas") == 1
    assert not any("ports" in services[n] for n in CRUX_SERVICES)

    # migrate runs once, first; the others wait for it to succeed.
    assert services["migrate"]["restart"] == "no"
    assert services["migrate"]["command"] == ["db", "upgrade"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in LONG_RUNNING:
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully", name
        assert services[name]["restart"] in ("unless-stopped", "always", "on-failure"), name
        for dep, spec in deps.items():
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], f"{name} waits on {dep}'s health"

    # Health checks where they mean something.
    for name in ("postgres", "redis-broker", "redis-cache", "worker"):
        assert services[name]["healthcheck"]["test"], name
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"]
    for name in ("redis-broker", "redis-cache"):
        assert services[name]["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]

    # The broker must not evict and must persist; the cache may evict.
    def redis_options(name: str) -> dict[str, str]:
        args = services[name]["command"]
        assert args[0] == "redis-server"
        args = args[: args.index("--user")] if "--user" in args else args
        return {k.lstrip("-"): v for k, v in zip(args[1::2], args[2::2], strict=True)}

    broker, cache = redis_options("redis-broker"), redis_options("redis-cache")
    assert broker["maxmemory-policy"] == "noeviction"
    assert broker["appendonly"] == "yes"
    assert any("/data" in v for v in services["redis-broker"]["volumes"])
    assert cache["maxmemory-policy"] in ("allkeys-lru", "allkeys-lfu")
    assert cache.get("appendonly") == "no"

    # Each URL points at the right server.
    env = service_environment(services["worker"], PASSWORDS)
    assert urlsplit(env["CRUX_DATABASE_URL"]).hostname == "postgres"
    assert urlsplit(env["CRUX_BROKER_URL"]).hostname == "redis-broker"
    assert urlsplit(env["CRUX_REDIS_URL"]).hostname == "redis-cache"

    # Every crux service is configured the same way; the signal secret only reaches the
    # ingress (publishers sign with it, the workers never see it).
    for name in CRUX_SERVICES:
        got = service_environment(services[name], {**PASSWORDS, "CRUX_SIGNAL_SECRET": "x"})
        assert (got.pop("CRUX_SIGNAL_SECRET", None) == "x") == (name == "ingress"), name
        assert got == env, name


def test_compose_settings_are_known_and_their_defaults_match_the_code() -> None:
    services = load_compose()["services"]
    for name in CRUX_SERVICES:
        env = service_environment(services[name], {**PASSWORDS, "CRUX_SIGNAL_SECRET": SECRET})
        # Refuses unknown settings and bad values, as every service would at start.
        Settings(**settings_kwargs(env))
    # A compose default that drifted from the code's default would be a silent fork.
    written = services["worker"]["environment"]
    env = service_environment(services["worker"], PASSWORDS)
    defaults = Settings()
    for key, value in written.items():
        if isinstance(value, str) and value.startswith("${" + key + ":-"):
            field = key.removeprefix("CRUX_").lower()
            parsed = getattr(Settings(**{field: env[key]}), field)
            assert parsed == getattr(defaults, field), key
    grace = parse_duration(services["worker"]["stop_grace_period"])
    assert grace < Settings(visibility_timeout=env["CRUX_VISIBILITY_TIMEOUT"]).visibility_timeout
    # Shipped safe: remote control answers questions, takes no orders, and the health
    # check does not need it.
    assert Settings(**settings_kwargs(env)).remote_control == "inspect"
    assert services["worker"]["healthcheck"]["test"][1:3] == ["crux-workers", "health"]
    assert env["CRUX_HEALTH_FILE"].startswith("/tmp/")


def test_compose_commands_are_crux_cli_commands() -> None:
    services = load_compose()["services"]
    commands = set(cli_main.commands)
    for name in CRUX_SERVICES:
        argv = service_argv(services[name], {})
        assert argv[:3] == ["tini", "--", "crux-workers"], argv
        assert argv[3] in commands, f"{name}: no `crux-workers {argv[3]}` command"
        if name != "migrate":
            assert argv[4:6] == ["--import", "examples.onboarding"], argv
        assert (REPO / "examples" / "onboarding.py").exists()


# -- Dockerfile and .dockerignore ---------------------------------------------------------------


def test_dockerfile_builds_a_non_root_image_with_the_examples() -> None:
    instructions = dockerfile()
    froms = [i.args for i in instructions if i.keyword == "FROM"]
    assert froms and all(f.startswith("python:3.11-slim") for f in froms), froms

    runtime = final_stage()
    user = [i.args for i in runtime if i.keyword == "USER"]
    assert user and user[-1].split(":")[0] not in ("root", "0"), user
    assert image_entrypoint()[-1] == "crux-workers"
    assert image_workdir() == "/app"
    assert image_env()["PYTHONPATH"] == "/app"
    assert "examples" in copy_sources(runtime)

    # The wheel is built from what pyproject.toml needs, all of it in the context.
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    sources = copy_sources(instructions)
    for needed in ("pyproject.toml", project["readme"], "crux_workers"):
        assert needed in sources, f"the build does not copy {needed}"
    for src in sources:
        assert (REPO / src).exists(), f"COPY {src}: not in the repository"
        assert not dockerignored(src), f"COPY {src}: left out by .dockerignore"

    tracked = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "crux_workers", "examples"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert tracked
    assert not [p for p in tracked if dockerignored(p) and not p.endswith((".pyc", ".pyo"))]
    for heavy in (".git/HEAD", ".venv/bin/python", "tests/conftest.py", ".env"):
        assert dockerignored(heavy), heavy


# -- deploy/ (Kubernetes) -----------------------------------------------------------------------


def _by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _crux_containers(docs: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for d in docs:
        if d["kind"] in ("Deployment", "Job", "StatefulSet"):
            for c in d["spec"]["template"]["spec"]["containers"]:
                if str(c["image"]).startswith("crux-workers"):
                    out.append((d["metadata"]["name"], c))
    return out


def test_kubernetes_manifests_are_consistent() -> None:
    manifests = load_manifests()
    assert manifests, "no manifests under deploy/"
    docs = [d for file_docs in manifests.values() for d in file_docs]
    for path, file_docs in manifests.items():
        for d in file_docs:
            assert {"apiVersion", "kind"} <= set(d), path
            assert "namespace" not in d.get("metadata", {}), f"{path}: pins a namespace"
            assert "namespace" not in d, f"{path}: pins a namespace"
            if d["kind"] != "Kustomization":
                assert d["metadata"]["name"], path

    # Every manifest is listed by a kustomization, and every listed file exists.
    listed: set[Path] = set()
    for path, file_docs in manifests.items():
        for d in file_docs:
            if d["kind"] == "Kustomization":
                for res in d.get("resources", []):
                    assert (path.parent / res).exists(), f"{path}: {res} missing"
                    listed.add((path.parent / res).resolve())
    for path, file_docs in manifests.items():
        if any(d["kind"] != "Kustomization" for d in file_docs):
            assert path.resolve() in listed, f"{path} is in no kustomization"

    config = _by_kind(docs, "ConfigMap")["crux-config"]["data"]
    secret = _by_kind(docs, "Secret")["crux-secrets"]["stringData"]
    # As shipped, the placeholders are refused at start: every process would stop there.
    with pytest.raises(ConfigurationError):
        Settings(**settings_kwargs({**config, **secret}))
    for key in ("CRUX_DATABASE_URL", "CRUX_BROKER_URL", "CRUX_REDIS_URL", "CRUX_SIGNAL_SECRET"):
        with pytest.raises(ConfigurationError):
            Settings(**settings_kwargs({**config, key: secret[key]}))
    settings = Settings(**settings_kwargs({**config, **replace_placeholders(secret)}))
    module = config["APP_MODULE"]
    assert (REPO / (module.replace(".", "/") + ".py")).exists(), module
    assert set(secret) == {
        "CRUX_DATABASE_URL",
        "CRUX_BROKER_URL",
        "CRUX_REDIS_URL",
        "CRUX_SIGNAL_SECRET",
    }
    assert not [k for k in config if "PASSWORD" in k or "SECRET" in k or "_URL" in k]
    # Shipped safe: remote control takes no orders; the probes read the heartbeat file.
    assert settings.remote_control == "inspect" and config["CRUX_REMOTE_CONTROL"] == "inspect"
    assert (settings.health_file or "").startswith("/tmp/")
    # Every Redis URL logs in as the fleet's user of that server's ACL file.
    acl = _by_kind(docs, "Secret")["crux-redis-acl"]["stringData"]
    for key, file in (("CRUX_BROKER_URL", "broker.acl"), ("CRUX_REDIS_URL", "cache.acl")):
        url = urlsplit(secret[key])
        assert f"user {url.username} on >{url.password} " in acl[file], key

    deployments = _by_kind(docs, "Deployment")
    worker = deployments["crux-worker"]
    beat = deployments["crux-beat"]
    assert "crux-ingress" in deployments
    assert beat["spec"]["replicas"] == 1
    assert beat["spec"]["strategy"]["type"] == "Recreate"

    # Every crux container: one image, its entrypoint kept, a real CLI command.
    containers = _crux_containers(docs)
    assert {name for name, _ in containers} >= {
        "crux-worker",
        "crux-beat",
        "crux-ingress",
        "crux-migrate",
    }
    assert len({c["image"] for _, c in containers}) == 1
    commands = set(cli_main.commands)
    configmaps = _by_kind(docs, "ConfigMap")
    for name, c in containers:
        assert "command" not in c, f"{name} overrides the image's entrypoint"
        # Kubernetes leaves an unresolvable $(VAR) in args as it is: it must be defined.
        defined = {e["name"] for e in c.get("env", [])}
        for source in c.get("envFrom", []):
            defined |= set(configmaps[source["configMapRef"]["name"]]["data"])
        for var in re.findall(r"\$\((\w+)\)", " ".join(c["args"])):
            assert var in defined, f"{name}: $({var}) is not in its environment"
        assert c["args"][0] in commands, f"{name}: no `crux-workers {c['args'][0]}` command"
        crux_env = [e["name"] for e in c.get("env", []) if e["name"].startswith("CRUX_")]
        for var in crux_env:
            assert var.removeprefix("CRUX_").lower() in Settings.model_fields, var
        signs = "CRUX_SIGNAL_SECRET" in crux_env
        assert signs == (name == "crux-ingress"), f"{name}: signal secret where not needed"
    job = _by_kind(docs, "Job")["crux-migrate"]
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == ["db", "upgrade"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] in ("Never", "OnFailure")

    # Graceful termination: longer than a step, shorter than broker redelivery.
    pod = worker["spec"]["template"]["spec"]
    grace = pod["terminationGracePeriodSeconds"]
    assert 60 <= grace < settings.visibility_timeout
    (wc,) = pod["containers"]
    assert wc["resources"]["requests"] and wc["resources"]["limits"]["memory"]
    # The probe is the compose file's health check, which the compose test runs.
    compose_check = load_compose()["services"]["worker"]["healthcheck"]["test"]
    assert wc["livenessProbe"]["exec"]["command"] == compose_check[1:]
    assert wc["startupProbe"]["exec"]["command"] == compose_check[1:]
    assert pod["securityContext"]["runAsNonRoot"] is True

    # KEDA scales the worker Deployment on the length of the flow queue's Redis list.
    (scaled,) = _by_kind(docs, "ScaledObject").values()
    (auth,) = _by_kind(docs, "TriggerAuthentication").values()
    keda = _by_kind(docs, "Secret")[auth["spec"]["secretTargetRef"][0]["name"]]["stringData"]
    assert f"user {keda['username']} on >{keda['password']} " in acl["broker.acl"]
    for trigger in scaled["spec"]["triggers"]:
        assert trigger["authenticationRef"]["name"] == auth["metadata"]["name"]
    assert scaled["spec"]["scaleTargetRef"]["name"] == "crux-worker"
    assert scaled["spec"]["scaleTargetRef"].get("kind", "Deployment") == "Deployment"
    assert scaled["spec"]["minReplicaCount"] >= 1
    # Two lists: resumes in "<queue>", starts (a lower priority) in "<queue>:9".
    triggers = scaled["spec"]["triggers"]
    default_queue = Settings.model_fields["queue"].default
    assert settings.queue == default_queue
    assert sorted(t["metadata"]["listName"] for t in triggers) == [
        default_queue,
        f"{default_queue}:{START_PRIORITY}",
    ]
    broker = urlsplit(settings.effective_broker_url or "")
    for trigger in triggers:
        meta = trigger["metadata"]
        assert trigger["type"] == "redis"
        assert meta["databaseIndex"] == (broker.path.lstrip("/") or "0")
        host, _, port = meta["address"].rpartition(":")
        # KEDA dials from its own namespace: the broker's Service name, fully qualified.
        assert host.startswith(f"{broker.hostname}.") and host.endswith(".svc.cluster.local")
        assert int(port) == (broker.port or 6379)

    # The broker Redis must not evict and must persist; the cache may evict.
    services = _by_kind(docs, "Service")
    assert {broker.hostname, urlsplit(settings.redis_url or "").hostname} <= set(services)
    redis_conf = {
        name: data["redis.conf"]
        for name, data in ((n, cm["data"]) for n, cm in _by_kind(docs, "ConfigMap").items())
        if "redis.conf" in data
    }
    broker_conf = redis_conf[f"{broker.hostname}"]
    cache_conf = redis_conf[f"{urlsplit(settings.redis_url or '').hostname}"]
    assert "maxmemory-policy noeviction" in broker_conf
    assert "appendonly yes" in broker_conf
    assert "maxmemory-policy allkeys-lru" in cache_conf
    assert _by_kind(docs, "StatefulSet")[f"{broker.hostname}"]["spec"]["volumeClaimTemplates"]

    # NetworkPolicy: nothing may connect to the crux processes; each Redis admits only
    # the fleet (and, for the broker, labelled publishers and KEDA).
    policies = _by_kind(docs, "NetworkPolicy")
    for workload in [*deployments.values(), *_by_kind(docs, "StatefulSet").values(), job]:
        labels = workload["spec"]["template"]["metadata"]["labels"]
        covering = [p for p in policies.values() if selects(p["spec"]["podSelector"], labels)]
        assert covering, f"{workload['metadata']['name']}: no NetworkPolicy selects it"
        component = labels["app.kubernetes.io/component"]
        for policy in covering:
            assert policy["spec"]["policyTypes"] == ["Ingress"]
            sources = [s for rule in policy["spec"]["ingress"] for s in rule["from"]]
            if component in ("worker", "beat", "ingress", "migrate"):
                assert sources == [], component
            elif component == "metrics":
                # The exporter is scraped from the monitoring namespace, nothing else.
                assert sources and all("namespaceSelector" in s for s in sources), component
            else:
                local = [s["podSelector"] for s in sources if "namespaceSelector" not in s]

                def admits(component: str, local: list[dict[str, Any]] = local) -> bool:
                    labels = {"app.kubernetes.io/name": "crux-workers"}
                    labels["app.kubernetes.io/component"] = component
                    return any(selects(sel, labels) for sel in local)

                assert admits("worker") and admits("ingress"), component
                assert not admits("migrate") and not admits("redis-cache"), component
                if component == "redis-cache":
                    assert all("namespaceSelector" not in s for s in sources)


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Whether a Kubernetes label selector matches ``labels`` (In/NotIn/Exists only)."""
    for key, value in selector.get("matchLabels", {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions", []):
        key, op = expr["key"], expr["operator"]
        if op == "In" and labels.get(key) not in expr["values"]:
            return False
        if op == "NotIn" and labels.get(key) in expr["values"]:
            return False
        if op == "Exists" and key not in labels:
            return False
    return True


def replace_placeholders(values: dict[str, str]) -> dict[str, str]:
    """What an operator does before the first apply: a real value for each CHANGE-ME."""
    return {k: v.replace("CHANGE-ME", "Real-Value-0f-the-operator") for k, v in values.items()}


def test_kubernetes_redis_configs_are_accepted_by_redis_server(tmp_path: Path) -> None:
    docs = [d for file_docs in load_manifests().values() for d in file_docs]
    confs = {
        name: cm["data"]["redis.conf"]
        for name, cm in _by_kind(docs, "ConfigMap").items()
        if "redis.conf" in cm.get("data", {})
    }
    want = {
        "crux-redis-broker": {"maxmemory-policy": "noeviction", "appendonly": "yes"},
        "crux-redis-cache": {"maxmemory-policy": "allkeys-lru", "appendonly": "no"},
    }
    assert set(confs) == set(want)
    acls = _by_kind(docs, "Secret")["crux-redis-acl"]["stringData"]
    assert all("aclfile /etc/redis-acl/users.acl" in conf for conf in confs.values())
    procs: list[ServiceProcess] = []
    with running(procs):
        for name, conf in confs.items():
            data = tmp_path / name
            data.mkdir()
            acl_file = data / "users.acl"
            acl_file.write_text(
                replace_placeholders(acls)[f"{name.removeprefix('crux-redis-')}.acl"]
            )
            (data / "redis.conf").write_text(
                conf.replace("aclfile /etc/redis-acl/users.acl", f"aclfile {acl_file}")
            )
            port = free_port()
            argv = ["redis-server", str(data / "redis.conf"), "--port", str(port)]
            argv += ["--bind", "127.0.0.1", "--dir", str(data), "--daemonize", "no"]
            # An ACL file excludes --user: the test's admin is added to it instead.
            with acl_file.open("a") as f:
                f.write(f"user {ADMIN[0]} on >{ADMIN[1]} ~* &* +@all\n")
            proc = ServiceProcess(name, argv, {"PATH": "/usr/local/bin:/usr/bin:/bin"}, tmp_path)
            procs.append(proc)
            url = f"redis://127.0.0.1:{port}/0"

            def answers(proc: ServiceProcess = proc, url: str = url) -> bool:
                proc.assert_running()
                try:
                    with redis_client(url) as client:
                        return bool(client.ping())
                except redis.ConnectionError:
                    return False

            wait_for(f"{name} answers PING", answers)
            users = {
                line.split()[1]: line.split()[3].removeprefix(">")
                for line in replace_placeholders(acls)[
                    f"{name.removeprefix('crux-redis-')}.acl"
                ].splitlines()
                if line.startswith("user ") and line.split()[3].startswith(">")
            }
            with redis_client(url, ("crux", users["crux"])) as client:
                assert client.set("x", "1") and client.get("x") == b"1"
                with pytest.raises(redis.exceptions.NoPermissionError):
                    client.config_get("maxmemory-policy")
            with redis_client(url) as anonymous:
                assert anonymous.ping()
                with pytest.raises(redis.exceptions.NoPermissionError):
                    anonymous.get("x")
            if name == "crux-redis-broker":
                with redis_client(url, ("publisher", users["publisher"])) as publisher:
                    assert publisher.lpush("crux.signals", "{}") == 1
                    for command in (
                        ("LPUSH", "crux", "{}"),
                        ("LLEN", "crux.signals"),
                        ("KEYS", "*"),
                    ):
                        with pytest.raises(redis.exceptions.NoPermissionError):
                            publisher.execute_command(*command)
                with redis_client(url, ("keda", users["keda"])) as keda:
                    assert keda.llen("crux") == 0 and keda.llen("crux:9") == 0
                    with pytest.raises(redis.exceptions.NoPermissionError):
                        keda.llen("crux.signals")
                    with pytest.raises(redis.exceptions.NoPermissionError):
                        keda.lpush("crux", "{}")
            with redis_client(url, ADMIN) as client:
                for key, value in want[name].items():
                    assert client.config_get(key)[key] == value, (name, key)
