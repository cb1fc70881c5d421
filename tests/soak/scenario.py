"""The seeded fault soak (故障浸泡测试): terminals, a real broker and clearing worker processes, under faults.

One seed fixes everything: which cards each terminal charges, the amounts, the voids and refunds, and
every fault — so a failing seed replays. The run is a list of phases; each phase injects one kind of
fault while traffic flows, then waits until every terminal's queues are empty and checks:

- ``check_invariants`` is empty (Σ debits = Σ credits, no negative beneficiary balance, balances equal
  their transfers, a terminal message posts at most once);
- no message posted twice (no two money transfers for one terminal/batch/trace/type);
- no approved transaction missing, and every terminal journal reconciles with the host, row by row and
  in money.

Faults:

- ``duplicates``: a chaos client on the plain up topic republishes a share of every terminal's messages,
  at once (duplicate delivery) or after a delay (reordered behind later messages);
- ``lost_answers``: the terminals' link drops a share of the host's answers (the host posted, the
  terminal never heard): reversals, retried until acknowledged;
- ``broker_restart``: mosquitto is stopped and started mid-phase (requests in flight are lost; small
  purchases go offline and are uploaded as advices);
- ``worker_kill``: ``kill -9`` of a clearing worker process mid-phase, restarted a little later;
- ``torn_cards``: cards lose power after a chosen command (cryptogram, external authentication,
  log append); the customer tries again at once and the terminal recovers the interrupted transaction;
- ``clock_skew``: the workers' clock is moved to just before the daily cut-off and every terminal's card
  clock is off by up to ``MAX_CARD_CLOCK_SKEW_S``: postings straddle two business dates.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

ROOT = Path(__file__).resolve().parents[2]
PHASES = ("warmup", "duplicates", "lost_answers", "broker_restart", "worker_kill", "torn_cards", "clock_skew")
WORKER_READY_TIMEOUT_S = 30.0
QUIESCE_TIMEOUT_S = 60.0
DUPLICATE_RATE = 0.25
REORDER_MAX_DELAY_S = 1.5
LOST_ANSWER_RATE = 0.25  # high enough that a 24-transaction CI phase always loses some (0.75^24 ≈ 0.1 %)
TORN_RATE = 0.15
MAX_CARD_CLOCK_SKEW_S = 90
CUTOFF_LEAD_S = 2.0
"""In the clock-skew phase the host clock starts this long (plus half the expected phase time) before cut-off."""
VOID_RATE = 0.05
REFUND_RATE = 0.04
AMOUNT_MIN_FEN, AMOUNT_MAX_FEN = 100, 3_000
FUND_FEN = 5_000_000
MONEY_TYPES = ("purchase", "advice", "void", "refund", "reversal")


@dataclass
class SoakConfig:
    seed: int
    workdir: Path
    terminals: int = 6
    cards: int = 36
    txns_per_phase: int = 30
    workers: int = 2
    links: int = 2
    phases: tuple[str, ...] = PHASES
    answer_timeout_s: float = 1.0
    card_mode: str = "full"
    """``full``: every purchase runs the card session over APDUs; ``fast`` (benchmark): the card's
    cryptogram is computed directly with the card's own key and counter, so the terminal side costs
    far less CPU (torn-card purchases always use the full card session)."""
    mid_phase_check_s: float = 0.0
    """When > 0, the ledger invariants are also checked this often while traffic flows."""
    pg_url: str | None = None
    """PostgreSQL instead of the SQLite file: a fresh schema for the run, dropped afterwards."""
    ledger_process: bool = False
    """Each worker runs its clearing service in a child process (``clearing serve --ledger-process``)."""
    verbose: bool = False


@dataclass
class PhaseResult:
    name: str
    txns: int
    seconds: float
    faults: dict[str, int]
    violations: list[str]
    checks: int


@dataclass
class SoakReport:
    seed: int
    phases: list[PhaseResult] = field(default_factory=list)

    @property
    def transactions(self) -> int:
        return sum(p.txns for p in self.phases)

    @property
    def faults(self) -> dict[str, int]:
        total: Counter[str] = Counter()
        for p in self.phases:
            total.update(p.faults)
        return dict(total)

    @property
    def checks(self) -> int:
        return sum(p.checks for p in self.phases)

    @property
    def violations(self) -> list[str]:
        return [f"{p.name}: {v}" for p in self.phases for v in p.violations]

    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "transactions": self.transactions, "faults": self.faults,
                "invariant_checks": self.checks, "violations": len(self.violations),
                "seconds": round(sum(p.seconds for p in self.phases), 2),
                "phases": [{"name": p.name, "txns": p.txns, "seconds": round(p.seconds, 2), "faults": p.faults,
                            "violations": p.violations} for p in self.phases]}


# --- faults on the wire -----------------------------------------------------------------------------------------


def chaos_link_class() -> type:
    from terminal_agent.host_client import HostLink

    class ChaosLink(HostLink):
        """A terminal link that loses a seeded share of the host's answers (the host did answer)."""

        def __init__(self, *a: Any, rng: random.Random, **kw: Any) -> None:
            super().__init__(*a, **kw)
            self.rng = rng
            self.drop_rate = 0.0
            self.dropped = 0

        def _dispatch(self, payload: object) -> None:
            if self.drop_rate and isinstance(payload, bytes | bytearray) and self.rng.random() < self.drop_rate:
                text = bytes(payload)
                if b'"type":"purchase_result"' in text or b'"type":"reversal_result"' in text:
                    self.dropped += 1
                    return
            super()._dispatch(payload)

    return ChaosLink


