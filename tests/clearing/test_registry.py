"""Provider and terminal registry, install-data export, and the registry CLI verbs."""

from __future__ import annotations

import csv
import io
import json
from datetime import date
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine
from typer.testing import CliRunner

from clearing.accounts import balance
from clearing.registry import (
    RegistryError,
    add_provider,
    export_install_csv,
    get_terminal,
    list_providers,
    list_terminals,
    register_terminal,
    set_provider_status,
    set_terminal_status,
)
from ops.cli import app

PID = "P11010500000001"
SM2 = "AB" * 64


async def test_provider_add_validates_and_opens_payable(db: AsyncEngine) -> None:
    p = await add_provider(db, PID, "朝阳区幸福养老驿站", "voucher", "meal,bathing", "6222000011112222", "110105")
    assert p.programs == ("voucher",) and p.service_categories == ("bathing", "meal") and p.status == "active"
    async with db.connect() as conn:
        assert await balance(conn, f"provider:{PID}:payable") == 0
    for bad in [dict(provider_id="SHORT"), dict(programs="cash"), dict(service_categories="gambling"),
                dict(settle_account="x"), dict(district="12"), dict(name="")]:
        args = dict(provider_id="P11010500000009", name="n", programs="voucher", service_categories="meal",
                    settle_account="6222000011112222", district="110105") | bad
        with pytest.raises(RegistryError):
            await add_provider(db, **args)
    with pytest.raises(RegistryError, match="already registered"):
        await add_provider(db, PID, "again", "voucher", "meal", "6222000011112222")


async def test_provider_status_transitions(db: AsyncEngine) -> None:
    await add_provider(db, PID, "驿站", ["nursing"], ["nursing_care"], "6222000011112222")
    assert (await set_provider_status(db, PID, "suspended")).status == "suspended"
    assert (await set_provider_status(db, PID, "active")).status == "active"
    assert (await set_provider_status(db, PID, "withdrawn")).status == "withdrawn"
    with pytest.raises(RegistryError, match="cannot be reactivated"):
        await set_provider_status(db, PID, "active")
    with pytest.raises(RegistryError):
        await set_provider_status(db, "P11010500000077", "suspended")
    assert [p.status for p in await list_providers(db, "withdrawn")] == ["withdrawn"]
    with pytest.raises(RegistryError, match="withdrawn"):
        await register_terminal(db, "T0000009", PID, "PSAM0009", date(2026, 1, 1))
    # each change is in the audit log with who did it; refused changes are not
    from sqlalchemy import select

    from clearing.eod_schema import audit_log

    async with db.connect() as conn:
        rows = (await conn.execute(select(audit_log.c.action, audit_log.c.subject, audit_log.c.details)
                                   .order_by(audit_log.c.seq))).all()
    assert [(a, s) for a, s, _ in rows] == [("provider.add", PID)] + [("provider.status", PID)] * 3
    assert [json.loads(d)["to"] for a, _, d in rows[1:]] == ["suspended", "active", "withdrawn"]


async def test_terminal_registry_and_install_export(db: AsyncEngine) -> None:
    await add_provider(db, PID, "朝阳区幸福养老驿站", ["voucher"], ["meal"], "6222000011112222")
    t = await register_terminal(db, "T0000001", PID, "PSAM0001", date(2026, 1, 5), address="朝阳区某街1号",
                                sm2_public_key=SM2.lower(), tmk_kcv="a1b2c3")
    assert t.sm2_public_key == SM2 and t.tmk_kcv == "A1B2C3"
    await register_terminal(db, "T0000002", PID, "PSAM0002", date(2026, 1, 6))
    with pytest.raises(RegistryError):
        await register_terminal(db, "T0000001", PID, "PSAM0003", date(2026, 1, 6))
    with pytest.raises(RegistryError):
        await register_terminal(db, "T0000003", "P11010500000077", "PSAM0003", date(2026, 1, 6))
    with pytest.raises(RegistryError):
        await register_terminal(db, "t-1", PID, "PSAM0003", date(2026, 1, 6))
    with pytest.raises(RegistryError):
        await register_terminal(db, "T0000004", PID, "PSAM0004", date(2026, 1, 6), sm2_public_key="XYZ")
    await set_terminal_status(db, "T0000002", "suspended")
    async with db.connect() as conn:
        assert (await get_terminal(conn, "T0000002")).status == "suspended"
        assert await get_terminal(conn, "T0000099") is None
    assert [x.terminal_id for x in await list_terminals(db, PID)] == ["T0000001", "T0000002"]
    rows = list(csv.DictReader(io.StringIO(await export_install_csv(db))))
    assert [r["terminal_id"] for r in rows] == ["T0000001", "T0000002"]
    assert rows[0]["provider_name"] == "朝阳区幸福养老驿站" and rows[0]["install_date"] == "2026-01-05"
    assert rows[0]["psam_serial"] == "PSAM0001" and rows[0]["sm2_public_key"] == SM2


def test_registry_cli(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'cli.db'}"
    r = CliRunner()
    res = r.invoke(app, ["clearing", "init-db", "--db", url, "--json"])
    assert res.exit_code == 0 and json.loads(res.output)["applied"] == ["0001", "0002", "0003", "0004"]
    res = r.invoke(app, ["clearing", "provider", "add", "--id", PID, "--name", "驿站", "--programs", "voucher",
                         "--categories", "meal,bathing", "--settle-account", "6222000011112222", "--db", url,
                         "--json"])
    assert res.exit_code == 0, res.output
    res = r.invoke(app, ["clearing", "provider", "add", "--id", "BAD", "--name", "x", "--programs", "voucher",
                         "--categories", "meal", "--settle-account", "6222000011112222", "--db", url])
    assert res.exit_code != 0 and "15 characters" in str(res.exception)
    res = r.invoke(app, ["clearing", "terminal", "register", "--id", "T0000001", "--provider", PID, "--psam",
                         "PSAM0001", "--install-date", "2026-03-01", "--db", url])
    assert res.exit_code == 0, res.output
    res = r.invoke(app, ["clearing", "provider", "suspend", PID, "--db", url, "--json"])
    assert json.loads(res.output)["status"] == "suspended"
    res = r.invoke(app, ["clearing", "provider", "list", "--db", url, "--json"])
    assert [p["provider_id"] for p in json.loads(res.output)] == [PID]
    out = tmp_path / "install.csv"
    res = r.invoke(app, ["clearing", "terminal", "export-install", "--out", str(out), "--db", url, "--json"])
    assert json.loads(res.output)["terminals"] == 1 and "T0000001" in out.read_text(encoding="utf-8")
    res = r.invoke(app, ["clearing", "terminal", "list", "--db", url, "--json"])
    assert json.loads(res.output)[0]["psam_serial"] == "PSAM0001"
    for verb in (["clearing"], ["clearing", "provider"], ["recharge"], ["card"]):
        res = r.invoke(app, [*verb, "--help"])
        assert res.exit_code == 0 and "Example" in res.output
