"""The engine and the flow context stay free of drivers and transports."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

FORBIDDEN = ("sqlalchemy", "alembic", "celery", "kombu", "redis", "psycopg")


def _loaded_after(code: str) -> list[str]:
    probe = (
        f"{code}\nimport json, sys\n"
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    return list(json.loads(out.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize(
    "module",
    [
        "crux_workers._engine",
        "crux_workers._execution",
        "crux_workers._context",
        "crux_workers._context_async",
        "crux_workers._port",
        "crux_workers.errors",
        "crux_workers",
    ],
)
def test_engine_and_context_import_no_driver_or_transport(module: str) -> None:
    loaded = _loaded_after(f"import {module}")
    assert "crux_workers" in loaded
    leaked = [m for m in FORBIDDEN if m in loaded]
    assert leaked == [], f"importing {module} loaded {leaked}"


def test_the_public_names_still_resolve_lazily() -> None:
    loaded = _loaded_after("from crux_workers import flow, Crux, signal_flow, FlowContext")
    # The app needs none of them until it opens its record or its transport.
    assert [m for m in ("celery", "kombu", "alembic") if m in loaded] == []
