"""Clearing test fixtures: a fresh database on SQLite AND PostgreSQL, and a small world to trade in.

``db`` is parametrised over an SQLite file and the real PostgreSQL server (a fresh schema
per test run, emptied before each test, dropped at the end). After EVERY test using it, the ledger invariants are
checked (``clearing.invariants.check_invariants``) and the test fails on any violation.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.ext.asyncio import AsyncEngine

from clearing.db import init_db, make_engine, write_transaction
from clearing.invariants import check_invariants
from clearing.ledger import TransferSpec, post_transfers_sync
from clearing.lifecycle import register_cards
from clearing.registry import add_provider, register_terminal
from clearing.service import ClearingConfig, ClearingService
from keys.cryptogram import compute_tac, cryptogram_data
from keys.issuer import IssuerKeySet
from protocol.ids import make_card_no, make_id_no
from protocol.messages import CardProof, OfflineAdvice, Purchase, Refund, Reversal, Void

SHANGHAI = ZoneInfo("Asia/Shanghai")


async def fresh_pg_engine(url: str) -> tuple[AsyncEngine, str]:
    schema = f"t_{uuid.uuid4().hex[:12]}"
    admin = make_engine(url)
    async with admin.begin() as conn:
        await conn.execute(text(f"CREATE SCHEMA {schema}"))
    await admin.dispose()
    return make_engine(url, pg_schema=schema), schema


async def drop_pg_schema(url: str, schema: str) -> None:
    admin = make_engine(url)
    async with admin.begin() as conn:
        await conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    await admin.dispose()


@pytest.fixture(scope="session")
def pg_schema(pg_url: str) -> Iterator[str]:
    """One fresh PostgreSQL schema for this test run, migrated once; dropped at the end."""
    async def create() -> str:
        engine, schema = await fresh_pg_engine(pg_url)
        await init_db(engine)
        await engine.dispose()
        return schema

    schema = _run_elsewhere(create())
    yield schema
    _run_elsewhere(drop_pg_schema(pg_url, schema))


def _run_elsewhere(coro: Any) -> Any:
    """Run a coroutine to completion on its own loop in a helper thread (callers may be inside a loop)."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


KEEP_TABLES = {"schema_migrations"}


async def _truncate_all(engine: AsyncEngine, schema: str) -> None:
    """Empty every table of ``schema`` (ids and sequences restarted) so each test starts from a clean ledger."""
    async with engine.begin() as conn:
        names = await conn.run_sync(lambda c: inspect(c).get_table_names(schema=schema))
        tables = ", ".join(f"{schema}.{n}" for n in names if n not in KEEP_TABLES)
        await conn.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
        for seq in ("rrn_seq", "transfer_id_seq"):
            await conn.execute(text(f"ALTER SEQUENCE {schema}.{seq} RESTART WITH 1"))


@pytest.fixture(params=["sqlite", "pg"])
async def db(request: pytest.FixtureRequest, tmp_path: Any) -> AsyncIterator[AsyncEngine]:
    """An initialised, empty database on SQLite (a new file) or PostgreSQL (the run's schema, emptied);
    the ledger invariants are asserted when the test ends."""
    if request.param == "sqlite":
        engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'clearing.db'}")
        await init_db(engine)
    else:
        url = request.getfixturevalue("pg_url")
        schema = request.getfixturevalue("pg_schema")
        engine = make_engine(url, pg_schema=schema)
        await init_db(engine)  # no-op when current; creates tables other parts registered since
        await _truncate_all(engine, schema)
    try:
        yield engine
        problems = await check_invariants(engine)
        assert problems == [], problems
    finally:
        await engine.dispose()


@pytest.fixture
def keys() -> IssuerKeySet:
    return IssuerKeySet.demo()


PROVIDER_V = "P00000000000001"  # voucher provider
PROVIDER_N = "P00000000000002"  # nursing provider
TERM_V = "T0000001"
TERM_N = "T0000002"
T0 = datetime(2026, 3, 10, 2, 0, tzinfo=UTC)  # 10:00 in Shanghai


