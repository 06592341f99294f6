"""Fixtures for the session's real Postgres and Redis; the shared hooks are a plugin.

The servers start lazily, for the first test that asks for them, so the tier without
servers (``pytest -m "not servers"``, see docs/development.md) starts none. The fixture bodies
live in tests/support (postgres.py, redis.py), the markers and hooks in tiers.py and
plugin.py there.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.servers import PostgresServer, RedisServer
from tests.support import postgres, redis

pytest_plugins = ["tests.support.plugin"]


@pytest.fixture(scope="session")
def pg() -> Iterator[PostgresServer]:
    """The session's Postgres server, with the empty (or hook-prepared) template database."""
    with postgres.cluster(postgres.SESSION) as server:
        yield server


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """The session's Redis server (1024 databases, no persistence)."""
    with redis.server() as server:
        yield server


@pytest.fixture
def pg_url(pg: PostgresServer, request: pytest.FixtureRequest) -> Iterator[str]:
    """SQLAlchemy URL of a fresh copy of the template database, dropped after the test."""
    with postgres.database(pg, postgres.SESSION, request.node.name) as name:
        yield pg.url(name)


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of a Redis database (1..1023) that no other recent test uses, emptied first."""
    return redis.fresh_database(redis_server)