class Duplicator:
    """Republishes a share of the terminals' up messages: at once (duplicates) or later (reordered)."""

    def __init__(self, url: str, rng: random.Random) -> None:
        self.url = url
        self.rng = rng
        self.rate = 0.0
        self.duplicated = 0
        self.reordered = 0
        self._task: asyncio.Task[None] | None = None
        self._later: set[asyncio.Task[None]] = set()
        self._ready = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run())
        await asyncio.wait_for(self._ready.wait(), 10)

    async def _run(self) -> None:
        import aiomqtt

        from protocol.messages import TOPIC_PREFIX
        from protocol.transport import client_id, make_client

        while True:
            try:
                async with make_client(self.url, identifier=client_id("chaos")) as client:
                    await client.subscribe(f"{TOPIC_PREFIX}/+/up", qos=1)
                    self._ready.set()
                    async for m in client.messages:
                        if self.rate and self.rng.random() < self.rate:
                            payload = bytes(m.payload)  # type: ignore[arg-type]
                            topic = str(m.topic)
                            if self.rng.random() < 0.5:
                                self.duplicated += 1
                                await client.publish(topic, payload, qos=1)
                            else:
                                self.reordered += 1
                                delay = self.rng.uniform(0.05, REORDER_MAX_DELAY_S)
                                t = asyncio.create_task(self._later_publish(topic, payload, delay))
                                self._later.add(t)
                                t.add_done_callback(self._later.discard)
            except aiomqtt.MqttError:
                await asyncio.sleep(0.3)

    async def _later_publish(self, topic: str, payload: bytes, delay: float) -> None:
        from protocol.transport import client_id, make_client

        await asyncio.sleep(delay)
        with contextlib.suppress(Exception):
            async with make_client(self.url, identifier=client_id("late")) as c:
                await c.publish(topic, payload, qos=1)

    async def idle(self) -> None:
        while self._later:
            await asyncio.gather(*list(self._later), return_exceptions=True)

    async def stop(self) -> None:
        await self.idle()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task


# --- clearing worker processes -----------------------------------------------------------------------------------


class WorkerProcs:
    """N clearing worker processes on the shared subscription (``tests/soak/worker_main.py``)."""

    def __init__(self, db_url: str, mqtt_url: str, n: int, logdir: Path, pg_schema: str = "",
                 ledger_process: bool = False) -> None:
        self.db_url, self.mqtt_url, self.n, self.logdir = db_url, mqtt_url, n, logdir
        self.pg_schema = pg_schema
        self.ledger_process = ledger_process
        self.procs: dict[str, subprocess.Popen[str]] = {}
        self.clock_offset_s = 0.0

    def _spawn(self, name: str) -> subprocess.Popen[str]:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        return subprocess.Popen(
            [sys.executable, "-m", "tests.soak.worker_main", "--db", self.db_url, "--mqtt", self.mqtt_url,
             "--name", name, "--clock-offset-s", str(self.clock_offset_s), "--log", str(self.logdir / f"{name}.log"),
             "--pg-schema", self.pg_schema] + (["--ledger-process"] if self.ledger_process else []),
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=(self.logdir / f"{name}.err").open("a"), text=True)

    async def _wait_ready(self, name: str, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), WORKER_READY_TIMEOUT_S)
        if "READY" not in line:
            err = (self.logdir / f"{name}.err").read_text()[-1500:]
            raise RuntimeError(f"worker {name} did not start: {line!r} {err}")

    async def start(self, name: str | None = None) -> None:
        names = [name] if name else [f"w{i + 1}" for i in range(self.n)]
        for nm in names:
            self.procs[nm] = self._spawn(nm)
        await asyncio.gather(*(self._wait_ready(nm, self.procs[nm]) for nm in names))

    def kill9(self, name: str) -> None:
        proc = self.procs.pop(name)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)

    async def stop(self) -> None:
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
        for proc in self.procs.values():
            try:
                await asyncio.to_thread(proc.wait, 15)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs.clear()


