"""Authorisation pipeline through ClearingService.handle — the path the MQTT worker calls."""

from __future__ import annotations

import asyncio
from datetime import date, timedelta

from sqlalchemy import func, select

from clearing.accounts import balance, card_balances
from clearing.lifecycle import report_lost
from clearing.pipeline import metrics
from clearing.registry import set_provider_status
from clearing.schema import host_txns, transfers
from tests.clearing.conftest import PROVIDER_N, TERM_N, World


async def journal(world: World) -> list[dict]:
    async with world.engine.connect() as conn:
        return [dict(r._mapping) for r in await conn.execute(select(host_txns).order_by(host_txns.c.id))]


async def n_transfers(world: World) -> int:
    async with world.engine.connect() as conn:
        return (await conn.execute(select(func.count()).select_from(transfers))).scalar_one()


async def test_purchase_approved_posts_once_and_answers(world: World) -> None:
    card = await world.add_card(1)
    await world.fund(card, "voucher", 10_000)
    msg = world.purchase(card, 2_500)
    ans = await world.svc.handle(msg)
    assert ans.type == "purchase_result" and ans.response_code == "00"
    assert ans.balance_after_fen == 7_500
    assert ans.rrn and len(ans.rrn) == 12 and ans.auth_code and len(ans.auth_code) == 6
    assert ans.orig_msg_id == msg.msg_id and ans.trace_no == msg.trace_no
    assert ans.business_date == "2026-03-10"
    async with world.engine.connect() as conn:
        assert await balance(conn, "provider:P00000000000001:payable") == 2_500
    rows = await journal(world)
    assert [(r["txn_type"], r["status"], r["amount_fen"], r["rrn"]) for r in rows] == [
        ("PURCHASE", "SUCCESS", 2_500, ans.rrn)]
    # the same message again (MQTT QoS 1 duplicate): the same answer, nothing posted
    again = await world.svc.handle(msg)
    assert (again.response_code, again.rrn, again.auth_code, again.balance_after_fen) == (
        "00", ans.rrn, ans.auth_code, 7_500)
    # same terminal+batch+trace in a new message id (terminal retry): the original answer again
    retry = msg.model_copy(update={"msg_id": "RETRY0000001"})
    assert (await world.svc.handle(retry)).rrn == ans.rrn
    assert await n_transfers(world) == 2  # the funding and the purchase


async def test_same_trace_different_body_is_a_conflict(world: World) -> None:
    card = await world.add_card(2)
    await world.fund(card, "voucher", 10_000)
    msg = world.purchase(card, 1_000)
    assert (await world.svc.handle(msg)).response_code == "00"
    other = world.purchase(card, 1_200, trace_no=msg.trace_no)
    ans = await world.svc.handle(other)
    assert ans.response_code == "94" and ans.rrn is None
    assert len(await journal(world)) == 1


async def test_declines_by_card_status_eligibility_program_provider(world: World) -> None:
    good = await world.add_card(3)
    await world.fund(good, "voucher", 5_000)
    await world.fund(good, "nursing", 5_000)
    lost = await world.add_card(4)
    await report_lost(world.engine, lost)
    expired = await world.add_card(5, valid_until=date(2026, 3, 1))
    voucher_only = await world.add_card(6, programs=("voucher",))
    unknown = "6218880000000099995"
    world.cards[unknown] = {**world.cards[good], "card_no": unknown}
    cases = [
        (world.purchase(unknown, 100), "14"),
        (world.purchase(lost, 100), "62"),
        (world.purchase(expired, 100), "54"),
        (world.purchase(voucher_only, 100, "nursing", terminal_id=TERM_N, provider_id=PROVIDER_N,
                        category="nursing_care"), "57"),
        (world.purchase(good, 100, "nursing"), "58"),  # voucher provider cannot take nursing money
        (world.purchase(good, 100, "voucher", terminal_id=TERM_N, provider_id=PROVIDER_N,
                        category="nursing_care"), "58"),  # and the reverse
        (world.purchase(good, 100, category="daycare"), "58"),  # provider does not offer the category
        (world.purchase(good, 100, terminal_id=TERM_N), "58"),  # terminal bound to another provider
        (world.purchase(good, 9_999), "51"),
    ]
    for msg, rc in cases:
        ans = await world.svc.handle(msg)
        assert ans.response_code == rc, (msg.program, ans.message)
        assert ans.auth_code is None
    rows = await journal(world)
    assert len(rows) == len(cases)
    assert all(r["status"] == "FAILED" and r["transfer_id"] is None for r in rows)
    async with world.engine.connect() as conn:
        assert (await card_balances(conn, good))["voucher"] == 5_000


