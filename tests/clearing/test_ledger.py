"""The ledger: group-commit writer, business dates and windows, direct postings, invariants, migrations."""

from __future__ import annotations

import asyncio
from datetime import UTC, date, datetime

import pytest
from sqlalchemy import select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from clearing.accounts import balance, card_account, ensure_accounts, provider_payable
from clearing.db import init_db, make_engine, write_transaction
from clearing.invariants import check_invariants
from clearing.ledger import (
    GroupCommitWriter,
    IdempotencyConflict,
    InsufficientFunds,
    TransferSpec,
    TxnOutcome,
    TxnRequest,
    post_transfers_sync,
)
from clearing.migrations import current_tables
from clearing.schema import accounts, host_txns, metadata, schema_migrations
from clearing.windows import Cutoff, close_window_now, open_business_date, window_status
from tests.clearing.conftest import drop_pg_schema, fresh_pg_engine

CARD = "6218880000000000015"
NOW = datetime(2026, 3, 10, 2, 0, tzinfo=UTC)


def req(n: int, amount: int = 100, *, card: str = CARD, at: datetime = NOW, body: str = "h",
        terminal: str = "T0000001") -> TxnRequest:
    trace = f"{n:06d}"
    return TxnRequest(
        txn_type="PURCHASE", txn_key=f"{terminal}:000001:{trace}:PURCHASE", msg_key=f"{terminal}:M{n:011d}",
        request_hash=body * 64 if len(body) == 1 else body, received_at=at,
        row={"provider_id": "P00000000000001", "terminal_id": terminal, "batch_no": "000001", "trace_no": trace,
             "program": "voucher", "card_no": card, "amount_fen": amount, "txn_time": at, "msg_id": f"M{n:011d}",
             "service_category": "meal", "orig_rrn": None},
        debit=card_account(card, "voucher"), credit=provider_payable("P00000000000001"), counter=(card, n))


async def fund(engine: AsyncEngine, amount: int, card: str = CARD) -> None:
    async with write_transaction(engine) as conn:
        await conn.run_sync(post_transfers_sync, [TransferSpec("fund:voucher:110105", card_account(card, "voucher"),
                                                               amount, "recharge", f"fund:{card}:{amount}")])


async def test_group_commit_batches_and_never_overdraws(db: AsyncEngine) -> None:
    await fund(db, 10_000)
    async with GroupCommitWriter(db, max_batch=50) as w:
        outs = await asyncio.gather(*(w.submit(req(i, 300)) for i in range(1, 101)))
    approved = [o for o in outs if o.approved]
    assert len(approved) == 33  # 33 × 300 = 9,900 ≤ 10,000
    assert all(o.row["response_code"] == "51" and o.row["status"] == "FAILED" for o in outs if not o.approved)
    assert w.stats.batches < 100 and w.stats.max_batch <= 50
    async with db.connect() as conn:
        assert await balance(conn, card_account(CARD, "voucher")) == 100
    assert len({o.row["rrn"] for o in outs}) == 100


async def test_batches_form_from_what_queued_never_by_waiting_on_a_timer(db: AsyncEngine) -> None:
    """Natural batching: the submitters of one event-loop turn share a batch; a lone request is written at once
    (not after the window); requests that trickle in (timer-spaced) are not held back to fill a batch — each
    batch takes what queued while the one before it was written."""
    await fund(db, 1_000_000)
    async with GroupCommitWriter(db, max_batch=100, window_ms=60_000) as w:
        together = await asyncio.gather(*(w.submit(req(i)) for i in range(1, 11)))
        assert all(o.approved for o in together) and (w.stats.batches, w.stats.max_batch) == (1, 10)

        lone = await asyncio.wait_for(w.submit(req(11)), 10)  # a window of 60 s is a bound, not a wait
        assert lone.approved and w.stats.batches == 2

        async def trickle(n: int) -> TxnOutcome:
            await asyncio.sleep(0.001 * (n - 11))
            return await w.submit(req(n))

        trickled = await asyncio.wait_for(asyncio.gather(*(trickle(n) for n in range(12, 32))), 10)
        assert all(o.approved for o in trickled)
        assert w.stats.batches > 3 and w.stats.max_batch < 20  # the first straggler did not wait for the rest


