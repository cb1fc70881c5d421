"""The authorisation pipeline runs per batch inside the group-commit writer: one snapshot load per batch,
participants in arrival order over the batch's running state (balance, card counters), replays not re-run."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from clearing.accounts import card_balances
from clearing.db import init_db, make_engine
from clearing.invariants import check_invariants
from clearing.pipeline import metrics
from clearing.pipeline.context import parse_card_time
from clearing.schema import accounts
from clearing.service import ClearingConfig, ClearingService
from keys.issuer import IssuerKeySet
from tests.clearing.conftest import World, build_world, drop_pg_schema, fresh_pg_engine


def count_loads(world: World) -> list[int]:
    """Wrap the authoriser's snapshot load: one entry (number of requests) per call."""
    calls: list[int] = []
    auth = world.svc.writer.authoriser
    original = auth.load

    def load(select_: Any, ctxs: list[Any], cache: Any = None) -> Any:
        calls.append(len(ctxs))
        return original(select_, ctxs, cache)

    auth.load = load  # type: ignore[method-assign]
    return calls


async def test_one_snapshot_load_per_batch_not_per_message(world: World) -> None:
    cards = [await world.add_card(100 + i) for i in range(8)]
    for c in cards:
        await world.fund(c, "voucher", 10_000)
    calls = count_loads(world)
    batches0 = world.svc.writer.stats.batches
    msgs = [world.purchase(cards[i % 8], 100 + i) for i in range(40)]
    answers = await asyncio.gather(*(world.svc.handle(m) for m in msgs))
    assert [a.response_code for a in answers] == ["00"] * 40
    batches = world.svc.writer.stats.batches - batches0
    assert sum(calls) == 40 and len(calls) == batches < 40  # set-based reads per batch, not per message


async def test_purchases_in_one_batch_see_each_others_balance(world: World) -> None:
    card = await world.add_card(120)
    await world.fund(card, "voucher", 1_000)
    calls = count_loads(world)
    msgs = [world.purchase(card, 400) for _ in range(3)]
    answers = await asyncio.gather(*(world.svc.handle(m) for m in msgs))
    assert calls == [3]  # all three authorised in the same batch
    assert [a.response_code for a in answers] == ["00", "00", "51"]  # in arrival order
    assert [a.balance_after_fen for a in answers[:2]] == [600, 200]
    async with world.engine.connect() as conn:
        assert (await card_balances(conn, card))["voucher"] == 200


async def test_same_card_counter_twice_in_one_batch(world: World) -> None:
    card = await world.add_card(121)
    await world.fund(card, "voucher", 5_000)
    calls = count_loads(world)
    before = metrics.SUSPECTED_FORGERY.labels(reason="counter_replay")._value.get()
    first = world.purchase(card, 100, atc=7)
    replay = first.model_copy(update={"trace_no": world.trace(), "msg_id": world.msg_id()})
    a, b = await asyncio.gather(world.svc.handle(first), world.svc.handle(replay))
    assert calls == [2]
    assert (a.response_code, b.response_code) == ("00", "59")
    assert metrics.SUSPECTED_FORGERY.labels(reason="counter_replay")._value.get() == before + 1


async def test_duplicate_delivery_in_one_batch_runs_the_chain_once(world: World) -> None:
    card = await world.add_card(122)
    await world.fund(card, "voucher", 5_000)
    calls = count_loads(world)
    before = metrics.SUSPECTED_FORGERY.labels(reason="bad_tac")._value.get()
    forged = world.purchase(card, 100, bad_tac=True)
    a, b = await asyncio.gather(world.svc.handle(forged), world.svc.handle(forged))  # QoS 1 delivered twice
    assert calls == [1]  # the second copy is a replay of the first: not authorised again
    assert (a.response_code, b.response_code) == ("59", "59") and a.rrn == b.rrn
    assert metrics.SUSPECTED_FORGERY.labels(reason="bad_tac")._value.get() == before + 1