async def test_suspended_provider_declined(world: World) -> None:
    card = await world.add_card(7)
    await world.fund(card, "voucher", 5_000)
    await set_provider_status(world.engine, "P00000000000001", "suspended")
    assert (await world.svc.handle(world.purchase(card, 100))).response_code == "58"
    await set_provider_status(world.engine, "P00000000000001", "withdrawn")
    assert (await world.svc.handle(world.purchase(card, 100))).response_code == "58"


async def test_restricted_account_only_designated_categories(world: World) -> None:
    card = await world.add_card(8)
    await world.fund(card, "restricted", 5_000)
    assert (await world.svc.handle(world.purchase(card, 100, "restricted", category="bathing"))).response_code == "57"
    ok = await world.svc.handle(world.purchase(card, 100, "restricted", category="rehab"))
    assert ok.response_code == "00" and ok.balance_after_fen == 4_900


async def test_bad_tac_is_declined_as_suspected_forgery(world: World) -> None:
    card = await world.add_card(9)
    await world.fund(card, "voucher", 5_000)
    before = metrics.SUSPECTED_FORGERY.labels(reason="bad_tac")._value.get()
    ans = await world.svc.handle(world.purchase(card, 100, bad_tac=True))
    assert ans.response_code == "59"
    assert metrics.SUSPECTED_FORGERY.labels(reason="bad_tac")._value.get() == before + 1
    # a TAC computed for another amount does not verify either (fabricated charge)
    msg = world.purchase(card, 100)
    forged = msg.model_copy(update={"amount_fen": 4_000, "trace_no": world.trace()})
    assert (await world.svc.handle(forged)).response_code == "59"
    assert await n_transfers(world) == 1  # only the funding


async def test_replayed_card_counter_declined_and_gaps_recorded(world: World) -> None:
    card = await world.add_card(10)
    await world.fund(card, "voucher", 5_000)
    first = world.purchase(card, 100, atc=5)
    assert (await world.svc.handle(first)).response_code == "00"
    # the same card proof replayed under a new trace number: a fabricated transaction
    replay = first.model_copy(update={"trace_no": world.trace(), "msg_id": world.msg_id()})
    assert (await world.svc.handle(replay)).response_code == "59"
    assert (await world.svc.handle(world.purchase(card, 100, atc=9))).response_code == "00"
    async with world.engine.connect() as conn:
        rows = (await conn.execute(select(host_txns.c.response_code, host_txns.c.atc, host_txns.c.atc_gap)
                                   .where(host_txns.c.card_no == card).order_by(host_txns.c.id))).all()
    # the replay's row spends no counter; each spent counter sits on the journal row that spent it
    assert [tuple(r) for r in rows] == [("00", 5, 0), ("59", None, None), ("00", 9, 3)]


async def test_concurrent_purchases_never_overdraw(world: World) -> None:
    card = await world.add_card(11)
    await world.fund(card, "voucher", 1_000)
    msgs = [world.purchase(card, 300) for _ in range(10)]
    answers = await asyncio.gather(*(world.svc.handle(m) for m in msgs))
    approved = [a for a in answers if a.response_code == "00"]
    assert len(approved) == 3
    assert sorted(a.response_code for a in answers).count("51") == 7
    async with world.engine.connect() as conn:
        assert (await card_balances(conn, card))["voucher"] == 100
    assert world.svc.writer.stats.max_batch > 1  # they were group-committed


async def test_void_same_batch_full_amount_once(world: World) -> None:
    card = await world.add_card(12)
    await world.fund(card, "voucher", 5_000)
    p = world.purchase(card, 1_200)
    pa = await world.svc.handle(p)
    assert (await world.svc.handle(world.void(p, pa.rrn, amount=1_000))).response_code == "13"
    assert (await world.svc.handle(world.void(p, pa.rrn, batch_no="000002"))).response_code == "12"
    v = await world.svc.handle(world.void(p, pa.rrn))
    assert v.type == "void_result" and v.response_code == "00" and v.balance_after_fen == 5_000
    assert (await world.svc.handle(world.void(p, pa.rrn))).response_code == "12"  # already voided
    assert (await world.svc.handle(world.refund(p, pa.rrn, 100))).response_code == "12"
    assert (await world.svc.handle(world.void(p, "000000999999"))).response_code == "25"


async def test_void_on_a_later_business_day_refused(world: World) -> None:
    card = await world.add_card(13)
    await world.fund(card, "voucher", 5_000)
    p = world.purchase(card, 1_200)
    pa = await world.svc.handle(p)
    world.now += timedelta(hours=14)  # past the 23:00 cut-off in Shanghai
    ans = await world.svc.handle(world.void(p, pa.rrn))
    assert ans.response_code == "12" and ans.business_date == "2026-03-11"


