"""Recharge import (all or nothing, once per batch), voucher expiry and the year-end rollover."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

from sqlalchemy import func, select
from typer.testing import CliRunner

from clearing.accounts import balance, card_balances
from clearing.lifecycle import cancel
from clearing.recharge import expire_vouchers, expiring_amounts, import_recharge, rollover_year_end
from clearing.schema import transfers
from ops.cli import app
from protocol.ids import make_card_no
from tests.clearing.conftest import World

HEADER = "batch_id,card_no,id_no,program,amount_fen,period,expires_on\n"


def write(path: Path, lines: list[str]) -> Path:
    path.write_text(HEADER + "".join(line + "\n" for line in lines), encoding="utf-8")
    return path


async def n_transfers(world: World) -> int:
    async with world.engine.connect() as conn:
        return (await conn.execute(select(func.count()).select_from(transfers))).scalar_one()


async def test_import_once_per_batch(world: World, tmp_path: Path) -> None:
    a, b = await world.add_card(1), await world.add_card(2)
    ida, idb = world.cards[a]["id_no"], world.cards[b]["id_no"]
    f = write(tmp_path / "r.csv", [f"B202603,{a},{ida},voucher,20000,202603,2026-12-31",
                                   f"B202603,{a},{ida},nursing,60000,202603,",
                                   f"B202603,{b},{idb},voucher,10000,202603,"])
    rep = await import_recharge(world.engine, f)
    assert (rep.status, rep.lines, rep.total_fen) == ("imported", 3, 90_000)
    async with world.engine.connect() as conn:
        assert await card_balances(conn, a) == {"voucher": 20_000, "nursing": 60_000}
        assert await balance(conn, "fund:voucher:110105") == -30_000  # the government's source goes negative
    again = await import_recharge(world.engine, f)
    assert again.status == "already_imported" and again.lines == 3
    assert await n_transfers(world) == 3
    other = write(tmp_path / "r2.csv", [f"B202603,{b},{idb},voucher,99,202603,"])
    conflict = await import_recharge(world.engine, other)
    assert conflict.status == "rejected" and "different content" in conflict.rejects[0]["reason"]
    # one audit entry for the import that moved money; none for the replay or the refused file
    from sqlalchemy import select

    from clearing.eod_schema import audit_log

    async with world.engine.connect() as conn:
        rows = (await conn.execute(select(audit_log.c.action, audit_log.c.subject, audit_log.c.actor)
                                   .where(audit_log.c.action.like("recharge.%")))).all()
    assert rows == [("recharge.import", "batch:B202603", "operator")]


async def test_bad_file_rejected_whole_with_every_reason(world: World, tmp_path: Path) -> None:
    a = await world.add_card(3, programs=("voucher",))
    ida = world.cards[a]["id_no"]
    unknown = make_card_no("621888", 99_999)
    f = write(tmp_path / "bad.csv", [f"B1,{a},{ida},voucher,100,202603,",
                                     f"B1,{a},{ida},nursing,100,202603,",  # card not entitled
                                     f"B1,{unknown},{ida},voucher,100,202603,"])  # not registered
    rep = await import_recharge(world.engine, f)
    assert rep.status == "rejected"
    assert [r["line_no"] for r in rep.rejects] == [3, 4]
    assert "not entitled" in rep.rejects[0]["reason"] and "not registered" in rep.rejects[1]["reason"]
    assert unknown not in json.dumps(rep.to_dict())  # card numbers masked
    syntax = write(tmp_path / "syntax.csv", [f"B2,{a},{ida},voucher,-5,202603,", f"B2,{a},{ida},voucher,100,2026,"])
    rep2 = await import_recharge(world.engine, syntax)
    assert rep2.status == "rejected" and len(rep2.rejects) == 2
    assert await n_transfers(world) == 0


async def test_cancelled_card_rejected(world: World, tmp_path: Path) -> None:
    a = await world.add_card(4)
    await cancel(world.engine, a)
    rep = await import_recharge(world.engine, write(tmp_path / "c.csv", [
        f"B3,{a},{world.cards[a]['id_no']},voucher,100,202603,"]))
    assert rep.status == "rejected" and "cancelled" in rep.rejects[0]["reason"]


def test_expiring_amounts_spends_soonest_expiry_first() -> None:
    lots = [{"id": 1, "amount_fen": 100, "expires_on": date(2026, 3, 31)},
            {"id": 2, "amount_fen": 100, "expires_on": date(2026, 6, 30)},
            {"id": 3, "amount_fen": 100, "expires_on": None}]
    # 150 left: it sits in the no-expiry lot (100) and half of the June lot; March is spent
    assert expiring_amounts(lots, 150, date(2026, 4, 1)) == (0, [1])
    assert expiring_amounts(lots, 250, date(2026, 4, 1)) == (50, [1])
    assert expiring_amounts(lots, 300, date(2026, 7, 1)) == (200, [1, 2])


async def test_expiry_sweep_and_rollover(world: World, tmp_path: Path) -> None:
    a = await world.add_card(5)
    ida = world.cards[a]["id_no"]
    await import_recharge(world.engine, write(tmp_path / "e1.csv", [f"E1,{a},{ida},voucher,1000,202603,2026-03-31"]))
    await import_recharge(world.engine, write(tmp_path / "e2.csv", [f"E2,{a},{ida},voucher,500,202604,2026-12-31"]))
    # spend 700: the March lot first
    assert (await world.svc.handle(world.purchase(a, 700))).response_code == "00"
    out = await expire_vouchers(world.engine, date(2026, 4, 1))
    assert out == {"cards": 1, "expired_fen": 300}
    assert await expire_vouchers(world.engine, date(2026, 4, 1)) == {"cards": 0, "expired_fen": 0}
    async with world.engine.connect() as conn:
        assert (await card_balances(conn, a))["voucher"] == 500
        assert await balance(conn, "expired:voucher") == 300
    roll = await rollover_year_end(world.engine, 2026)
    assert roll["moved_fen"] == 500 and not roll["already_done"]
    assert (await rollover_year_end(world.engine, 2026))["already_done"]
    async with world.engine.connect() as conn:
        assert await card_balances(conn, a) == {"voucher": 0, "nursing": 0, "restricted": 500}
    # restricted money pays only the designated categories
    assert (await world.svc.handle(world.purchase(a, 100, "restricted", category="bathing"))).response_code == "57"
    assert (await world.svc.handle(world.purchase(a, 100, "restricted", category="meal"))).response_code == "00"


def test_cli_recharge_import_json(tmp_path: Path) -> None:
    import asyncio

    from clearing.db import init_db, make_engine
    from clearing.lifecycle import register_cards
    from protocol.ids import make_id_no

    url = f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}"
    card, id_no = make_card_no("621888", 6), make_id_no("110105", date(1940, 1, 1), 7)

    async def setup() -> None:
        engine = make_engine(url)
        await init_db(engine)
        await register_cards(engine, [{"card_no": card, "app_serial": "0000000000000006", "id_no": id_no,
                                       "district": "110105", "valid_until": "2030-12-31", "programs": ["voucher"]}])
        await engine.dispose()

    asyncio.run(setup())
    f = write(tmp_path / "cli.csv", [f"C1,{card},{id_no},voucher,1234,202603,"])
    runner = CliRunner()
    res = runner.invoke(app, ["recharge", "import", str(f), "--db", url, "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["status"] == "imported"
    res2 = runner.invoke(app, ["recharge", "import", str(f), "--db", url, "--json"])
    assert json.loads(res2.output)["status"] == "already_imported"
    bad = write(tmp_path / "bad.csv", [f"C2,{card},{id_no},voucher,0,202603,"])
    res3 = runner.invoke(app, ["recharge", "import", str(bad), "--db", url, "--json"])
    assert res3.exit_code == 2 and json.loads(res3.output)["status"] == "rejected"
    res4 = runner.invoke(app, ["clearing", "check", "--db", url, "--json"])
    assert res4.exit_code == 0 and json.loads(res4.output)["ok"]
