"""Business dates (会计日) and settlement windows (清算窗口): the cut-off (日切) and closing a date.

A posting picks its business date inside the same database transaction that writes
it: the local date (Asia/Shanghai) of the host time, plus one day at or after the
cut-off (default 23:00), and — when that date's window is already closed — the next
open date. Closing a date (end of day) is therefore atomic with respect to postings:

- SQLite: every ledger write runs under ``BEGIN IMMEDIATE`` (one writer), so a posting
  runs wholly before or wholly after the close.
- PostgreSQL: a posting inserts the window row if missing and reads it ``FOR SHARE``;
  :func:`close_window` reads it ``FOR UPDATE`` — the close waits for postings in flight
  and later postings see ``closed`` and move to the next date.

The end-of-day helper closes a date with ``async with write_transaction(engine) as conn:
await close_window(conn, d)`` (or :func:`close_window_now`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from sqlalchemy import select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from clearing.db import write_transaction
from clearing.schema import settlement_windows

DEFAULT_CUTOFF = time(23, 0)
DEFAULT_TIMEZONE = "Asia/Shanghai"
MAX_CLOSED_DAYS_SKIPPED = 366  # a posting never skips more closed windows than this
OPEN, CLOSED = "open", "closed"


@dataclass(frozen=True)
class Cutoff:
    """The daily cut-off: local time of day and the zone it is in."""

    local_time: time = DEFAULT_CUTOFF
    timezone: str = DEFAULT_TIMEZONE

    def business_date(self, at: datetime) -> date:
        """The nominal business date of an aware instant (before checking closed windows)."""
        if at.tzinfo is None:
            raise ValueError("business_date needs an aware datetime")
        local = at.astimezone(ZoneInfo(self.timezone))
        d = local.date()
        return d + timedelta(days=1) if local.time() >= self.local_time else d


def _ensure_rows(conn: Connection, dates: Iterable[date]) -> None:
    rows = [{"business_date": d, "status": OPEN} for d in sorted(set(dates))]
    if not rows:
        return
    ins = sqlite_insert(settlement_windows) if conn.dialect.name == "sqlite" else pg_insert(settlement_windows)
    conn.execute(ins.on_conflict_do_nothing(index_elements=["business_date"]), rows)


def resolve_business_dates_sync(conn: Connection, nominal: Iterable[date]) -> dict[date, date]:
    """``{nominal: effective}``: each date, or the next open one when its window is closed.

    Runs in the posting's transaction; on PostgreSQL the window rows are held ``FOR SHARE``.
    """
    wanted = sorted(set(nominal))
    result: dict[date, date] = {}
    pending = {d: d for d in wanted}
    for _ in range(MAX_CLOSED_DAYS_SKIPPED):
        if not pending:
            return result
        probe = sorted(set(pending.values()))
        q = (select(settlement_windows.c.business_date, settlement_windows.c.status)
             .where(settlement_windows.c.business_date.in_(probe)).with_for_update(read=True))
        status = {d: s for d, s in conn.execute(q)}
        if len(status) < len(probe):  # first posting of a date: create its row, then hold it like the others
            _ensure_rows(conn, [d for d in probe if d not in status])
            status = {d: s for d, s in conn.execute(q)}
        nxt = {}
        for orig, cand in pending.items():
            if status.get(cand, OPEN) == OPEN:
                result[orig] = cand
            else:
                nxt[orig] = cand + timedelta(days=1)
        pending = nxt
    raise RuntimeError("no open settlement window within a year")


def close_window_sync(conn: Connection, business_date: date) -> bool:
    """Mark ``business_date`` closed; False when it was already closed. Call inside a write transaction."""
    _ensure_rows(conn, [business_date])
    row = conn.execute(select(settlement_windows.c.status)
                       .where(settlement_windows.c.business_date == business_date).with_for_update()).first()
    if row is not None and row[0] == CLOSED:
        return False
    conn.execute(update(settlement_windows).where(settlement_windows.c.business_date == business_date)
                 .values(status=CLOSED, closed_at=datetime.now(UTC)))
    return True


async def close_window(conn: AsyncConnection, business_date: date) -> bool:
    """Close a business date on ``conn`` (from :func:`clearing.db.write_transaction`)."""
    return await conn.run_sync(close_window_sync, business_date)


async def close_window_now(engine: AsyncEngine, business_date: date) -> bool:
    """Close a business date in its own write transaction."""
    async with write_transaction(engine) as conn:
        return await close_window(conn, business_date)


async def window_status(conn: AsyncConnection, business_date: date) -> str:
    row = (await conn.execute(select(settlement_windows.c.status)
                              .where(settlement_windows.c.business_date == business_date))).first()
    return OPEN if row is None else str(row[0])


async def open_business_date(engine: AsyncEngine, at: datetime, cutoff: Cutoff | None = None) -> date:
    """The business date a posting at ``at`` would get now (closed windows skipped)."""
    c = cutoff or Cutoff()
    async with write_transaction(engine) as conn:
        return (await conn.run_sync(resolve_business_dates_sync, [c.business_date(at)]))[c.business_date(at)]
