"""End-to-end authorisation benchmark: simulated terminals → mosquitto → clearing workers → ledger → back.

One run, one broker (mosquitto started with the project's own configuration on a free
port), one load generator (this process: many terminals multiplexed over a few MQTT
connections, one asyncio loop), two systems under test:

1. **echo** — the baseline: a bare aiomqtt responder process on the shared subscription
   that publishes every request straight back on the terminal's down topic (QoS 1,
   TCP_NODELAY). Same messages, same generator, same broker.
2. **auth** — ``carepay clearing serve`` worker processes: MAC check, de-duplication,
   card cryptogram verification, group-committed double-entry posting, signed answer.

For each: a closed-loop run (a fixed number of requests in flight: the sustained
rate) and an open-loop run at a fixed offered rate (default 1,000/s: p50/p99 latency
measured from the scheduled send time, so queueing counts). Each simulated terminal
sends one request at a time, in order (as a real POS does).

The fleet is large enough (default 800 terminals, quick 400) that a closed loop measures what the
system under test sustains, not how long one round trip takes: the table's ``sut cores`` column shows
the CPU the system under test used during each run. With a small fleet a group-committing system tends
to run in convoys — most terminals' requests land in one batch, its answers go out together, and each
stage (generator, broker, worker, ledger) works through the convoy while the next waits — so the closed
loop is bound by the round trip rather than by the slowest stage. Measured here (quick runs, same
machine): the echo is saturated at any fleet size (6,400–7,000/s at 100 to 800 terminals, its responder
at 1 core); the clearing worker reaches 4,200/s at 100 terminals (0.91 core busy) and 4,900/s at 400
(0.93 core: the in-process worker's interpreter lock; ``--ledger-process`` 5,600/s, 1.2 cores).
``--terminals 100`` reproduces the small-fleet figure.

The generator: :class:`LoadGenerator` — one process, a few MQTT connections
(:class:`protocol.transport.LeanMqttConnection`), every terminal multiplexed, requests
serialised and MAC'd before the clock starts, an answer's arrival publishing that terminal's
next request from the receive callback (no task or future per request); in the timed window
answers are only JSON-decoded (response code), the full parse and the answer MAC check of
every approval run after the clock stops (a failure there counts as failed).

Card proofs: every purchase carries a real card cryptogram made by a simulated card and
PSAM over the in-process channel — made before the clock starts (the card side's cost is
measured and reported separately as ``card_sessions_per_s``), so the figures are the host
path's.

    .venv/bin/python bench/e2e_auth.py            # ~1.5 minutes
    .venv/bin/python bench/e2e_auth.py --quick    # ~35 s

Prints a table; the last line is one JSON object with at least ``auth_per_s``, ``p50_ms``,
``p99_ms`` and ``echo_per_s``. Targets: auth ≥ 0.6 × echo; p99 ≤ 50 ms at 1,000/s offered.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


from ops.cli_serve import stop_processes  # noqa: E402
from ops.mosquitto_proc import MosquittoProcess  # noqa: E402
from protocol.messages import SHARED_UP_TOPIC, Message, MessageError, down_topic, parse_message, up_topic  # noqa: E402
from protocol.transport import LeanMqttConnection, LeanMqttError, client_id, make_client, publish_nowait  # noqa: E402
from terminal_agent.host_client import HostLink, HostTimeout  # noqa: E402

REQUEST_TIMEOUT_S = 10.0
TARGET_ECHO_RATIO = 0.6
TARGET_P99_MS = 50.0
SIGN_ON_CONCURRENCY = 16
SIGN_ON_ATTEMPTS = 3
DEFAULT_WORKERS = 1
"""On 2 cores one worker beats two: two SQLite writers in two processes queue on the file's write lock
(p99 300 ms at 500/s offered with 2, 33 ms with 1), and the generator and broker need the other core."""
PREPARED_PER_S_CLOSED = 6_000
"""Purchases prepared per second of the closed-loop auth runs, warm-up included (a run that drains them stops
early, flagged ``dry``)."""
FLEET_TERMINALS = 800
FLEET_TERMINALS_QUICK = 400
OPEN_LOOP_GRACE_FACTOR = 2.0
"""An open-loop run stops sending after this many times its duration; what is left counts as missed."""


# --- the echo responder (a separate process, like the clearing workers) -----------------------------


async def echo_responder(url: str, name: str) -> None:
    """Publish every up message back on its terminal's down topic; never await a PUBACK in the loop."""

    async with make_client(url, identifier=client_id("echo", name)) as client:
        await client.subscribe(SHARED_UP_TOPIC, qos=1)
        print("ready", flush=True)
        async for message in client.messages:
            publish_nowait(client, str(message.topic).removesuffix("/up") + "/down", message.payload)  # type: ignore[arg-type]


