"""Error accounts: cases from breaks, suspense, maker ≠ checker, corrections posted, overdue, audit trail."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
from sqlalchemy import select

from clearing.accounts import SUSPENSE, balance
from clearing.audit import verify_chain
from clearing.db import write_transaction
from clearing.eod import close_and_settle, reconcile
from clearing.eod_schema import audit_log
from clearing.error_cases import (
    CaseError,
    MakerCheckerViolation,
    aging_sync,
    approve_sync,
    get_case_sync,
    list_cases_sync,
    open_manual_case_sync,
    post_sync,
    propose_sync,
    reject_sync,
)
from clearing.settlement import journal_frame_sync
from tests.eod.conftest import Day, make_bank_file


async def _step(day: Day, fn, *args):
    async with write_transaction(day.engine) as conn:
        return await conn.run_sync(fn, *args)


async def _cases(day: Day, **kw) -> list[dict]:
    async with day.engine.connect() as conn:
        return await conn.run_sync(lambda c: list_cases_sync(c, **kw))


async def _open_day(day: Day, eod_config, tmp_path: Path) -> list[dict]:
    bank = tmp_path / "bank.txt"
    await make_bank_file(day, bank, rate=0.3, seed=11)
    await close_and_settle(day.engine, day.business_date, eod_config)
    await reconcile(day.engine, day.business_date, bank, eod_config)
    return await _cases(day)


async def test_cases_open_with_suspense_and_due_times(day: Day, eod_config, tmp_path: Path) -> None:
    cases = await _open_day(day, eod_config, tmp_path)
    assert cases and {c["status"] for c in cases} == {"open"}
    classes = {c["class"] for c in cases}
    assert classes == {"host_only", "bank_only", "amount_mismatch", "status_mismatch", "duplicate"}
    for c in cases:
        # 2026-03-10 is a Tuesday and 03-11 a configured holiday: general due 03-12 17:00, complex 03-16 17:00 local
        want = "2026-03-16 09:00" if c["class"] in ("host_only", "bank_only") else "2026-03-12 09:00"
        assert c["due_at"].astimezone(UTC).strftime("%Y-%m-%d %H:%M") == want
        assert c["complexity"] == ("complex" if c["class"] in ("host_only", "bank_only") else "general")
    async with day.engine.connect() as conn:
        suspense = await balance(conn, SUSPENSE)
    assert suspense not in (None, 0)  # money under investigation is parked


async def test_maker_cannot_check_own_proposal(day: Day, eod_config, tmp_path: Path) -> None:
    case = (await _open_day(day, eod_config, tmp_path))[0]["case_no"]
    await _step(day, propose_sync, case, "alice", "dismiss", "timing difference at the bank")
    with pytest.raises(MakerCheckerViolation):
        await _step(day, approve_sync, case, "alice", "self-approve")
    with pytest.raises(MakerCheckerViolation):
        await _step(day, reject_sync, case, "alice", "self-reject")
    async with day.engine.connect() as conn:
        assert (await conn.run_sync(get_case_sync, case))["status"] == "proposed"
    with pytest.raises(CaseError):  # not approved yet
        await _step(day, post_sync, case, "bob")


async def test_full_workflow_every_action_closes_and_clears_suspense(day: Day, eod_config, tmp_path: Path) -> None:
    cases = await _open_day(day, eod_config, tmp_path)
    # one rejection round trip first
    first = cases[0]["case_no"]
    await _step(day, propose_sync, first, "alice", "write_off", "small difference")
    rejected = await _step(day, reject_sync, first, "bob", "needs the bank's confirmation")
    assert rejected["status"] == "open" and rejected["rejections"] == 1
    actions = ["adjust", "write_off", "dismiss", "reverse"]
    for i, c in enumerate(cases):
        action = actions[i % len(actions)]
        await _step(day, propose_sync, c["case_no"], "alice", action, f"case {i}: {action} after review")
        await _step(day, approve_sync, c["case_no"], "bob", "checked")
        done = await _step(day, post_sync, c["case_no"], "carol")
        assert done["status"] == "closed" and done["posted_at"] and done["closed_at"]
    async with day.engine.connect() as conn:
        assert await balance(conn, SUSPENSE) == 0  # nothing left under investigation
        actions_logged = [r[0] for r in await conn.execute(select(audit_log.c.action).order_by(audit_log.c.seq))]
    for a in ("case.open", "case.propose", "case.reject", "case.approve", "case.post", "case.close"):
        assert a in actions_logged
    assert (await verify_chain(day.engine)).intact
    assert await _cases(day, status="open") == []


async def test_refund_only_when_bank_holds_more(day: Day, eod_config, tmp_path: Path) -> None:
    cases = await _open_day(day, eod_config, tmp_path)
    host_only = next(c for c in cases if c["class"] == "host_only")
    with pytest.raises(CaseError, match="refund"):
        await _step(day, propose_sync, host_only["case_no"], "alice", "refund", "give it back")
    with pytest.raises(CaseError, match="action"):
        await _step(day, propose_sync, host_only["case_no"], "alice", "delete", "no such action")
    with pytest.raises(CaseError, match="explanation"):
        await _step(day, propose_sync, host_only["case_no"], "alice", "dismiss", "")


async def test_overdue_cases_stand_out(day: Day, eod_config, tmp_path: Path) -> None:
    cases = await _open_day(day, eod_config, tmp_path)
    later = datetime(2026, 3, 13, 12, 0, tzinfo=UTC)  # general cases (due 03-12) overdue, complex not yet
    async with day.engine.connect() as conn:
        overdue = await conn.run_sync(lambda c: list_cases_sync(c, overdue_only=True, now=later))
        aging = await conn.run_sync(aging_sync, later + timedelta(days=10))
    assert {c["complexity"] for c in overdue} == {"general"}
    assert len(overdue) == sum(1 for c in cases if c["complexity"] == "general")
    assert aging.overdue == len(cases) and aging.open_total == len(cases)
    from prometheus_client import REGISTRY

    assert REGISTRY.get_sample_value("carepay_error_cases_open", {"overdue": "true"}) == len(cases)


async def test_rerun_with_corrected_file_resolves_breaks(day: Day, eod_config, tmp_path: Path) -> None:
    cases = await _open_day(day, eod_config, tmp_path)
    # the bank re-sends a clean file: every break resolved, every open case released from suspense
    from simulator import bank_file as bf

    async with day.engine.connect() as conn:
        journal = await conn.run_sync(journal_frame_sync, day.business_date)
    clean = tmp_path / "clean.txt"
    bf.write(clean, bf.generate(journal, 0.0).rows, day.business_date, "BJBANK")
    doc = await reconcile(day.engine, day.business_date, clean, eod_config)
    assert doc["breaks"] == [] and doc["run"]["resolved"] == len(cases)
    assert doc["run"]["cases_released"] == len(cases)
    async with day.engine.connect() as conn:
        assert await balance(conn, SUSPENSE) == 0
    assert all(c["status"] == "closed" for c in await _cases(day))
    assert pl.Series([c["resolution"] for c in await _cases(day)]).str.starts_with("resolved").all()


async def test_manual_case_by_hand(day: Day, eod_config) -> None:
    rrn = day.rrns["purchase"][3]
    async with day.engine.connect() as conn:
        j = await conn.run_sync(journal_frame_sync, day.business_date)
    host_amount = int(j.filter(pl.col("rrn") == rrn)["amount_fen"][0])
    case_no = await _step(day, open_manual_case_sync, day.business_date, rrn, "amount_mismatch", "alice",
                          "bank statement shows 1 yuan less", eod_config.calendar, host_amount - 100)
    async with day.engine.connect() as conn:
        case = await conn.run_sync(get_case_sync, case_no)
        assert await balance(conn, SUSPENSE) == -100  # the 1 yuan the bank lacks is parked
    assert (case["source"], case["class"], case["diff_fen"], case["exposure_fen"]) == ("manual", "amount_mismatch", -100, -100)
    assert case["card_no_masked"].count("*") == 9
    with pytest.raises(CaseError):
        await _step(day, open_manual_case_sync, day.business_date, "NOSUCHRRN000", "other", "alice", "a query",
                    eod_config.calendar, None)
    await _step(day, propose_sync, case_no, "alice", "adjust", "recover from the provider's next settlement")
    await _step(day, approve_sync, case_no, "bob")
    await _step(day, post_sync, case_no, "bob")
    async with day.engine.connect() as conn:
        assert await balance(conn, SUSPENSE) == 0
