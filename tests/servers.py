"""Real Postgres and Redis servers on loopback, in a temp dir, for tests.

Plain Python (no pytest): the fixtures (tests/conftest.py over tests/support/postgres.py
and redis.py) wrap these, and fault tests drive them directly (stop, kill, restart).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import psycopg
import redis
from psycopg import sql

HOST = "127.0.0.1"
PG_BIN_DIR = Path("/usr/lib/postgresql/15/bin")
TMP_ROOT = Path("/tmp")
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0


class ServerError(RuntimeError):
    """A test server failed to start, stop or answer in time."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _log_tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log at {path}: {exc})"
    tail = text.splitlines()[-lines:]
    return f"--- last {len(tail)} lines of {path} ---\n" + "\n".join(tail)


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs; a zombie counts as dead (its reaper may be another process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    # The state follows the parenthesised command name, which may itself contain spaces.
    return stat.rpartition(")")[2].split()[0] != "Z"


def _child_pids(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rpartition(")")[2].split()[1]) == pid:
            children.append(int(entry.name))
    return children


def _wait_dead(pids: Sequence[int], timeout: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while any(_pid_alive(pid) for pid in pids):
        if time.monotonic() > deadline:
            alive = [pid for pid in pids if _pid_alive(pid)]
            raise ServerError(f"{what}: {alive} still alive after {timeout}s\n{_log_tail(log)}")
        time.sleep(0.02)


class PostgresServer:
    """A PostgreSQL 15 cluster in ``base_dir`` listening on 127.0.0.1:``port``.

    The postmaster refuses to run as root, so as root every server command goes through
    ``runuser -u postgres``, and ``base_dir`` (the socket dir) and the data dir belong to
    that user.
    """

    def __init__(self, base_dir: Path, port: int, bin_dir: Path = PG_BIN_DIR) -> None:
        self.base_dir = Path(base_dir)
        self.port = port
        self.bin_dir = Path(bin_dir)
        self.data_dir = self.base_dir / "data"
        self.log_file = self.base_dir / "postgres.log"
        self.run_as = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Create the cluster on first use, then start it and wait until it accepts queries."""
        if not (self.bin_dir / "pg_ctl").exists():
            raise ServerError(f"PostgreSQL binaries not found in {self.bin_dir}")
        self._prepare_dirs()
        if not (self.data_dir / "PG_VERSION").exists():
            self._run(
                "initdb",
                "-D",
                str(self.data_dir),
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
                "--no-instructions",
                timeout=120,
            )
            with (self.data_dir / "postgresql.conf").open("a") as conf:
                conf.write("\ninclude_if_exists = 'crux_servers.conf'\n")
        # Rewritten on every start so a server object always owns its port and socket dir.
        settings = {
            "listen_addresses": HOST,
            "port": str(self.port),
            "unix_socket_directories": str(self.base_dir),
            "fsync": "off",
            "full_page_writes": "off",
            "max_connections": "300",
            "shared_buffers": "128MB",
        }
        conf_text = "".join(f"{key} = '{value}'\n" for key, value in settings.items())
        (self.data_dir / "crux_servers.conf").write_text(conf_text)
        self._chown(self.data_dir / "crux_servers.conf")
        if self.postmaster_pid() is None:
            # Lock files left by a killed postmaster. If nothing reaps orphans (PID 1 in some
            # containers), it stays a zombie that a new postmaster would take for a live one.
            (self.data_dir / "postmaster.pid").unlink(missing_ok=True)
            (self.base_dir / f".s.PGSQL.{self.port}.lock").unlink(missing_ok=True)
        self._run(
            "pg_ctl",
            "start",
            "-D",
            str(self.data_dir),
            "-l",
            str(self.log_file),
            "-w",
            "-t",
            str(int(START_TIMEOUT)),
            timeout=START_TIMEOUT + 10,
        )
        self._wait_ready()

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``mode`` is pg_ctl's: smart, fast or immediate); no-op if down."""
        if self.postmaster_pid() is None:
            return
        self._run(
            "pg_ctl",
            "stop",
            "-D",
            str(self.data_dir),
            "-m",
            mode,
            "-w",
            "-t",
            str(int(STOP_TIMEOUT)),
            timeout=STOP_TIMEOUT + 10,
        )

    def restart(self) -> None:
        """Stop (fast) if running, then start again on the same port with the same data."""
        self.stop()
        self.start()

    def kill(self) -> None:
        """SIGKILL the postmaster, like a crash; wait until it and its backends are gone.

        The next ``start()`` runs crash recovery. Waiting for the orphaned backends matters:
        while they still hold the old shared memory, a new postmaster refuses to start.
        """
        pid = self.postmaster_pid()
        if pid is None:
            return
        children = _child_pids(pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        _wait_dead([pid, *children], STOP_TIMEOUT, "postgres kill", self.log_file)

    def postmaster_pid(self) -> int | None:
        """Pid of the running postmaster, or None when it is not running."""
        try:
            first_line = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
        except FileNotFoundError:
            return None
        pid = int(first_line) if first_line.strip().isdigit() else None
        return pid if pid is not None and _pid_alive(pid) else None

    # -- access ------------------------------------------------------------------------

    def url(self, dbname: str) -> str:
        """SQLAlchemy URL for ``dbname`` (psycopg 3 driver)."""
        return f"postgresql+psycopg://postgres@{HOST}:{self.port}/{dbname}"

    def dsn(self, dbname: str) -> str:
        """Plain libpq URL for ``dbname``, for psycopg.connect."""
        return f"postgresql://postgres@{HOST}:{self.port}/{dbname}"

    def execute(
        self,
        query: str | sql.SQL | sql.Composed,
        dbname: str = "postgres",
        params: Sequence[Any] = (),
    ) -> list[tuple[Any, ...]]:
        """Run one statement in autocommit mode; return its rows (empty if none)."""
        with psycopg.connect(self.dsn(dbname), autocommit=True, connect_timeout=10) as conn:
            cur = conn.execute(query, params or None)
            return cur.fetchall() if cur.description is not None else []

    def create_database(self, name: str, template: str | None = None) -> None:
        """Create database ``name``, copying ``template`` if given (it must have no sessions)."""
        query = sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name))
        if template is not None:
            query = sql.SQL("{} TEMPLATE {}").format(query, sql.Identifier(template))
        self.execute(query)

    def drop_database(self, name: str) -> None:
        """Drop database ``name`` if it exists, terminating any sessions still connected."""
        self.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )

    # -- internals ---------------------------------------------------------------------

    def _prepare_dirs(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.base_dir.chmod(0o755)
        self._chown(self.base_dir)
        if os.geteuid() == 0:
            self._ensure_traversable(self.base_dir.parent)

    def _ensure_traversable(self, directory: Path) -> None:
        """Let the postgres user reach ``base_dir``: open up dirs under /tmp, refuse elsewhere."""
        tmp_root = TMP_ROOT.resolve()
        for parent in [directory.resolve(), *directory.resolve().parents]:
            mode = parent.stat().st_mode
            if mode & 0o001:
                continue
            if parent != tmp_root and tmp_root in parent.parents:
                parent.chmod(mode | 0o001)
            else:
                raise ServerError(
                    f"{parent} is not traversable by the {self.run_as} user; "
                    f"put the Postgres base dir under {tmp_root}"
                )

    def _chown(self, path: Path) -> None:
        if os.geteuid() == 0:
            user = pwd.getpwnam(self.run_as)
            os.chown(path, user.pw_uid, user.pw_gid)

    def _run(self, program: str, *args: str, timeout: float) -> None:
        cmd = [str(self.bin_dir / program), *args]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", self.run_as, "--", *cmd]
        try:
            # The cwd must be readable by the run-as user, or initdb/pg_ctl complain.
            result = subprocess.run(
                cmd,
                cwd=self.base_dir,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise ServerError(
                f"{program} timed out after {timeout}s\n{_log_tail(self.log_file)}"
            ) from exc
        if result.returncode != 0:
            raise ServerError(
                f"{' '.join(cmd)} exited with {result.returncode}\n"
                f"stdout: {result.stdout.strip()}\nstderr: {result.stderr.strip()}\n"
                f"{_log_tail(self.log_file)}"
            )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                self.execute("SELECT 1")
                return
            except psycopg.OperationalError as exc:
                if time.monotonic() > deadline:
                    raise ServerError(
                        f"postgres on port {self.port} not answering after {START_TIMEOUT}s: "
                        f"{exc}\n{_log_tail(self.log_file)}"
                    ) from exc
                time.sleep(0.05)


class RedisServer:
    """A redis-server child process on 127.0.0.1:``port`` without persistence."""

    def __init__(self, base_dir: Path, port: int, executable: str = "redis-server") -> None:
        self.base_dir = Path(base_dir)
        self.port = port
        self.executable = executable
        self.log_file = self.base_dir / "redis.log"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start redis-server and wait until it answers PING."""
        if self._proc is not None and self._proc.poll() is None:
            raise ServerError(f"redis on port {self.port} is already running")
        self.base_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            self.executable,
            "--port",
            str(self.port),
            "--bind",
            HOST,
            "--save",
            "",
            "--appendonly",
            "no",
            "--databases",
            "1024",
            "--dir",
            str(self.base_dir),
            "--daemonize",
            "no",
            "--logfile",
            str(self.log_file),
        ]
        try:
            # A new session keeps the terminal's Ctrl-C away from it; the fixtures stop it.
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
        except FileNotFoundError as exc:
            raise ServerError(f"{self.executable} not found on PATH") from exc
        self._wait_ready()

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL if it lingers); no-op if not running."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT)
        self._proc = None

    def kill(self) -> None:
        """SIGKILL the server, like a crash."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
            proc.wait(STOP_TIMEOUT)
        self._proc = None

    def restart(self) -> None:
        """Stop and start on the same port; all data is lost (there is no persistence)."""
        self.stop()
        self.start()

    @property
    def pid(self) -> int | None:
        """Pid of the running server, or None."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def url(self, db: int = 0) -> str:
        """redis:// URL for database number ``db``."""
        return f"redis://{HOST}:{self.port}/{db}"

    def client(self, db: int = 0) -> redis.Redis:
        """A new client for database ``db``; close it when done."""
        return redis.Redis(host=HOST, port=self.port, db=db, socket_timeout=10)

    def flushall(self) -> None:
        """Empty every database."""
        with self.client() as client:
            client.flushall()

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert self._proc is not None
            code = self._proc.poll()
            if code is not None:
                self._proc = None
                raise ServerError(
                    f"redis-server on port {self.port} exited with {code}\n"
                    f"{_log_tail(self.log_file)}"
                )
            try:
                with redis.Redis(
                    host=HOST, port=self.port, socket_timeout=1, socket_connect_timeout=1
                ) as client:
                    client.ping()
                return
            except redis.RedisError as exc:
                if time.monotonic() > deadline:
                    self.kill()
                    raise ServerError(
                        f"redis on port {self.port} not answering after {START_TIMEOUT}s: "
                        f"{exc}\n{_log_tail(self.log_file)}"
                    ) from exc
                time.sleep(0.02)