# --- the soak ---------------------------------------------------------------------------------------------------


def cutoff_offset_s(lead_s: float) -> float:
    """Seconds to add to the real clock so that it reads ``lead_s`` before the next daily cut-off."""
    from datetime import time as dtime
    from zoneinfo import ZoneInfo

    from ops.config import load_settings

    cs = load_settings().clearing
    tz = ZoneInfo(cs.timezone)
    now = datetime.now(tz)
    cut = datetime.combine(now.date(), cs.cutoff_local_time or dtime(23, 0), tz)
    if cut <= now:
        cut += timedelta(days=1)
    return (cut - now).total_seconds() - lead_s


class Soak:
    def __init__(self, cfg: SoakConfig) -> None:
        self.cfg = cfg
        self.rng = random.Random(cfg.seed)
        self.report = SoakReport(cfg.seed)

    def log(self, text: str) -> None:
        if self.cfg.verbose:
            print(f"[soak seed={self.cfg.seed}] {text}", file=sys.stderr, flush=True)

    async def run(self) -> SoakReport:
        from clearing.db import init_db, make_engine
        from clearing.terminal_keys import ensure_schema
        from ops.fleet import setup_fleet
        from ops.mosquitto_proc import MosquittoProcess

        cfg = self.cfg
        cfg.workdir.mkdir(parents=True, exist_ok=True)
        self.pg_schema = ""
        if cfg.pg_url:
            db_url = cfg.pg_url
            self.pg_schema = f"soak_{cfg.seed}_{os.getpid()}_{int(time.time()) % 100_000}"
            await _pg_schema(cfg.pg_url, f"CREATE SCHEMA {self.pg_schema}")
            engine = make_engine(db_url, pg_schema=self.pg_schema)
        else:
            db_url = f"sqlite+aiosqlite:///{cfg.workdir / 'clearing.db'}"
            engine = make_engine(db_url)
        await init_db(engine)
        await ensure_schema(engine)
        self.world = await setup_fleet(engine, terminals=cfg.terminals, cards=cfg.cards, seed=cfg.seed,
                                       fund_fen={"voucher": FUND_FEN, "nursing": FUND_FEN}, prefix="K")
        self.engine = engine
        self.broker = MosquittoProcess(cfg.workdir / "mosquitto")
        await asyncio.to_thread(self.broker.start)
        self.workers = WorkerProcs(db_url, self.broker.url, cfg.workers, cfg.workdir, self.pg_schema,
                                   cfg.ledger_process)
        self.dup = Duplicator(self.broker.url, random.Random(f"{cfg.seed}|dup"))
        try:
            await self.workers.start()
            await self.dup.start()
            await self._open_terminals()
            for name in cfg.phases:
                self.report.phases.append(await self._phase(name))
        finally:
            await self._close()
        return self.report

    async def _open_terminals(self) -> None:
        from ops.fleet import card_programs
        from terminal_agent.agent import AgentSettings
        from terminal_agent.journal import Journal

        cfg = self.cfg
        link_cls = chaos_link_class()
        ids = [t.terminal_id for t in self.world.terminals]
        self.links = []
        for i in range(cfg.links):
            link = link_cls(self.broker.url, ids[i::cfg.links], rng=random.Random(f"{cfg.seed}|link{i}"),
                            name=f"soak{i}", connect_wait_s=0.3, reconnect_max_s=0.5)
            await link.start()
            self.links.append(link)
        settings = AgentSettings(answer_timeout_s=cfg.answer_timeout_s, reversal_retry_s=0.3,
                                 offline_floor_limit_fen=2_000, offline_max_per_card=2, heartbeat_s=3600,
                                 card_in_thread=False)
        from ops.fleet import SimTerminal

        self.terms = []
        for i, spec in enumerate(self.world.terminals):
            journal = Journal(cfg.workdir / f"journal-{spec.terminal_id}.db", durable=False)
            term = SimTerminal(spec, self.world.key_set, self.links[i % cfg.links], journal, settings)
            await term.agent.start(background=True)
            self.terms.append(term)
        # cards partitioned: a card is only ever in one terminal's reader
        self.cards_of: dict[str, list[Any]] = {t.terminal_id: [] for t in self.terms}
        by_program = {p: [t for t in self.terms if t.spec.program == p] for p in ("voucher", "nursing")}
        n = Counter[str]()
        for card in self.world.cards:
            program = "nursing" if "nursing" in card_programs(card) and by_program["nursing"] else "voucher"
            pool = by_program[program]
            self.cards_of[pool[n[program] % len(pool)].terminal_id].append(card)
            n[program] += 1
        self.card_skew_s = {t.terminal_id: 0.0 for t in self.terms}
        self.host_offset_s = 0.0

    async def _close(self) -> None:
        for t in getattr(self, "terms", []):
            with contextlib.suppress(Exception):
                await t.agent.stop()
        for link in getattr(self, "links", []):
            with contextlib.suppress(Exception):
                await link.stop()
        with contextlib.suppress(Exception):
            await self.dup.stop()
        with contextlib.suppress(Exception):
            await self.workers.stop()
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self.broker.stop)
        for t in getattr(self, "terms", []):
            with contextlib.suppress(Exception):
                t.agent.journal.close()
        with contextlib.suppress(Exception):
            await self.engine.dispose()
        if self.cfg.pg_url and self.pg_schema:
            with contextlib.suppress(Exception):
                await _pg_schema(self.cfg.pg_url, f"DROP SCHEMA {self.pg_schema} CASCADE")

    # --- one phase

    async def _phase(self, name: str) -> PhaseResult:
        cfg = self.cfg
        started = time.perf_counter()
        faults: Counter[str] = Counter()
        before = {"dropped": sum(link.dropped for link in self.links), "dup": self.dup.duplicated,
                  "reord": self.dup.reordered}
        states_before = self._journal_states()
        self.dup.rate = DUPLICATE_RATE if name == "duplicates" else 0.0
        for link in self.links:
            link.drop_rate = LOST_ANSWER_RATE if name == "lost_answers" else 0.0
        if name == "clock_skew":
            expected = self._mean_phase_s() / 2
            self.host_offset_s = cutoff_offset_s(CUTOFF_LEAD_S + expected)
            t0 = time.perf_counter()
            await self.workers.stop()
            self.workers.clock_offset_s = self.host_offset_s
            await self.workers.start()
            self.log(f"workers restarted with the host clock {self.host_offset_s:.0f} s ahead "
                     f"({time.perf_counter() - t0:.1f} s)")
            self.card_skew_s = {t.terminal_id: self.rng.uniform(-MAX_CARD_CLOCK_SKEW_S, MAX_CARD_CLOCK_SKEW_S)
                                for t in self.terms}
            faults["clock_skew_terminals"] = len(self.terms)
        plan = self._plan(name)
        self.log(f"phase {name}: {sum(len(p) for p in plan.values())} purchases")
        traffic = asyncio.gather(*(self._drive(t, plan[t.terminal_id], faults) for t in self.terms))
        mid_violations: list[str] = []
        mid_checks = [0]
        watcher = asyncio.create_task(self._watch(mid_violations, mid_checks)) if cfg.mid_phase_check_s else None
        if name == "broker_restart":
            await self._after_share(0.4)
            await asyncio.to_thread(self.broker.restart, self.rng.uniform(0.2, 1.0))
            faults["broker_restarts"] += 1
        elif name == "worker_kill":
            await self._after_share(0.3)
            victim = self.rng.choice(sorted(self.workers.procs))
            self.workers.kill9(victim)
            faults["workers_killed"] += 1
            await asyncio.sleep(self.rng.uniform(0.3, 1.5))
            await self.workers.start(victim)
        await traffic
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        await self._quiesce()
        faults["answers_lost"] += sum(link.dropped for link in self.links) - before["dropped"]
        faults["duplicated"] += self.dup.duplicated - before["dup"]
        faults["reordered"] += self.dup.reordered - before["reord"]
        states_after = self._journal_states()
        for key in ("reversal acked", "offline_purchase advised", "purchase reversed"):
            faults[key.replace(" ", "_")] += states_after[key] - states_before[key]
        violations, checks = await self._check()
        violations = mid_violations + violations
        checks += mid_checks[0]
        if name == "clock_skew":
            dates = await self._business_dates_since(started)
            if len(dates) < 2:
                self.log(f"clock_skew: postings fell in {len(dates)} business date(s) only")
            faults["business_dates_in_phase"] = len(dates)
        txns = sum(len(p) for p in plan.values())
        self._done = getattr(self, "_done", 0) + txns
        result = PhaseResult(name, txns, time.perf_counter() - started, {k: v for k, v in faults.items() if v},
                             violations, checks)
        self.log(f"phase {name}: {result.seconds:.1f}s faults={result.faults} violations={len(violations)}")
        return result

    async def _watch(self, violations: list[str], count: list[int]) -> None:
        """Ledger invariants checked while traffic flows (they hold at every commit, not only at rest)."""
        from clearing.invariants import check_invariants

        engine = self.engine
        if self.cfg.pg_url:  # one snapshot for all the check's statements while postings flow
            engine = engine.execution_options(isolation_level="REPEATABLE READ")
        while True:
            await asyncio.sleep(self.cfg.mid_phase_check_s)
            problems = await check_invariants(engine)
            count[0] += 1
            if problems:
                # a check's statements may straddle a commit (SQLite reads outside a transaction): a real
                # violation is permanent (nothing is ever edited), so it must still be there a moment later
                await asyncio.sleep(0.5)
                again = await check_invariants(engine)
                count[0] += 1
                if again:
                    violations += [f"invariant (mid-phase): {p}" for p in again]

    def _journal_states(self) -> Counter[str]:
        out: Counter[str] = Counter()
        for t in self.terms:
            for row in t.agent.journal.rows():
                out[f"{row.kind} {row.state}"] += 1
        return out

    def _mean_phase_s(self) -> float:
        done = self.report.phases
        return sum(p.seconds for p in done) / len(done) if done else 5.0

    async def _after_share(self, share: float) -> None:
        """Wait until about ``share`` of the phase's purchases are done."""
        target = self._phase_done + int(self._phase_total * share)
        while self._phase_done < target and self._phase_done < self._phase_total:
            await asyncio.sleep(0.02)

    def _plan(self, name: str) -> dict[str, list[tuple[Any, int, str | None]]]:
        """Per terminal: (card, amount, follow-up) — follow-up ``void`` / ``refund`` / ``tear:INS`` / None."""
        from protocol import card_files as cf

        tear_ins = (cf.INS_CRYPTOGRAM, cf.INS_EXTERNAL_AUTH, cf.INS_APPEND_RECORD)
        plan: dict[str, list[tuple[Any, int, str | None]]] = {t.terminal_id: [] for t in self.terms}
        active = [t for t in self.terms if self.cards_of[t.terminal_id]]
        for k in range(self.cfg.txns_per_phase):
            t = active[k % len(active)]
            card = self.rng.choice(self.cards_of[t.terminal_id])
            amount = self.rng.randint(AMOUNT_MIN_FEN // 10, AMOUNT_MAX_FEN // 10) * 10
            roll = self.rng.random()
            extra: str | None = None
            if name == "torn_cards" and roll < TORN_RATE:
                extra = f"tear:{self.rng.choice(tear_ins)}"
            elif roll < VOID_RATE:
                extra = "void"
            elif roll < VOID_RATE + REFUND_RATE:
                extra = "refund"
            plan[t.terminal_id].append((card, amount, extra))
        self._phase_total = self.cfg.txns_per_phase
        self._phase_done = 0
        return plan

    async def _drive(self, term: Any, items: list[tuple[Any, int, str | None]], faults: Counter[str]) -> None:
        for card, amount, extra in items:
            if extra and extra.startswith("tear:"):
                card.arm_tear(int(extra.split(":", 1)[1]))
                faults["torn_cards"] += 1
                out = await self._purchase(term, card, amount)
                if not out.approved:  # the customer tries again at once: the interrupted one is recovered
                    await self._purchase(term, card, amount)
            else:
                out = await (self._fast_purchase(term, card, amount) if self.cfg.card_mode == "fast"
                             else self._purchase(term, card, amount))
                if out.approved and not out.offline and extra == "void":
                    with contextlib.suppress(Exception):
                        await term.agent.void(out.trace_no)
                elif out.approved and out.rrn and extra == "refund":
                    with contextlib.suppress(Exception):
                        await term.agent.refund(out.rrn, max(10, out.amount_fen // 2))
            self._phase_done += 1

    async def _purchase(self, term: Any, card: Any, amount: int) -> Any:
        from ops.fleet import PROGRAM_CATEGORIES
        from terminal_agent.card_session import CardSession

        skew = timedelta(seconds=self.host_offset_s + self.card_skew_s[term.terminal_id])
        program = term.spec.program
        term.reader.card.insert(card)
        session = CardSession(term.reader.card, term.psam_session, term.aid,
                              clock=lambda: datetime.now(UTC).astimezone() + skew)
        try:
            return await term.agent.purchase(session, program, amount, pin="123456",
                                             service_category=PROGRAM_CATEGORIES[program][0])
        finally:
            with contextlib.suppress(Exception):
                session.close()
            term.reader.card.remove()

    async def _fast_purchase(self, term: Any, card: Any, amount: int) -> Any:
        """The card's part without APDUs: its TAC under its own key over the next counter (benchmark mode)."""
        from zoneinfo import ZoneInfo

        from keys.cryptogram import compute_tac, cryptogram_data
        from ops.fleet import PROGRAM_CATEGORIES, card_number
        from terminal_agent.card_session import CardTransaction

        program = term.spec.program
        now = datetime.now(ZoneInfo("Asia/Shanghai")) + timedelta(
            seconds=self.host_offset_s + self.card_skew_s[term.terminal_id])
        card.atc += 1
        term.psam.ttn += 1
        d, t = f"{now:%Y%m%d}", f"{now:%H%M%S}"
        data = cryptogram_data(amount, program, term.terminal_id, term.psam.ttn, d, t, card.atc)
        tac = compute_tac(card.keys["tac"], data, card.suite)
        txn = CardTransaction(card_number(card), card.app_serial.hex().upper(), card.key_version, card.suite.value,
                              program, amount, card.atc, term.psam.ttn, term.terminal_id, d, t, tac.hex().upper())
        return await term.agent.authorise(txn, service_category=PROGRAM_CATEGORIES[program][0])

    async def _quiesce(self) -> None:
        """Every terminal's reversals, advices and retransmissions answered; late duplicates delivered."""
        deadline = time.monotonic() + QUIESCE_TIMEOUT_S
        await self.dup.idle()
        while True:
            waiting = 0
            for t in self.terms:
                if not t.agent.signed_on:
                    with contextlib.suppress(Exception):
                        await t.agent.sign_on()
                with contextlib.suppress(Exception):
                    await t.agent.flush()
                j = t.agent.journal
                waiting += j.backlog() + len(j.rows(state="pending")) + len(j.rows(state="reversing"))
            if waiting == 0:
                break
            if time.monotonic() > deadline:
                self.log(f"quiesce: {waiting} still waiting after {QUIESCE_TIMEOUT_S} s")
                break
            await asyncio.sleep(0.2)
        await asyncio.sleep(0.3)  # answers to late duplicates drain

    async def _business_dates_since(self, started_perf: float) -> set[Any]:
        from clearing.schema import host_txns

        since = datetime.now(UTC) - timedelta(seconds=time.perf_counter() - started_perf + 1)
        async with self.engine.connect() as conn:
            rows = await conn.execute(sa.select(host_txns.c.business_date).where(host_txns.c.created_at >= since)
                                      .distinct())
            return {r[0] for r in rows}

    async def _check(self) -> tuple[list[str], int]:
        return await check_all(self.engine, [(t.terminal_id, t.agent.journal) for t in self.terms])


async def _pg_schema(url: str, statement: str) -> None:
    from clearing.db import make_engine

    admin = make_engine(url)
    try:
        async with admin.begin() as conn:
            await conn.execute(sa.text(statement))
    finally:
        await admin.dispose()


# --- the checks ---------------------------------------------------------------------------------------------------


async def check_all(engine: AsyncEngine, journals: list[tuple[str, Any]]) -> tuple[list[str], int]:
    """Every check of the soak; returns (violations, number of checks run)."""
    from clearing.invariants import check_invariants

    problems = [f"invariant: {p}" for p in await check_invariants(engine)]
    problems += await posted_twice(engine)
    checks = 2
    for terminal_id, journal in journals:
        problems += await journal_vs_host(engine, journal, terminal_id)
        checks += 1
    return problems, checks


async def posted_twice(engine: AsyncEngine) -> list[str]:
    """A terminal message that moved money more than once (two transfers for one batch/trace/type)."""
    from clearing.schema import host_txns, transfers

    q = (sa.select(transfers.c.terminal_id, transfers.c.batch_no, transfers.c.trace_no, transfers.c.code,
                   sa.func.count())
         .where(transfers.c.code.in_(MONEY_TYPES), transfers.c.terminal_id.is_not(None))
         .group_by(transfers.c.terminal_id, transfers.c.batch_no, transfers.c.trace_no, transfers.c.code)
         .having(sa.func.count() > 1))
    q2 = (sa.select(host_txns.c.terminal_id, host_txns.c.batch_no, host_txns.c.trace_no, sa.func.count())
          .where(host_txns.c.txn_type.in_(("PURCHASE", "ADVICE")), host_txns.c.status == "SUCCESS")
          .group_by(host_txns.c.terminal_id, host_txns.c.batch_no, host_txns.c.trace_no)
          .having(sa.func.count() > 1))
    async with engine.connect() as conn:
        dup = (await conn.execute(q)).all()
        dup2 = (await conn.execute(q2)).all()
    return ([f"posted twice: {r[0]} batch {r[1]} trace {r[2]} {r[3]} ({r[4]} transfers)" for r in dup]
            + [f"charged twice: {r[0]} batch {r[1]} trace {r[2]} ({r[3]} successful rows)" for r in dup2])


KIND_TYPE = {"purchase": "PURCHASE", "void": "VOID", "refund": "REFUND", "offline_purchase": "ADVICE",
             "reversal": "REVERSAL"}
SIGN = {"PURCHASE": 1, "ADVICE": 1, "VOID": -1, "REFUND": -1}


async def journal_vs_host(engine: AsyncEngine, journal: Any, terminal_id: str) -> list[str]:
    """The terminal's journal and the host agree on every row, and on the money."""
    from clearing.schema import host_txns

    async with engine.connect() as conn:
        rows = (await conn.execute(sa.select(host_txns).where(host_txns.c.terminal_id == terminal_id))).mappings().all()
    host = {(r["batch_no"], r["trace_no"], r["txn_type"]): r for r in rows}
    problems: list[str] = []
    seen: set[tuple[str, str, str]] = set()
    term_money = 0
    for j in journal.rows():
        typ = KIND_TYPE[j.kind]
        if j.kind == "purchase" and j.state in ("offline", "advised", "advice_declined"):
            typ = "ADVICE"
        key = (j.batch_no, j.trace_no, typ)
        seen.add(key)
        h = host.get(key)
        status = h["status"] if h is not None else None
        where = f"{terminal_id} {j.kind} batch {j.batch_no} trace {j.trace_no}"
        if j.state in ("approved", "advised"):
            if status != "SUCCESS":
                problems.append(f"{where}: approved on the terminal, host {status or 'has no record'}")
            elif h["amount_fen"] != j.amount_fen:
                problems.append(f"{where}: amount {j.amount_fen} on the terminal, {h['amount_fen']} on the host")
            else:
                term_money += SIGN.get(typ, 0) * j.amount_fen
        elif j.state in ("declined", "reversed", "cancelled", "advice_declined"):
            if status == "SUCCESS":
                problems.append(f"{where}: {j.state} on the terminal, SUCCESS on the host")
        elif j.state == "acked":
            pass
        elif j.state == "offline":
            problems.append(f"{where}: offline advice never uploaded")
        else:
            problems.append(f"{where}: still {j.state} after the phase settled")
    host_money = 0
    for key, h in host.items():
        if h["status"] != "SUCCESS" or key[2] == "REVERSAL":
            continue
        host_money += SIGN.get(key[2], 0) * int(h["amount_fen"])
        if key not in seen:
            problems.append(f"{terminal_id} batch {key[0]} trace {key[1]} {key[2]}: on the host, not on the terminal")
    if host_money != term_money and not problems:
        problems.append(f"{terminal_id}: terminal nets {term_money} fen, host {host_money} fen")
    return problems


async def run_soak(cfg: SoakConfig) -> SoakReport:
    return await Soak(cfg).run()
