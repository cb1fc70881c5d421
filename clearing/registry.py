"""Provider and terminal registry (服务商 / 终端登记).

Providers (养老助残服务单位) are registered with the programs they may accept
(a voucher provider cannot take nursing-subsidy money and the reverse) and the
service categories they offer; a suspended or withdrawn (清退) provider is
declined ``58``. Terminals are bound to one provider, with their PSAM serial,
install date, SM2 public key (sign-on) and TMK check value; the install-data
export is the CSV the program's operations unit loads.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from clearing.accounts import ensure_accounts_sync, provider_payable
from clearing.audit import append_audit
from clearing.db import write_transaction
from clearing.schema import providers, terminals

PROVIDER_PROGRAMS = ("voucher", "nursing")
PROVIDER_STATUSES = ("active", "suspended", "withdrawn")
TERMINAL_STATUSES = ("active", "suspended", "removed")
SERVICE_CATEGORIES = (
    "meal", "bathing", "cleaning", "daycare", "rehab", "nursing_care", "assistive_device", "medical_escort",
    "home_care", "companionship",
)
RESTRICTED_SERVICE_CATEGORIES = frozenset({"rehab", "nursing_care", "meal", "assistive_device"})
"""Categories the restricted account (专用账户, rolled-over vouchers) may pay for."""
PROVIDER_ID_RE = re.compile(r"^[0-9A-Z]{15}$")
TERMINAL_ID_RE = re.compile(r"^[0-9A-Z]{8}$")
DISTRICT_RE = re.compile(r"^(\d{6})?$")
SM2_PUBLIC_HEX_RE = re.compile(r"^([0-9A-F]{128}|04[0-9A-F]{128})?$")
KCV_RE = re.compile(r"^([0-9A-F]{6})?$")
INSTALL_EXPORT_COLUMNS = ("terminal_id", "provider_id", "provider_name", "psam_serial", "install_date", "address",
                          "status", "tmk_kcv", "sm2_public_key")


class RegistryError(ValueError):
    """A registration that cannot be accepted (bad id, unknown provider, bad status, …)."""


@dataclass(frozen=True)
class Provider:
    provider_id: str
    name: str
    programs: tuple[str, ...]
    service_categories: tuple[str, ...]
    status: str
    settle_account: str
    district: str

    @classmethod
    def from_row(cls, r: Any) -> Provider:
        m = r._mapping
        return cls(m["provider_id"], m["name"], tuple(_split(m["programs"])), tuple(_split(m["service_categories"])),
                   m["status"], m["settle_account"], m["district"])


@dataclass(frozen=True)
class Terminal:
    terminal_id: str
    provider_id: str
    psam_serial: str
    install_date: date
    address: str
    status: str
    sm2_public_key: str
    tmk_kcv: str

    @classmethod
    def from_row(cls, r: Any) -> Terminal:
        m = r._mapping
        return cls(m["terminal_id"], m["provider_id"], m["psam_serial"], m["install_date"], m["address"], m["status"],
                   m["sm2_public_key"], m["tmk_kcv"])


def _split(s: str) -> list[str]:
    return [x for x in (s or "").split(",") if x]


def _norm_list(values: str | list[str] | tuple[str, ...], allowed: tuple[str, ...], what: str) -> list[str]:
    items = _split(values) if isinstance(values, str) else list(values)
    items = sorted({x.strip() for x in items if x.strip()})
    if not items:
        raise RegistryError(f"{what}: at least one is required")
    bad = [x for x in items if x not in allowed]
    if bad:
        raise RegistryError(f"{what}: unknown {', '.join(bad)} (allowed: {', '.join(allowed)})")
    return items


async def add_provider(engine: AsyncEngine, provider_id: str, name: str, programs: str | list[str],
                       service_categories: str | list[str], settle_account: str, district: str = "", *,
                       actor: str = "operator") -> Provider:
    """Register a provider (active) and open its payable account."""
    if not PROVIDER_ID_RE.match(provider_id):
        raise RegistryError("provider id must be 15 characters 0-9A-Z")
    if not name.strip() or len(name) > 128:
        raise RegistryError("provider name must be 1-128 characters")
    if not re.match(r"^[0-9A-Za-z-]{4,64}$", settle_account):
        raise RegistryError("settle account must be 4-64 characters 0-9A-Za-z-")
    if not DISTRICT_RE.match(district):
        raise RegistryError("district code must be 6 digits")
    progs = _norm_list(programs, PROVIDER_PROGRAMS, "programs")
    cats = _norm_list(service_categories, SERVICE_CATEGORIES, "service categories")
    now = datetime.now(UTC)
    async with write_transaction(engine) as conn:
        if (await conn.execute(select(providers.c.provider_id).where(providers.c.provider_id == provider_id))).first():
            raise RegistryError(f"provider {provider_id} is already registered")
        await conn.execute(providers.insert().values(
            provider_id=provider_id, name=name.strip(), programs=",".join(progs), service_categories=",".join(cats),
            status="active", settle_account=settle_account, district=district, created_at=now, updated_at=now))
        await conn.run_sync(ensure_accounts_sync, [provider_payable(provider_id)])
        await conn.run_sync(append_audit, actor, "provider.add", provider_id,
                            {"programs": progs, "service_categories": cats, "district": district})
    return Provider(provider_id, name.strip(), tuple(progs), tuple(cats), "active", settle_account, district)


async def set_provider_status(engine: AsyncEngine, provider_id: str, status: str, *,
                              actor: str = "operator") -> Provider:
    """Suspend, withdraw (清退) or reactivate a provider. A withdrawn provider stays withdrawn."""
    if status not in PROVIDER_STATUSES:
        raise RegistryError(f"provider status must be one of {', '.join(PROVIDER_STATUSES)}")
    async with write_transaction(engine) as conn:
        p = await get_provider(conn, provider_id)
        if p is None:
            raise RegistryError(f"unknown provider {provider_id}")
        if p.status == "withdrawn" and status != "withdrawn":
            raise RegistryError(f"provider {provider_id} is withdrawn and cannot be reactivated")
        await conn.execute(update(providers).where(providers.c.provider_id == provider_id)
                           .values(status=status, updated_at=datetime.now(UTC)))
        await conn.run_sync(append_audit, actor, "provider.status", provider_id, {"from": p.status, "to": status})
    return Provider(p.provider_id, p.name, p.programs, p.service_categories, status, p.settle_account, p.district)


async def get_provider(conn: AsyncConnection, provider_id: str) -> Provider | None:
    r = (await conn.execute(select(providers).where(providers.c.provider_id == provider_id))).first()
    return None if r is None else Provider.from_row(r)


async def list_providers(engine: AsyncEngine, status: str | None = None) -> list[Provider]:
    q = select(providers).order_by(providers.c.provider_id)
    if status:
        q = q.where(providers.c.status == status)
    async with engine.connect() as conn:
        return [Provider.from_row(r) for r in await conn.execute(q)]


async def register_terminal(engine: AsyncEngine, terminal_id: str, provider_id: str, psam_serial: str,
                            install_date: date, *, address: str = "", sm2_public_key: str = "",
                            tmk_kcv: str = "", actor: str = "operator") -> Terminal:
    """Bind a terminal to a provider (active). Re-registering an existing terminal id is refused."""
    if not TERMINAL_ID_RE.match(terminal_id):
        raise RegistryError("terminal id must be 8 characters 0-9A-Z")
    if not re.match(r"^[0-9A-Z]{4,32}$", psam_serial):
        raise RegistryError("PSAM serial must be 4-32 characters 0-9A-Z")
    sm2_public_key, tmk_kcv = sm2_public_key.upper(), tmk_kcv.upper()
    if not SM2_PUBLIC_HEX_RE.match(sm2_public_key):
        raise RegistryError("SM2 public key must be 64 bytes X‖Y in hex (optionally 04-prefixed)")
    if not KCV_RE.match(tmk_kcv):
        raise RegistryError("TMK KCV must be 3 bytes hex")
    if len(address) > 200:
        raise RegistryError("address longer than 200 characters")
    now = datetime.now(UTC)
    async with write_transaction(engine) as conn:
        p = await get_provider(conn, provider_id)
        if p is None:
            raise RegistryError(f"unknown provider {provider_id}")
        if p.status == "withdrawn":
            raise RegistryError(f"provider {provider_id} is withdrawn")
        if (await conn.execute(select(terminals.c.terminal_id).where(terminals.c.terminal_id == terminal_id))).first():
            raise RegistryError(f"terminal {terminal_id} is already registered")
        await conn.execute(terminals.insert().values(
            terminal_id=terminal_id, provider_id=provider_id, psam_serial=psam_serial, install_date=install_date,
            address=address, status="active", sm2_public_key=sm2_public_key, tmk_kcv=tmk_kcv, created_at=now,
            updated_at=now))
        await conn.run_sync(append_audit, actor, "terminal.register", terminal_id,
                            {"provider_id": provider_id, "psam_serial": psam_serial, "tmk_kcv": tmk_kcv})
    return Terminal(terminal_id, provider_id, psam_serial, install_date, address, "active", sm2_public_key, tmk_kcv)


async def set_terminal_status(engine: AsyncEngine, terminal_id: str, status: str, *, actor: str = "operator") -> None:
    if status not in TERMINAL_STATUSES:
        raise RegistryError(f"terminal status must be one of {', '.join(TERMINAL_STATUSES)}")
    async with write_transaction(engine) as conn:
        res = await conn.execute(update(terminals).where(terminals.c.terminal_id == terminal_id)
                                 .values(status=status, updated_at=datetime.now(UTC)))
        if res.rowcount == 0:
            raise RegistryError(f"unknown terminal {terminal_id}")
        await conn.run_sync(append_audit, actor, "terminal.status", terminal_id, {"to": status})


async def get_terminal(conn: AsyncConnection, terminal_id: str) -> Terminal | None:
    """The terminal record (the MQTT sign-on reads ``sm2_public_key`` and ``tmk_kcv`` from it)."""
    r = (await conn.execute(select(terminals).where(terminals.c.terminal_id == terminal_id))).first()
    return None if r is None else Terminal.from_row(r)


async def list_terminals(engine: AsyncEngine, provider_id: str | None = None) -> list[Terminal]:
    q = select(terminals).order_by(terminals.c.terminal_id)
    if provider_id:
        q = q.where(terminals.c.provider_id == provider_id)
    async with engine.connect() as conn:
        return [Terminal.from_row(r) for r in await conn.execute(q)]


async def export_install_csv(engine: AsyncEngine, provider_id: str | None = None) -> str:
    """Install data (装机数据) for the operations unit: one CSV row per terminal with its provider's name."""
    q = (select(terminals, providers.c.name.label("provider_name"))
         .join(providers, providers.c.provider_id == terminals.c.provider_id).order_by(terminals.c.terminal_id))
    if provider_id:
        q = q.where(terminals.c.provider_id == provider_id)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(INSTALL_EXPORT_COLUMNS)
    async with engine.connect() as conn:
        for r in await conn.execute(q):
            m = r._mapping
            w.writerow([m[c].isoformat() if c == "install_date" else m[c] for c in INSTALL_EXPORT_COLUMNS])
    return buf.getvalue()