async def test_refunds_cumulative_never_above_original(world: World) -> None:
    card = await world.add_card(14)
    await world.fund(card, "voucher", 5_000)
    p = world.purchase(card, 1_000)
    pa = await world.svc.handle(p)
    world.now += timedelta(days=3)
    r1 = await world.svc.handle(world.refund(p, pa.rrn, 600))
    assert r1.response_code == "00" and r1.balance_after_fen == 4_600
    assert (await world.svc.handle(world.refund(p, pa.rrn, 500))).response_code == "13"
    assert (await world.svc.handle(world.refund(p, pa.rrn, 400))).response_code == "00"
    assert (await world.svc.handle(world.refund(p, pa.rrn, 1))).response_code == "13"
    async with world.engine.connect() as conn:
        assert (await card_balances(conn, card))["voucher"] == 5_000
        assert await balance(conn, "provider:P00000000000001:payable") == 0


async def test_reversal_after_original(world: World) -> None:
    card = await world.add_card(15)
    await world.fund(card, "voucher", 5_000)
    p = world.purchase(card, 700)
    pa = await world.svc.handle(p)
    r = await world.svc.handle(world.reversal(p))
    assert r.type == "reversal_result" and r.response_code == "00" and r.balance_after_fen == 5_000
    rows = {row["txn_type"]: row for row in await journal(world)}
    assert rows["PURCHASE"]["status"] == "REVERSED" and rows["REVERSAL"]["orig_rrn"] == pa.rrn
    # a reversal retried (new trace) after success: answered, nothing more posted
    again = await world.svc.handle(world.reversal(p))
    assert again.response_code == "00"
    async with world.engine.connect() as conn:
        assert (await card_balances(conn, card))["voucher"] == 5_000
    assert await n_transfers(world) == 3


async def test_reversal_before_original_blocks_the_late_original(world: World) -> None:
    card = await world.add_card(16)
    await world.fund(card, "voucher", 5_000)
    p = world.purchase(card, 700)
    r = await world.svc.handle(world.reversal(p))
    assert r.response_code == "00"
    late = await world.svc.handle(p)
    assert late.response_code != "00"
    rows = {row["txn_type"]: row for row in await journal(world)}
    assert rows["PURCHASE"]["status"] == "REVERSED" and rows["PURCHASE"]["transfer_id"] is None
    async with world.engine.connect() as conn:
        assert (await card_balances(conn, card))["voucher"] == 5_000


async def test_reversal_and_original_in_one_batch(world: World) -> None:
    card = await world.add_card(17)
    await world.fund(card, "voucher", 5_000)
    p = world.purchase(card, 700)
    pa, ra = await asyncio.gather(world.svc.handle(p), world.svc.handle(world.reversal(p)))
    assert ra.response_code == "00"
    async with world.engine.connect() as conn:
        assert (await card_balances(conn, card))["voucher"] == 5_000
    assert pa.response_code in ("00", "12")


async def test_offline_advice_posted_or_flagged_for_an_error_case(world: World) -> None:
    card = await world.add_card(18)
    await world.fund(card, "voucher", 1_000)
    ok = await world.svc.handle(world.advice(card, 800))
    assert ok.type == "advice_result" and ok.response_code == "00" and ok.balance_after_fen == 200
    short = await world.svc.handle(world.advice(card, 800))
    assert short.response_code == "51"
    rows = await journal(world)
    assert rows[-1]["status"] == "FAILED" and rows[-1]["review_reason"] == "advice_declined_51"
    forged = await world.svc.handle(world.advice(card, 100, bad_tac=True))
    assert forged.response_code == "59"


