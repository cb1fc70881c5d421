"""End-of-day fixtures: the clearing test world (SQLite and PostgreSQL) with one simulated business day.

The day (2026-03-10, Asia/Shanghai) goes through the real ClearingService: purchases on two
providers' terminals, an offline advice, voids, refunds, a reversal, a decline, and two
terminal batch settlements — one balanced, one whose terminal totals disagree with the host.
Invariants are checked after every test by the ``db`` fixture.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from clearing.calendar import BusinessCalendar
from clearing.eod import EodConfig
from clearing.settlement import journal_frame_sync
from clearing.signing import signer_for
from keys.issuer import IssuerKeySet
from protocol.messages import BatchSettle, BatchTotals
from simulator import bank_file as bank_file_sim
from tests.clearing.conftest import (  # noqa: F401 — fixtures re-exported for tests/eod
    PROVIDER_N,
    PROVIDER_V,
    TERM_N,
    TERM_V,
    World,
    build_world,
    db,
    keys,
    pg_schema,
)

DAY = date(2026, 3, 10)


@dataclass
class Day:
    world: World
    engine: AsyncEngine
    business_date: date
    rrns: dict[str, list[str]]


async def simulate_day(world: World) -> dict[str, list[str]]:
    """A small realistic day; returns the RRNs by kind."""
    out: dict[str, list[str]] = {"purchase": [], "void": [], "refund": [], "reversal": [], "advice": [], "declined": []}
    cards = [await world.add_card(i) for i in range(1, 7)]
    for c in cards:
        await world.fund(c, "voucher", 50_000)
        await world.fund(c, "nursing", 30_000)
    purchases = []
    for i in range(18):
        c = cards[i % len(cards)]
        if i % 4 == 3:
            msg = world.purchase(c, 1_000 + 37 * i, "nursing", terminal_id=TERM_N, provider_id=PROVIDER_N,
                                 category="nursing_care")
        else:
            msg = world.purchase(c, 1_500 + 53 * i)
        ans = await world.svc.handle(msg)
        assert ans.response_code == "00", ans
        purchases.append((msg, ans.rrn))
        out["purchase"].append(ans.rrn)
    for msg, rrn in purchases[:2]:  # voids (same batch, same day)
        ans = await world.svc.handle(world.void(msg, rrn))
        assert ans.response_code == "00", ans
        out["void"].append(ans.rrn)
    for msg, rrn in purchases[4:6]:  # partial refunds in another batch
        ans = await world.svc.handle(world.refund(msg, rrn, 500))
        assert ans.response_code == "00", ans
        out["refund"].append(ans.rrn)
    rev_msg = world.purchase(cards[0], 777)
    assert (await world.svc.handle(rev_msg)).response_code == "00"
    ans = await world.svc.handle(world.reversal(rev_msg))
    out["reversal"].append(ans.rrn)
    adv = await world.svc.handle(world.advice(cards[1], 888))
    assert adv.response_code == "00", adv
    out["advice"].append(adv.rrn)
    declined = await world.svc.handle(world.purchase(cards[2], 900_000))
    assert declined.response_code != "00"
    out["declined"].append(declined.rrn)
    # batch settlements: TERM_V balanced (host totals), TERM_N off by one purchase
    host_v = await world.svc.host_totals(TERM_V, "000001")
    await world.svc.handle(BatchSettle(terminal_id=TERM_V, msg_id=world.msg_id(), sent_at=world.now,
                                       provider_id=PROVIDER_V, batch_no="000001", totals=host_v))
    host_n = await world.svc.host_totals(TERM_N, "000001")
    wrong = BatchTotals(**{**host_n.model_dump(), "purchase_count": host_n.purchase_count + 1,
                           "purchase_fen": host_n.purchase_fen + 100})
    await world.svc.handle(BatchSettle(terminal_id=TERM_N, msg_id=world.msg_id(), sent_at=world.now,
                                       provider_id=PROVIDER_N, batch_no="000001", totals=wrong))
    return out


async def make_bank_file(day: Day, path: Path, rate: float = 0.3, seed: int = 5) -> bank_file_sim.BankFileResult:
    async with day.engine.connect() as conn:
        journal = await conn.run_sync(journal_frame_sync, day.business_date)
    result = bank_file_sim.generate(journal, rate, seed)
    bank_file_sim.write(path, result.rows, day.business_date, "BJBANK")
    return result


@pytest.fixture
async def day(db: AsyncEngine, keys: IssuerKeySet) -> AsyncIterator[Day]:  # noqa: F811
    world = await build_world(db, keys)
    async with world.svc:
        rrns = await simulate_day(world)
    yield Day(world, db, DAY, rrns)


@pytest.fixture
def eod_config(tmp_path: Path) -> EodConfig:
    data_dir = tmp_path / "data"
    data_dir.mkdir(exist_ok=True)
    return EodConfig(data_dir=data_dir, out_dir=tmp_path / "out", signer=signer_for(data_dir),
                     calendar=BusinessCalendar(holidays=frozenset({date(2026, 3, 11)})))


@pytest.fixture
async def sqlite_day(tmp_path: Path, keys: IssuerKeySet) -> AsyncIterator[tuple[str, Day]]:  # noqa: F811
    """A simulated day in an SQLite file the CLI can open by URL; invariants checked afterwards."""
    from clearing.db import init_db, make_engine
    from clearing.invariants import check_invariants

    url = f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}"
    engine = make_engine(url)
    await init_db(engine)
    world = await build_world(engine, keys)
    async with world.svc:
        rrns = await simulate_day(world)
    try:
        yield url, Day(world, engine, DAY, rrns)
        assert await check_invariants(engine) == []
    finally:
        await engine.dispose()
