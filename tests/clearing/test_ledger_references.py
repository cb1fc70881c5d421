"""References between ledger rows hold on both backends: SQLite's foreign keys, PostgreSQL's set-based
reference triggers (migrations 0003, 0004) — a missing account or transfer is refused, none can ever go
(0004), and a bulk statement with one bad row fails as a whole. Also the PostgreSQL bulk-insert statement shape."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest
from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from clearing.accounts import card_account, ensure_accounts
from clearing.db import _pg_unnest_args, write_transaction
from clearing.ledger import GroupCommitWriter
from clearing.schema import accounts, host_txns, transfers
from tests.clearing.test_ledger import CARD, fund, req

NOW = datetime(2026, 3, 10, 2, 0, tzinfo=UTC)


def transfer_row(tid: int, dr: int, cr: int) -> dict[str, object]:
    return {"id": tid, "transfer_key": f"test:{tid}", "debit_account_id": dr, "credit_account_id": cr,
            "amount_fen": 1, "code": "test", "business_date": date(2026, 3, 10), "created_at": NOW}


async def _two_accounts(db: AsyncEngine) -> tuple[int, int]:
    async with db.connect() as conn:
        ids = await ensure_accounts(conn, ["suspense", card_account(CARD, "voucher")])
        await conn.commit()
    return ids["suspense"], ids[card_account(CARD, "voucher")]


async def test_transfer_to_a_missing_account_is_refused(db: AsyncEngine) -> None:
    a, b = await _two_accounts(db)
    with pytest.raises(IntegrityError):
        async with db.begin() as conn:
            await conn.execute(transfers.insert(), [transfer_row(900_001, a, b), transfer_row(900_002, a, 10**9)])
    with pytest.raises(IntegrityError):
        async with db.begin() as conn:
            await conn.execute(transfers.insert(), [transfer_row(900_003, 10**9, b)])
    async with db.connect() as conn:  # the whole statement failed: not even the good row is there
        assert (await conn.execute(select(func.count()).select_from(transfers))).scalar_one() == 0


async def test_journal_row_to_a_missing_transfer_is_refused(db: AsyncEngine) -> None:
    await fund(db, 1_000)
    async with GroupCommitWriter(db) as w:
        out = await w.submit(req(1))
    assert out.approved
    with pytest.raises(IntegrityError):
        async with db.begin() as conn:
            await conn.execute(update(host_txns).where(host_txns.c.rrn == out.row["rrn"]).values(transfer_id=10**9))


async def test_accounts_and_transfers_are_permanent(db: AsyncEngine) -> None:
    """Migration 0004: no ledger account or transfer is ever deleted or given another id — referenced or not."""
    await fund(db, 1_000)
    async with GroupCommitWriter(db) as w:
        out = await w.submit(req(1))
    async with write_transaction(db) as conn:
        ids = await ensure_accounts(conn, ["expired:nursing"])  # an account nothing refers to yet
    for stmt in (delete(accounts).where(accounts.c.code == card_account(CARD, "voucher")),
                 delete(accounts).where(accounts.c.id == ids["expired:nursing"]),
                 update(accounts).where(accounts.c.id == ids["expired:nursing"]).values(id=10**9),
                 delete(transfers).where(transfers.c.id == out.row["transfer_id"]),
                 update(transfers).where(transfers.c.id == out.row["transfer_id"]).values(id=10**9)):
        with pytest.raises(IntegrityError):
            async with db.begin() as conn:
                await conn.execute(stmt)
    async with db.connect() as conn:  # everything still there; other columns still change as before
        assert (await conn.execute(select(func.count()).select_from(accounts).where(
            accounts.c.id == ids["expired:nursing"]))).scalar_one() == 1
        assert (await conn.execute(select(func.count()).select_from(transfers))).scalar_one() == 2
    async with db.begin() as conn:
        await conn.execute(update(accounts).where(accounts.c.id == ids["expired:nursing"]).values(flags=0))


def test_pg_bulk_insert_binds_constant_columns_once() -> None:
    rows = [(1, "a", date(2026, 3, 10), None), (2, "b", date(2026, 3, 10), None)]
    sql, params = _pg_unnest_args(transfers, ("id", "transfer_key", "business_date", "memo"), rows)
    assert sql == ("INSERT INTO transfers (id, transfer_key, business_date, memo) SELECT u.c1, u.c2, $3::date, "
                   "$4::text FROM unnest($1::bigint[], string_to_array($2::text, chr(31), chr(30))) AS u(c1, c2)")
    assert params == [[1, 2], "a\x1fb", date(2026, 3, 10), None]  # a text column: one separated string
    # every column the same: one stays an array (it gives unnest its row count)
    sql, params = _pg_unnest_args(transfers, ("code", "memo"), [("x", None), ("x", None)])
    assert sql.endswith("SELECT u.c1, $2::text FROM unnest(string_to_array($1::text, chr(31), chr(30))) AS u(c1)")
    assert params == ["x\x1fx", None]
    sql, params = _pg_unnest_args(transfers, ("code",), [("x",)])  # one row: plain arrays
    assert params == [["x"]] and "unnest($1::text[])" in sql