# --- the load generator -----------------------------------------------------------------------------

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_s(pid: int, children: bool = True, thread: int | None = None) -> float | None:
    """User + system CPU seconds of process ``pid`` (all its threads, or only ``thread``) and, with ``children``,
    of its live child processes (``clearing serve --workers N``); None where ``/proc`` is not available."""
    def one(p: int) -> float | None:
        try:
            with open(f"/proc/{p}/task/{thread}/stat" if thread else f"/proc/{p}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / _CLK_TCK

    total = one(pid)
    if total is None or not children:
        return total
    try:
        with open(f"/proc/{pid}/task/{pid}/children", "rb") as f:
            kids = [int(k) for k in f.read().split()]
    except OSError:
        kids = []
    return total + sum(c for k in kids if (c := one(k)) is not None)


class CpuMeter:
    """CPU seconds of this process and of some others between ``start()`` and ``stop()``."""

    def __init__(self, pids: dict[str, list[int]]) -> None:
        self._pids = pids
        self._t0: dict[str, float | None] = {}

    def _now(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {"gen": time.process_time()}
        for who, pids in self._pids.items():
            vals = [process_cpu_s(p) for p in pids]
            out[who] = None if not vals or any(v is None for v in vals) else sum(v for v in vals if v is not None)
            if pids:  # the first process's main thread alone (its event loop; the rest is its helper threads)
                out[f"{who}_main"] = process_cpu_s(pids[0], children=False, thread=pids[0])
        return out

    def start(self) -> None:
        self._t0 = self._now()

    def stop(self) -> dict[str, float]:
        t1 = self._now()
        return {k: round(v - v0, 3) for k, v in t1.items() if v is not None and (v0 := self._t0.get(k)) is not None}


@dataclass
class Result:
    name: str
    mode: str
    sent: int = 0
    ok: int = 0
    failed: int = 0
    elapsed_s: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    offered_per_s: float | None = None
    dry: bool = False
    missed: int = 0
    cpu_s: dict[str, float] = field(default_factory=dict)
    """CPU seconds used during the run by ``gen`` (this process), ``sut`` (responders / clearing workers) and
    ``broker`` (mosquitto): informative, for comparing variants on a machine whose wall clock is noisy."""

    def cpu_us_per_ok(self, who: str) -> float | None:
        s = self.cpu_s.get(who)
        return round(s / self.ok * 1e6) if s is not None and self.ok else None

    @property
    def per_s(self) -> float:
        return self.ok / self.elapsed_s if self.elapsed_s else 0.0

    @property
    def sut_cores(self) -> float | None:
        """Cores the system under test kept busy on average (None where its CPU was not measured)."""
        s = self.cpu_s.get("sut")
        return round(s / self.elapsed_s, 2) if s is not None and self.elapsed_s else None

    def pct(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        s = sorted(self.latencies_ms)
        return s[min(len(s) - 1, int(q * len(s)))]


@dataclass(frozen=True)
class Prepared:
    """One request ready to go: serialised (and MAC'd) before the clock starts, as a terminal has it ready."""

    msg_id: str
    topic: str
    payload: bytes


def prepared(msg: Message) -> Prepared:
    return Prepared(msg.msg_id, up_topic(msg.terminal_id), msg.wire_json())


class _Term:
    """One simulated terminal: at most one request in flight, the rest queued (scheduled send times)."""

    __slots__ = ("busy", "client", "queue", "terminal_id")

    def __init__(self, terminal_id: str) -> None:
        self.terminal_id = terminal_id
        self.client: LeanMqttConnection | None = None
        self.queue: deque[float] = deque()
        self.busy = False


class LoadGenerator:
    """The lean generator: a few MQTT connections (:class:`LeanMqttConnection`, no paho), every terminal
    multiplexed over them, no task or future per request. An answer is matched by ``orig_msg_id`` (an echo by its own ``msg_id``) in the receive loop, which
    records its latency and publishes that terminal's next request at once. Answers are only JSON-decoded in
    the timed window (their response code checked); the full parse and MAC check of every answer happens after
    the clock stops (``verify``), so the generator's CPU goes to sending and receiving."""

    def __init__(self, url: str, terminal_ids: list[str], links: int, make: Callable[[str], Prepared | None],
                 quick_ok: Callable[[dict[str, Any]], bool]) -> None:
        self._url = url
        self._terms = {t: _Term(t) for t in terminal_ids}
        self._links = max(1, min(links, len(terminal_ids)))
        self._make = make
        self._quick_ok = quick_ok
        self._pending: dict[str, tuple[_Term, float]] = {}
        self._conns: list[LeanMqttConnection] = []
        self._result = Result("-", "-")
        self._stop_at = 0.0
        self._give_up_at = float("inf")
        self._closed = False
        self.answers: list[tuple[str, bytes]] = []

    async def __aenter__(self) -> LoadGenerator:
        terms = list(self._terms.values())
        for i in range(self._links):
            group = terms[i :: self._links]
            conn = await LeanMqttConnection.open(self._url, self._on_message, identifier=client_id("gen", str(i)))
            self._conns.append(conn)
            for t in group:
                await conn.subscribe(down_topic(t.terminal_id), 1)
                t.client = conn
        return self

    async def __aexit__(self, *exc: object) -> None:
        for conn in self._conns:
            conn.close()

    def _on_message(self, topic: str, payload: bytes) -> None:
        self._on_answer(payload)

    def _on_answer(self, payload: bytes) -> None:
        try:
            doc = json.loads(payload)
        except ValueError:
            return
        if not isinstance(doc, dict):
            return
        entry = self._pending.pop(doc.get("orig_msg_id") or doc.get("msg_id") or "", None)
        if entry is None:
            return  # late (after its timeout) or a duplicate
        term, scheduled = entry
        now = time.perf_counter()
        r = self._result
        if self._quick_ok(doc):
            r.ok += 1
            r.latencies_ms.append((now - scheduled) * 1000)
            self.answers.append((term.terminal_id, payload))
        else:
            r.failed += 1
        term.busy = False
        self._next(term, now)

    def _send(self, term: _Term, scheduled: float) -> None:
        req = self._make(term.terminal_id)
        r = self._result
        if req is None:
            r.dry = True  # a terminal ran out of prepared purchases: stop everyone
            return
        r.sent += 1
        term.busy = True
        self._pending[req.msg_id] = (term, scheduled)
        try:
            term.client.publish(req.topic, req.payload)  # type: ignore[union-attr]
        except LeanMqttError:
            self._pending.pop(req.msg_id, None)
            term.busy = False
            r.failed += 1

    def _next(self, term: _Term, now: float) -> None:
        r = self._result
        if self._closed:
            if now < self._stop_at and not r.dry:
                self._send(term, now)
            return
        while term.queue and not term.busy:
            scheduled = term.queue.popleft()
            if now > self._give_up_at:  # the system fell this far behind: count the rest as missed
                r.missed += 1
                continue
            self._send(term, scheduled)

    async def _drain(self, deadline: float) -> None:
        """Wait until nothing is queued or in flight; what is still in flight at ``deadline`` failed."""
        while time.perf_counter() < deadline:
            if not self._pending and not any(t.queue for t in self._terms.values()):
                return
            await asyncio.sleep(0.002)
        self._result.failed += len(self._pending)
        self._pending.clear()

    async def closed_loop(self, duration_s: float, name: str, terminals: int | None = None,
                          meter: CpuMeter | None = None) -> Result:
        """Every terminal (or the first ``terminals``) keeps one request in flight for ``duration_s``."""
        self._result = result = Result(name, "closed")
        self._closed = True
        if meter is not None:
            meter.start()
        start = time.perf_counter()
        self._stop_at = start + duration_s
        for term in list(self._terms.values())[:terminals]:
            self._send(term, start)
        await asyncio.sleep(duration_s)
        await self._drain(time.perf_counter() + REQUEST_TIMEOUT_S)
        result.elapsed_s = time.perf_counter() - start
        if meter is not None:
            result.cpu_s = meter.stop()
        return result

    async def open_loop(self, rate_per_s: float, duration_s: float, name: str) -> Result:
        """Arrivals at ``rate_per_s`` spread round-robin over the terminals; latency from the scheduled time."""
        self._result = result = Result(name, "open", offered_per_s=rate_per_s)
        self._closed = False
        terms = list(self._terms.values())
        n = int(rate_per_s * duration_s)
        interval = 1.0 / rate_per_s
        start = time.perf_counter()
        self._give_up_at = start + duration_s * OPEN_LOOP_GRACE_FACTOR
        for i in range(n):
            due = start + i * interval
            now = time.perf_counter()
            if due - now > 0.001:
                await asyncio.sleep(due - now)
                now = time.perf_counter()
            term = terms[i % len(terms)]
            term.queue.append(due)
            if not term.busy:
                self._next(term, now)
        await self._drain(self._give_up_at + REQUEST_TIMEOUT_S)
        result.elapsed_s = time.perf_counter() - start
        self._give_up_at = float("inf")
        return result


async def with_links(url: str, terminal_ids: list[str], links: int,
                     body: Callable[[list[HostLink]], Awaitable[object]]) -> object:
    groups = [terminal_ids[i::links] for i in range(links)]
    hl = [HostLink(url, g, name=f"gen{i}") for i, g in enumerate(groups)]
    for link in hl:
        await link.start()
    try:
        return await body(hl)
    finally:
        for link in hl:
            await link.stop()


# --- the two systems under test -------------------------------------------------------------------


def spawn(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})}, cwd=ROOT)


