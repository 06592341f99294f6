"""Prepares the template database every test database is copied from."""

from __future__ import annotations

from crux_workers._store._migrate import upgrade
from crux_workers._store._sql import make_engine


def prepare_template(url: str) -> None:
    engine = make_engine(url)
    try:
        upgrade(engine)
    finally:
        engine.dispose()