async def test_writer_replays_duplicates_and_names_conflicts(db: AsyncEngine) -> None:
    await fund(db, 1_000)
    async with GroupCommitWriter(db) as w:
        first = await w.submit(req(1, 100))
        again = await w.submit(req(1, 100))
        assert again.duplicate and again.row["rrn"] == first.row["rrn"]
        with pytest.raises(IdempotencyConflict):
            await w.submit(req(1, 200, body="x"))
        # duplicates inside one batch: one posting
        outs = await asyncio.gather(*(w.submit(req(2, 100)) for _ in range(5)))
    assert sum(not o.duplicate for o in outs) == 1
    async with db.connect() as conn:
        assert await balance(conn, card_account(CARD, "voucher")) == 800


async def test_business_date_cutoff_and_closed_window(db: AsyncEngine) -> None:
    cut = Cutoff()
    assert cut.business_date(datetime(2026, 3, 10, 14, 59, tzinfo=UTC)) == date(2026, 3, 10)  # 22:59 local
    assert cut.business_date(datetime(2026, 3, 10, 15, 0, tzinfo=UTC)) == date(2026, 3, 11)  # 23:00 local
    assert Cutoff(local_time=datetime(2000, 1, 1, 22, 0).time()).business_date(
        datetime(2026, 3, 10, 14, 30, tzinfo=UTC)) == date(2026, 3, 11)
    await fund(db, 1_000)
    assert await close_window_now(db, date(2026, 3, 10))
    assert not await close_window_now(db, date(2026, 3, 10))  # already closed
    async with db.connect() as conn:
        assert await window_status(conn, date(2026, 3, 10)) == "closed"
    assert await open_business_date(db, NOW) == date(2026, 3, 11)
    async with GroupCommitWriter(db) as w:
        out = await w.submit(req(1, 100))
    assert out.approved and out.row["business_date"] == date(2026, 3, 11)


async def test_close_racing_postings_lands_each_in_one_window(db: AsyncEngine) -> None:
    await fund(db, 100_000)
    async with GroupCommitWriter(db, max_batch=10) as w:
        posts = [asyncio.create_task(w.submit(req(i, 10))) for i in range(1, 61)]
        await asyncio.sleep(0)
        await close_window_now(db, date(2026, 3, 10))
        outs = await asyncio.gather(*posts)
    async with db.connect() as conn:
        closed_at = (await conn.execute(text("SELECT closed_at FROM settlement_windows WHERE status = 'closed'"))).scalar()
        dates = [r[0] for r in await conn.execute(select(host_txns.c.business_date))]
    assert closed_at is not None
    assert set(dates) <= {date(2026, 3, 10), date(2026, 3, 11)}
    assert all(o.approved for o in outs)


async def test_direct_postings_are_all_or_nothing(db: AsyncEngine) -> None:
    await fund(db, 500)
    with pytest.raises(InsufficientFunds):
        async with write_transaction(db) as conn:
            await conn.run_sync(post_transfers_sync, [
                TransferSpec(card_account(CARD, "voucher"), "suspense", 300, "adjust", "a1"),
                TransferSpec(card_account(CARD, "voucher"), "suspense", 300, "adjust", "a2")])
    async with db.connect() as conn:
        assert await balance(conn, card_account(CARD, "voucher")) == 500
        assert await balance(conn, "suspense") is None