def wait_ready(proc: subprocess.Popen[str], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"{what} exited before it was ready")
        if "ready" in line:
            import threading

            # keep reading its output so a chatty child never blocks on a full pipe
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # type: ignore[union-attr]
            return
    raise RuntimeError(f"{what} not ready within {timeout_s} s")


WARM_UP_S = 0.5
WARM_UP_TERMINALS: int | None = None
"""Terminals in the warm-up (None: all, so every terminal's keys are loaded before the clock starts)."""


async def run_echo(url: str, terminal_ids: list[str], make: Callable[[str], Prepared | None], *,
                   duration_s: float, closed_s: float, rate: float, links: int,
                   responders: int, broker_pid: int | None = None) -> tuple[Result, Result]:
    procs = [spawn([__file__, "--role", "echo", "--mqtt", url, "--name", f"e{i}"]) for i in range(responders)]
    try:
        for p in procs:
            wait_ready(p, "echo responder")

        def quick_ok(doc: dict[str, Any]) -> bool:
            return doc.get("type") == "purchase"

        async with LoadGenerator(url, terminal_ids, links, make, quick_ok) as gen:
            await gen.closed_loop(WARM_UP_S, "warm-up", WARM_UP_TERMINALS)
            opened = await gen.open_loop(rate, duration_s, "echo")
            meter = CpuMeter({"sut": [p.pid for p in procs], "broker": [broker_pid] if broker_pid else []})
            closed = await gen.closed_loop(closed_s, "echo", meter=meter)
            answers = gen.answers
        bad = sum(1 for _, raw in answers if parse_message(raw).type != "purchase")  # the full parse, off the clock
        closed.failed += bad
        return closed, opened
    finally:
        stop_processes(procs)


