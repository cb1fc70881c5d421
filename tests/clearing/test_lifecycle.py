"""Card lifecycle: register, lost/unblock, replace, extend, cancel, 多卡合一 migration."""

from __future__ import annotations

import os
from datetime import date
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from clearing.accounts import balance, card_balances
from clearing.lifecycle import (
    LifecycleError,
    MigrationRejected,
    cancel,
    extend,
    get_card,
    migrate,
    parse_migration,
    register_cards,
    replace,
    report_lost,
    unblock,
)
from clearing.schema import transfers
from protocol.ids import make_card_no
from tests.clearing.conftest import World


async def card_of(world: World, card_no: str):
    async with world.engine.connect() as conn:
        return await get_card(conn, card_no)


async def test_register_is_idempotent_and_refuses_clashes(world: World) -> None:
    a = await world.add_card(1)
    spec = dict(world.cards[a])
    assert await register_cards(world.engine, [spec]) == 0  # same card, same serial: skipped
    with pytest.raises(LifecycleError):
        await register_cards(world.engine, [{**spec, "app_serial": "00000000000000FF"}])
    with pytest.raises(LifecycleError):  # another card with a serial already taken
        await register_cards(world.engine, [{**spec, "card_no": make_card_no("621888", 77)}])
    with pytest.raises(LifecycleError):
        await register_cards(world.engine, [{**spec, "card_no": "6218880000000000016"}])  # bad Luhn


async def test_lost_declines_62_then_unblock(world: World) -> None:
    a = await world.add_card(2)
    await world.fund(a, "voucher", 1_000)
    assert (await report_lost(world.engine, a)).status == "lost"
    assert (await report_lost(world.engine, a)).status == "lost"  # reporting again is harmless
    assert (await world.svc.handle(world.purchase(a, 100))).response_code == "62"
    assert (await unblock(world.engine, a)).status == "active"
    assert (await world.svc.handle(world.purchase(a, 100))).response_code == "00"
    with pytest.raises(LifecycleError):
        await unblock(world.engine, a)


async def test_replace_moves_every_balance_atomically(world: World) -> None:
    old = await world.add_card(3)
    await world.fund(old, "voucher", 1_500)
    await world.fund(old, "nursing", 6_000)
    await report_lost(world.engine, old)
    new_no = make_card_no("621888", 1003)
    spec = {**world.cards[old], "card_no": new_no, "app_serial": "00000000000003EB"}
    out = await replace(world.engine, old, spec)
    assert out["moved_fen"] == {"nursing": 6_000, "voucher": 1_500}
    assert new_no not in str(out) and old not in str(out)  # masked
    assert (await replace(world.engine, old, spec)) == out  # idempotent replay
    async with world.engine.connect() as conn:
        assert await card_balances(conn, old) == {"voucher": 0, "nursing": 0}
        assert await card_balances(conn, new_no) == {"voucher": 1_500, "nursing": 6_000}
        codes = list((await conn.execute(select(transfers.c.code).where(transfers.c.code == "replace"))).scalars())
    assert len(codes) == 2
    old_card = await card_of(world, old)
    assert old_card.status == "closed" and old_card.replaced_by == new_no
    world.cards[new_no] = spec
    assert (await world.svc.handle(world.purchase(old, 100))).response_code == "14"
    assert (await world.svc.handle(world.purchase(new_no, 100))).response_code == "00"


async def test_replace_refuses_another_cardholder(world: World) -> None:
    a, b = await world.add_card(4), await world.add_card(5)
    spec = {**world.cards[b], "card_no": make_card_no("621888", 1005), "app_serial": "00000000000003ED"}
    with pytest.raises(LifecycleError, match="another cardholder"):
        await replace(world.engine, a, spec)


async def test_extend_eligibility(world: World) -> None:
    a = await world.add_card(6, valid_until=date(2026, 3, 1))
    await world.fund(a, "voucher", 1_000)
    assert (await world.svc.handle(world.purchase(a, 100))).response_code == "54"
    with pytest.raises(LifecycleError):
        await extend(world.engine, a, date(2026, 2, 1))
    assert (await extend(world.engine, a, date(2031, 12, 31))).valid_until == date(2031, 12, 31)
    assert (await world.svc.handle(world.purchase(a, 100))).response_code == "00"


