"""The schema: migrations equal the declared tables, and concurrent upgrades are safe."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from crux_workers._store._migrate import current_revision, head_revision, upgrade
from crux_workers._store._schema import metadata
from crux_workers._store._sql import make_engine
from tests.servers import PostgresServer
from tests.workers import REPO

_numbers = itertools.count()


@pytest.fixture
def empty_pg(pg: PostgresServer) -> Iterator[str]:
    name = f"empty_{os.getpid()}_{next(_numbers)}"
    pg.create_database(name)
    yield pg.url(name)
    pg.drop_database(name)


@pytest.mark.parametrize("backend", ["postgres", "sqlite"])
def test_upgrade_head_equals_the_declared_metadata(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    url = (
        request.getfixturevalue("empty_pg")
        if backend == "postgres"
        else f"sqlite:///{tmp_path}/m.db"
    )
    engine = make_engine(url)
    try:
        upgrade(engine)
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), metadata)
        assert diff == []
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()


def test_workers_upgrading_at_once_do_not_race(empty_pg: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRUX_")}
    env.update(CRUX_DATABASE_URL=empty_pg, PYTHONPATH=str(REPO))
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "crux_workers", "db", "upgrade"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for _ in range(5)
    ]
    outputs = [p.communicate(timeout=120)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0] * 5, outputs
    assert all(f"at revision {head_revision()}" in out for out in outputs)
    engine = make_engine(empty_pg)
    try:
        assert current_revision(engine) == head_revision()
    finally:
        engine.dispose()


def test_db_upgrade_names_an_unreachable_database_without_its_password() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRUX_")}
    env.update(
        CRUX_DATABASE_URL="postgresql+psycopg://crux:hunter2@127.0.0.1:1/crux",
        PYTHONPATH=str(REPO),
    )
    done = subprocess.run(
        [sys.executable, "-m", "crux_workers", "db", "upgrade"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "127.0.0.1:1/crux" in done.stderr
    assert "hunter2" not in done.stderr + done.stdout
