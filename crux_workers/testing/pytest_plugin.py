"""The pytest plugin (entry point ``pytest11``): a ``flow_env`` fixture.

Installed with crux_workers, so any project's tests can ask for it::

    def test_signup_expires(flow_env):
        run = flow_env.start(onboarding, input={...})
        flow_env.advance("24h")
        assert run.outcome().status == "expired"
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ._env import FlowEnvironment


@pytest.fixture
def flow_env() -> Iterator[FlowEnvironment]:
    """A fresh ``FlowEnvironment``: in-memory record, virtual clock, no servers."""
    with FlowEnvironment() as env:
        yield env
