"""The fault tier's fixtures: its own Postgres and Redis (its tests kill and restart them).

The session servers of tests/conftest.py are shared with every other test and must stay
up, so the fault tests never touch them: one Postgres cluster serves this package (a fresh
database per test, copied from a template holding the schema), and each test gets its own
Redis, started without persistence. The fleet, the effects, the audit and the figures are
in tests/support (fleet.py, effects.py, audit.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import PostgresServer, RedisServer
from tests.support import postgres, redis
from tests.support.fleet import FaultFleet


@pytest.fixture(scope="package")
def fault_pg() -> Iterator[PostgresServer]:
    """A Postgres cluster for this package only: tests may restart or kill it."""
    with postgres.cluster(postgres.FAULTS) as server:
        yield server


@pytest.fixture
def fault_db(fault_pg: PostgresServer, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh database with the schema; the cluster is (re)started if a test left it down."""
    with postgres.database(fault_pg, postgres.FAULTS, request.node.name) as name:
        yield name


@pytest.fixture
def fault_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test only, without persistence: a restart loses everything."""
    with redis.server(tmp_path / "redis", "fault tier's Redis") as server:
        yield server


@pytest.fixture
def fleet(
    fault_pg: PostgresServer, fault_db: str, fault_redis: RedisServer, tmp_path: Path
) -> Iterator[FaultFleet]:
    f = FaultFleet(fault_pg, fault_db, fault_redis, tmp_path)
    try:
        yield f
    finally:
        f.close()
