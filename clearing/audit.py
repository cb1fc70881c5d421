"""The audit log (审计日志): append-only, each entry chained to the previous by SM3.

``entry_hash = SM3(prev_hash ‖ canonical(entry))`` where ``canonical`` is the
sorted-key compact JSON of ``{seq, ts, actor, action, subject, details}`` and
the first entry's ``prev_hash`` is 64 zeros (:data:`GENESIS_HASH`). The table
stores ``ts`` and ``details`` as the exact text that was hashed, so
:func:`verify_chain` recomputes every hash from the stored columns: an edited
column, an inserted row, a removed row or a reordering breaks the chain at that
point. ``prev_hash`` is UNIQUE, so two writers cannot both extend the same head
(one gets an integrity error and its transaction rolls back).

API — usable inside the caller's own transaction:

- :func:`append_audit` ``(conn, actor, action, subject, details)`` takes a *synchronous*
  SQLAlchemy ``Connection``; from async code call it through
  ``await aconn.run_sync(append_audit, actor, action, subject, details)``, or use
  :func:`append_audit_async` which does exactly that.
- :func:`append_audit_batch` ``(conn, entries)`` appends many entries with one
  ``executemany`` (the ledger writes one entry per posting batch this way).

On PostgreSQL the head is serialised with a transaction-scoped advisory lock
(:data:`PG_AUDIT_LOCK_ID`); on SQLite the caller's write transaction
(``BEGIN IMMEDIATE``) already serialises writers.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from clearing.eod_schema import audit_log
from keys.sm3 import sm3

GENESIS_HASH = "0" * 64
PG_AUDIT_LOCK_ID = 0x43415245_41554454  # "CAREAUDT": pg_advisory_xact_lock key
MAX_DETAILS_BYTES = 64 * 1024
VERIFY_PAGE_ROWS = 10_000


class AuditError(Exception):
    """An audit entry that cannot be written (too large, not JSON-serialisable)."""


def canonical_details(details: dict[str, Any]) -> str:
    """Details as canonical JSON text (sorted keys, compact, UTF-8 kept)."""
    try:
        out = json.dumps(details, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    except (TypeError, ValueError) as exc:
        raise AuditError(f"audit details not serialisable: {exc}") from None
    if len(out.encode("utf-8")) > MAX_DETAILS_BYTES:
        raise AuditError(f"audit details over {MAX_DETAILS_BYTES} bytes")
    return out


def entry_hash(prev_hash: str, seq: int, ts: str, actor: str, action: str, subject: str, details_json: str) -> str:
    """SM3(prev_hash ‖ canonical entry), hex."""
    entry = json.dumps(
        {"seq": seq, "ts": ts, "actor": actor, "action": action, "subject": subject, "details": details_json},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return sm3(bytes.fromhex(prev_hash) + entry.encode("utf-8")).hex()


@dataclass(frozen=True)
class AuditEntry:
    actor: str
    action: str
    subject: str
    details: dict[str, Any]


def _head(conn: Connection) -> tuple[int, str]:
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": PG_AUDIT_LOCK_ID})
    row = conn.execute(select(audit_log.c.seq, audit_log.c.entry_hash).order_by(audit_log.c.seq.desc()).limit(1)).first()
    return (0, GENESIS_HASH) if row is None else (int(row[0]), str(row[1]))


def append_audit_batch(conn: Connection, entries: Sequence[AuditEntry]) -> list[int]:
    """Append ``entries`` in order inside the caller's transaction; returns their sequence numbers."""
    if not entries:
        return []
    seq, prev = _head(conn)
    ts = datetime.now(UTC).isoformat(timespec="microseconds")
    rows = []
    for e in entries:
        seq += 1
        details = canonical_details(e.details)
        h = entry_hash(prev, seq, ts, e.actor, e.action, e.subject, details)
        rows.append({"seq": seq, "prev_hash": prev, "entry_hash": h, "ts": ts, "actor": e.actor,
                     "action": e.action, "subject": e.subject, "details": details})
        prev = h
    conn.execute(audit_log.insert(), rows)
    return [r["seq"] for r in rows]


def append_audit(conn: Connection, actor: str, action: str, subject: str, details: dict[str, Any] | None = None) -> int:
    """Append one entry inside the caller's (synchronous) transaction; returns its sequence number."""
    return append_audit_batch(conn, [AuditEntry(actor, action, subject, details or {})])[0]


async def append_audit_async(
    aconn: AsyncConnection, actor: str, action: str, subject: str, details: dict[str, Any] | None = None
) -> int:
    """:func:`append_audit` for an ``AsyncConnection`` (runs it through ``run_sync``)."""
    return await aconn.run_sync(append_audit, actor, action, subject, details or {})