async def test_invariant_checker_finds_tampering(db: AsyncEngine) -> None:
    from sqlalchemy.exc import IntegrityError

    await fund(db, 500)
    assert await check_invariants(db) == []
    code = card_account(CARD, "voucher")
    with pytest.raises(IntegrityError):  # the database itself refuses a negative beneficiary balance
        async with db.begin() as conn:
            await conn.execute(update(accounts).where(accounts.c.code == code)
                               .values(debits_posted=accounts.c.debits_posted + 700))
    async with db.begin() as conn:
        await conn.execute(update(accounts).where(accounts.c.code == code)
                           .values(debits_posted=accounts.c.debits_posted + 200))
    problems = await check_invariants(db)
    assert any("balance columns" in p for p in problems)
    assert any("sum of account debits" in p for p in problems)
    async with db.begin() as conn:  # restore, so the fixture's own check passes
        await conn.execute(update(accounts).where(accounts.c.code == code)
                           .values(debits_posted=accounts.c.debits_posted - 200))


async def test_init_db_is_versioned_and_idempotent(db: AsyncEngine) -> None:
    assert await init_db(db) == []
    async with db.connect() as conn:
        versions = list((await conn.execute(select(schema_migrations.c.version))).scalars())
    assert versions == ["0001", "0002", "0003", "0004"]
    tables = set(await current_tables(db))
    assert set(metadata.tables) <= tables  # every registered table, other parts' too
    async with db.connect() as conn:
        ids = await ensure_accounts(conn, ["suspense"])
        await conn.commit()
    assert set(ids) == {"suspense"}


@pytest.mark.pg
async def test_several_workers_on_postgresql_never_double_spend(pg_url: str) -> None:
    """Four writers (each its own engine and connection pool, like four worker processes) race
    on the same cards and the same provider account on the real server."""
    engines = []
    engine, schema = await fresh_pg_engine(pg_url)
    try:
        await init_db(engine)
        cards = [f"62188800000000{i:04d}0" for i in range(5)]
        for c in cards:
            await fund(engine, 1_000, c)
        engines = [make_engine(pg_url, pg_schema=schema) for _ in range(4)]
        writers = [GroupCommitWriter(e, max_batch=20, window_ms=2) for e in engines]
        for w in writers:
            await w.start()
        jobs = []
        n = 0
        for c in cards:
            for _ in range(12):  # 12 × 100 against 1,000 each: at most 10 may pass
                n += 1
                jobs.append(writers[n % 4].submit(req(n, 100, card=c, terminal=f"T{n % 4:07d}")))
        outs = await asyncio.gather(*jobs)
        for w in writers:
            await w.stop()
        assert sum(o.approved for o in outs) == 50
        async with engine.connect() as conn:
            for c in cards:
                assert await balance(conn, card_account(c, "voucher")) == 0
        assert await check_invariants(engine) == []
    finally:
        for e in engines:
            await e.dispose()
        await engine.dispose()
        await drop_pg_schema(pg_url, schema)


async def test_two_sqlite_writers_share_one_file(tmp_path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'two.db'}"
    e1, e2 = make_engine(url), make_engine(url)
    try:
        await init_db(e1)
        await fund(e1, 1_000)
        async with GroupCommitWriter(e1, max_batch=5) as w1, GroupCommitWriter(e2, max_batch=5) as w2:
            outs = await asyncio.gather(*((w1 if i % 2 else w2).submit(req(i, 100)) for i in range(1, 31)))
        assert sum(o.approved for o in outs) == 10
        assert await check_invariants(e1) == []
    finally:
        await e1.dispose()
        await e2.dispose()


async def test_driver_bulk_write_stays_inside_the_transaction(db: AsyncEngine) -> None:
    """A set-based write that is the FIRST statement of a transaction still rolls back with it."""
    from clearing.db import executemany_sync
    from clearing.schema import counters

    with pytest.raises(RuntimeError):
        async with write_transaction(db) as conn:
            await conn.run_sync(executemany_sync, counters, ("name", "value"), [("zz_test", 1)])
            raise RuntimeError("abort")
    async with db.connect() as conn:
        assert (await conn.execute(select(counters.c.value).where(counters.c.name == "zz_test"))).first() is None
