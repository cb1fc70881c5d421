"""End of day on a simulated day: close, settle, reconcile against a generated bank file, reports."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
from sqlalchemy import func, select

from clearing.eod import reconcile, run_eod
from clearing.eod_schema import error_cases, provider_settlements
from clearing.schema import settlement_windows, transfers
from clearing.settlement import journal_frame_sync
from clearing.signing import verify_file
from simulator import bank_file as bf
from tests.eod.conftest import Day, make_bank_file


async def test_eod_run_finds_exactly_the_injected_breaks(day: Day, eod_config, tmp_path: Path) -> None:
    bank = tmp_path / "bank.txt"
    truth = await make_bank_file(day, bank)
    assert set(truth.truth["class"].unique()) == set(bf.INJECTED_CLASSES)
    doc = await run_eod(day.engine, day.business_date, eod_config, bank)
    assert doc["settlement"]["providers"] == 2
    # every injected break found, nothing else
    got = await reconcile(day.engine, day.business_date, bank, eod_config)
    found = sorted((b["class"], b["rrn"]) for b in got["breaks"])
    assert found == sorted(truth.truth.select("class", "rrn").iter_rows())
    assert got["run"]["persisting"] == len(found) and got["run"]["new"] == 0  # second run: persisting
    assert got["run"]["batches_unbalanced"] == 1  # the nursing terminal reported wrong totals
    for p in [Path(x) for x in doc["reports"]] + [Path(doc["manifest"])]:
        assert verify_file(p).ok, p
    async with day.engine.connect() as conn:
        status = (await conn.execute(select(settlement_windows.c.status)
                                     .where(settlement_windows.c.business_date == day.business_date))).scalar_one()
        n_cases = (await conn.execute(select(func.count()).select_from(error_cases))).scalar_one()
    assert status == "closed"
    assert n_cases == len(found)


async def test_eod_rerun_is_idempotent(day: Day, eod_config) -> None:
    first = await run_eod(day.engine, day.business_date, eod_config)
    async with day.engine.connect() as conn:
        n1 = (await conn.execute(select(func.count()).select_from(transfers))).scalar_one()
        s1 = (await conn.execute(select(provider_settlements).order_by(provider_settlements.c.provider_id))).all()
    settle_csv = Path(first["settlement"]["settlement_file"]).read_bytes()
    second = await run_eod(day.engine, day.business_date, eod_config)
    async with day.engine.connect() as conn:
        n2 = (await conn.execute(select(func.count()).select_from(transfers))).scalar_one()
        s2 = (await conn.execute(select(provider_settlements).order_by(provider_settlements.c.provider_id))).all()
    assert second["settlement"]["rerun"] is True
    assert n1 == n2 and s1 == s2
    assert Path(second["settlement"]["settlement_file"]).read_bytes() == settle_csv


async def test_settlement_amounts_follow_the_journal(day: Day, eod_config) -> None:
    doc = await run_eod(day.engine, day.business_date, eod_config)
    rows = pl.read_csv(doc["settlement"]["settlement_file"], schema_overrides={"provider_id": pl.String})
    async with day.engine.connect() as conn:
        j = await conn.run_sync(journal_frame_sync, day.business_date)
    ok = j.filter(pl.col("status") == "SUCCESS")
    for r in rows.iter_rows(named=True):
        mine = ok.filter(pl.col("provider_id") == r["provider_id"])
        buy = int(mine.filter(pl.col("txn_type").is_in(["PURCHASE", "ADVICE"]))["amount_fen"].sum())
        void = int(mine.filter(pl.col("txn_type") == "VOID")["amount_fen"].sum())
        refund = int(mine.filter(pl.col("txn_type") == "REFUND")["amount_fen"].sum())
        assert (r["purchase_fen"], r["void_fen"], r["refund_fen"]) == (buy, void, refund)
        assert r["net_fen"] == buy - void - refund
        assert r["fee_fen"] == (max(r["net_fen"], 0) * 6_000 + 500_000) // 1_000_000
    manifest = json.loads(Path(doc["manifest"]).read_text())
    assert manifest["previous_manifest_sm3"] == "0" * 64


async def test_manifests_chain_day_to_day(day: Day, eod_config, tmp_path: Path) -> None:
    from datetime import timedelta

    from clearing.eod import verify_manifest_chain
    from clearing.signing import file_sm3, trusted_public_key

    first = await run_eod(day.engine, day.business_date, eod_config)
    nxt = day.business_date + timedelta(days=1)
    eod_config.out_dir = tmp_path / "out2"
    second = await run_eod(day.engine, nxt, eod_config)
    m1, m2 = Path(first["manifest"]), Path(second["manifest"])
    doc2 = json.loads(m2.read_text())
    assert doc2["previous_manifest_sm3"] == file_sm3(m1)
    # an empty day is settled and recorded too: every registered provider with an explicit zero net
    assert (doc2["settlement"]["providers"], doc2["settlement"]["zero_net_providers"]) == (2, 2)
    trusted = trusted_public_key(eod_config.data_dir)
    assert verify_manifest_chain([m2, m1], trusted) == []
    doc1 = json.loads(m1.read_text())
    doc1["reconciliation"] = {"counts": {"matched": 1}}
    m1.write_text(json.dumps(doc1))
    problems = verify_manifest_chain([m1, m2], trusted)
    assert len(problems) == 1 and problems[0].startswith(m1.name) and "SM3" in problems[0]
    eod_config.signer.sign_file(m1)  # even re-signed with the clearing key, the next day's link exposes it
    assert verify_manifest_chain([m1, m2], trusted) == [
        f"{m2.name}: previous_manifest_sm3 does not match {m1.name}"]


async def test_posting_after_the_close_lands_on_the_next_date(day: Day, eod_config) -> None:
    from clearing.eod import close_and_settle

    first = await close_and_settle(day.engine, day.business_date, eod_config)
    w = day.world
    card = next(iter(w.cards))
    async with w.svc:  # a late message stamped inside the closed date
        ans = await w.svc.handle(w.purchase(card, 321))
    assert ans.response_code == "00" and ans.business_date == "2026-03-11"
    again = await close_and_settle(day.engine, day.business_date, eod_config)
    assert (again["net_fen"], again["fee_fen"], again["rerun"]) == (first["net_fen"], first["fee_fen"], True)
