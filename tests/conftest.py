"""Fixtures for tests that need the real Postgres and Redis of tests/servers.py.

The servers start lazily, for the first test that asks for them, so unit tests run without.
"""

from __future__ import annotations

import importlib
import itertools
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from tests.servers import TMP_ROOT, PostgresServer, RedisServer, ServerError, free_port

TEMPLATE_DB = "crux_template"
REDIS_DATABASES = 1024  # matches --databases in RedisServer

_pg_db_numbers = itertools.count(1)
# Database 0 stays unused; after 1023 tests the numbers come round again (each is flushed).
_redis_db_numbers = itertools.cycle(range(1, REDIS_DATABASES))


def _fail_start(what: str, exc: BaseException) -> NoReturn:
    message = f"could not start the test {what} server: {exc}"
    if os.environ.get("CI") != "true":
        message += (
            "\nRun the tests with scripts/test.sh: it installs redis-server and PostgreSQL 15 "
            "and creates the postgres user when they are missing."
        )
    pytest.fail(message, pytrace=False)


def _make_base_dir(prefix: str) -> Path:
    # Under /tmp and world-traversable: as root, Postgres runs as the postgres user.
    base = Path(tempfile.mkdtemp(prefix=prefix, dir=TMP_ROOT))
    base.chmod(0o755)
    return base


def _run_schema_hook(url: str) -> None:
    """Call ``tests.schema_hook.prepare_template(url)`` if that module and function exist."""
    try:
        module = importlib.import_module("tests.schema_hook")
    except ModuleNotFoundError as exc:
        if exc.name in ("tests", "tests.schema_hook"):
            return
        raise
    prepare_template = getattr(module, "prepare_template", None)
    if prepare_template is not None:
        prepare_template(url)


@pytest.fixture(scope="session")
def pg() -> Iterator[PostgresServer]:
    """The session's Postgres server, with the empty (or hook-prepared) template database."""
    base = _make_base_dir("crux-pg-")
    server = PostgresServer(base / "pg", free_port())
    try:
        try:
            server.start()
        except (ServerError, OSError) as exc:
            _fail_start("PostgreSQL", exc)
        server.create_database(TEMPLATE_DB)
        _run_schema_hook(server.url(TEMPLATE_DB))
        # A session left open on the template would make every copy of it fail.
        server.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            params=[TEMPLATE_DB],
        )
        yield server
    finally:
        try:
            server.stop()
        except ServerError:
            server.kill()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """The session's Redis server (1024 databases, no persistence)."""
    base = _make_base_dir("crux-redis-")
    server = RedisServer(base, free_port())
    try:
        try:
            server.start()
        except (ServerError, OSError) as exc:
            _fail_start("Redis", exc)
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def pg_url(pg: PostgresServer, request: pytest.FixtureRequest) -> Iterator[str]:
    """SQLAlchemy URL of a fresh copy of the template database, dropped after the test."""
    slug = re.sub(r"[^a-z0-9_]+", "_", request.node.name.lower()).strip("_")
    name = f"t{next(_pg_db_numbers)}_{slug}"[:63]
    pg.create_database(name, template=TEMPLATE_DB)
    yield pg.url(name)
    pg.drop_database(name)


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of a Redis database (1..1023) that no other recent test uses, emptied first."""
    db = next(_redis_db_numbers)
    with redis_server.client(db) as client:
        client.flushdb()
    return redis_server.url(db)