@dataclass
class World:
    """A provider pair, terminals, cards and a running service; builds signed-by-card messages."""

    engine: AsyncEngine
    keys: IssuerKeySet
    svc: ClearingService
    now: datetime = T0
    cards: dict[str, dict[str, Any]] = field(default_factory=dict)
    atc: dict[str, int] = field(default_factory=dict)
    _trace: itertools.count = field(default_factory=lambda: itertools.count(1))
    _msg: itertools.count = field(default_factory=lambda: itertools.count(1))

    def clock(self) -> datetime:
        return self.now

    async def add_card(self, n: int, programs: tuple[str, ...] = ("voucher", "nursing"),
                       valid_until: date = date(2030, 12, 31), status: str = "active",
                       district: str = "110105") -> str:
        card_no = make_card_no("621888", n)
        spec = {"card_no": card_no, "app_serial": f"{n:016X}", "id_no": make_id_no(district, date(1940, 1, 1), n % 999 + 1),
                "name": "王秀英", "district": district, "street": f"{district}001", "category": "AGE80",
                "valid_until": valid_until, "programs": programs, "key_version": 1, "suite": "sm4", "status": status}
        await register_cards(self.engine, [spec])
        self.cards[card_no] = spec
        return card_no

    async def fund(self, card_no: str, program: str, amount: int) -> None:
        district = self.cards[card_no]["district"]
        async with write_transaction(self.engine) as conn:
            await conn.run_sync(post_transfers_sync, [TransferSpec(
                f"fund:{'voucher' if program == 'restricted' else program}:{district}", f"card:{card_no}:{program}",
                amount, "recharge", f"test-fund:{uuid.uuid4().hex}")])

    def trace(self) -> str:
        return f"{next(self._trace):06d}"

    def msg_id(self) -> str:
        return f"M{next(self._msg):011d}"

    def proof(self, card_no: str, amount: int, program: str, terminal_id: str, *, atc: int | None = None,
              bad_tac: bool = False, at: datetime | None = None, key_version: int = 1) -> CardProof:
        spec = self.cards[card_no]
        if atc is None:
            atc = self.atc.get(card_no, 0) + 1
        self.atc[card_no] = max(self.atc.get(card_no, 0), atc)
        local = (at or self.now).astimezone(SHANGHAI)
        ttn = atc + 1000
        d, t = f"{local:%Y%m%d}", f"{local:%H%M%S}"
        key = self.keys.card_key("tac", key_version, bytes.fromhex(spec["app_serial"]))
        tac = compute_tac(key, cryptogram_data(amount, program, terminal_id, ttn, d, t, atc), self.keys.suite)
        if bad_tac:
            tac = bytes(b ^ 0xFF for b in tac)
        return CardProof(card_no=card_no, app_serial=spec["app_serial"], key_version=key_version, suite="sm4", atc=atc,
                         ttn=ttn, txn_date=d, txn_time=t, tac=tac.hex().upper())

    def purchase(self, card_no: str, amount: int, program: str = "voucher", *, terminal_id: str = TERM_V,
                 provider_id: str = PROVIDER_V, batch_no: str = "000001", trace_no: str | None = None,
                 category: str = "meal", **proof_kw: Any) -> Purchase:
        return Purchase(terminal_id=terminal_id, msg_id=self.msg_id(), sent_at=self.now, provider_id=provider_id,
                        batch_no=batch_no, trace_no=trace_no or self.trace(), program=program,
                        service_category=category, amount_fen=amount,
                        card=self.proof(card_no, amount, program, terminal_id, **proof_kw))

    def advice(self, card_no: str, amount: int, program: str = "voucher", *, terminal_id: str = TERM_V,
               provider_id: str = PROVIDER_V, batch_no: str = "000001", **proof_kw: Any) -> OfflineAdvice:
        return OfflineAdvice(terminal_id=terminal_id, msg_id=self.msg_id(), sent_at=self.now, provider_id=provider_id,
                             batch_no=batch_no, trace_no=self.trace(), program=program, service_category="meal",
                             amount_fen=amount, card=self.proof(card_no, amount, program, terminal_id, **proof_kw),
                             offline_auth_code="OFF001", approved_at=self.now - timedelta(hours=1))

    def void(self, orig: Purchase, rrn: str, *, amount: int | None = None, batch_no: str | None = None) -> Void:
        return Void(terminal_id=orig.terminal_id, msg_id=self.msg_id(), sent_at=self.now, provider_id=orig.provider_id,
                    batch_no=batch_no or orig.batch_no, trace_no=self.trace(), orig_rrn=rrn, orig_trace_no=orig.trace_no,
                    card_no=orig.card.card_no, amount_fen=amount or orig.amount_fen)

    def refund(self, orig: Purchase, rrn: str, amount: int, *, batch_no: str = "000002") -> Refund:
        return Refund(terminal_id=orig.terminal_id, msg_id=self.msg_id(), sent_at=self.now,
                      provider_id=orig.provider_id, batch_no=batch_no, trace_no=self.trace(), orig_rrn=rrn,
                      card_no=orig.card.card_no, amount_fen=amount)

    def reversal(self, orig: Purchase, *, amount: int | None = None) -> Reversal:
        return Reversal(terminal_id=orig.terminal_id, msg_id=self.msg_id(), sent_at=self.now,
                        provider_id=orig.provider_id, batch_no=orig.batch_no, trace_no=self.trace(),
                        orig_trace_no=orig.trace_no, orig_msg_id=orig.msg_id, card_no=orig.card.card_no,
                        amount_fen=amount or orig.amount_fen)


async def build_world(engine: AsyncEngine, keys: IssuerKeySet, **cfg: Any) -> World:
    await add_provider(engine, PROVIDER_V, "朝阳区幸福养老驿站", ["voucher"],
                       ["meal", "bathing", "cleaning", "rehab", "nursing_care"], "6222000011112222", "110105")
    await add_provider(engine, PROVIDER_N, "海淀区护理服务中心", ["nursing"], ["nursing_care", "rehab"],
                       "6222000011113333", "110108")
    await register_terminal(engine, TERM_V, PROVIDER_V, "PSAM0001", date(2026, 1, 5))
    await register_terminal(engine, TERM_N, PROVIDER_N, "PSAM0002", date(2026, 1, 6))
    world = World(engine, keys, None)  # type: ignore[arg-type]
    world.svc = ClearingService(engine, keys, ClearingConfig(**cfg), clock=world.clock)
    return world


@pytest.fixture
async def world(db: AsyncEngine, keys: IssuerKeySet) -> AsyncIterator[World]:
    w = await build_world(db, keys)
    async with w.svc:
        yield w