@dataclass(frozen=True)
class ChainReport:
    intact: bool
    entries: int
    head_hash: str
    problem: str = ""
    first_bad_seq: int | None = None


def verify_rows(rows: Iterable[Sequence[Any]]) -> ChainReport:
    """Walk (seq, prev_hash, entry_hash, ts, actor, action, subject, details) rows in seq order."""
    expect_seq, prev, n = 1, GENESIS_HASH, 0
    for seq, prev_hash, stored_hash, ts, actor, action, subject, details in rows:
        seq = int(seq)
        if seq != expect_seq:
            kind = "removed" if seq > expect_seq else "inserted"
            return ChainReport(False, n, prev, f"entry {expect_seq} {kind} (found seq {seq})", expect_seq)
        if prev_hash != prev:
            return ChainReport(False, n, prev, f"entry {seq}: link to the previous entry broken", seq)
        if entry_hash(prev, seq, ts, actor, action, subject, details) != stored_hash:
            return ChainReport(False, n, prev, f"entry {seq}: content does not match its hash (edited)", seq)
        prev, expect_seq, n = stored_hash, expect_seq + 1, n + 1
    return ChainReport(True, n, prev)


def verify_chain_sync(conn: Connection, expected_head: tuple[int, str] | None = None) -> ChainReport:
    """Verify the whole chain; ``expected_head`` (seq, hash), e.g. from a signed manifest, also catches
    a truncated tail."""
    cols = [audit_log.c.seq, audit_log.c.prev_hash, audit_log.c.entry_hash, audit_log.c.ts, audit_log.c.actor,
            audit_log.c.action, audit_log.c.subject, audit_log.c.details]
    res = conn.execute(select(*cols).order_by(audit_log.c.seq).execution_options(yield_per=VERIFY_PAGE_ROWS))
    report = verify_rows(res)
    if report.intact and expected_head is not None:
        seq, h = expected_head
        if report.entries < seq:
            return ChainReport(False, report.entries, report.head_hash, f"entries after {report.entries} removed "
                               f"(a manifest recorded {seq})", report.entries + 1)
        row = conn.execute(select(audit_log.c.entry_hash).where(audit_log.c.seq == seq)).first()
        if row is None or row[0] != h:
            return ChainReport(False, report.entries, report.head_hash, f"entry {seq} differs from the manifest", seq)
    return report


async def verify_chain(engine: AsyncEngine, expected_head: tuple[int, str] | None = None) -> ChainReport:
    async with engine.connect() as conn:
        return await conn.run_sync(verify_chain_sync, expected_head)


async def head(engine: AsyncEngine) -> tuple[int, str]:
    """(seq, hash) of the last entry, (0, GENESIS_HASH) when empty."""
    async with engine.connect() as conn:
        row = (await conn.execute(select(audit_log.c.seq, audit_log.c.entry_hash)
                                  .order_by(audit_log.c.seq.desc()).limit(1))).first()
    return (0, GENESIS_HASH) if row is None else (int(row[0]), str(row[1]))


# --- data-access trail (使用痕迹) ------------------------------------------------------------------------------

ACCESS_ACTIONS = ("view", "export", "copy", "delete")


def record_access(conn: Connection, actor: str, action: str, subject: str, record_count: int = 0,
                  business_date: Any = None, purpose: str = "") -> int:
    """Record who viewed/exported/copied/deleted cardholder data, inside the caller's transaction.

    Writes an ``access_events`` row and an audit entry (``access.<action>``); returns the audit seq.
    Async callers: ``await aconn.run_sync(record_access, actor, action, subject, n, date, purpose)``.
    """
    from clearing.eod_schema import access_events

    if action not in ACCESS_ACTIONS:
        raise AuditError(f"access action must be one of {', '.join(ACCESS_ACTIONS)}")
    conn.execute(access_events.insert().values(at=datetime.now(UTC), actor=actor[:64], action=action,
                                               subject=subject[:400], record_count=record_count,
                                               business_date=business_date, purpose=purpose[:200]))
    return append_audit(conn, actor, f"access.{action}", subject[:200],
                        {"records": record_count, "business_date": str(business_date or ""), "purpose": purpose})


async def record_access_async(aconn: AsyncConnection, actor: str, action: str, subject: str, record_count: int = 0,
                              business_date: Any = None, purpose: str = "") -> int:
    """:func:`record_access` for an ``AsyncConnection``."""
    return await aconn.run_sync(record_access, actor, action, subject, record_count, business_date, purpose)