async def test_unfunded_card_declined_51_nothing_posted(world: World) -> None:
    card = await world.add_card(123)  # registered (accounts opened empty), never funded
    ans = await world.svc.handle(world.purchase(card, 100))
    assert ans.response_code == "51" and ans.auth_code is None
    async with world.engine.connect() as conn:
        assert (await card_balances(conn, card))["voucher"] == 0
        rows = (await conn.execute(select(accounts.c.code, accounts.c.debits_posted)
                                   .where(accounts.c.code == f"card:{card}:voucher"))).all()
    assert [tuple(r) for r in rows] == [(f"card:{card}:voucher", 0)]


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="0123456789٠١٢", min_size=0, max_size=16), st.text(alphabet="0123456789", max_size=7))
def test_parse_card_time_agrees_with_strptime(ymd: str, hms: str) -> None:
    try:
        want: object = datetime.strptime(ymd + hms, "%Y%m%d%H%M%S")
    except ValueError:
        want = ValueError
    try:
        got: object = parse_card_time(ymd, hms)
    except ValueError:
        got = ValueError
    assert got == want


@given(st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2099, 12, 31)))
def test_parse_card_time_round_trips(at: datetime) -> None:
    at = at.replace(microsecond=0)
    assert parse_card_time(f"{at:%Y%m%d}", f"{at:%H%M%S}") == at


@pytest.mark.pg
async def test_several_services_on_postgresql_never_double_spend(pg_url: str, keys: IssuerKeySet) -> None:
    """Three services (each its own engine and writer, like three worker processes) authorise purchases
    on the same cards through ``handle``: the balance participant and the posting see the locked accounts."""
    engine, schema = await fresh_pg_engine(pg_url)
    engines: list[Any] = []
    try:
        await init_db(engine)
        world = await build_world(engine, keys)
        cards = [await world.add_card(200 + i) for i in range(4)]
        for c in cards:
            await world.fund(c, "voucher", 1_000)
        engines = [make_engine(pg_url, pg_schema=schema) for _ in range(3)]
        services = [ClearingService(e, keys, ClearingConfig(group_commit_window_ms=2), clock=world.clock)
                    for e in engines]
        msgs = [world.purchase(c, 100) for c in cards for _ in range(15)]  # 15 × 100 against 1,000: 10 may pass
        for s in services:
            await s.start()
        answers = await asyncio.gather(*(services[i % 3].handle(m) for i, m in enumerate(msgs)))
        for s in services:
            await s.stop()
        codes = [a.response_code for a in answers]
        assert codes.count("00") == 40 and codes.count("51") == 20
        async with engine.connect() as conn:
            for c in cards:
                assert (await card_balances(conn, c))["voucher"] == 0
        assert await check_invariants(engine) == []
    finally:
        for e in engines:
            await e.dispose()
        await engine.dispose()
        await drop_pg_schema(pg_url, schema)


@pytest.mark.pg
async def test_duplicate_raced_by_two_services_on_postgresql_gets_the_first_answer(pg_url: str,
                                                                                  keys: IssuerKeySet) -> None:
    """QoS 1 redelivers; with a shared subscription two workers can hold the same message at once. The
    loser's batch hits the unique key, is retried, and answers with the winner's answer — never 96 for the
    duplicate or for the unrelated requests batched with it."""
    engine, schema = await fresh_pg_engine(pg_url)
    engines: list[Any] = []
    try:
        await init_db(engine)
        world = await build_world(engine, keys)
        cards = [await world.add_card(300 + i) for i in range(6)]
        for c in cards:
            await world.fund(c, "voucher", 10_000)
        engines = [make_engine(pg_url, pg_schema=schema) for _ in range(2)]
        services = [ClearingService(e, keys, ClearingConfig(group_commit_window_ms=3), clock=world.clock)
                    for e in engines]
        for s in services:
            await s.start()
        msgs = [world.purchase(c, 100 + i) for i, c in enumerate(cards * 3)]
        calls = [s.handle(m) for m in msgs for s in services]  # every message to both services at once
        answers = await asyncio.gather(*calls)
        for s in services:
            await s.stop()
        assert [a.response_code for a in answers] == ["00"] * len(answers)
        for i in range(len(msgs)):  # both deliveries of one message answer the same RRN
            assert answers[2 * i].rrn == answers[2 * i + 1].rrn
        assert sum(s.writer.stats.postings for s in services) == len(msgs)
        assert await check_invariants(engine) == []
    finally:
        for e in engines:
            await e.dispose()
        await engine.dispose()
        await drop_pg_schema(pg_url, schema)
