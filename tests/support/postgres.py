"""The one Postgres cluster fixture body: a cluster, a template database, a copy per test.

The session (``pg``/``pg_url``) and the fault tier (``fault_pg``/``fault_db``) run separate
instances of the same code: fault tests kill and restart their cluster, and the other
tests never see it.
"""

from __future__ import annotations

import importlib
import itertools
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from tests.servers import PostgresServer, ServerError, free_port
from tests.support.start import base_dir, fail_start

_db_numbers = itertools.count(1)


def run_schema_hook(url: str) -> None:
    """Call ``tests.schema_hook.prepare_template(url)`` if that module and function exist."""
    try:
        module = importlib.import_module("tests.schema_hook")
    except ModuleNotFoundError as exc:
        if exc.name in ("tests", "tests.schema_hook"):
            return
        raise
    prepare = getattr(module, "prepare_template", None)
    if prepare is not None:
        prepare(url)


def prepare_schema(url: str) -> None:
    """Bring the database at ``url`` to the schema's head (``tests.schema_hook``)."""
    from tests.schema_hook import prepare_template  # loads SQLAlchemy: only when needed

    prepare_template(url)


@dataclass(frozen=True)
class ClusterSpec:
    """How one instance differs: its dir, its template database and how that is prepared."""

    what: str  # in messages
    dir_prefix: str
    template: str
    db_prefix: str  # each test database is <db_prefix><n>_<test name>
    prepare: Callable[[str], None]


# The cluster every test shares; the template holds what the schema hook makes of it.
SESSION = ClusterSpec("PostgreSQL", "crux-pg-", "crux_template", "t", run_schema_hook)
# The fault tier's own cluster, which its tests may stop, kill and restart.
FAULTS = ClusterSpec(
    "fault tier's PostgreSQL", "crux-fault-pg-", "crux_fault_template", "f", prepare_schema
)


@contextmanager
def cluster(spec: ClusterSpec) -> Iterator[PostgresServer]:
    """Start a cluster with ``spec.template`` prepared; stop it and remove its files after."""
    base = base_dir(spec.dir_prefix)
    server = PostgresServer(base / "pg", free_port())
    try:
        try:
            server.start()
        except (ServerError, OSError) as exc:
            fail_start(spec.what, exc)
        server.create_database(spec.template)
        spec.prepare(server.url(spec.template))
        # A session left open on the template would make every copy of it fail.
        server.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            params=[spec.template],
        )
        yield server
    finally:
        try:
            server.stop()
        except ServerError:
            server.kill()
        shutil.rmtree(base, ignore_errors=True)


@contextmanager
def database(server: PostgresServer, spec: ClusterSpec, test_name: str) -> Iterator[str]:
    """A fresh copy of the template for one test (its name), dropped after.

    The cluster is started again first if a test left it down (the fault tests stop and
    kill theirs), before the copy and before the drop.
    """
    if server.postmaster_pid() is None:
        server.start()
    slug = re.sub(r"[^a-z0-9_]+", "_", test_name.lower()).strip("_")
    name = f"{spec.db_prefix}{next(_db_numbers)}_{slug}"[:63]
    server.create_database(name, template=spec.template)
    yield name
    if server.postmaster_pid() is None:
        server.start()
    server.drop_database(name)
