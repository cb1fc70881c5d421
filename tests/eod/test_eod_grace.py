"""Grace near the cut-off (日期错位): no case at first, cross-day match resolves, expiry opens a case."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
from sqlalchemy import select

from clearing.eod import reconcile
from clearing.eod_schema import error_cases, recon_breaks
from clearing.settlement import journal_frame_sync
from simulator import bank_file as bf
from tests.clearing.conftest import SHANGHAI
from tests.eod.conftest import Day


async def _late_purchase(day: Day) -> str:
    w = day.world
    w.now = datetime(2026, 3, 10, 22, 55, tzinfo=SHANGHAI)  # five minutes before the 23:00 cut-off
    card = next(iter(w.cards))
    async with w.svc:
        ans = await w.svc.handle(w.purchase(card, 1_234))
    assert ans.response_code == "00" and ans.business_date == "2026-03-10"
    return ans.rrn


async def _files(day: Day, tmp_path: Path, late: str) -> tuple[Path, pl.DataFrame]:
    async with day.engine.connect() as conn:
        journal = await conn.run_sync(journal_frame_sync, day.business_date)
    rows = bf.generate(journal, 0.0).rows
    today = tmp_path / "bank-d.txt"
    bf.write(today, rows.filter(pl.col("rrn") != late), day.business_date, "BJBANK")  # the bank booked it next day
    return today, rows.filter(pl.col("rrn") == late)


async def _state(day: Day) -> tuple[list, list]:
    async with day.engine.connect() as conn:
        brk = (await conn.execute(select(recon_breaks.c.business_date, recon_breaks.c["class"], recon_breaks.c.rrn,
                                         recon_breaks.c.in_grace, recon_breaks.c.lifecycle)
                                  .order_by(recon_breaks.c.business_date))).all()
        cases = (await conn.execute(select(error_cases.c.business_date, error_cases.c.rrn, error_cases.c.status))).all()
    return [tuple(r) for r in brk], [tuple(r) for r in cases]


@pytest.mark.parametrize("bank_books_it_next_day", [True, False])
async def test_grace_then_cross_day_match_or_expiry(day: Day, eod_config, tmp_path: Path,
                                                    bank_books_it_next_day: bool) -> None:
    late = await _late_purchase(day)
    today, late_row = await _files(day, tmp_path, late)
    doc = await reconcile(day.engine, day.business_date, today, eod_config)
    assert [(b["class"], b["rrn"]) for b in doc["breaks"]] == [("host_only", late)]  # reported…
    assert doc["run"]["in_grace"] == 1 and doc["run"]["cases_opened"] == 0  # …but no case yet
    nxt = day.business_date + timedelta(days=1)
    tomorrow = tmp_path / "bank-d1.txt"
    bf.write(tomorrow, late_row if bank_books_it_next_day else late_row.head(0), nxt, "BJBANK")
    doc2 = await reconcile(day.engine, nxt, tomorrow, eod_config)
    breaks, cases = await _state(day)
    if bank_books_it_next_day:
        assert doc2["run"]["grace_cross_matched"] == 1 and doc2["run"]["cases_opened"] == 0
        assert breaks == [(day.business_date, "host_only", late, True, "resolved"),
                          (nxt, "bank_only", late, True, "resolved")]
        assert cases == []
    else:
        assert doc2["run"]["grace_expired"] == 1
        assert breaks == [(day.business_date, "host_only", late, False, "new")]
        assert cases == [(day.business_date, late, "open")]
