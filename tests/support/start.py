"""What every test server start shares: a base dir under /tmp and a clear failure."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import NoReturn

import pytest

from tests.servers import TMP_ROOT


def base_dir(prefix: str) -> Path:
    """A fresh directory under /tmp, world-traversable: as root, Postgres runs as postgres."""
    base = Path(tempfile.mkdtemp(prefix=prefix, dir=TMP_ROOT))
    base.chmod(0o755)
    return base


def fail_start(what: str, exc: BaseException) -> NoReturn:
    """Fail the test with the reason ``what`` did not start, and (outside CI) the remedy."""
    message = f"could not start the test {what} server: {exc}"
    if os.environ.get("CI") != "true":
        message += (
            "\nRun the tests with scripts/test.sh: it installs redis-server and PostgreSQL 15 "
            "and creates the postgres user when they are missing."
        )
    pytest.fail(message, pytrace=False)
