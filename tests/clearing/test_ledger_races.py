"""Two PostgreSQL writers (two workers) racing on one original: a purchase and its reversal, a void and a
reversal. Each batch reads the journal before it takes its account locks (READ COMMITTED); what another
worker commits in between must not leave the terminal and the host disagreeing, nor return money twice.
Each race is forced into the bad order with a row lock held by the test. Real server only (a SQLite batch
reads inside its one write lock)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncTransaction

from clearing.accounts import balance, card_account, ensure_accounts, provider_payable
from clearing.db import init_db, write_transaction
from clearing.invariants import check_invariants
from clearing.ledger import GroupCommitWriter, TxnOutcome, TxnRequest
from clearing.windows import open_business_date
from tests.clearing.conftest import drop_pg_schema, fresh_pg_engine
from tests.clearing.test_ledger import CARD, NOW, fund, req
from tests.clearing.test_ledger_pipeline import HOLD_KEY_SQL, wait_for

pytestmark = pytest.mark.pg
CARDS_Y = "6218880000000199990"
RETRIES = "carepay_ledger_batch_retries_total"


@pytest.fixture
async def pg(pg_url: str) -> AsyncIterator[AsyncEngine]:
    """A fresh schema with the card funded (1,000 fen) before the provider's account exists, so the card's
    account has the lower id: a batch locking both (id order) waits on the card holding nothing else."""
    engine, schema = await fresh_pg_engine(pg_url)
    try:
        await init_db(engine)
        await fund(engine, 1_000)
        await open_business_date(engine, NOW)
        async with write_transaction(engine) as conn:
            await ensure_accounts(conn, [provider_payable("P00000000000001")])
        yield engine
        assert await check_invariants(engine) == []
    finally:
        await engine.dispose()
        await drop_pg_schema(pg_url, schema)


def reversal(purchase: TxnRequest, n: int) -> TxnRequest:
    """The terminal's reversal of ``purchase`` (its own message ``n``)."""
    key = purchase.txn_key.removesuffix(":PURCHASE")
    return dataclasses.replace(
        purchase, txn_type="REVERSAL", txn_key=f"{key}:REVERSAL", msg_key=f"T0000001:M{n:011d}",
        orig_key=purchase.txn_key, debit=None, credit=None, counter=None,
        row={**purchase.row, "msg_id": f"M{n:011d}", "service_category": None})


def void(purchase: TxnOutcome, n: int) -> TxnRequest:
    """A void of the approved ``purchase`` (trace ``n``) in its batch."""
    base = req(n, purchase.row["amount_fen"])
    return dataclasses.replace(base, txn_type="VOID", txn_key=base.txn_key.replace(":PURCHASE", ":VOID"),
                               debit=None, credit=None, counter=None,
                               row={**base.row, "orig_rrn": purchase.row["rrn"], "service_category": None})


@contextlib.asynccontextmanager
async def two_workers(pg: AsyncEngine, pipeline: bool = False
                      ) -> AsyncIterator[tuple[GroupCommitWriter, GroupCommitWriter, AsyncConnection, AsyncTransaction]]:
    """Two writers on the schema as two workers (batches of one), and the test's holding transaction (:func:`holding`,
    left first: the writers then drain)."""
    async with GroupCommitWriter(pg, max_batch=1, window_ms=1, pipeline=pipeline) as a, \
            GroupCommitWriter(pg, max_batch=1, window_ms=1, pipeline=pipeline) as b, holding(pg) as (holder, trans):
        yield a, b, holder, trans


@contextlib.asynccontextmanager
async def holding(pg: AsyncEngine) -> AsyncIterator[tuple[AsyncConnection, AsyncTransaction]]:
    """A transaction of the test's that holds a row lock or a key; rolled back on the way out if the test did
    not (a failed assertion must not leave the writers draining batches that wait on it forever)."""
    async with pg.connect() as holder:
        trans = await holder.begin()
        try:
            yield holder, trans
        finally:
            if trans.is_active:
                await trans.rollback()


