"""A signal that waits for the flow's row lock while the executor suspends is not missed."""

from __future__ import annotations

import threading
import time

from sqlalchemy import create_engine, text

from crux_workers._store._sql import SqlStore
from crux_workers._store._types import Claimed, SignalResult


def test_a_signal_waiting_on_the_lock_of_a_suspend_in_progress_wakes_the_flow(
    pg_url: str,
) -> None:
    store = SqlStore(pg_url)
    engine = create_engine(pg_url)
    try:
        store.create_flow("race-1", "inbox", "{}")
        claimed = store.claim("race-1", "executor", 30)
        assert isinstance(claimed, Claimed)
        got: list[SignalResult] = []
        with engine.connect() as executor:
            # The executor's suspend, in progress: it holds the row lock; the committed
            # row still says "running" when the signal's statement takes its snapshot.
            executor.execute(
                text(
                    "UPDATE crux_flows SET status = 'suspended', waiting_on = 'go', "
                    "lease_owner = NULL, lease_until = NULL WHERE id = 'race-1'"
                )
            )
            signal = threading.Thread(
                target=lambda: got.append(store.record_signal("race-1", "go", "1", None))
            )
            signal.start()
            time.sleep(0.5)  # the signal is now blocked on the row lock
            assert signal.is_alive()
            executor.commit()
            signal.join(timeout=30)
        assert len(got) == 1 and got[0].wake and not got[0].duplicate
        with engine.connect() as conn:
            row = conn.execute(
                text("SELECT status, wake_kind FROM crux_flows WHERE id = 'race-1'")
            ).one()
        assert (row.status, row.wake_kind) == ("suspended", "run")
    finally:
        engine.dispose()
        store.close()
