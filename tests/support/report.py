"""The figures a fault test reports: on its line, in its test report, in the summary."""

from __future__ import annotations

from typing import Any

import pytest

_FIGURES: list[str] = []


def report(request: pytest.FixtureRequest, name: str, **figures: Any) -> str:
    """Print a one-line summary of a test's figures and attach them to the test report.

    The lines are also repeated in the terminal summary, so they show without ``-s``.
    """
    for key, value in figures.items():
        request.node.user_properties.append((key, value))
    line = f"[faults] {name}: " + " ".join(f"{k}={v}" for k, v in figures.items())
    print("\n" + line)
    _FIGURES.append(line)
    return line


def terminal_summary(terminalreporter: Any) -> None:
    """Repeat the figures lines of this run's fault tests at the end of the terminal output."""
    if _FIGURES:
        terminalreporter.section("fault test figures")
        for line in _FIGURES:
            terminalreporter.write_line(line)
