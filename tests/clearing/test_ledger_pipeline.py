"""The PostgreSQL writer's pipeline: a purchase batch decided on the results of the batch before it while that
one still commits — the same decisions as one after the other; a balance moved elsewhere meanwhile, or a batch
before that fails, makes it run again plainly. Real server only (SQLite has one writer and no pipeline)."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import defaultdict
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncTransaction

from clearing.accounts import balance, card_account, ensure_accounts, provider_payable
from clearing.db import init_db, write_transaction
from clearing.invariants import check_invariants
from clearing.ledger import (
    GroupCommitWriter,
    IdempotencyConflict,
    TransferSpec,
    TxnRequest,
    post_transfers_sync,
)
from clearing.windows import open_business_date
from tests.clearing.conftest import drop_pg_schema, fresh_pg_engine
from tests.clearing.test_ledger import NOW, fund, req

CARDS = [f"62188800000001{i:04d}0" for i in range(30)]
X = CARDS[0]


@pytest.fixture
async def pg(pg_url: str) -> AsyncIterator[AsyncEngine]:
    engine, schema = await fresh_pg_engine(pg_url)
    try:
        await init_db(engine)
        yield engine
        assert await check_invariants(engine) == []
    finally:
        await engine.dispose()
        await drop_pg_schema(pg_url, schema)


async def wait_for(cond, what: str, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


@pytest.mark.pg
async def test_pipelined_batches_decide_as_if_one_after_another(pg: AsyncEngine) -> None:
    """600 purchases over 30 cards of 1,000 fen, in batches of at most 25: per card the approvals' balances
    after run down by exactly each amount in journal order, every 51 saw less than it asked for, the final
    balance is what is left — whatever batch, pipelined or not, each landed in."""
    for c in CARDS:
        await fund(pg, 1_000, c)
    rng = random.Random(5)
    work = [(n, rng.choice(CARDS), rng.randint(10, 120)) for n in range(1, 601)]
    async with GroupCommitWriter(pg, max_batch=25, window_ms=1) as w:
        assert w.pipeline
        queue = iter(work)

        async def submitter() -> list:
            return [await w.submit(req(n, amount, card=card)) for n, card, amount in queue]

        outs = [o for chunk in await asyncio.gather(*(submitter() for _ in range(60))) for o in chunk]
    assert w.stats.pipelined > 5 and w.stats.redone == 0  # the pipeline ran; one writer never conflicts itself
    by_card = defaultdict(list)
    for o in outs:
        by_card[o.row["card_no"]].append(o.row)
    async with pg.connect() as conn:
        for card, rows in by_card.items():
            running = 1_000
            for row in sorted(rows, key=lambda r: r["rrn"]):  # RRNs are handed out in posting order
                if row["response_code"] == "00":
                    running -= row["amount_fen"]
                    assert row["balance_after_fen"] == running >= 0
                else:
                    assert row["response_code"] == "51" and running < row["amount_fen"]
                    assert row["balance_after_fen"] == running
            assert await balance(conn, card_account(card, "voucher")) == running
    assert len({o.row["rrn"] for o in outs}) == 600


HOLD_KEY_SQL = (
    "INSERT INTO host_txns (rrn, txn_key, msg_key, request_hash, business_date, provider_id, terminal_id, "
    "batch_no, trace_no, txn_type, amount_fen, fee_fen, txn_time, status, response_code, msg_id, message, "
    "created_at) VALUES ('999999999999', :k, 'held:1', :h, '2026-03-10', 'P00000000000001', 'T0000009', "
    "'000001', '000001', 'PURCHASE', 1, 0, :t, 'FAILED', '96', 'held', 'held', :t)")
"""A journal row under batch A's key, inserted and kept uncommitted by another transaction: A's write waits on it."""


@contextlib.asynccontextmanager
async def a_held_while_b_builds_on_it(pg: AsyncEngine, a: TxnRequest, b: TxnRequest
                                      ) -> AsyncIterator[tuple[GroupCommitWriter, asyncio.Future, asyncio.Future,
                                                               AsyncTransaction]]:
    """A writer with batches of one, and batch A kept in flight while batch B builds on it: another transaction
    has inserted a journal row under A's key and keeps it uncommitted (A's write waits on it). Yields once B
    has applied on A's state; the caller then rolls that transaction back (A goes on) or commits it (A fails).
    (The day's settlement window and the provider's account exist first: the first posting of a day or at a
    provider creates them, and a batch after it cannot see them, or refer to them, before that one commits.)"""
    await open_business_date(pg, NOW)
    async with write_transaction(pg) as conn:
        await ensure_accounts(conn, [provider_payable("P00000000000001")])
    async with pg.connect() as held:
        trans = await held.begin()
        await held.execute(text(HOLD_KEY_SQL), {"k": a.txn_key, "h": "z" * 64, "t": NOW})
        async with GroupCommitWriter(pg, max_batch=1, window_ms=1) as w:
            fa = asyncio.ensure_future(w.submit(a))
            fb = asyncio.ensure_future(w.submit(b))
            await wait_for(lambda: w._last_flight is not None and w._last_flight.before is not None
                           and w._last_flight.applied.is_set(), "batch B to apply on A's state")
            yield w, fa, fb, trans


@pytest.mark.pg
async def test_a_balance_moved_meanwhile_makes_the_batch_run_again(pg: AsyncEngine) -> None:
    """A (card Y) is held in flight; B (300 on card X, 1,000 on it) is decided on the state as A leaves it and
    reads X unlocked — approve. Before B commits, 800 leave X elsewhere: B's check at its commit point finds X
    moved, B runs again plainly and, as one after the other would, declines (200 < 300)."""
    y = CARDS[1]
    await fund(pg, 1_000, X)
    await fund(pg, 1_000, y)
    async with a_held_while_b_builds_on_it(pg, req(1, 600, card=y), req(2, 300, card=X)) as (w, fa, fb, held):
        async with write_transaction(pg) as conn:  # elsewhere: 800 fen leave card X
            await conn.run_sync(post_transfers_sync, [TransferSpec(card_account(X, "voucher"), "suspense", 800,
                                                                   "correction", "elsewhere:1")])
        await held.rollback()  # A goes on and commits
        out_a, out_b = await fa, await fb
    assert out_a.approved and out_a.row["balance_after_fen"] == 400
    assert out_b.row["response_code"] == "51" and out_b.row["balance_after_fen"] == 200
    assert w.stats.redone == 1
    async with pg.connect() as conn:
        assert await balance(conn, card_account(X, "voucher")) == 200


@pytest.mark.pg
async def test_after_a_conflict_the_pipeline_builds_on_sound_batches_again(pg: AsyncEngine) -> None:
    """One batch that has to run again (B: its card moved elsewhere meanwhile) dooms the batches already built
    on it, but no more: a batch that starts once a state below it has failed runs plainly, and the batches after
    it are pipelined on sound states again. (It used to build on the newest batch in flight whatever that stood
    on, so under steady traffic every later batch was built on one bound to fail and ran twice — for good.)"""
    y = CARDS[1]
    for c in CARDS[:6]:
        await fund(pg, 1_000, c)
    async with a_held_while_b_builds_on_it(pg, req(1, 600, card=y), req(2, 300, card=X)) as (w, fa, fb, held):
        stop = asyncio.Event()
        outs: list[asyncio.Future] = []

        async def traffic() -> None:  # arrivals on their own clock, answered or not (terminals do not wait on
            n = 10_000                # each other): a new batch starts as soon as the one before it applied
            while not stop.is_set():
                n += 1
                outs.append(asyncio.ensure_future(w.submit(req(n, 1, card=CARDS[2 + n % 4], terminal="T0000002"))))
                await asyncio.sleep(0.002)

        feeding = asyncio.create_task(traffic())
        try:
            await wait_for(lambda: len(w._flights) >= 4, "batches built on B")
            async with write_transaction(pg) as conn:  # elsewhere: 800 fen leave card X — B's check will fail
                await conn.run_sync(post_transfers_sync, [TransferSpec(card_account(X, "voucher"), "suspense", 800,
                                                                       "correction", "elsewhere:1")])
            await held.rollback()  # A commits; B and what was built on it run again
            assert (await fa).approved and (await fb).row["response_code"] == "51"
            pipelined = w.stats.pipelined
            await wait_for(lambda: w.stats.pipelined - pipelined >= 30, "pipelined batches to commit again", 20)
        finally:
            stop.set()
            await feeding
        assert all(o.approved for o in await asyncio.gather(*outs))
    assert w.stats.redone < len(outs) / 2  # the batches doomed when B failed ran twice, not all that came after


@pytest.mark.pg
async def test_a_failed_batch_before_makes_the_next_run_again(pg: AsyncEngine) -> None:
    """A is held in flight and then fails (its key was taken by a different request meanwhile); B had decided
    on A's result (400 left) — it runs again plainly on what committed: A posted nothing, B is approved from 1,000."""
    await fund(pg, 1_000, X)
    async with a_held_while_b_builds_on_it(pg, req(1, 600, card=X), req(2, 300, card=X)) as (w, fa, fb, held):
        await held.commit()  # the key is taken for good: A fails, and on its retry finds another body there
        with pytest.raises(IdempotencyConflict):
            await fa
        out_b = await fb
    assert out_b.approved and out_b.row["balance_after_fen"] == 700
    assert w.stats.redone >= 1
    async with pg.connect() as conn:
        assert await balance(conn, card_account(X, "voucher")) == 700