async def test_batch_settle_and_upload(world: World) -> None:
    from protocol.messages import BatchItem, BatchSettle, BatchTotals, BatchUpload

    card = await world.add_card(19)
    await world.fund(card, "voucher", 10_000)
    p1, p2, p3 = (world.purchase(card, a) for a in (100, 200, 300))
    a1 = await world.svc.handle(p1)
    await world.svc.handle(p2)
    await world.svc.handle(p3)
    await world.svc.handle(world.void(p1, a1.rrn))
    host = BatchTotals(purchase_count=3, purchase_fen=600, void_count=1, void_fen=100)
    ok = await world.svc.handle(BatchSettle(terminal_id=p1.terminal_id, msg_id=world.msg_id(), sent_at=world.now,
                                            provider_id=p1.provider_id, batch_no="000001", totals=host))
    assert ok.type == "batch_settle_result" and ok.balanced and ok.host_totals == host
    off = host.model_copy(update={"purchase_count": 4, "purchase_fen": 650})
    bad = await world.svc.handle(BatchSettle(terminal_id=p1.terminal_id, msg_id=world.msg_id(), sent_at=world.now,
                                             provider_id=p1.provider_id, batch_no="000001", totals=off))
    assert not bad.balanced and bad.host_totals == host
    items = [BatchItem(trace_no=p1.trace_no, txn_type="PURCHASE", amount_fen=100, card_no=card, program="voucher"),
             BatchItem(trace_no=p2.trace_no, txn_type="PURCHASE", amount_fen=250, card_no=card, program="voucher"),
             BatchItem(trace_no="999999", txn_type="PURCHASE", amount_fen=50, card_no=card, program="voucher")]
    up = await world.svc.handle(BatchUpload(terminal_id=p1.terminal_id, msg_id=world.msg_id(), sent_at=world.now,
                                            provider_id=p1.provider_id, batch_no="000001", items=items))
    assert up.missing_on_host == ["999999"]
    assert up.amount_differs == [p2.trace_no]
    assert set(up.missing_on_terminal) == {p3.trace_no, world_void_trace(await journal(world))}


def world_void_trace(rows: list[dict]) -> str:
    return next(r["trace_no"] for r in rows if r["txn_type"] == "VOID")


async def test_seeded_random_traffic_keeps_the_books(world: World) -> None:
    """VOPR in miniature: a seeded mix of purchases, QoS duplicates, voids, refunds, early and late
    reversals and advices, partly concurrent; the journal and the ledger must agree at the end."""
    import random

    rng = random.Random(20260310)
    cards = [await world.add_card(100 + i) for i in range(4)]
    for c in cards:
        await world.fund(c, "voucher", 3_000)
    approved: list[tuple[object, str]] = []
    for _step in range(40):
        op = rng.random()
        c = rng.choice(cards)
        if op < 0.45:
            msgs = [world.purchase(c, rng.randint(1, 900)) for _ in range(rng.randint(1, 3))]
            batch = msgs + [m for m in msgs if rng.random() < 0.3]  # duplicates
            answers = await asyncio.gather(*(world.svc.handle(m) for m in batch))
            approved += [(m, a.rrn) for m, a in zip(batch, answers, strict=True) if a.response_code == "00"]
        elif op < 0.6 and approved:
            m, rrn = rng.choice(approved)
            await world.svc.handle(world.void(m, rrn))
        elif op < 0.75 and approved:
            m, rrn = rng.choice(approved)
            await world.svc.handle(world.refund(m, rrn, rng.randint(1, m.amount_fen)))
        elif op < 0.85:
            m = world.purchase(c, rng.randint(1, 500))
            first, second = (world.reversal(m), m) if rng.random() < 0.5 else (m, world.reversal(m))
            await world.svc.handle(first)
            await world.svc.handle(second)
        else:
            await world.svc.handle(world.advice(c, rng.randint(1, 400)))
    rows = await journal(world)
    async with world.engine.connect() as conn:
        for c in cards:
            mine = [r for r in rows if r["card_no"] == c and r["transfer_id"] is not None]
            spent = sum(r["amount_fen"] for r in mine if r["txn_type"] in ("PURCHASE", "ADVICE"))
            back = sum(r["amount_fen"] for r in mine if r["txn_type"] in ("VOID", "REFUND", "REVERSAL"))
            assert (await card_balances(conn, c))["voucher"] == 3_000 - spent + back
    keys = [(r["terminal_id"], r["batch_no"], r["trace_no"], r["txn_type"]) for r in rows]
    assert len(keys) == len(set(keys))


async def test_declines_open_no_accounts(world: World) -> None:
    from clearing.schema import accounts

    unknown = "6218880000000099995"
    world.cards[unknown] = {**world.cards[await world.add_card(20)], "card_no": unknown}
    assert (await world.svc.handle(world.purchase(unknown, 100))).response_code == "14"
    async with world.engine.connect() as conn:
        codes = list((await conn.execute(select(accounts.c.code))).scalars())
    assert not any(unknown in c for c in codes)


async def test_declined_proof_cannot_be_replayed_after_a_recharge(world: World) -> None:
    card = await world.add_card(21)
    await world.fund(card, "voucher", 100)
    first = world.purchase(card, 500, atc=3)
    assert (await world.svc.handle(first)).response_code == "51"
    await world.fund(card, "voucher", 1_000)
    replay = first.model_copy(update={"trace_no": world.trace(), "msg_id": world.msg_id()})
    assert (await world.svc.handle(replay)).response_code == "59"
