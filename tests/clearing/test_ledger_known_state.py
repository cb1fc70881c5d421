"""The writer's knowledge between batches (accounts, card counters: SQLite) must never outlive a change made
elsewhere or a failed batch; the batch handed to the database ahead of answering the previous one; key lists as
joins (``{ROWSn}``)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from clearing import ledger
from clearing.accounts import balance, card_account
from clearing.db import _pg_unnest_args, init_db, make_engine, render_in, write_transaction
from clearing.invariants import check_invariants
from clearing.ledger import GroupCommitWriter, TransferSpec, post_transfers_sync
from clearing.schema import host_txns, transfers
from tests.clearing.test_ledger import CARD, fund, req


async def test_balance_changed_by_another_connection_is_seen(db: AsyncEngine) -> None:
    await fund(db, 1_000)
    async with GroupCommitWriter(db) as w:
        assert (await w.submit(req(1, 600))).approved  # the writer now knows the card at 400
        await fund(db, 500)  # another connection: 900
        out = await w.submit(req(2, 800))
        assert out.approved and out.row["balance_after_fen"] == 100
        async with write_transaction(db) as conn:  # another connection takes 50 back: 50 left
            await conn.run_sync(post_transfers_sync, [TransferSpec(card_account(CARD, "voucher"), "fund:voucher:110105",
                                                                   50, "correction", "take-back")])
        out = await w.submit(req(3, 60))
        assert out.row["response_code"] == "51" and out.row["balance_after_fen"] == 50
        assert w.stats.retries == 0
    async with db.connect() as conn:
        assert await balance(conn, card_account(CARD, "voucher")) == 50


async def test_counter_spent_by_another_writer_is_seen(db: AsyncEngine) -> None:
    await fund(db, 10_000)
    async with GroupCommitWriter(db) as a, GroupCommitWriter(db) as b:
        assert (await a.submit(req(1))).approved  # a knows the card's highest counter: 1
        assert (await b.submit(req(5))).approved  # b spends 5 (gap 3)
        six = await a.submit(req(6))  # a must see 5: no gap
        assert six.approved and six.row["atc"] == 6 and six.row["atc_gap"] == 0
        replay = req(7)
        replay.counter = (CARD, 5)  # counter 5 again, other message: replayed
        assert (await a.submit(replay)).row["response_code"] == "59"
        assert a.stats.retries == 0 and b.stats.retries == 0
    async with db.connect() as conn:
        gaps = dict((await conn.execute(select(host_txns.c.atc, host_txns.c.atc_gap)
                                        .where(host_txns.c.atc.is_not(None)))).all())
    assert gaps == {1: 0, 5: 3, 6: 0}


async def test_failed_batch_forgets_what_it_changed_in_memory(db: AsyncEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    await fund(db, 1_000)
    real_write = ledger._Batch.write
    failures = iter([True])

    def write(self: ledger._Batch) -> None:
        if next(failures, False):
            raise RuntimeError("disk on fire")  # after apply: the batch's accounts were debited in memory
        real_write(self)

    async with GroupCommitWriter(db) as w:
        assert (await w.submit(req(1, 600))).approved  # 400 left
        monkeypatch.setattr(ledger._Batch, "write", write)
        with pytest.raises(ledger.LedgerError):
            await w.submit(req(2, 300))
        out = await w.submit(req(3, 350))  # 400 are there (not the failed batch's 100)
        assert out.approved and out.row["balance_after_fen"] == 50
    async with db.connect() as conn:
        assert await balance(conn, card_account(CARD, "voucher")) == 50


def test_known_state_is_dropped_when_anything_else_wrote(tmp_path: Path) -> None:
    path = tmp_path / "k.db"
    a = sqlite3.connect(path, isolation_level=None)
    b = sqlite3.connect(path, isolation_level=None)
    a.execute("PRAGMA journal_mode=WAL")
    a.execute("CREATE TABLE t (x)")
    acct = ledger._Acct(1, "card:1:voucher", 1, 0, 100)
    batch = SimpleNamespace(accts={acct.code: acct}, accts_by_id={1: acct}, max_atc={"c1": 4, "c2": 9},
                            atc_loaded={"c1"})
    state = ledger._KnownState()

    def committed_batch(raw: sqlite3.Connection) -> ledger._KnownState | None:
        raw.execute("BEGIN IMMEDIATE")
        got = state.check(raw)
        raw.execute("INSERT INTO t VALUES (1)")  # the batch's own writes
        raw.execute("COMMIT")
        state.keep(raw, batch)  # type: ignore[arg-type]
        return got

    assert committed_batch(a) is None  # nothing known yet
    assert state.max_atc == {"c1": 4}  # c2's counter was not loaded by the batch: not trusted
    assert committed_batch(a) is state and state.accts == {acct.code: acct}  # nobody else wrote
    b.execute("INSERT INTO t VALUES (2)")  # another connection commits
    assert committed_batch(a) is None
    committed_batch(a)
    a.execute("INSERT INTO t VALUES (3)")  # the same connection, written outside a batch
    assert committed_batch(a) is None
    committed_batch(a)
    assert committed_batch(b) is None  # another connection
    assert committed_batch(b) is state
    a.execute("BEGIN IMMEDIATE")
    assert state.check(a) is None and state.accts == {} and state.max_atc == {}  # dropped, not reused
    a.execute("ROLLBACK")
    a.close()
    b.close()


async def test_batches_handed_ahead_all_answered_and_connection_released(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'w.db'}")
    await init_db(engine)
    try:
        await fund(engine, 100_000)
        async with GroupCommitWriter(engine, max_batch=7) as w:
            outs = await asyncio.gather(*(w.submit(req(i, 10)) for i in range(1, 201)))
            assert engine.pool.checkedout() == 1  # the writer keeps its connection between batches
        assert all(o.approved for o in outs) and len({o.row["rrn"] for o in outs}) == 200
        assert [o.row["balance_after_fen"] for o in sorted(outs, key=lambda o: o.row["transfer_id"])] == list(
            range(100_000 - 10, 100_000 - 10 * 201, -10))  # applied one after the other, none twice
        assert w.stats.max_batch <= 7 and w.stats.batches >= 200 // 7
        assert engine.pool.checkedout() == 0  # released on stop
        assert await check_invariants(engine) == []
    finally:
        await engine.dispose()


def test_rows_placeholder_renders_a_join_source() -> None:
    sql = "SELECT h.id FROM {ROWS1} JOIN host_txns AS h ON h.txn_key = r1.v WHERE h.id {IN2}"
    q, params = render_in(sql, [(["a", "b"], "text"), ([1], "bigint")], True)
    assert q == ("SELECT h.id FROM (SELECT value AS v FROM json_each(?)) AS r1 JOIN host_txns AS h ON h.txn_key = r1.v "
                 "WHERE h.id IN (SELECT value FROM json_each(?))")
    assert params == ('["a", "b"]', "[1]")
    q, params = render_in(sql, [(["a", "b"], "text"), ([1], "bigint")], False)
    assert q == ("SELECT h.id FROM unnest($1::text[]) AS r1(v) JOIN host_txns AS h ON h.txn_key = r1.v "
                 "WHERE h.id = ANY($2::bigint[])")
    assert params == (["a", "b"], [1])


async def test_failed_batch_on_the_same_connection_drops_known_state(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "f.db"
    engine = make_engine(f"sqlite+aiosqlite:///{path}")
    await init_db(engine)
    await fund(engine, 1_000)
    await engine.dispose()
    raw = sqlite3.connect(path, isolation_level=None)
    dialect = engine.dialect
    state = ledger._KnownState()
    cut = ledger.Cutoff()
    try:
        (first,) = ledger._run_raw_sqlite(raw, dialect, [req(1, 600)], cut, None, state)
        assert first.approved and state.accts  # 400 left, known
        real_write = ledger._Batch.write

        def write(self: ledger._Batch) -> None:
            raise RuntimeError("disk on fire")  # after apply: 300 more taken in memory

        monkeypatch.setattr(ledger._Batch, "write", write)
        with pytest.raises(RuntimeError):
            ledger._run_raw_sqlite(raw, dialect, [req(2, 300)], cut, None, state)
        monkeypatch.setattr(ledger._Batch, "write", real_write)
        (third,) = ledger._run_raw_sqlite(raw, dialect, [req(3, 350)], cut, None, state)
        assert third.approved and third.row["balance_after_fen"] == 50
    finally:
        raw.close()


async def test_pg_text_columns_sent_joined_round_trip_exactly(db: AsyncEngine) -> None:
    """Text columns go to PostgreSQL as one separated string (SQLite: plain executemany); every value —
    empty, NULL, quotes, braces, commas, backslashes, non-ASCII, a separator character itself — comes back."""
    plain = ["", None, "a,b", '"q"', "{x}", "back\\slash", "NULL", "授权码", " lead", "x"]  # joined
    with_separators = ["sep\x1fin", "rs\x1ein", None]  # sent as an array
    for group, memos in enumerate((plain, with_separators)):
        specs = [TransferSpec("fund:voucher:110105", card_account(CARD, "voucher"), 100 + i, "recharge",
                              f"tk:{group}:{i}", memo) for i, memo in enumerate(memos)]
        async with write_transaction(db) as conn:
            ids = await conn.run_sync(post_transfers_sync, specs)
        async with db.connect() as conn:
            got = dict((await conn.execute(select(transfers.c.id, transfers.c.memo)
                                           .where(transfers.c.id.in_(ids)))).all())
        assert got == dict(zip(ids, memos, strict=True))
    assert isinstance(_pg_unnest_args(transfers, ("memo",), [(m,) for m in plain])[1][0], str)  # the joined form
    _, params = _pg_unnest_args(transfers, ("transfer_key", "memo"), [("a", "x\x1fy"), ("b", None)])
    assert isinstance(params[0], str) and params[1] == ["x\x1fy", None]  # a separator inside: sent as an array
