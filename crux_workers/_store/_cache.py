"""The step cache: Redis in production, a dict embedded and in unit tests.

Write-through with Postgres first: a checkpoint reaches the cache only after it
committed, and checkpoints never change once committed, so a cached entry is
always right; a missing one only costs a read from the record. Every Redis
failure is logged and treated as a miss: the cache can never fail a flow.
"""

from __future__ import annotations

import json
import logging
import threading

from ._keys import steps_key
from ._types import Checkpoint

log = logging.getLogger("crux_workers.cache")

# A finished flow's entry is dropped; this bounds what abandoned flows leave behind.
_TTL_SECONDS = 7 * 86400


def encode(cp: Checkpoint) -> str:
    """One cache entry: a JSON header line, then the result's JSON text untouched.

    Compact JSON never contains a raw newline, so the first one splits the entry,
    and the result is parsed once, by the replay, not re-encoded here.
    """
    return json.dumps([cp.kind, cp.name, cp.occurrence]) + "\n" + cp.result


def decode(seq: int, raw: str | bytes) -> Checkpoint:
    """Parse an entry written by ``encode``."""
    text = raw.decode() if isinstance(raw, bytes) else raw
    head, sep, result = text.partition("\n")
    if not sep:
        raise ValueError("malformed cache entry")
    kind, name, occurrence = json.loads(head)
    return Checkpoint(seq, str(kind), str(name), int(occurrence), result)


def _decode_all(raw: dict[bytes, bytes]) -> dict[int, Checkpoint]:
    """Every entry of a hash at once: the headers parsed by one ``json.loads``.

    A replay of 1000 checkpoints parses one array instead of making 1000 calls.
    Raises ``ValueError`` (or ``KeyError``, ``TypeError``) if any entry is malformed.
    """
    seqs: list[int] = []
    heads: list[str] = []
    results: list[str] = []
    for field, value in raw.items():
        head, sep, result = value.decode().partition("\n")
        if not sep:
            raise ValueError("malformed cache entry")
        seqs.append(int(field))
        heads.append(head)
        results.append(result)
    parsed = json.loads("[" + ",".join(heads) + "]")
    if len(parsed) != len(seqs):  # a header that was itself a comma-separated list
        raise ValueError("malformed cache entry")
    out: dict[int, Checkpoint] = {}
    for seq, (kind, name, occurrence), result in zip(seqs, parsed, results, strict=True):
        if not isinstance(kind, str) or not isinstance(name, str):
            raise TypeError("malformed cache entry")
        out[seq] = Checkpoint(seq, kind, name, int(occurrence), result)
    return out


class RedisStepCache:
    """``StepCache`` on one Redis hash per flow, loaded with a single HGETALL."""

    def __init__(self, url: str, prefix: str) -> None:
        import redis

        self._redis = redis.Redis.from_url(
            url, socket_timeout=2.0, socket_connect_timeout=2.0, health_check_interval=30
        )
        self._prefix = prefix

    def _key(self, flow_id: str) -> str:
        return steps_key(self._prefix, flow_id)

    def load(self, flow_id: str) -> dict[int, Checkpoint]:
        """Every cached checkpoint of the flow, in one round trip."""
        try:
            raw: dict[bytes, bytes] = self._redis.hgetall(self._key(flow_id))  # type: ignore[assignment]
        except Exception as exc:
            log.warning("step cache unavailable, reading the record: %r", exc)
            return {}
        try:
            return _decode_all(raw)
        except (ValueError, KeyError, TypeError):
            pass  # one entry or more is malformed: decode one by one, skipping those
        out: dict[int, Checkpoint] = {}
        for field, value in raw.items():
            try:
                seq = int(field)
                out[seq] = decode(seq, value)
            except (ValueError, KeyError, TypeError):
                log.warning("ignoring a malformed cache entry of flow %s", flow_id)
        return out

    def fill(self, flow_id: str, cps: list[Checkpoint]) -> None:
        """Cache many checkpoints in one round trip."""
        if not cps:
            return
        key = self._key(flow_id)
        try:
            pipe = self._redis.pipeline(transaction=False)
            pipe.hset(key, mapping={str(cp.seq): encode(cp) for cp in cps})
            pipe.expire(key, _TTL_SECONDS)
            pipe.execute()
        except Exception as exc:
            log.warning("step cache write failed (the record has it): %r", exc)

    def drop(self, flow_id: str) -> None:
        """Forget a finished flow."""
        try:
            self._redis.delete(self._key(flow_id))
        except Exception as exc:
            log.warning("step cache delete failed: %r", exc)

    def close(self) -> None:
        """Release connections."""
        self._redis.close()


class MemoryStepCache:
    """``StepCache`` in a dict, for the embedded default and unit tests."""

    def __init__(self) -> None:
        self._data: dict[str, dict[int, str]] = {}
        self._lock = threading.Lock()

    def load(self, flow_id: str) -> dict[int, Checkpoint]:
        """Every cached checkpoint of the flow."""
        with self._lock:
            entries = dict(self._data.get(flow_id, {}))
        return {seq: decode(seq, raw) for seq, raw in entries.items()}

    def fill(self, flow_id: str, cps: list[Checkpoint]) -> None:
        """Cache many checkpoints."""
        with self._lock:
            entry = self._data.setdefault(flow_id, {})
            for cp in cps:
                entry[cp.seq] = encode(cp)

    def drop(self, flow_id: str) -> None:
        """Forget a flow."""
        with self._lock:
            self._data.pop(flow_id, None)

    def clear(self) -> None:
        """Forget everything, as a Redis flush would."""
        with self._lock:
            self._data.clear()

    def close(self) -> None:
        """Nothing to release."""
