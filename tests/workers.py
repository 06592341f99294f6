"""Real `crux-workers worker` processes for integration and fault tests.

Plain Python (no pytest), like tests/servers.py; the fleets that run these for a test are
in tests/support/fleet.py, and the effects file the flows write in tests/support/effects.py.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def fleet_env(pg_url: str, redis_url: str, effects: Path, **extra: str) -> dict[str, str]:
    """Environment of a worker: the test's database and Redis, short leases, fast redelivery."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CRUX_")}
    env.update(
        CRUX_DATABASE_URL=pg_url,
        CRUX_REDIS_URL=redis_url,
        CRUX_LEASE_TTL="3s",
        CRUX_SWEEP_INTERVAL="1s",
        CRUX_REDRIVE_AFTER="2s",
        CRUX_VISIBILITY_TIMEOUT="6s",
        CRUX_BROKER_OPTIONS='{"unacked_restore_interval": 1, "unacked_restore_throttle": 1}',
        CRUXTEST_EFFECTS=str(effects),
        PYTHONPATH=str(REPO),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


class Worker:
    """One `crux-workers worker` in its own process group."""

    def __init__(
        self,
        name: str,
        env: dict[str, str],
        log_dir: Path,
        *,
        concurrency: int = 1,
        imports: str = "tests.integration.flows",
        extra: tuple[str, ...] = (),
        pool: str = "prefork",
    ) -> None:
        self.name = name
        self.log = log_dir / f"{name}.log"
        cmd = [
            sys.executable,
            "-m",
            "crux_workers",
            "worker",
            "--import",
            imports,
            "--pool",
            pool,
            "--concurrency",
            str(concurrency),
            "--loglevel",
            "INFO",
            "--hostname",
            f"{name}@%h",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            *extra,
        ]
        self._log_file = self.log.open("ab")
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 30) -> Worker:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited:\n{self.tail()}")
            if b"ready." in self.log.read_bytes():
                return self
            time.sleep(0.1)
        raise RuntimeError(f"worker {self.name} not ready in {timeout}s:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the whole process group (master and pool children)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self._log_file.close()

    def stop(self) -> None:
        self.kill(signal.SIGTERM)


class Beat:
    """One `crux-workers beat` in its own process group."""

    def __init__(self, name: str, env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.log = log_dir / f"{name}.log"
        self._log_file = self.log.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "crux_workers",
                "beat",
                "--import",
                "tests.integration.flows",
                "--loglevel",
                "INFO",
            ],
            cwd=REPO,
            env=env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
        self.proc.wait(timeout=20)
        self._log_file.close()


class Service:
    """Any `crux-workers <command>` in its own process group, logging to a file."""

    def __init__(self, name: str, env: dict[str, str], log_dir: Path, *args: str) -> None:
        self.name = name
        self.log = log_dir / f"{name}.log"
        self._log_file = self.log.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "crux_workers", *args],
            cwd=REPO,
            env=env,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_for(self, text: str, timeout: float = 30) -> Service:
        """Wait until ``text`` appears in the log; fail early if the process exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text.encode() in self.log.read_bytes():
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited:\n{self.tail()}")
            time.sleep(0.05)
        raise RuntimeError(f"{self.name}: no {text!r} in {timeout}s:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def kill(self, sig: int = signal.SIGKILL) -> int:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
        code = self.proc.wait(timeout=20)
        self._log_file.close()
        return code
