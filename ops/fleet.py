"""A simulated fleet (模拟终端群): providers, terminals with PSAMs, personalised cards, funded — and agents.

Used by ``carepay sim traffic``, ``carepay terminal run --reader sim``, the end-to-end tests and
``bench/e2e_auth.py``. Everything goes through the real parts: the registry and the recharge
import on the clearing side; on the terminal side a :class:`~simulator.channel.SimReader` whose
card slot takes a :class:`~simulator.card.VirtualCard` and whose PSAM slot holds a
:class:`~simulator.psam.VirtualPsam`, driven by the real card session and terminal agent.

Terminal keys are the public demo keys of :mod:`clearing.terminal_keys` (TMK and SM2 pair per
terminal id) — simulation only.
"""

from __future__ import annotations

import random
import tempfile
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy.ext.asyncio import AsyncEngine

from clearing.terminal_keys import DEMO_SEED, demo_terminal_sm2, demo_terminal_tmk
from keys.diversify import kcv
from keys.issuer import IssuerKeySet
from ops.config import DEFAULT_AID_HEX
from protocol import card_files as cf
from simulator.card import VirtualCard
from terminal_agent.agent import AgentSettings, TerminalAgent, TerminalIdentity, TxnOutcome
from terminal_agent.card_session import CardSession
from terminal_agent.host_client import HostClient, HostLink
from terminal_agent.journal import Journal
from terminal_agent.psam_session import PsamSession

LOCAL_TZ = ZoneInfo("Asia/Shanghai")
FLEET_DISTRICT = "110105"
PROGRAM_CATEGORIES = {"voucher": ["meal", "bathing", "cleaning", "daycare", "home_care", "companionship"],
                      "nursing": ["nursing_care", "rehab", "home_care"]}
DEFAULT_FUND_FEN = {"voucher": 100_000, "nursing": 100_000}
MAX_FLEET_TERMINALS = 10_000
MAX_FLEET_CARDS = 100_000
SIM_CARD_INDEX_BASE = 10_000_000
"""Simulated fleet cards are numbered from here (per seed), clear of decks made by ``sim cards issue``."""


def fleet_first_card_index(seed: int) -> int:
    return SIM_CARD_INDEX_BASE + (seed % 1000) * MAX_FLEET_CARDS + 1


def provider_id_for(program: str, index: int) -> str:
    return f"P{FLEET_DISTRICT}{'V' if program == 'voucher' else 'N'}{index:07d}"


def terminal_id_for(index: int, prefix: str = "S") -> str:
    return f"{prefix}{index:07d}"


def card_spec(card: VirtualCard) -> dict[str, Any]:
    """What the issuing bank registers for a personalised card."""
    holder = cf.CARDHOLDER.parse(card.cardholder_ef)
    programs = cf.programs_from_bits(cf.ENTITLEMENT.parse(card.entitlement_ef).programs)
    return {"card_no": holder.card_no, "id_no": holder.id_no, "name": holder.name, "app_serial": card.app_serial,
            "district_code": holder.district_code, "street_code": holder.street_code,
            "category": cf.Category(holder.category).name, "valid_until": holder.valid_until, "programs": programs,
            "key_version": card.key_version, "suite": card.suite.value, "status": "active"}


def card_programs(card: VirtualCard) -> tuple[str, ...]:
    return cf.programs_from_bits(cf.ENTITLEMENT.parse(card.entitlement_ef).programs)


def card_number(card: VirtualCard) -> str:
    return str(cf.CARDHOLDER.parse(card.cardholder_ef).card_no)


@dataclass
class TerminalSpec:
    terminal_id: str
    provider_id: str
    program: str
    provider_name: str

    def identity(self, seed: str = DEMO_SEED) -> TerminalIdentity:
        return TerminalIdentity(self.terminal_id, self.provider_id, demo_terminal_tmk(self.terminal_id, seed),
                                demo_terminal_sm2(self.terminal_id, seed), self.provider_name)


@dataclass
class FleetWorld:
    """What :func:`setup_fleet` registered: terminals (with their provider's program) and cards."""

    key_set: IssuerKeySet
    terminals: list[TerminalSpec] = field(default_factory=list)
    cards: list[VirtualCard] = field(default_factory=list)
    funded_fen: dict[str, int] = field(default_factory=dict)

    def cards_for(self, program: str) -> list[VirtualCard]:
        return [c for c in self.cards if program in card_programs(c)]


