"""Test support shared by every tier: one home for each kind of helper.

- ``tiers``: the markers (``unit``, ``integration``, ``faults``, ``servers``), given by
  directory and by the fixtures a test asks for, and the guard that refuses to start a
  server for a test outside the ``servers`` tier.
- ``start``: what every server start shares (a base dir under /tmp, a clear failure).
- ``postgres``: the one Postgres cluster fixture body (a cluster with a template database,
  a fresh copy per test); the session and the fault tier each run their own instance.
- ``redis``: the one Redis server fixture body and the per-test database numbers.
- ``clock``: the one fake clock.
- ``effects``: the one side-effect ledger the test flows append to.
- ``fleet``: the one fleet (database, Redis, worker and beat processes, an app in the test
  process), and the fault tier's ``FaultFleet`` on top of it.
- ``harness``: the unit tier's in-memory app driven by hand.
- ``audit``: what the fault tests check (the audit) and report (their figures).

The server processes themselves are driven by ``tests/servers.py`` and the worker
processes by ``tests/workers.py``; both stay plain Python, without pytest.
"""
