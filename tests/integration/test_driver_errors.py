"""The hot path's prebuilt statements run on the driver: its errors leave as the seam's.

``PgDb.first`` bypasses SQLAlchemy, so it translates psycopg's errors itself: a record
that cannot be reached is a ``StoreError`` (try later: the execution is abandoned, the
flow is not failed), a value the record refuses is a ``RecordRefused``; neither shows a
password.
"""

from __future__ import annotations

import pytest

from crux_workers._store._sql import SqlStore
from crux_workers._store._types import Claimed
from crux_workers.errors import RecordRefused, StoreError
from tests.servers import free_port


def test_an_unreachable_record_is_a_store_error_without_the_password() -> None:
    store = SqlStore(f"postgresql+psycopg://crux:s3cret-pw@127.0.0.1:{free_port()}/nowhere")
    try:
        for call in (
            lambda: store.claim("f", "w", 10),
            lambda: store.record_signal("f", "go", "1", None),
        ):
            with pytest.raises(StoreError) as got:
                call()
            assert not isinstance(got.value, RecordRefused)
            assert "s3cret-pw" not in str(got.value)
    finally:
        store.close()


def test_a_value_the_record_refuses_is_record_refused(pg_url: str) -> None:
    store = SqlStore(pg_url)
    try:
        store.create_flow("driver-errors", "demo", "{}")
        claimed = store.claim("driver-errors", "w", 10)
        assert isinstance(claimed, Claimed)
        # Postgres text cannot hold NUL: a data error, which no retry cures.
        with pytest.raises(RecordRefused):
            store.record_signal("driver-errors", "go", '"a\x00b"', None)
        # The connection it ran on is back in the pool, usable.
        assert store.record_signal("driver-errors", "go", "1", None).signal_id > 0
    finally:
        store.close()