async def register_fleet_terminals(engine: AsyncEngine, n_terminals: int, *, prefix: str = "S",
                                   seed: str = DEMO_SEED) -> list[TerminalSpec]:
    """One voucher and one nursing provider per 4 terminals (at least one each); terminals alternate programs."""
    from clearing.registry import add_provider, register_terminal

    if not 0 < n_terminals <= MAX_FLEET_TERMINALS:
        raise ValueError(f"terminals must be 1..{MAX_FLEET_TERMINALS}")
    n_prov = max(1, n_terminals // 8)
    providers: dict[str, list[str]] = {"voucher": [], "nursing": []}
    for program in ("voucher", "nursing"):
        for i in range(1, n_prov + 1):
            pid = provider_id_for(program, i)
            await add_provider(engine, pid, f"{'养老服务' if program == 'voucher' else '护理服务'}{i}号站", [program],
                               PROGRAM_CATEGORIES[program], f"6222{i:012d}", FLEET_DISTRICT)
            providers[program].append(pid)
    specs = []
    today = datetime.now(LOCAL_TZ).date()
    for i in range(1, n_terminals + 1):
        program = "voucher" if i % 2 else "nursing"
        pid = providers[program][(i // 2) % n_prov]
        tid = terminal_id_for(i, prefix)
        await register_terminal(engine, tid, pid, f"PSAM{i:08d}", today,
                                sm2_public_key=demo_terminal_sm2(tid, seed).public_key.hex().upper(),
                                tmk_kcv=kcv(demo_terminal_tmk(tid, seed)).hex().upper())
        specs.append(TerminalSpec(tid, pid, program, f"{program} provider {pid[-3:]}"))
    return specs


async def issue_and_fund_cards(engine: AsyncEngine, n_cards: int, key_set: IssuerKeySet, *, seed: int = 1,
                               fund_fen: dict[str, int] | None = None, first_index: int = 1,
                               workdir: Path | None = None) -> tuple[list[VirtualCard], dict[str, int]]:
    """Personalise ``n_cards`` cards, register them and fund them through a real recharge file import."""
    from clearing.lifecycle import register_cards
    from clearing.recharge import import_recharge
    from protocol.files.recharge import RechargeLine, write_recharge
    from simulator.personalise import issue_cards

    if not 0 < n_cards <= MAX_FLEET_CARDS:
        raise ValueError(f"cards must be 1..{MAX_FLEET_CARDS}")
    today = datetime.now(LOCAL_TZ).date()
    cards = issue_cards(n_cards, aid=bytes.fromhex(DEFAULT_AID_HEX), key_set=key_set, seed=seed,
                        first_index=first_index, today=today)
    specs = [card_spec(c) for c in cards]
    await register_cards(engine, specs)
    amounts = fund_fen or DEFAULT_FUND_FEN
    period = f"{today:%Y%m}"
    batch_id = f"SIM{period}-{seed % 100_000:05d}-{first_index}"
    expires = today + timedelta(days=400)
    lines = []
    for spec in specs:
        for program in spec["programs"]:
            lines.append(RechargeLine(batch_id, spec["card_no"], spec["id_no"], program, amounts[program], period,
                                      expires if program == "voucher" else None))
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        path = write_recharge(Path(tmp) / f"recharge-{batch_id}.csv", lines)
        await import_recharge(engine, path)
    funded = {program: sum(line.amount_fen for line in lines if line.program == program) for program in amounts}
    return cards, funded


async def setup_fleet(engine: AsyncEngine, *, terminals: int, cards: int, seed: int = 1,
                      key_set: IssuerKeySet | None = None, fund_fen: dict[str, int] | None = None,
                      prefix: str = "S") -> FleetWorld:
    """Register a simulated fleet in the clearing database (providers, terminals, cards, money)."""
    ks = key_set or IssuerKeySet.demo()
    world = FleetWorld(ks)
    world.terminals = await register_fleet_terminals(engine, terminals, prefix=prefix)
    world.cards, world.funded_fen = await issue_and_fund_cards(engine, cards, ks, seed=seed, fund_fen=fund_fen,
                                                               first_index=fleet_first_card_index(seed))
    return world


class SimTerminal:
    """A terminal with a simulated reader (card slot + PSAM) running the real agent and card session."""

    def __init__(self, spec: TerminalSpec, key_set: IssuerKeySet, link: HostLink, journal: Journal,
                 settings: AgentSettings | None = None) -> None:
        from simulator.channel import SimReader
        from simulator.psam import VirtualPsam

        self.spec = spec
        self.psam = VirtualPsam(key_set, terminal_id=spec.terminal_id)
        self.reader = SimReader(psam=self.psam)
        self.psam_session = PsamSession(self.reader.psam)
        self.psam_session.open()
        self.agent = TerminalAgent(spec.identity(), HostClient(link, spec.terminal_id), journal, settings)
        self.aid = bytes.fromhex(DEFAULT_AID_HEX)
        self.rng = random.Random(spec.terminal_id)

    @property
    def terminal_id(self) -> str:
        return self.spec.terminal_id

    def session(self, card: VirtualCard) -> CardSession:
        self.reader.card.insert(card)
        return CardSession(self.reader.card, self.psam_session, self.aid)

    async def purchase(self, card: VirtualCard, amount_fen: int, *, program: str | None = None,
                       category: str | None = None, pin: str | None = "123456") -> TxnOutcome:
        """Insert ``card``, charge it, take it out."""
        program = program or self.spec.program
        category = category or PROGRAM_CATEGORIES[program][0]
        session = self.session(card)
        try:
            return await self.agent.purchase(session, program, amount_fen, service_category=category, pin=pin)
        finally:
            session.close()
            self.reader.card.remove()


def today_local() -> date:
    return datetime.now(LOCAL_TZ).date()


async def issue_and_fund_cards_from(engine: AsyncEngine, cards: list[VirtualCard], *,
                                    fund_fen: dict[str, int] | None = None) -> int:
    """Register and fund the cards of a deck that clearing does not know yet; returns how many were new."""
    import sqlalchemy as sa

    from clearing.lifecycle import register_cards
    from clearing.recharge import import_recharge
    from clearing.schema import cards as cards_table
    from protocol.files.recharge import RechargeLine, write_recharge

    specs = [card_spec(c) for c in cards]
    async with engine.connect() as conn:
        known = set((await conn.execute(sa.select(cards_table.c.card_no).where(
            cards_table.c.card_no.in_([s["card_no"] for s in specs])))).scalars())
    new = [s for s in specs if s["card_no"] not in known]
    if not new:
        return 0
    await register_cards(engine, new)
    today = today_local()
    amounts = fund_fen or DEFAULT_FUND_FEN
    batch_id = f"DECK{today:%Y%m%d}-{new[0]['card_no'][-8:]}"
    lines = [RechargeLine(batch_id, s["card_no"], s["id_no"], p, amounts[p], f"{today:%Y%m}",
                          today + timedelta(days=400) if p == "voucher" else None)
             for s in new for p in s["programs"]]
    with tempfile.TemporaryDirectory() as tmp:
        await import_recharge(engine, write_recharge(Path(tmp) / f"recharge-{batch_id}.csv", lines))
    return len(new)


class FaultyLink(HostLink):
    """A host link that loses a share of the host's answers on the way (fault injection for ``sim traffic``)."""

    def __init__(self, *args: Any, lost_answers: float = 0.0, seed: int = 1, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.lost_answers = lost_answers
        self.lost = 0
        self._rng = random.Random(seed)

    def _dispatch(self, payload: object) -> None:
        if self.lost_answers and self._rng.random() < self.lost_answers:
            self.lost += 1
            return
        super()._dispatch(payload)


async def ensure_fleet(engine: AsyncEngine, *, terminals: int, cards: int, seed: int,
                       deck_path: Path) -> FleetWorld:
    """The fleet for ``seed``: registered on first use; later runs reload the card deck (card counters
    carry on) and the terminals registered before."""
    import sqlalchemy as sa

    from clearing.schema import terminals as terminals_table
    from simulator.cardfile import CardDeck, load_deck

    ks = IssuerKeySet.demo()
    async with engine.connect() as conn:
        rows = (await conn.execute(sa.select(terminals_table).where(terminals_table.c.terminal_id.like("S%"))
                                   .order_by(terminals_table.c.terminal_id))).mappings().all()
    if not rows:
        world = await setup_fleet(engine, terminals=terminals, cards=cards, seed=seed, key_set=ks)
        CardDeck(cards=world.cards, path=deck_path).save()
        return world
    world = FleetWorld(ks)
    for r in rows[:terminals]:
        program = "voucher" if r["provider_id"][7] == "V" else "nursing"
        world.terminals.append(TerminalSpec(r["terminal_id"], r["provider_id"], program,
                                            f"{program} provider {r['provider_id'][-3:]}"))
    if deck_path.exists():
        world.cards = load_deck(deck_path).cards[:cards]
    else:
        from simulator.personalise import issue_cards

        world.cards = issue_cards(cards, aid=bytes.fromhex(DEFAULT_AID_HEX), key_set=ks, seed=seed,
                                  first_index=fleet_first_card_index(seed), today=today_local())
        CardDeck(cards=world.cards, path=deck_path).save()
    await issue_and_fund_cards_from(engine, world.cards)
    return world


async def run_traffic(engine: AsyncEngine, url: str, *, terminals: int, cards: int, txns: int, seed: int,
                      rate: float = 0.0, lost_answers: float = 0.0, card_failures: float = 0.0,
                      workdir: Path, progress: bool = False) -> dict[str, Any]:
    """Drive ``txns`` purchases from a simulated fleet; returns a summary (outcomes, latency, faults)."""
    import asyncio
    import time

    workdir.mkdir(parents=True, exist_ok=True)
    deck_path = workdir / f"deck-seed{seed}.json"
    world = await ensure_fleet(engine, terminals=terminals, cards=cards, seed=seed, deck_path=deck_path)
    rng = random.Random(seed)
    link = FaultyLink(url, [t.terminal_id for t in world.terminals], lost_answers=lost_answers, seed=seed,
                      name="sim")
    await link.start()
    settings = AgentSettings(answer_timeout_s=3.0, reversal_retry_s=1.0, card_in_thread=False)
    fleet = [SimTerminal(spec, world.key_set, link, Journal(workdir / f"journal-{spec.terminal_id}.db", durable=False),
                         settings) for spec in world.terminals]
    # cards are dealt to terminals so no card sits in two readers at once
    nursing = [c for c in world.cards if "nursing" in card_programs(c)]
    voucher_only = [c for c in world.cards if c not in nursing]
    pools: dict[str, list[list[VirtualCard]]] = {"voucher": [], "nursing": []}
    by_program = {"voucher": [t for t in fleet if t.spec.program == "voucher"],
                  "nursing": [t for t in fleet if t.spec.program == "nursing"]}
    for program, deck in (("voucher", voucher_only), ("nursing", nursing)):
        n = max(1, len(by_program[program]))
        pools[program] = [deck[i::n] for i in range(n)]
    counts: dict[str, int] = {}
    latencies: list[float] = []
    per_term = [txns // len(fleet) + (1 if i < txns % len(fleet) else 0) for i in range(len(fleet))]
    interval = len(fleet) / rate if rate else 0.0

    async def drive(idx: int, term: SimTerminal) -> None:
        program = term.spec.program
        group = by_program[program].index(term)
        mine = pools[program][group] if pools[program] else []
        if not mine:
            counts["skipped_no_card"] = counts.get("skipped_no_card", 0) + per_term[idx]
            return
        await term.agent.start()
        for k in range(per_term[idx]):
            card = mine[rng.randrange(len(mine))]
            amount = rng.choice((500, 1_000, 1_500, 2_000, 3_000, 4_500))
            if card_failures and rng.random() < card_failures:
                card.arm_tear(cf.INS_EXTERNAL_AUTH)
            t0 = time.perf_counter()
            out = await term.purchase(card, amount)
            latencies.append(time.perf_counter() - t0)
            key = "offline" if out.offline else out.state
            counts[key] = counts.get(key, 0) + 1
            if progress and sum(counts.values()) % 100 == 0:
                print(f"  {sum(counts.values())}/{txns} purchases", flush=True)
            if interval:
                await asyncio.sleep(max(0.0, interval - (time.perf_counter() - t0)) if k else rng.random() * interval)

    started = time.perf_counter()
    try:
        await asyncio.gather(*(drive(i, t) for i, t in enumerate(fleet)))
        for _ in range(20):  # let the queues drain: reversals and advices retried until acknowledged
            for t in fleet:
                await t.agent.flush()
            if all(t.agent.journal.backlog() == 0 for t in fleet):
                break
            await asyncio.sleep(0.5)
        elapsed = time.perf_counter() - started
        backlog = sum(t.agent.journal.backlog() for t in fleet)
        reversed_ = sum(len(t.agent.journal.rows(state="reversed")) for t in fleet)
    finally:
        for t in fleet:
            await t.agent.stop()
            t.agent.journal.close()
        await link.stop()
        from simulator.cardfile import CardDeck

        CardDeck(cards=world.cards, path=deck_path).save()  # card counters carry on in the next run
    lat = sorted(latencies)

    def pct(q: float) -> float:
        return round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 1) if lat else 0.0

    done = sum(v for k, v in counts.items() if k != "skipped_no_card")
    return {"terminals": len(fleet), "cards": len(world.cards), "purchases": done,
            "outcomes": counts, "reversed": reversed_, "answers_lost": link.lost, "backlog_left": backlog,
            "elapsed_s": round(elapsed, 2), "purchases_per_s": round(done / elapsed, 1),
            "p50_ms": pct(0.5), "p99_ms": pct(0.99), "seed": seed}
