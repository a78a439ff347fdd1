"""Tamper evidence for the trace: the record hash chain, per-run Merkle roots, content hashes.

Every event commits to its predecessor across the whole trace (``prev_hash``), so an edited,
deleted, inserted or reordered row breaks the chain at that point. Each run's final record
carries a Merkle root over the run's records. Content (PHI, stored apart) is committed by the
hash of its stored bytes, so it can be verified without decrypting it.

Hashes are over a canonical JSON form, so they come out the same on SQLite and PostgreSQL.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

GENESIS_HASH = "0" * 64


def canonical_json(value: Any) -> str:
    """Return the canonical text of a JSON value: sorted keys, no spaces, ASCII only."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def sha256_hex(data: str | bytes) -> str:
    """Return the hex SHA-256 of text (UTF-8) or bytes."""
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def canonical_time(value: datetime) -> str:
    """Return a timestamp as naive-UTC ISO text with microseconds (SQLite drops the zone)."""
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value.isoformat(timespec="microseconds")


def event_hash(
    *,
    chain_seq: int,
    prev_hash: str,
    run_id: str,
    seq: int,
    kind: str,
    name: str,
    at: datetime,
    duration_ms: float | None,
    status: str | None,
    meta: dict[str, Any],
    content_hash: str | None,
) -> str:
    """Return the hash of one event record, committing to its predecessor's hash."""
    body = {
        "chain_seq": chain_seq,
        "prev_hash": prev_hash,
        "run_id": run_id,
        "seq": seq,
        "kind": kind,
        "name": name,
        "at": canonical_time(at),
        "duration_ms": duration_ms,
        "status": status,
        "meta": meta,
        "content_hash": content_hash,
    }
    return sha256_hex(canonical_json(body))


def merkle_root(leaves: Sequence[str]) -> str:
    """Return the Merkle root (SHA-256, hex) of hex leaf hashes; an odd node is paired with itself."""
    if not leaves:
        return sha256_hex(b"")
    level = [bytes.fromhex(leaf) for leaf in leaves]
    while len(level) > 1:
        if len(level) % 2:
            level.append(level[-1])
        level = [hashlib.sha256(b"\x01" + level[i] + level[i + 1]).digest() for i in range(0, len(level), 2)]
    return level[0].hex()
