"""Migration 0002 on a database in the 0001 shape WITH data: card counters move onto their journal rows, the
replay rule still holds afterwards, the correction indexes become partial; a counter row without its journal
row stops the migration and leaves the database as it was. SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import inspect, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from clearing.db import DatabaseError, init_db, make_engine
from clearing.invariants import check_invariants
from clearing.ledger import GroupCommitWriter
from clearing.migrations.versions import v0001_initial
from clearing.schema import host_txns
from tests.clearing.conftest import drop_pg_schema, fresh_pg_engine
from tests.clearing.test_ledger import CARD, fund, req


@pytest.fixture(params=["sqlite", "pg"])
async def fresh(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[AsyncEngine]:
    """A NEW database (its own file / PostgreSQL schema): these tests rewrite the schema."""
    if request.param == "sqlite":
        engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'm.db'}")
        yield engine
        await engine.dispose()
        return
    url = request.getfixturevalue("pg_url")
    engine, schema = await fresh_pg_engine(url)
    try:
        yield engine
    finally:
        await engine.dispose()
        await drop_pg_schema(url, schema)


def _to_0001(conn: Connection) -> None:
    """Put a migrated database back into the 0001 shape, counters in ``card_counters`` as 0001 wrote them."""
    conn.execute(text("DROP INDEX uq_host_txns_card_atc"))
    for name in ("ix_host_txns_orig_rrn", "ix_host_txns_orig_key"):
        conn.execute(text(f"DROP INDEX {name}"))
        conn.execute(text(f"CREATE INDEX {name} ON host_txns ({name.removeprefix('ix_host_txns_')})"))
    v0001_initial.card_counters.create(conn)
    conn.execute(text("INSERT INTO card_counters (counter_key, card_no, atc, gap, rrn, created_at) "
                      "SELECT card_no || ':' || atc, card_no, atc, atc_gap, rrn, created_at FROM host_txns "
                      "WHERE atc IS NOT NULL"))
    conn.execute(text("ALTER TABLE host_txns DROP COLUMN atc"))
    conn.execute(text("ALTER TABLE host_txns DROP COLUMN atc_gap"))
    conn.execute(text("DELETE FROM schema_migrations WHERE version = '0002'"))


async def _old_database_with_counters(engine: AsyncEngine) -> list[tuple[str, int, int]]:
    await init_db(engine)
    await fund(engine, 10_000)
    async with GroupCommitWriter(engine) as w:  # counters 1, 2, 5 (gap 2), 7 (gap 1); 5 replayed: 59
        outs = await asyncio.gather(*(w.submit(req(n)) for n in (1, 2, 5, 7)))
        replay = req(99)
        replay.counter = (CARD, 5)
        assert (await w.submit(replay)).row["response_code"] == "59"
    assert all(o.approved for o in outs)
    async with engine.begin() as conn:
        await conn.run_sync(_to_0001)
    async with engine.connect() as conn:
        assert "card_counters" in await conn.run_sync(lambda c: inspect(c).get_table_names())
        rows = (await conn.execute(text("SELECT rrn, atc, gap FROM card_counters ORDER BY atc"))).all()
    return [tuple(r) for r in rows]


async def test_0002_moves_card_counters_onto_journal_rows(fresh: AsyncEngine) -> None:
    before = await _old_database_with_counters(fresh)
    assert [(a, g) for _, a, g in before] == [(1, 0), (2, 0), (5, 2), (7, 1)]
    assert await init_db(fresh) == ["0002"]
    async with fresh.connect() as conn:
        assert "card_counters" not in await conn.run_sync(lambda c: inspect(c).get_table_names())
        moved = (await conn.execute(select(host_txns.c.rrn, host_txns.c.atc, host_txns.c.atc_gap)
                                    .where(host_txns.c.atc.is_not(None)).order_by(host_txns.c.atc))).all()
        indexes = {ix["name"]: ix for ix in await conn.run_sync(lambda c: inspect(c).get_indexes("host_txns"))}
    assert [tuple(r) for r in moved] == before
    assert indexes["uq_host_txns_card_atc"]["unique"]
    for name in ("ix_host_txns_orig_rrn", "ix_host_txns_orig_key", "uq_host_txns_card_atc"):
        where = indexes[name].get("dialect_options", {})
        assert any("IS NOT NULL" in str(v).upper() for v in where.values()), (name, indexes[name])
    # the replay rule holds on the moved data: counter 2 again is refused, counter 8 passes with no gap
    async with GroupCommitWriter(fresh) as w:
        again, nxt = req(98), req(8)
        again.counter = (CARD, 2)
        out_again, out_next = await asyncio.gather(w.submit(again), w.submit(nxt))
    assert out_again.row["response_code"] == "59" and out_again.row["atc"] is None
    assert out_next.approved and (out_next.row["atc"], out_next.row["atc_gap"]) == (8, 0)
    # and the database refuses a second row for a spent counter even without the writer
    async with fresh.connect() as conn:
        with pytest.raises(IntegrityError):
            await conn.execute(text("UPDATE host_txns SET atc = 7 WHERE atc = 8"))
    assert await check_invariants(fresh) == []


async def test_0002_stops_on_a_counter_without_its_journal_row(fresh: AsyncEngine) -> None:
    await _old_database_with_counters(fresh)
    async with fresh.begin() as conn:
        await conn.execute(text("INSERT INTO card_counters (counter_key, card_no, atc, gap, rrn, created_at) "
                                f"VALUES ('{CARD}:40', '{CARD}', 40, 0, '999999999999', CURRENT_TIMESTAMP)"))
    with pytest.raises(DatabaseError, match="1 card_counters row"):
        await init_db(fresh)
    async with fresh.connect() as conn:  # rolled back: still the 0001 shape, nothing lost
        assert (await conn.execute(text("SELECT count(*) FROM card_counters"))).scalar_one() == 5
        columns = {c["name"] for c in await conn.run_sync(lambda c: inspect(c).get_columns("host_txns"))}
    assert "atc" not in columns
