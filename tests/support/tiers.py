"""The test tiers, their markers, and the guard that keeps servers out of the fast tier.

Every test gets the marker of its directory (``unit``, ``integration`` or ``faults``).
``servers`` goes to every integration and fault test and to any test, wherever it lives,
whose fixtures include a server; ``pytest -m "not servers"`` is therefore the tier that
needs no Postgres, no Redis and no worker process. The server fixtures start lazily, for
the first test that asks; a test that starts one without being in the ``servers`` tier
(through a ``request.getfixturevalue`` the markers cannot see) fails, and so does any
test in ``tests/unit`` that asks for a server. A new fixture that starts a server belongs
in ``SERVER_FIXTURES``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent.parent

UNIT = "unit"
INTEGRATION = "integration"
FAULTS = "faults"
SERVERS = "servers"

# The directory under tests/ that gives a test its tier.
TIER_BY_DIRECTORY = {"unit": UNIT, "integration": INTEGRATION, "faults": FAULTS}
# Tiers whose tests may start servers and worker processes, fixture or not.
SERVER_TIERS = frozenset({INTEGRATION, FAULTS})
# The fixtures that start a server; every other server fixture depends on one of them.
SERVER_FIXTURES = frozenset({"pg", "redis_server", "fault_pg", "fault_redis"})

_running: list[pytest.Item] = []
_refused: dict[str, str] = {}  # test node id -> why it may not start the server it did


def tier_of(path: Path) -> str | None:
    """The tier of a test file, from its directory under tests/ (None: no tier)."""
    try:
        parts = Path(path).resolve().relative_to(TESTS_DIR).parts
    except ValueError:
        return None
    return TIER_BY_DIRECTORY.get(parts[0]) if len(parts) > 1 else None


def mark(items: Iterable[pytest.Item]) -> None:
    """Give every collected test its tier marker and, where it needs them, ``servers``."""
    for item in items:
        tier = tier_of(item.path)
        if tier is not None:
            item.add_marker(tier)
        fixtures = set(getattr(item, "fixturenames", ()))
        if tier in SERVER_TIERS or fixtures & SERVER_FIXTURES:
            item.add_marker(SERVERS)


@contextmanager
def running(item: pytest.Item) -> Iterator[None]:
    """Remember which test runs (setup, call, teardown), for ``note_setup``."""
    _running.append(item)
    try:
        yield
    finally:
        _running.pop()


def note_setup(fixture: str) -> None:
    """Remember it if the running test starts a server it may not start."""
    reason = refusal(fixture)
    if reason is not None and _running:
        _refused.setdefault(_running[-1].nodeid, reason)


def fail_if_refused(item: pytest.Item) -> None:
    """Fail ``item`` if it started a server it may not start.

    The server has started by then: failing inside the fixture instead would make pytest
    hand that failure, cached with the session fixture, to every later test that asks.
    """
    reason = _refused.pop(item.nodeid, None)
    if item.get_closest_marker(UNIT) and item.get_closest_marker(SERVERS):
        reason = f"{item.nodeid} asks for a server, but tests/unit runs without servers"
    if reason is not None:
        pytest.fail(reason, pytrace=False)


def refusal(fixture: str) -> str | None:
    """Why the running test may not start the server ``fixture`` (None: it may)."""
    if fixture not in SERVER_FIXTURES or not _running:
        return None
    item = _running[-1]
    if item.get_closest_marker(UNIT) is not None:
        return (
            f"{item.nodeid} starts a server ({fixture}), but tests/unit runs without "
            "servers: move the test to tests/integration"
        )
    if item.get_closest_marker(SERVERS) is None:
        return (
            f"{item.nodeid} starts a server ({fixture}) without the 'servers' marker: ask "
            "for the fixture as an argument, or mark the test @pytest.mark.servers"
        )
    return None
