"""Every Redis key crux_workers writes, in one place."""

from __future__ import annotations


def steps_key(prefix: str, flow_id: str) -> str:
    """Hash of a flow's checkpoints: field ``seq`` -> cached checkpoint JSON."""
    return f"{prefix}:steps:{{{flow_id}}}"
