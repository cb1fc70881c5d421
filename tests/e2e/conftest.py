"""End-to-end fixtures: the project's mosquitto on a free port, a clearing database, a simulated fleet,
a clearing worker, and a check after every test that the ledger invariants hold and every terminal
journal agrees with the host."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from clearing.db import init_db, make_engine
from clearing.invariants import check_invariants
from clearing.schema import host_txns
from clearing.terminal_keys import DemoTerminalKeys, demo_working_key_master, ensure_schema
from clearing.worker import ClearingWorker, clearing_runtime
from ops.fleet import FleetWorld, SimTerminal, setup_fleet
from ops.mosquitto_proc import MosquittoProcess, find_mosquitto
from terminal_agent.agent import AgentSettings
from terminal_agent.host_client import HostLink
from terminal_agent.journal import Journal

FAST = AgentSettings(answer_timeout_s=2.0, reversal_retry_s=0.2, offline_floor_limit_fen=5_000,
                     offline_max_per_card=2, heartbeat_s=3600, card_in_thread=False)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[MosquittoProcess]:
    """mosquitto with ops/deploy/mosquitto/mosquitto.conf on a free loopback port."""
    try:
        find_mosquitto()
    except Exception as exc:
        pytest.skip(str(exc))
    with MosquittoProcess(tmp_path / "mosquitto") as m:
        yield m


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    eng = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'clearing.db'}")
    await init_db(eng)
    await ensure_schema(eng)
    yield eng
    await eng.dispose()


@pytest.fixture
async def fleet(engine: AsyncEngine) -> FleetWorld:
    return await setup_fleet(engine, terminals=2, cards=8, seed=7)


@dataclass
class Harness:
    """The running pieces of one end-to-end test."""

    engine: AsyncEngine
    broker: MosquittoProcess
    fleet: FleetWorld
    tmp: Path
    links: list[HostLink] = field(default_factory=list)
    terminals: dict[str, SimTerminal] = field(default_factory=dict)

    def clearing(self, **kw: Any):
        return clearing_runtime(self.engine, self.broker.url, issuer_keys=self.fleet.key_set,
                                key_source=DemoTerminalKeys(), wkm=demo_working_key_master(), **kw)

    async def link(self) -> HostLink:
        link = HostLink(self.broker.url, [t.terminal_id for t in self.fleet.terminals], connect_wait_s=0.3,
                        reconnect_max_s=0.5)
        await link.start()
        self.links.append(link)
        return link

    async def terminal(self, index: int = 0, *, link: HostLink | None = None, settings: AgentSettings = FAST,
                       start: bool = True) -> SimTerminal:
        spec = self.fleet.terminals[index]
        link = link or (self.links[0] if self.links else await self.link())
        journal = Journal(self.tmp / f"journal-{spec.terminal_id}.db")
        term = SimTerminal(spec, self.fleet.key_set, link, journal, settings)
        self.terminals[spec.terminal_id] = term
        if start:
            await term.agent.start()
        return term

    def card(self, program: str, n: int = 0):
        return self.fleet.cards_for(program)[n]

    async def close(self) -> None:
        for t in self.terminals.values():
            await t.agent.stop()
        for link in self.links:
            await link.stop()


@pytest.fixture
async def harness(engine: AsyncEngine, broker: MosquittoProcess, fleet: FleetWorld,
                  tmp_path: Path) -> AsyncIterator[Harness]:
    h = Harness(engine, broker, fleet, tmp_path)
    try:
        yield h
    finally:
        await h.close()
    problems = await check_invariants(engine)
    assert problems == [], problems
    for term in h.terminals.values():
        disagreements = await journal_vs_host(engine, term.agent.journal, term.terminal_id)
        assert disagreements == [], disagreements
        term.agent.journal.close()


async def journal_vs_host(engine: AsyncEngine, journal: Journal, terminal_id: str) -> list[str]:
    """Every terminal journal row matches what the host recorded, and the host has nothing the terminal lacks."""
    async with engine.connect() as conn:
        rows = (await conn.execute(sa.select(host_txns).where(host_txns.c.terminal_id == terminal_id))).mappings().all()
    host = {(r["batch_no"], r["trace_no"], r["txn_type"]): r for r in rows}
    kind_type = {"purchase": "PURCHASE", "void": "VOID", "refund": "REFUND", "offline_purchase": "ADVICE",
                 "reversal": "REVERSAL"}
    problems: list[str] = []
    seen: set[tuple[str, str, str]] = set()
    for j in journal.rows():
        key = (j.batch_no, j.trace_no, kind_type[j.kind])
        seen.add(key)
        h = host.get(key)
        status = h["status"] if h is not None else None
        if j.state in ("approved", "advised"):
            if status != "SUCCESS":
                problems.append(f"{key}: terminal {j.state}, host {status}")
            elif j.rrn and h["rrn"] != j.rrn:
                problems.append(f"{key}: RRN {j.rrn} on the terminal, {h['rrn']} on the host")
            elif h["amount_fen"] != j.amount_fen:
                problems.append(f"{key}: amount differs")
        elif j.state in ("declined", "reversed", "cancelled", "advice_declined"):
            if status == "SUCCESS":
                problems.append(f"{key}: terminal {j.state}, host SUCCESS")
        elif j.state == "acked":
            pass  # a reversal the host acknowledged (posted, or nothing to undo)
        elif j.state == "offline":
            if status is not None:
                problems.append(f"{key}: offline advice not uploaded yet but the host has it")
        else:
            problems.append(f"{key}: still {j.state} on the terminal at the end of the test")
    for key, h in host.items():
        if h["status"] == "SUCCESS" and key[2] != "REVERSAL" and key not in seen:
            problems.append(f"{key}: host SUCCESS, unknown to the terminal")
    return problems


__all__ = ["FAST", "ClearingWorker", "Harness", "journal_vs_host"]


async def raw_exchange(url: str, msgs: list[Any], *, expect: int | None = None,
                       wait_s: float = 3.0) -> list[Any]:
    """Publish already-signed messages as a bare MQTT client on their terminal's up topic; collect answers."""
    import asyncio

    from protocol.messages import down_topic, parse_message, up_topic
    from protocol.transport import make_client

    want = len(msgs) if expect is None else expect
    answers: list[Any] = []
    terminal_id = msgs[0].terminal_id
    async with make_client(url) as client:
        await client.subscribe(down_topic(terminal_id), qos=1)
        for m in msgs:
            await client.publish(up_topic(terminal_id), m.to_json(), qos=1)

        async def collect() -> None:
            async for message in client.messages:
                answers.append(parse_message(bytes(message.payload)))  # type: ignore[arg-type]
                if len(answers) >= want:
                    return

        try:
            await asyncio.wait_for(collect(), wait_s)
        except TimeoutError:
            pass
    return answers


async def host_rows(engine: AsyncEngine, terminal_id: str | None = None) -> list[dict[str, Any]]:
    q = sa.select(host_txns).order_by(host_txns.c.id)
    if terminal_id:
        q = q.where(host_txns.c.terminal_id == terminal_id)
    async with engine.connect() as conn:
        return [dict(r) for r in (await conn.execute(q)).mappings().all()]


async def balance(engine: AsyncEngine, card_no: str, program: str) -> int:
    from clearing.schema import accounts

    async with engine.connect() as conn:
        row = (await conn.execute(sa.select(accounts).where(accounts.c.code == f"card:{card_no}:{program}"))).mappings().first()
    assert row is not None, f"no account for card:{card_no}:{program}"
    return int(row["credits_posted"]) - int(row["debits_posted"])
