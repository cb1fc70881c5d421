"""Ledger invariants (账务恒等式), checked by tests after every scenario and by ``carepay clearing check``.

1. Σ debits = Σ credits over all transfers, and over all account balance columns;
2. no beneficiary (``no_overdraft``) account below zero;
3. each account's ``debits_posted`` / ``credits_posted`` equal the sums of its transfers;
4. each terminal message (terminal, batch, trace, type) has at most one journal row and
   at most one transfer; every approved journal row with money has exactly one transfer.

All queries run in ONE read transaction so they see one snapshot of the ledger even while postings
flow: ``REPEATABLE READ`` on PostgreSQL (READ COMMITTED would give each query its own snapshot and
false alarms such as "account totals != sum of transfers"); on SQLite the explicit ``BEGIN`` of
:mod:`clearing.db` makes the first read fix the WAL snapshot for the rest of the transaction.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from clearing.db import is_sqlite
from clearing.schema import FLAG_NO_OVERDRAFT, accounts, host_txns, transfers

SNAPSHOT_ISOLATION_PG = "REPEATABLE READ"


async def check_invariants(engine: AsyncEngine) -> list[str]:
    """Every violation found, as one line each (empty list = the ledger is consistent)."""
    async with engine.connect() as conn:
        if not is_sqlite(engine):
            conn = await conn.execution_options(isolation_level=SNAPSHOT_ISOLATION_PG)
        async with conn.begin():
            return await _check(conn)


async def _check(conn: AsyncConnection) -> list[str]:
    """The checks, on one connection inside one (snapshot) transaction."""
    problems: list[str] = []
    total = (await conn.execute(select(func.coalesce(func.sum(transfers.c.amount_fen), 0)))).scalar_one()
    dr, cr = (await conn.execute(select(func.coalesce(func.sum(accounts.c.debits_posted), 0),
                                        func.coalesce(func.sum(accounts.c.credits_posted), 0)))).one()
    if int(dr) != int(cr):
        problems.append(f"sum of account debits {dr} != sum of credits {cr}")
    if int(dr) != int(total) or int(cr) != int(total):
        problems.append(f"account totals (dr {dr}, cr {cr}) != sum of transfers {total}")
    neg = await conn.execute(select(accounts.c.code, accounts.c.credits_posted - accounts.c.debits_posted).where(
        accounts.c.flags.op("&")(FLAG_NO_OVERDRAFT) != 0, accounts.c.credits_posted < accounts.c.debits_posted))
    for code, bal in neg:
        problems.append(f"beneficiary account {code.split(':')[0]}#{code.rsplit(':', 1)[-1]} negative: {bal}")
    d_sums = (select(transfers.c.debit_account_id.label("aid"), func.sum(transfers.c.amount_fen).label("s"))
              .group_by(transfers.c.debit_account_id).subquery())
    c_sums = (select(transfers.c.credit_account_id.label("aid"), func.sum(transfers.c.amount_fen).label("s"))
              .group_by(transfers.c.credit_account_id).subquery())
    q = (select(accounts.c.id, accounts.c.debits_posted, accounts.c.credits_posted,
                func.coalesce(d_sums.c.s, 0), func.coalesce(c_sums.c.s, 0))
         .outerjoin(d_sums, d_sums.c.aid == accounts.c.id).outerjoin(c_sums, c_sums.c.aid == accounts.c.id)
         .where((accounts.c.debits_posted != func.coalesce(d_sums.c.s, 0))
                | (accounts.c.credits_posted != func.coalesce(c_sums.c.s, 0))))
    for aid, dp, cp, ds, cs in await conn.execute(q):
        problems.append(f"account {aid}: balance columns (dr {dp}, cr {cp}) != transfers (dr {ds}, cr {cs})")
    q = (select(host_txns.c.terminal_id, host_txns.c.batch_no, host_txns.c.trace_no, host_txns.c.txn_type,
                func.count()).group_by(host_txns.c.terminal_id, host_txns.c.batch_no, host_txns.c.trace_no,
                                       host_txns.c.txn_type).having(func.count() > 1))
    for t, b, tr, ty, n in await conn.execute(q):
        problems.append(f"message {t}/{b}/{tr}/{ty} journaled {n} times")
    q = (select(transfers.c.terminal_id, transfers.c.batch_no, transfers.c.trace_no, transfers.c.code, func.count())
         .where(transfers.c.terminal_id.is_not(None))
         .group_by(transfers.c.terminal_id, transfers.c.batch_no, transfers.c.trace_no, transfers.c.code)
         .having(func.count() > 1))
    for t, b, tr, code, n in await conn.execute(q):
        problems.append(f"message {t}/{b}/{tr}/{code} posted {n} times")
    q = select(func.count()).select_from(host_txns).where(
        host_txns.c.response_code == "00", host_txns.c.transfer_id.is_(None),
        host_txns.c.txn_type.in_(("PURCHASE", "ADVICE")))
    n = (await conn.execute(q)).scalar_one()
    if n:
        problems.append(f"{n} approved purchase(s) without a transfer")
    q = select(func.count()).select_from(host_txns).where(host_txns.c.status == "FAILED",
                                                          host_txns.c.transfer_id.is_not(None))
    n = (await conn.execute(q)).scalar_one()
    if n:
        problems.append(f"{n} declined journal row(s) with a transfer")
    return problems
