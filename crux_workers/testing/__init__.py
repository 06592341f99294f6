"""Testing users' flows: virtual time, crash injection, and a replay check before deploys.

- ``FlowEnvironment``: run flows in-process on a virtual clock (``flow_env`` in pytest).
- ``crash_test``: kill a flow at every checkpoint boundary and compare the outcomes.
- ``check_flows`` / ``check_history``: replay recorded flows against the code as it is
  now (``crux-workers check``).

See docs/testing.md.
"""

from __future__ import annotations

from ._base import AdvanceReport, SimulatedCrash, TestingError, TimePoint, VirtualClock
from ._check import CheckReport, History, check_flows, check_history, export_history
from ._crash import crash_test
from ._crash_report import CrashReport, CrashRun
from ._env import EnvFlowRun, FlowEnvironment
from ._replay import Problem
from ._transport import PendingTask

__all__ = [
    "AdvanceReport",
    "CheckReport",
    "CrashReport",
    "CrashRun",
    "EnvFlowRun",
    "FlowEnvironment",
    "History",
    "PendingTask",
    "Problem",
    "SimulatedCrash",
    "TestingError",
    "TimePoint",
    "VirtualClock",
    "check_flows",
    "check_history",
    "crash_test",
    "export_history",
]
