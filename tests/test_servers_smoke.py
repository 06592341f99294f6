"""Smoke tests for the Postgres and Redis test servers and their fixtures."""

from __future__ import annotations

import psycopg
import pytest
import redis

from tests.servers import PostgresServer, RedisServer

pytestmark = pytest.mark.servers


def _dsn(pg_url: str) -> str:
    # pg_url is a SQLAlchemy URL; psycopg wants plain libpq syntax.
    return pg_url.replace("postgresql+psycopg://", "postgresql://", 1)


def test_postgres_roundtrip(pg_url: str) -> None:
    with psycopg.connect(_dsn(pg_url), autocommit=True) as conn:
        conn.execute("CREATE TABLE flows (id int PRIMARY KEY, name text NOT NULL)")
        conn.execute("INSERT INTO flows VALUES (1, 'one'), (2, 'two')")
        rows = conn.execute("SELECT id, name FROM flows ORDER BY id").fetchall()
    assert rows == [(1, "one"), (2, "two")]


def test_redis_roundtrip(redis_url: str) -> None:
    with redis.Redis.from_url(redis_url) as client:
        client.set("greeting", "hello")
        assert client.get("greeting") == b"hello"


_seen_urls: list[str] = []


@pytest.mark.parametrize("run", [1, 2])
def test_each_test_gets_its_own_databases(run: int, pg_url: str, redis_url: str) -> None:
    assert pg_url not in _seen_urls
    assert redis_url not in _seen_urls
    _seen_urls.extend([pg_url, redis_url])
    with psycopg.connect(_dsn(pg_url), autocommit=True) as conn:
        row = conn.execute("SELECT to_regclass('public.marker') IS NULL").fetchone()
        assert row == (True,), "another test's table leaked into this database"
        conn.execute("CREATE TABLE marker (run int)")
    with redis.Redis.from_url(redis_url) as client:
        assert client.dbsize() == 0
        client.set("marker", run)


def test_postgres_restart_keeps_data(pg: PostgresServer, pg_url: str) -> None:
    with psycopg.connect(_dsn(pg_url), autocommit=True) as conn:
        conn.execute("CREATE TABLE durable (value text)")
        conn.execute("INSERT INTO durable VALUES ('survives')")
    pg.restart()
    with psycopg.connect(_dsn(pg_url)) as conn:
        assert conn.execute("SELECT value FROM durable").fetchall() == [("survives",)]


def test_postgres_kill_then_start_recovers_committed_data(pg: PostgresServer, pg_url: str) -> None:
    with psycopg.connect(_dsn(pg_url), autocommit=True) as conn:
        conn.execute("CREATE TABLE durable (value text)")
        conn.execute("INSERT INTO durable VALUES ('committed')")
    pg.kill()
    assert pg.postmaster_pid() is None
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(_dsn(pg_url), connect_timeout=2).close()
    pg.start()
    with psycopg.connect(_dsn(pg_url)) as conn:
        assert conn.execute("SELECT value FROM durable").fetchall() == [("committed",)]


def test_redis_restart_loses_data(redis_server: RedisServer, redis_url: str) -> None:
    with redis.Redis.from_url(redis_url) as client:
        client.set("ephemeral", "gone soon")
    redis_server.restart()
    with redis.Redis.from_url(redis_url) as client:
        assert client.get("ephemeral") is None
        client.set("after", "restart")
        assert client.get("after") == b"restart"
