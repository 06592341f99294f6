"""The integration tier: a fleet on the session's Postgres and Redis (tests/support/fleet.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.fleet import Fleet


@pytest.fixture
def fleet(pg_url: str, redis_url: str, tmp_path: Path) -> Iterator[Fleet]:
    f = Fleet(pg_url, redis_url, tmp_path)
    try:
        yield f
    finally:
        f.close()