async def test_cancel_returns_to_fund_or_freezes(world: World) -> None:
    a, b = await world.add_card(7), await world.add_card(8)
    await world.fund(a, "voucher", 1_000)
    await world.fund(b, "voucher", 2_000)
    async with world.engine.connect() as conn:
        fund_before = await balance(conn, "fund:voucher:110105")
    out = await cancel(world.engine, a, "return_to_fund", "death")
    assert out["returned_fen"] == {"voucher": 1_000}
    assert (await cancel(world.engine, a, "return_to_fund")) == out
    frozen = await cancel(world.engine, b, "freeze")
    assert frozen["frozen_fen"] == {"voucher": 2_000} and frozen["returned_fen"] == {}
    async with world.engine.connect() as conn:
        assert await balance(conn, "fund:voucher:110105") == fund_before + 1_000
        assert (await card_balances(conn, b))["voucher"] == 2_000
    assert (await world.svc.handle(world.purchase(b, 100))).response_code == "14"
    with pytest.raises(LifecycleError):
        await cancel(world.engine, a, "nonsense")


def test_parse_migration_reports_every_bad_line() -> None:
    good = make_card_no("621888", 9)
    text = ("source_bank,source_account,card_no,id_no,program,amount_fen\n"
            f"OLDBANK,A1,{good},11010519491231002X,voucher,100\n"
            f"OLDBANK,A2,{good[:-1]}0,11010519491231002X,voucher,100\n"
            f"OLDBANK,A3,{good},11010519491231002X,vouchers,100\n"
            f"OLDBANK,A1,{good},11010519491231002X,voucher,100\n"
            f"OLDBANK,A4,{good},11010519491231002X,voucher,-1\n")
    lines, problems = parse_migration(text)
    assert len(lines) == 1
    assert [p.split(":")[0] for p in problems] == ["line 3", "line 4", "line 5", "line 6"]
    assert good not in " ".join(problems)
    assert parse_migration("a,b\n")[1][0].startswith("line 1")


async def test_migration_all_or_nothing_and_once(world: World, tmp_path: Path) -> None:
    a, b = await world.add_card(10), await world.add_card(11, programs=("voucher",))
    ida, idb = world.cards[a]["id_no"], world.cards[b]["id_no"]
    head = "source_bank,source_account,card_no,id_no,program,amount_fen\n"
    bad = tmp_path / "bad.csv"
    bad.write_text(head + f"OLDBANK,Q1,{a},{ida},voucher,3000\nOLDBANK,Q2,{b},{idb},nursing,500\n")
    with pytest.raises(MigrationRejected) as exc:
        await migrate(world.engine, bad)
    assert "line 3" in exc.value.problems[0]
    async with world.engine.connect() as conn:
        assert (await card_balances(conn, a))["voucher"] == 0
    good = tmp_path / "good.csv"
    good.write_text(head + f"OLDBANK,Q1,{a},{ida},voucher,3000\nOLDBANK,Q2,{b},{idb},voucher,500\n")
    out = await migrate(world.engine, good)
    assert out == {"lines": 2, "amount_fen": 3_500, "already_imported": False}
    assert (await migrate(world.engine, good))["already_imported"]
    async with world.engine.connect() as conn:
        assert (await card_balances(conn, a))["voucher"] == 3_000
        assert await balance(conn, "migration:voucher") == -3_500


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(alphabet="0123456789,abcX-\n ", max_size=60), max_size=8))
def test_parse_migration_never_raises_and_accounts_for_every_line(rows: list[str]) -> None:
    text = "source_bank,source_account,card_no,id_no,program,amount_fen\n" + "\n".join(rows)
    lines, problems = parse_migration(text)
    data_lines = [r for r in "\n".join(rows).split("\n") if any(f.strip() for f in r.split(","))]
    assert len(lines) + len(problems) == len(data_lines)  # every line is accepted or reported, once
    assert all(ln.amount_fen > 0 and ln.program in ("voucher", "nursing") for ln in lines)