# --- table and JSON ---------------------------------------------------------------------------------


def cpu_fields(prefix: str, r: Result) -> dict[str, Any]:
    """CPU µs per completed request of the closed-loop run: generator, system under test, broker."""
    return {**{f"{prefix}_cpu_us_{who}": v for who in ("gen", "sut", "sut_main", "broker")
               if (v := r.cpu_us_per_ok(who)) is not None},
            **({f"{prefix}_sut_cores": cores} if (cores := r.sut_cores) is not None else {})}


def table(rows: list[Result]) -> str:
    head = (f"{'system':<8} {'mode':<7} {'offered/s':>9} {'done/s':>9} {'ok':>7} {'failed':>6} {'missed':>6} "
            f"{'p50 ms':>8} {'p99 ms':>8} {'sut cores':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        offered = f"{r.offered_per_s:.0f}" if r.offered_per_s else "max"
        cores = r.sut_cores
        lines.append(f"{r.name:<8} {r.mode:<7} {offered:>9} {r.per_s:>9.0f} {r.ok:>7} {r.failed:>6} {r.missed:>6} "
                     f"{r.pct(0.50):>8.2f} {r.pct(0.99):>8.2f} {cores if cores is not None else '-':>9}")
    return "\n".join(lines)


def synthetic_purchases(terminal_ids: list[str], per_terminal: int) -> dict[str, deque[Prepared]]:
    """Well-formed purchase messages (no card) for the echo-only mode."""
    from datetime import UTC, datetime

    from protocol.messages import CardProof, Purchase

    out: dict[str, deque[Prepared]] = {}
    now = datetime.now(UTC)
    proof = CardProof(card_no="6217000000000000018", app_serial="0123456789ABCDEF", key_version=1, atc=1, ttn=1,
                      txn_date="20260101", txn_time="120000", tac="00000000")
    for t in terminal_ids:
        out[t] = deque(prepared(Purchase(terminal_id=t, msg_id=f"{t}-{i:08d}", sent_at=now, provider_id="110105000000001",
                                batch_no="000001", trace_no=f"{i % 999999 + 1:06d}", program="voucher",
                                service_category="home_care", amount_fen=100, card=proof, mac="0" * 16))
                       for i in range(per_terminal))
    return out


async def prepare_fleet(db_url: str, n_terms: int, n_cards: int, seed: int) -> Any:
    """Register the fleet (providers, terminals, cards funded by a recharge import) in a fresh database."""
    from clearing.db import init_db, make_engine
    from clearing.terminal_keys import ensure_schema
    from ops.fleet import setup_fleet

    engine = make_engine(db_url)
    try:
        await init_db(engine)
        await ensure_schema(engine)
        return await setup_fleet(engine, terminals=n_terms, cards=n_cards, seed=seed, prefix="B",
                                 fund_fen={"voucher": 10_000_000, "nursing": 10_000_000})
    finally:
        await engine.dispose()


def start_clearing(db_url: str, url: str, workers: int, mqtt_client: str = "lean",
                   ledger_process: bool = False) -> subprocess.Popen[str]:
    env = {**os.environ, "CAREPAY_MQTT_CLIENT": mqtt_client}
    proc = spawn(["-m", "ops.cli", "clearing", "serve", "--db", db_url, "--mqtt", url, "--workers", str(workers)]
                 + (["--ledger-process"] if ledger_process else []), env=env)
    wait_ready(proc, "clearing serve")
    return proc


async def sign_on_all(url: str, world: Any, links: int) -> dict[str, Any]:
    """Every terminal signs on through the clearing workers; returns the agents (with their TAKs)."""
    from terminal_agent.agent import TerminalAgent
    from terminal_agent.host_client import HostClient
    from terminal_agent.journal import Journal

    ids = [t.terminal_id for t in world.terminals]

    async def body(hl: list[HostLink]) -> dict[str, Any]:
        agents = {t.terminal_id: TerminalAgent(t.identity(), HostClient(hl[i % len(hl)], t.terminal_id),
                                               Journal(":memory:", durable=False))
                  for i, t in enumerate(world.terminals)}
        sem = asyncio.Semaphore(SIGN_ON_CONCURRENCY)

        async def one(a: Any) -> None:
            async with sem:
                for attempt in range(SIGN_ON_ATTEMPTS):
                    try:
                        await a.sign_on()
                        return
                    except HostTimeout:
                        if attempt == SIGN_ON_ATTEMPTS - 1:
                            raise

        await asyncio.gather(*(one(a) for a in agents.values()))
        return agents

    return await with_links(url, ids, links, body)  # type: ignore[return-value]


def prepare_purchases(world: Any, agents: dict[str, Any], per_terminal: int) -> tuple[dict[str, deque[Prepared]], float]:
    """Card sessions over the in-process channel (real card + PSAM simulators): one signed purchase each.

    Returns the messages per terminal (in each card's counter order) and the card sessions per second.
    """
    from ops.fleet import SimTerminal, card_programs
    from terminal_agent.host_client import HostLink as _HL

    nursing = [c for c in world.cards if "nursing" in card_programs(c)]
    voucher = [c for c in world.cards if c not in nursing]
    by_prog = {"voucher": [t for t in world.terminals if t.program == "voucher"],
               "nursing": [t for t in world.terminals if t.program == "nursing"]}
    deal: dict[str, list[Any]] = {}
    for program, deck in (("voucher", voucher), ("nursing", nursing)):
        terms = by_prog[program]
        for i, t in enumerate(terms):
            deal[t.terminal_id] = deck[i::len(terms)] if deck else []
    dummy = _HL("mqtt://127.0.0.1:1")  # never started: only the card side is used here
    out: dict[str, deque[Prepared]] = {}
    sessions, started = 0, time.perf_counter()
    for spec in world.terminals:
        cards = deal.get(spec.terminal_id) or []
        q: deque[Prepared] = deque()
        out[spec.terminal_id] = q
        if not cards:
            continue
        sim = SimTerminal(spec, world.key_set, dummy, agents[spec.terminal_id].journal)
        agent = agents[spec.terminal_id]
        for k in range(per_terminal):
            card = cards[k % len(cards)]
            session = sim.session(card)
            session.start()
            txn = session.authorize(100 + k % 50, spec.program)
            sim.reader.card.remove()
            sessions += 1
            msg = agent._purchase_message(txn, f"{k % 999_999 + 1:06d}", "home_care")
            q.append(prepared(msg.model_copy(update={"batch_no": f"{1 + k // 999_999:06d}"}).signed(agent._tak)))
    rate = sessions / (time.perf_counter() - started)
    return out, rate


async def run_auth(url: str, world: Any, agents: dict[str, Any], msgs: dict[str, deque[Prepared]], *,
                   duration_s: float, closed_s: float, rate: float, links: int,
                   sut_pid: int | None = None, broker_pid: int | None = None) -> tuple[Result, Result]:
    ids = [t.terminal_id for t in world.terminals if msgs[t.terminal_id]]

    def make(t: str) -> Prepared | None:
        q = msgs[t]
        return q.popleft() if q else None

    def quick_ok(doc: dict[str, Any]) -> bool:
        return doc.get("type") == "purchase_result" and doc.get("response_code") == "00"

    def verified(terminal_id: str, raw: bytes) -> bool:
        """The terminal's own check of an approval: parses as a purchase result for it, MAC good under its TAK."""
        try:
            answer = parse_message(raw)
        except MessageError:
            return False
        return (answer.type == "purchase_result" and answer.terminal_id == terminal_id
                and answer.mac_ok(agents[terminal_id]._tak))

    async with LoadGenerator(url, ids, links, make, quick_ok) as gen:
        await gen.closed_loop(WARM_UP_S, "warm-up", WARM_UP_TERMINALS)
        gen.answers.clear()
        opened = await gen.open_loop(rate, duration_s, "auth")
        n_open = len(gen.answers)
        meter = CpuMeter({"sut": [sut_pid] if sut_pid else [], "broker": [broker_pid] if broker_pid else []})
        closed = await gen.closed_loop(closed_s, "auth", meter=meter)
        answers = gen.answers
    for i, (terminal_id, raw) in enumerate(answers):  # off the clock: every approval's parse and MAC
        if not verified(terminal_id, raw):
            row = opened if i < n_open else closed
            row.ok -= 1
            row.failed += 1
    return closed, opened


async def run_bench(args: argparse.Namespace) -> int:
    duration_s = 3.0 if args.quick else 10.0
    closed_s = 2.0 if args.quick else 5.0
    n_terms = args.terminals or (FLEET_TERMINALS_QUICK if args.quick else FLEET_TERMINALS)
    n_cards = 4 * n_terms
    rows: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="carepay-bench-") as tmp, MosquittoProcess(Path(tmp)) as broker:
        url = broker.url
        if args.echo_only:
            terminal_ids = [f"B{i:07d}" for i in range(1, n_terms + 1)]
            per_terminal = int((args.rate * duration_s + 4000 * closed_s) / n_terms) + 50
            msgs = synthetic_purchases(terminal_ids, per_terminal)
        else:
            db_url = args.db or f"sqlite+aiosqlite:///{tmp}/bench.db"
            print(f"setting up {n_terms} terminals, {n_cards} cards in {db_url.split('@')[-1]} …", flush=True)
            world = await prepare_fleet(db_url, n_terms, n_cards, seed=7)
            terminal_ids = [t.terminal_id for t in world.terminals]
            clearing = start_clearing(db_url, url, args.workers, args.mqtt_client)
            try:
                agents = await sign_on_all(url, world, args.links)
            finally:
                stop_processes([clearing])  # the echo baseline runs on the same topics: clearing must not see it
            per_terminal = int((args.rate * duration_s + PREPARED_PER_S_CLOSED * (closed_s + WARM_UP_S))
                               / n_terms) + 10
            print(f"card sessions for {per_terminal * n_terms} purchases (in-process card + PSAM) …", flush=True)
            msgs, card_rate = prepare_purchases(world, agents, per_terminal)
        echo_msgs = {t: deque(q) for t, q in msgs.items()}
        # The generator holds the whole prepared fleet (tens of thousands of signed purchases, agents, cards):
        # left to the collector, each full collection during a timed run walks all of it and stalls the
        # generator's loop for tens of milliseconds — latency it would charge to whichever system it measures.
        # Freeze it, as ``clearing serve`` freezes its own start-up objects (clearing.worker.tune_gc).
        gc.collect()
        gc.freeze()

        def make_echo(t: str) -> Prepared | None:
            q = echo_msgs[t]
            if not q:
                return None
            m = q.popleft()
            q.append(m)
            return m

        echo_closed, echo_open = await run_echo(url, [t for t in terminal_ids if echo_msgs[t]], make_echo,
                                                duration_s=duration_s, closed_s=closed_s, rate=args.rate,
                                                links=args.links, responders=args.workers, broker_pid=broker.pid)
        rows += [echo_closed, echo_open]
        summary: dict[str, Any] = {"echo_per_s": round(echo_closed.per_s), "echo_p50_ms": round(echo_open.pct(0.5), 2),
                                   "echo_p99_ms": round(echo_open.pct(0.99), 2),
                                   **cpu_fields("echo", echo_closed)}
        if not args.echo_only:
            clearing = start_clearing(db_url, url, args.workers, args.mqtt_client, args.ledger_process)
            try:
                auth_closed, auth_open = await run_auth(url, world, agents, msgs, duration_s=duration_s,
                                                        closed_s=closed_s, rate=args.rate, links=args.links,
                                                        sut_pid=clearing.pid, broker_pid=broker.pid)
            finally:
                stop_processes([clearing])
            rows += [auth_closed, auth_open]
            from clearing.db import make_engine
            from clearing.invariants import check_invariants

            engine = make_engine(db_url)
            problems = await check_invariants(engine)
            await engine.dispose()
            ratio = auth_closed.per_s / echo_closed.per_s if echo_closed.per_s else 0.0
            summary = {"auth_per_s": round(auth_closed.per_s), "p50_ms": round(auth_open.pct(0.5), 2),
                       "p99_ms": round(auth_open.pct(0.99), 2), "offered_per_s": args.rate,
                       "auth_open_done_per_s": round(auth_open.per_s), "auth_failed": auth_closed.failed
                       + auth_open.failed, "auth_open_missed": auth_open.missed, **summary, "auth_vs_echo": round(ratio, 3),
                       "card_sessions_per_s": round(card_rate), "workers": args.workers, "terminals": n_terms,
                       "ledger_process": args.ledger_process,
                       "db": "postgresql" if db_url.startswith("postgresql") else "sqlite",
                       "invariants_ok": problems == [], **cpu_fields("auth", auth_closed),
                       "auth_dry": auth_closed.dry,
                       "targets_met": ratio >= TARGET_ECHO_RATIO and auth_open.pct(0.99) <= TARGET_P99_MS
                       and not auth_closed.dry}
        print(table(rows))
        for r in rows:
            if r.dry:
                print(f"note: {r.name} {r.mode} ran out of prepared purchases and stopped early: its rate is "
                      f"understated (prepare more: PREPARED_PER_S_CLOSED)")
        print(json.dumps(summary))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short runs (~20 s in all)")
    ap.add_argument("--role", default="bench", choices=("bench", "echo"), help=argparse.SUPPRESS)
    ap.add_argument("--mqtt", default="", help=argparse.SUPPRESS)
    ap.add_argument("--name", default="e0", help=argparse.SUPPRESS)
    ap.add_argument("--rate", type=float, default=1000.0, help="offered rate of the open-loop runs (per second)")
    ap.add_argument("--terminals", type=int, default=0,
                    help=f"simulated terminals (default {FLEET_TERMINALS}; quick {FLEET_TERMINALS_QUICK})")
    ap.add_argument("--workers", type=int, default=DEFAULT_WORKERS,
                    help="clearing worker processes (and echo responders); default 1 on this 2-core machine")
    ap.add_argument("--links", type=int, default=4, help="MQTT connections the generator multiplexes over")
    ap.add_argument("--db", default="", help="database URL (default: an SQLite file in a temp dir)")
    ap.add_argument("--mqtt-client", default="lean", choices=("aiomqtt", "lean"),
                    help="the clearing workers' MQTT client (default lean = protocol.transport's; or aiomqtt)")
    ap.add_argument("--echo-only", action="store_true", help="only the echo baseline")
    ap.add_argument("--ledger-process", action="store_true",
                    help="clearing serve --ledger-process: each worker's ledger in a process of its own")
    args = ap.parse_args()
    if args.role == "echo":
        asyncio.run(echo_responder(args.mqtt, args.name))
        return 0
    return asyncio.run(run_bench(args))


if __name__ == "__main__":
    sys.exit(main())
