"""The soak's checks catch what they claim to catch (a checker that never fails proves nothing)."""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from clearing.db import init_db, make_engine
from clearing.schema import accounts, host_txns, transfers
from tests.soak.scenario import journal_vs_host, posted_twice

TID = "K0000001"
NOW = datetime(2026, 3, 1, 2, 0, tzinfo=UTC)


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncEngine:
    eng = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'c.db'}")
    await init_db(eng)
    async with eng.begin() as conn:
        await conn.execute(host_txns.insert().values(
            rrn="000000000001", txn_key=f"{TID}:000001:000001:PURCHASE", msg_key=f"{TID}:m1", request_hash="h" * 64,
            business_date=date(2026, 3, 1), provider_id="P11010500000001", terminal_id=TID, batch_no="000001",
            trace_no="000001", txn_type="PURCHASE", program="voucher", card_no="6218880000000000012",
            amount_fen=500, fee_fen=0, txn_time=NOW, status="SUCCESS", response_code="00", msg_id="m1",
            message="", created_at=NOW))
    yield eng
    await eng.dispose()


class FakeJournal:
    def __init__(self, *rows: tuple[str, str, int]) -> None:
        self._rows = [SimpleNamespace(kind=k, state=s, batch_no="000001", trace_no=f"{i + 1:06d}", amount_fen=a)
                      for i, (k, s, a) in enumerate(rows)]

    def rows(self) -> list[SimpleNamespace]:
        return self._rows


async def test_agreeing_journal_passes(engine: AsyncEngine) -> None:
    assert await journal_vs_host(engine, FakeJournal(("purchase", "approved", 500)), TID) == []


@pytest.mark.parametrize(("journal", "expected"), [
    (FakeJournal(("purchase", "reversed", 500)), "reversed on the terminal, SUCCESS on the host"),
    (FakeJournal(("purchase", "approved", 400)), "amount 400 on the terminal, 500 on the host"),
    (FakeJournal(), "on the host, not on the terminal"),
    (FakeJournal(("purchase", "pending", 500)), "still pending"),
    (FakeJournal(("purchase", "approved", 500), ("void", "approved", 500)), "approved on the terminal, host has no"),
])
async def test_disagreements_are_found(engine: AsyncEngine, journal: FakeJournal, expected: str) -> None:
    problems = await journal_vs_host(engine, journal, TID)
    assert any(expected in p for p in problems), problems


async def test_posted_twice_is_found(engine: AsyncEngine) -> None:
    assert await posted_twice(engine) == []
    async with engine.begin() as conn:
        for i, code in ((1, "card:x"), (2, "provider:y")):
            await conn.execute(accounts.insert().values(id=i, code=code, kind="card", flags=0, debits_posted=0,
                                                        credits_posted=0, created_at=NOW))
        for tid_ in (1, 2):  # the same purchase moved money twice
            await conn.execute(transfers.insert().values(
                id=tid_, transfer_key=f"purchase:k{tid_}", debit_account_id=1, credit_account_id=2, amount_fen=500,
                code="purchase", business_date=date(2026, 3, 1), created_at=NOW, terminal_id=TID,
                batch_no="000001", trace_no="000001", rrn="000000000001"))
    problems = await posted_twice(engine)
    assert problems and "posted twice" in problems[0]
