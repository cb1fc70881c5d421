"""The demo's terminal fleet (演示终端): simulated readers, PSAMs and cards wired into real terminal agents.

One terminal uses the real serial driver against the virtual reader on a pty; the
others use the in-process reader. Each terminal's host client is wrapped in
:class:`FaultSwitch`, the demo's fault injector: an offline period (the network
is down: requests fail at once, the agent approves small purchases offline) and
a lost answer (the host posts, the answer never arrives: the agent reverses).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ops.logging import get_logger
from ops.metrics import observe_terminal_outcome, refresh_terminal_gauges
from protocol.messages import Message
from terminal_agent.agent import AgentSettings, TerminalAgent, TerminalIdentity, TxnOutcome
from terminal_agent.card_session import CardSession
from terminal_agent.host_client import HostClient, HostLink, HostTimeout, HostUnavailable
from terminal_agent.journal import Journal
from terminal_agent.psam_session import PsamSession

log = get_logger("carepay.demo.fleet")

DEMO_ANSWER_TIMEOUT_S = 10.0
"""As the configured default: on a loaded machine a slow answer must not turn into a reversal."""
SETTLE_WAIT_S = 60.0
"""How long settlement waits for queued reversals and advices to be answered."""
DEMO_PIN = "123456"  # simulator.personalise.DEFAULT_PIN: the simulated cardholders' PIN


class FaultSwitch:
    """A terminal's host client with the demo's faults: ``down`` (offline period), ``drop_next_answer``."""

    def __init__(self, inner: HostClient) -> None:
        self.inner = inner
        self.down = False
        self.drop_next_answer = False
        self.answers_dropped = 0
        self.requests_refused = 0

    @property
    def connected(self) -> bool:
        return self.inner.connected and not self.down

    async def request(self, msg: Message, timeout_s: float) -> Message:
        if self.down:
            self.requests_refused += 1
            raise HostUnavailable("network down (demo offline period)")
        answer = await self.inner.request(msg, timeout_s)
        if self.drop_next_answer and msg.type == "purchase":
            self.drop_next_answer = False
            self.answers_dropped += 1
            raise HostTimeout("the host's answer was lost on the way (demo fault)")
        return answer

    async def send(self, msg: Message) -> None:
        if self.down:
            raise HostUnavailable("network down (demo offline period)")
        await self.inner.send(msg)


@dataclass
class DemoTerminal:
    terminal_id: str
    provider_id: str
    provider_name: str
    program: str
    kind: str  # "serial" | "sim"
    agent: TerminalAgent
    host: FaultSwitch
    link: HostLink
    session: CardSession
    reader: Any
    pty: Any = None
    categories: tuple[str, ...] = ("home_care",)
    outcomes: list[TxnOutcome] = field(default_factory=list)
    receipts: list[str] = field(default_factory=list)

    def insert(self, card: Any) -> None:
        if self.pty is not None:
            self.pty.insert(card)
        else:
            self.reader.card.insert(card)

    def remove(self) -> None:
        if self.pty is not None:
            self.pty.remove()
        else:
            self.reader.card.remove()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.agent.stop()
        with contextlib.suppress(Exception):
            await self.link.stop()
        with contextlib.suppress(Exception):
            self.session.close()
        with contextlib.suppress(Exception):
            self.reader.close()
        if self.pty is not None:
            with contextlib.suppress(Exception):
                self.pty.close()
        with contextlib.suppress(Exception):
            self.agent.journal.close()


async def open_terminal(*, index: int, terminal_id: str, provider_id: str, provider_name: str, program: str,
                        broker_url: str, key_set: Any, tmk: bytes, sm2: Any, aid: bytes, workdir: Path,
                        serial: bool, categories: tuple[str, ...] = ("home_care",)) -> DemoTerminal:
    """A signed-on terminal: its PSAM in the reader, its journal under ``workdir``, its link to the broker."""
    from simulator.channel import SimReader
    from simulator.psam import VirtualPsam

    workdir.mkdir(parents=True, exist_ok=True)
    psam = VirtualPsam(key_set, terminal_id=terminal_id, state_path=workdir / "psam.json")
    pty = None
    if serial:
        from simulator.reader_pty import PtyReader
        from terminal_agent.serial_driver import SerialReader

        pty = PtyReader(psam).start()
        reader: Any = SerialReader(pty.path).open()
    else:
        reader = SimReader(None, psam)
    psam_session = PsamSession(reader.psam)
    await asyncio.to_thread(psam_session.open)
    session = CardSession(reader.card, psam_session, aid)
    link = HostLink(broker_url, [terminal_id], name=f"t{index}")
    await link.start()
    host = FaultSwitch(HostClient(link, terminal_id))
    journal = Journal(workdir / "journal.db")
    identity = TerminalIdentity(terminal_id, provider_id, tmk=tmk, sm2=sm2, provider_name=provider_name)
    settings = AgentSettings(answer_timeout_s=DEMO_ANSWER_TIMEOUT_S, reversal_retry_s=1.0, card_in_thread=serial)
    agent = TerminalAgent(identity, host, journal, settings)  # type: ignore[arg-type]
    await agent.start()
    return DemoTerminal(terminal_id, provider_id, provider_name, program, "serial" if serial else "sim", agent, host,
                        link, session, reader, pty, categories)


# --- the day's script ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Action:
    """One step of a terminal's day: ``purchase`` (card index, amount), ``void_last``, ``refund_some``,
    ``report_lost`` (card index, then a purchase with it), ``offline_on``/``offline_off``, ``drop_answer``."""

    kind: str
    card: int = -1
    amount_fen: int = 0


VOID_RATE = 0.05
REFUND_RATE = 0.04
OFFLINE_PURCHASES = 3
NURSING_SHARE = 0.3


def plan_day(rng: random.Random, terminals: list[dict[str, Any]], specs: list[dict[str, Any]], txns: int,
             floor_limit_fen: int) -> tuple[dict[str, list[Action]], dict[str, Any]]:
    """Each terminal's list of actions for the day, and the special events chosen (seeded)."""
    voucher_cards = list(range(len(specs)))
    nursing_cards = [i for i, s in enumerate(specs) if "nursing" in s["programs"]]
    lost_card = rng.choice([i for i in voucher_cards if i not in nursing_cards] or voucher_cards)
    usable_voucher = [i for i in voucher_cards if i != lost_card]
    scripts: dict[str, list[Action]] = {t["terminal_id"]: [] for t in terminals}
    by_program = {p: [t for t in terminals if t["program"] == p] for p in ("voucher", "nursing")}
    nursing_share = min(NURSING_SHARE, len(nursing_cards) / max(1, len(specs))) if by_program["nursing"] else 0.0
    # each card belongs to one terminal per program, so the day's outcome does not depend on how the
    # terminals interleave (the same seed gives the same day)
    home: dict[tuple[str, str], list[int]] = {}
    for program, pool in (("voucher", usable_voucher), ("nursing", [i for i in nursing_cards if i != lost_card])):
        terms = by_program[program]
        for n, card in enumerate(pool):
            if terms:
                home.setdefault((program, terms[n % len(terms)]["terminal_id"]), []).append(card)
    turn = {"voucher": 0, "nursing": 0}
    for _ in range(txns):
        program = "nursing" if nursing_cards and rng.random() < nursing_share else "voucher"
        t = by_program[program][turn[program] % len(by_program[program])]
        turn[program] += 1
        script = scripts[t["terminal_id"]]
        own = home.get((program, t["terminal_id"])) or (nursing_cards if program == "nursing" else usable_voucher)
        card = rng.choice(own)
        if program == "nursing":
            amount = rng.choice((rng.randint(20, 150) * 100, rng.randint(20, 150) * 100, 25_000))
        else:
            amount = rng.randint(5, 30) * 100 + rng.choice((0, 50))
        script.append(Action("purchase", card, amount))
        roll = rng.random()
        if roll < VOID_RATE:
            script.append(Action("void_last"))
        elif roll < VOID_RATE + REFUND_RATE:
            script.append(Action("refund_some"))
    voucher_terms = [t for t in terminals if t["program"] == "voucher"]
    sim_voucher = [t for i, t in enumerate(terminals) if i > 0 and t["program"] == "voucher"] or voucher_terms
    offline_t = sim_voucher[-1]["terminal_id"]
    drop_t = voucher_terms[0]["terminal_id"]
    lost_t = voucher_terms[min(1, len(voucher_terms) - 1)]["terminal_id"]

    base_len = {tid: len(script) for tid, script in scripts.items()}
    specials: list[tuple[str, float, list[Action]]] = []
    def own(tid: str) -> list[int]:
        return home.get(("voucher", tid)) or usable_voucher

    offline = [Action("offline_on")]
    for _ in range(OFFLINE_PURCHASES):
        offline.append(Action("purchase", rng.choice(own(offline_t)), rng.randint(5, floor_limit_fen // 100) * 100))
    offline.append(Action("purchase", rng.choice(own(offline_t)), floor_limit_fen + 1_000))  # above the floor
    offline.append(Action("offline_off"))
    specials.append((offline_t, 0.6, offline))
    specials.append((drop_t, 0.45, [Action("drop_answer"), Action("purchase", rng.choice(own(drop_t)), 1_800)]))
    specials.append((lost_t, 0.3, [Action("report_lost", lost_card), Action("purchase", lost_card, 1_200)]))
    # later positions first, so each event lands where it was planned and none falls inside another
    for tid, at, actions in sorted(specials, key=lambda e: -e[1]):
        pos = int(base_len[tid] * at)
        scripts[tid][pos:pos] = actions
    events = {"lost_card": lost_card, "offline_terminal": offline_t, "lost_answer_terminal": drop_t,
              "lost_card_terminal": lost_t}
    return scripts, events


class DayRunner:
    """Runs every terminal's script concurrently; a card is in one reader at a time."""

    def __init__(self, terminals: list[DemoTerminal], cards: list[Any], engine: Any, rng: random.Random,
                 progress: Any = None) -> None:
        self.terminals = {t.terminal_id: t for t in terminals}
        self.cards = cards
        self.engine = engine
        self.rng = rng
        self.locks = [asyncio.Lock() for _ in cards]
        self.progress = progress or (lambda _m: None)
        self.done = 0
        self.total = 0
        self.events: list[str] = []

    async def run(self, scripts: dict[str, list[Action]]) -> None:
        self.total = sum(1 for s in scripts.values() for a in s if a.kind == "purchase")
        await asyncio.gather(*(self._run_one(self.terminals[tid], script) for tid, script in scripts.items()))
        for t in self.terminals.values():  # reversals and advices still queued go out now
            await drain(t)

    async def _run_one(self, t: DemoTerminal, script: list[Action]) -> None:
        # per-terminal seeded choices, independent of how the terminals interleave
        rng = random.Random(f"{self.rng.random()}|{t.terminal_id}")
        for action in script:
            if action.kind == "purchase":
                await self._purchase(t, action.card, action.amount_fen)
            elif action.kind == "void_last":
                approved = [o for o in t.outcomes if o.kind == "purchase" and o.approved and not o.offline]
                if approved:
                    t.outcomes.append(await t.agent.void(approved[-1].trace_no))
            elif action.kind == "refund_some":
                approved = [o for o in t.outcomes if o.kind == "purchase" and o.approved and o.rrn]
                if approved:
                    orig = rng.choice(approved)
                    amount = max(100, (orig.amount_fen // 2) // 100 * 100)
                    t.outcomes.append(await t.agent.refund(orig.rrn or "", min(amount, orig.amount_fen)))
            elif action.kind == "report_lost":
                from clearing.lifecycle import report_lost

                card_no = self._card_no(action.card)
                await report_lost(self.engine, card_no)
                log.info("card reported lost", card_no=card_no, by="demo:hotline")
                self.events.append(f"card #{action.card} reported lost (挂失)")
            elif action.kind == "offline_on":
                t.host.down = True
                self.events.append(f"{t.terminal_id} offline")
            elif action.kind == "offline_off":
                t.host.down = False
                flushed = await t.agent.flush()
                self.events.append(f"{t.terminal_id} back online: {flushed['advices']} offline advices uploaded")
            elif action.kind == "drop_answer":
                t.host.drop_next_answer = True

    def _card_no(self, index: int) -> str:
        from protocol import card_files as cf

        return str(cf.CARDHOLDER.parse(self.cards[index].cardholder_ef).card_no)

    async def _purchase(self, t: DemoTerminal, card_index: int, amount_fen: int) -> None:
        card = self.cards[card_index]
        started = time.perf_counter()
        async with self.locks[card_index]:
            t.insert(card)
            try:
                category = t.categories[(card_index + amount_fen) % len(t.categories)]
                outcome = await t.agent.purchase(t.session, t.program, amount_fen, pin=DEMO_PIN,
                                                 service_category=category)
            finally:
                with contextlib.suppress(Exception):
                    t.session.close()
                t.remove()
        t.outcomes.append(outcome)
        observe_terminal_outcome(outcome.kind, outcome.state, time.perf_counter() - started)
        refresh_terminal_gauges(t.agent.journal, t.host.connected)
        log.info("terminal transaction", terminal_id=t.terminal_id, kind=outcome.kind, state=outcome.state,
                 card_no=outcome.card_no, program=outcome.program, amount_fen=outcome.amount_fen,
                 response_code=outcome.response_code, rrn=outcome.rrn, message=outcome.message)
        if outcome.approved:
            t.receipts.append(t.agent.receipt(outcome))
        self.done += 1
        if self.done % 10 == 0 or self.done == self.total:
            self.progress(f"{self.done}/{self.total} purchases")


async def drain(t: DemoTerminal, wait_s: float = SETTLE_WAIT_S) -> int:
    """Flush the terminal's queues until nothing waits for the host (or ``wait_s`` passes); returns the backlog."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while True:
        with contextlib.suppress(HostTimeout, HostUnavailable):
            await t.agent.flush()
        backlog = t.agent.journal.backlog()
        if backlog == 0 or loop.time() > deadline:
            return backlog
        await asyncio.sleep(0.2)
