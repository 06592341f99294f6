"""The one Redis server fixture body, and the database numbers tests share on the session's.

The session runs one server for every test (each test gets its own database number,
emptied first); a fault test runs its own (``fault_redis``), which it may kill or restart.
Neither persists anything: a restart loses every key.
"""

from __future__ import annotations

import itertools
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.servers import RedisServer, ServerError, free_port
from tests.support.start import base_dir, fail_start

DATABASES = 1024  # matches --databases in RedisServer
# Database 0 stays unused; after 1023 tests the numbers come round again (each is flushed).
_db_numbers = itertools.cycle(range(1, DATABASES))


@contextmanager
def server(where: Path | None = None, what: str = "Redis") -> Iterator[RedisServer]:
    """Start a Redis in ``where`` (default: a new dir under /tmp, removed after); stop it after."""
    base = where if where is not None else base_dir("crux-redis-")
    redis = RedisServer(base, free_port())
    try:
        try:
            redis.start()
        except (ServerError, OSError) as exc:
            fail_start(what, exc)
        yield redis
    finally:
        redis.stop()
        if where is None:
            shutil.rmtree(base, ignore_errors=True)


def fresh_database(redis: RedisServer) -> str:
    """URL of a database (1..1023) that no other recent test uses, emptied first."""
    db = next(_db_numbers)
    with redis.client(db) as client:
        client.flushdb()
    return redis.url(db)