def test_card_cli(tmp_path: Path) -> None:
    import asyncio
    import json

    from typer.testing import CliRunner

    from clearing.db import init_db, make_engine
    from ops.cli import app
    from protocol.ids import make_id_no

    url = f"sqlite+aiosqlite:///{tmp_path / 'c.db'}"
    asyncio.run(_init(url, init_db, make_engine))
    card, id_no = make_card_no("621888", 42), make_id_no("110105", date(1940, 1, 1), 9)
    deck = tmp_path / "deck.json"
    deck.write_text(json.dumps([{"card_no": card, "app_serial": "000000000000002A", "id_no": id_no,
                                 "district": "110105", "valid_until": "2030-12-31", "programs": ["voucher"]}]))
    r = CliRunner()
    res = r.invoke(app, ["card", "register", str(deck), "--db", url, "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["registered"] == 1, res.output
    res = r.invoke(app, ["card", "lost", card, "--db", url, "--json"])
    shown = json.loads(res.output)
    assert shown["status"] == "lost" and shown["card_no"] == card[:6] + "*" * 9 + card[-4:]
    assert card not in res.output and id_no not in res.output
    assert json.loads(r.invoke(app, ["card", "unblock", card, "--db", url, "--json"]).output)["status"] == "active"
    res = r.invoke(app, ["card", "extend", card, "--until", "2031-01-01", "--db", url, "--json"])
    assert json.loads(res.output)["valid_until"] == "2031-01-01"
    new = make_card_no("621888", 43)
    res = r.invoke(app, ["card", "replace", card, "--new-card", new, "--app-serial", "000000000000002B", "--db", url,
                         "--json"])
    assert res.exit_code == 0, res.output
    res = r.invoke(app, ["card", "show", new, "--db", url, "--json"])
    assert json.loads(res.output)["status"] == "active"
    res = r.invoke(app, ["card", "cancel", new, "--db", url, "--json"])
    assert json.loads(res.output)["policy"] == "return_to_fund"
    res = r.invoke(app, ["card", "lost", make_card_no("621888", 44), "--db", url])
    assert res.exit_code != 0 and "unknown card" in str(res.exception)
    # every step is in the audit log, in order, under the --user given (default $USER), numbers masked
    res = r.invoke(app, ["card", "lost", new, "--db", url, "--user", "clerk-li"])
    assert res.exit_code != 0  # a cancelled card cannot be reported lost: nothing audited
    entries = asyncio.run(_audit(url))
    assert [e["action"] for e in entries] == ["card.register", "card.lost", "card.unblock", "card.extend",
                                              "card.replace", "card.cancel"]
    assert entries[1]["details"]["to"] == "lost" and {e["actor"] for e in entries} == {os.environ.get("USER", "operator")}
    assert entries[3]["details"] == {"from": "2030-12-31", "to": "2031-01-01"}
    assert all(card not in json.dumps(e) and new not in json.dumps(e) and id_no not in json.dumps(e) for e in entries)
    assert entries[1]["subject"] == card[:6] + "*" * 9 + card[-4:]


async def _audit(url: str) -> list[dict]:
    import json

    from sqlalchemy import select as sel

    from clearing.audit import verify_chain
    from clearing.db import make_engine
    from clearing.eod_schema import audit_log

    engine = make_engine(url)
    try:
        assert (await verify_chain(engine)).intact
        async with engine.connect() as conn:
            rows = (await conn.execute(sel(audit_log).order_by(audit_log.c.seq))).mappings().all()
        return [{"action": r["action"], "subject": r["subject"], "actor": r["actor"],
                 "details": json.loads(r["details"])} for r in rows]
    finally:
        await engine.dispose()


async def _init(url, init_db, make_engine) -> None:
    engine = make_engine(url)
    await init_db(engine)
    await engine.dispose()
