"""A worker's liveness heartbeat: a file touched while its consumer runs.

Health checks used to be Celery remote-control pings, which need remote control on,
and with it any broker client can shut a worker down (``docs/security.md``). Instead,
with ``CRUX_HEALTH_FILE`` set, a consumer bootstep (``_tasks.heartbeat_step``) starts a
thread that refreshes the file's mtime every ``HEARTBEAT_INTERVAL`` seconds while the
consumer is connected and consuming; it stops, and removes the file, when the consumer
stops (a warm shutdown, or a lost broker connection until it is back).
``crux-workers health`` reads the file's age: no broker round trip, no remote control.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("crux_workers.health")

HEARTBEAT_INTERVAL = 5.0
DEFAULT_MAX_AGE = 30.0


class Heartbeat:
    """A daemon thread that touches ``path`` every ``interval`` seconds until stopped."""

    def __init__(self, path: str | os.PathLike[str], interval: float = HEARTBEAT_INTERVAL):
        self.path = Path(path)
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def beat(self) -> None:
        """Write the file anew (atomically): its mtime is the heartbeat, its text for humans."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "at": time.time()}) + "\n")
        os.replace(tmp, self.path)

    def start(self) -> None:
        """Beat once now (a failure here is the operator's to see), then every interval."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.beat()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="crux-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop beating and remove the file: a stopped consumer is not healthy."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 1)
            self._thread = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
            except OSError as exc:
                # The file goes stale and the health check says so; the worker goes on.
                log.warning("cannot write the heartbeat file %s: %s", self.path, exc)


@dataclass(frozen=True)
class Health:
    """What ``check`` found: healthy or not, and a one-line reason."""

    healthy: bool
    message: str


def check(path: str | os.PathLike[str], max_age: float) -> Health:
    """Healthy when the heartbeat file at ``path`` was written less than ``max_age`` ago."""
    p = Path(path)
    try:
        mtime = p.stat().st_mtime
    except FileNotFoundError:
        return Health(
            False,
            f"unhealthy: no heartbeat at {p} (the worker is stopped, still starting, or "
            "reconnecting to the broker)",
        )
    except OSError as exc:
        return Health(False, f"unhealthy: cannot read the heartbeat at {p}: {exc}")
    age = time.time() - mtime
    pid = ""
    with contextlib.suppress(OSError, ValueError, TypeError, AttributeError):
        pid = f" (pid {int(json.loads(p.read_text())['pid'])})"
    if age > max_age:
        return Health(
            False, f"unhealthy: heartbeat at {p} is {age:.1f}s old, more than {max_age:g}s{pid}"
        )
    return Health(True, f"healthy: heartbeat at {p} is {max(age, 0.0):.1f}s old{pid}")