async def lock_waiters(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(text(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND datname = current_database()"))).scalar_one())


async def until_waiting(engine: AsyncEngine, n: int, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + 10
    while await lock_waiters(engine) < n:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def hold_row_lock(conn: AsyncConnection, code: str) -> None:
    await conn.execute(text("SELECT id FROM accounts WHERE code = :c FOR UPDATE"), {"c": code})


async def journal(engine: AsyncEngine, key: str) -> dict:
    async with engine.connect() as conn:
        row = (await conn.execute(text("SELECT status, response_code, transfer_id FROM host_txns "
                                       "WHERE txn_key = :k"), {"k": key})).mappings().one()
        return dict(row)


async def test_a_tombstone_committed_while_the_purchase_waits_declines_it(pg: AsyncEngine) -> None:
    """Worker A has read the journal for purchase P (no reversal yet) and waits for the card's lock; worker B
    takes P's reversal as a tombstone (P not received) and commits. A's recheck under its locks finds the
    tombstone: P is not posted ("reversed before it arrived") — as the terminal was told — and no money moves."""
    p = req(1, 300)
    raced = REGISTRY.get_sample_value(RETRIES, {"reason": "journal_raced"}) or 0.0
    async with two_workers(pg) as (a, b, holder, trans):
        await hold_row_lock(holder, card_account(CARD, "voucher"))
        fa = asyncio.ensure_future(a.submit(p))
        await until_waiting(pg, 1, "the purchase to wait for the card's lock")
        rb = await b.submit(reversal(p, 2))
        assert rb.row["response_code"] == "00" and rb.row.get("transfer_id") is None  # tombstone
        await trans.rollback()
        ra = await fa
    assert ra.row["response_code"] == "12" and ra.row["status"] == "REVERSED"
    assert a.stats.retries == 1
    assert REGISTRY.get_sample_value(RETRIES, {"reason": "journal_raced"}) == raced + 1  # what operators see
    assert (await journal(pg, p.txn_key))["transfer_id"] is None
    async with pg.connect() as conn:
        assert await balance(conn, card_account(CARD, "voucher")) == 1_000


async def test_a_pipelined_purchase_and_its_reversal_on_another_worker_agree(pg: AsyncEngine) -> None:
    """Worker A's batch before is held in flight (its insert waits on a key held by the test) and purchase P
    is decided on its state — journal read, accounts unlocked. Worker B takes P's reversal. Whichever commits
    first, the other's recheck under the provider's lock sees it: P ends REVERSED and the card has all its
    money — never P posted beside a tombstone (the terminal reversed it, the host would keep it)."""
    await fund(pg, 500, CARDS_Y)
    first, p = req(5, 100, card=CARDS_Y), req(1, 300)
    async with two_workers(pg, pipeline=True) as (a, b, holder, trans):
        await holder.execute(text(HOLD_KEY_SQL), {"k": first.txn_key, "h": "z" * 64, "t": NOW})
        f_first = asyncio.ensure_future(a.submit(first))
        fa = asyncio.ensure_future(a.submit(p))
        await wait_for(lambda: a._last_flight is not None and a._last_flight.before is not None
                       and a._last_flight.applied.is_set(), "P to apply on the state of the batch before")
        fb = asyncio.ensure_future(b.submit(reversal(p, 2)))
        await until_waiting(pg, 2, "the reversal to wait for the provider's lock")
        await trans.rollback()
        assert (await f_first).approved
        ra, rb = await fa, await fb
    assert rb.row["response_code"] == "00"
    assert (await journal(pg, p.txn_key))["status"] == "REVERSED"
    assert ra.row["response_code"] == "12" or rb.row.get("transfer_id") is not None
    assert a.stats.retries + b.stats.retries >= 1
    async with pg.connect() as conn:
        assert await balance(conn, card_account(CARD, "voucher")) == 1_000


async def test_a_reversal_waits_for_the_purchase_it_would_take_as_missing(pg: AsyncEngine) -> None:
    """Worker A has checked purchase P under its locks and is writing it (its insert waits on a key held by
    the test); worker B reads the journal for P's reversal, finds no P and — were it not to wait for the
    provider's lock A holds — would commit a tombstone while A then commits P. It waits; once P committed its
    recheck finds P, it runs again and reverses P for real: the money goes back, P is REVERSED."""
    p = req(1, 300)
    async with two_workers(pg) as (a, b, holder, trans):
        await holder.execute(text(HOLD_KEY_SQL), {"k": p.txn_key, "h": "z" * 64, "t": NOW})
        fa = asyncio.ensure_future(a.submit(p))
        await until_waiting(pg, 1, "the purchase's insert to wait on the held key")
        fb = asyncio.ensure_future(b.submit(reversal(p, 2)))
        await until_waiting(pg, 2, "the reversal to wait for the provider's lock")
        await trans.rollback()
        ra, rb = await fa, await fb
    assert ra.approved
    assert rb.row["response_code"] == "00" and rb.row.get("transfer_id") is not None  # the money went back
    assert b.stats.retries == 1
    assert (await journal(pg, p.txn_key))["status"] == "REVERSED"
    async with pg.connect() as conn:
        assert await balance(conn, card_account(CARD, "voucher")) == 1_000


async def test_a_void_and_a_reversal_of_one_purchase_return_its_money_once(pg: AsyncEngine) -> None:
    """P approved (300). Worker A voids it, worker B reverses it; both read P as untouched, then wait for the
    card's lock (held by the test), A first. A commits the void; B's recheck finds the void and runs again:
    the reversal is refused (original already voided). The card has its 1,000 back — not 1,300."""
    async with GroupCommitWriter(pg, max_batch=1, window_ms=1, pipeline=False) as w:
        p_req = req(1, 300)
        p = await w.submit(p_req)
    assert p.approved
    async with two_workers(pg) as (a, b, holder, trans):
        await hold_row_lock(holder, card_account(CARD, "voucher"))
        fa = asyncio.ensure_future(a.submit(void(p, 3)))
        await until_waiting(pg, 1, "the void to wait for the card's lock")
        fb = asyncio.ensure_future(b.submit(reversal(p_req, 4)))
        await until_waiting(pg, 2, "the reversal to wait for the card's lock")
        await trans.rollback()
        ra, rb = await fa, await fb
    assert ra.approved
    assert rb.row["response_code"] == "12" and rb.row.get("transfer_id") is None
    assert b.stats.retries == 1
    async with pg.connect() as conn:
        assert await balance(conn, card_account(CARD, "voucher")) == 1_000
