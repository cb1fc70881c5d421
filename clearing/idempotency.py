"""Idempotency records (幂等): one stored answer per (scope, key), guarded by a hash of the request body.

Same key and same body → the stored answer is replayed; same key and a different
body → :class:`clearing.ledger.IdempotencyConflict`. Terminal messages use the host
journal itself for this (``host_txns.txn_key`` / ``msg_key`` + ``request_hash``);
this table serves bulk work: recharge batches, card lifecycle operations,
migrations, rollovers, batch settlements.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Connection

from clearing.ledger import IdempotencyConflict
from clearing.schema import idempotency


def request_hash(body: Any) -> str:
    """SHA-256 (hex) of a JSON-able body in canonical form (bytes are hashed as they are)."""
    if isinstance(body, bytes):
        return hashlib.sha256(body).hexdigest()
    raw = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(raw.encode("utf-8")).hexdigest()


def lookup_sync(conn: Connection, scope: str, key: str, req_hash: str) -> dict[str, Any] | None:
    """The stored answer for (scope, key), None if new; :class:`IdempotencyConflict` if the body differs."""
    row = conn.execute(select(idempotency.c.request_hash, idempotency.c.response)
                       .where(idempotency.c.scope == scope, idempotency.c.key == key)).first()
    if row is None:
        return None
    if row[0] != req_hash:
        raise IdempotencyConflict(f"{scope}:{key}")
    return json.loads(row[1])


def store_sync(conn: Connection, scope: str, key: str, req_hash: str, response: dict[str, Any]) -> None:
    """Record the answer in the caller's transaction (a racing duplicate fails on the unique key)."""
    conn.execute(idempotency.insert().values(scope=scope, key=key, request_hash=req_hash,
                                             response=json.dumps(response, sort_keys=True, default=str),
                                             created_at=datetime.now(UTC)))
