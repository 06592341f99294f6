"""Alembic environment: runs on the connection crux_workers hands it."""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from crux_workers._store._schema import metadata

# Any fixed 64-bit number works; it only has to be the same for every migrator.
_MIGRATION_LOCK = 0x637275785F6D6967


def run_migrations_online() -> None:
    connection = context.config.attributes["connection"]
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # Transaction-scoped, so it also works behind pgbouncer transaction pooling:
            # a second migrator waits here, then finds the schema at head and does nothing.
            connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _MIGRATION_LOCK})
        context.run_migrations()


if context.is_offline_mode():
    raise RuntimeError("crux_workers migrations run online only")
run_migrations_online()
