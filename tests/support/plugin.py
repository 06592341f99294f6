"""The hooks every tier shares, loaded by tests/conftest.py (``pytest_plugins``).

A plugin rather than conftest hooks: pytest calls a conftest's ``pytest_fixture_setup``
only for the fixtures of tests below it, never for the session-scoped ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.support import report, tiers


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    tiers.mark(items)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[Any]:
    with tiers.running(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef[Any]) -> Iterator[Any]:
    tiers.note_setup(fixturedef.argname)
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    tiers.fail_if_refused(item)  # a server its fixtures started
    yield
    tiers.fail_if_refused(item)  # a server the test body asked for


def pytest_terminal_summary(terminalreporter: Any) -> None:
    report.terminal_summary(terminalreporter)