async def test_only_purchase_batches_build_on_a_batch_in_flight() -> None:
    """Voids, refunds and reversals read originals and tombstones a batch in flight has not committed: a batch
    holding one, or following one, waits for the batch before it to end and runs plainly; so does any batch
    after one that has ended, or whose state failed."""
    from clearing.ledger import _Flight, _Prior

    class Published:  # the part of _Prior that builds_on reads
        failed, committed, doomed, chain = _Prior.failed, _Prior.committed, _Prior.doomed, _Prior.chain

        def __init__(self) -> None:
            self.outcome = asyncio.get_running_loop().create_future()
            self.before: Published | None = None

    def flight(*types: str, before: _Flight | None = None, published: bool = True) -> _Flight:
        reqs = [req(n) for n in range(1, len(types) + 1)]
        for r, t in zip(reqs, types, strict=True):
            r.txn_type = t
        f = _Flight(reqs, before)
        f.prior = Published() if published else None  # type: ignore[assignment]
        return f

    a = flight("PURCHASE", "ADVICE")
    assert flight("PURCHASE").builds_on() is None  # nothing before it
    assert flight("PURCHASE", before=a).builds_on() is a.prior
    assert flight("PURCHASE", "VOID", before=a).builds_on() is None
    assert flight("PURCHASE", before=flight("PURCHASE", "REVERSAL")).builds_on() is None
    assert flight("PURCHASE", before=flight("REFUND")).builds_on() is None
    assert flight("PURCHASE", before=flight("PURCHASE", published=False)).builds_on() is None  # not applied yet
    failed = flight("PURCHASE")
    failed.prior.outcome.set_result(False)
    assert flight("PURCHASE", before=failed).builds_on() is None
    on_failed = flight("PURCHASE", before=failed)  # applied on the failed state before its failure was known
    on_failed.prior.before = failed.prior
    assert flight("PURCHASE", before=on_failed).builds_on() is None  # doomed with it: not a base to build on
    on_committed = flight("PURCHASE")
    on_committed.prior.before = flight("PURCHASE").prior
    on_committed.prior.before.outcome.set_result(True)
    assert flight("PURCHASE", before=on_committed).builds_on() is on_committed.prior
    ended = flight("PURCHASE")
    ended.ended.set()
    assert flight("PURCHASE", before=ended).builds_on() is None
