"""A clearing worker (清算工作进程): terminal requests in from MQTT, answers out.

Subscribes to the shared subscription ``$share/clearing/carepay/v1/term/+/up`` so N
worker processes split the load (with the embedded amqtt broker, which has no
``$share``, exactly one worker subscribes to the plain topic). For each message:

1. parse (malformed → counted, dropped: there is nobody to answer with certainty);
2. the topic's terminal id must be the message's (``carepay_refused_messages{reason="topic"}``);
3. ``sign_on`` → :class:`clearing.signon.SignOnService` (MAC under the TMK);
4. MAC under the terminal's TAK (current, or the previous during the rotation grace,
   re-read from the database once on failure): bad → answer ``A0``, count, post nothing;
5. ``sent_at`` outside ``±max_age_s`` → refused (``12``, "stale"); a ``msg_id`` this
   worker already answered → the same answer again, nothing processed (the host's
   own idempotency on ``terminal:msg_id`` and ``terminal:batch:trace`` covers other workers);
6. the clearing service's ``handle`` (verify card, de-duplicate, post via group commit);
7. the answer, MAC'd under the TAK that verified the request, published QoS 1.

The receive loop never awaits a PUBACK or a posting: each message is processed in
its own task (bounded by ``MAX_IN_FLIGHT``: when full, the loop waits — back-pressure
to the broker), so group commit sees many requests at once and answers leave as
soon as they are ready.

Per-message cost (the worker is CPU-bound): on a real broker the worker speaks MQTT through
:class:`protocol.transport.LeanMqttConnection` (no paho: one socket write per event-loop turn for
all PUBACKs and answers); with the embedded amqtt broker, or ``lean=False``, through aiomqtt. The
request MAC is checked over the message's canonical bytes made once (one model dump, a prebuilt sorted
JSON encoder), the answer is MAC'd and serialised from one model dump (its canonical JSON plus ``mac``),
and the metric children are looked up once per (type, code).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hmac
import logging
import os
import sys
import time
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

import aiomqtt
from sqlalchemy.ext.asyncio import AsyncEngine

from clearing import metrics
from clearing.ledger_link import LedgerProcessClient, LedgerUnavailable
from clearing.signon import SignOnService
from clearing.terminal_keys import KEY_GRACE_S, TerminalKeySource, WorkingKeys, ensure_schema
from protocol.messages import (
    MESSAGE_MAC_BYTES,
    RC,
    RESULT_TYPE,
    SHARED_UP_TOPIC,
    Answered,
    BatchSettle,
    BatchSettleResult,
    BatchTotals,
    BatchUpload,
    BatchUploadResult,
    Heartbeat,
    Message,
    MessageError,
    SignOn,
    TxnResult,
    down_topic,
    mac_hex,
    parse_message,
    without_mac,
)
from protocol.transport import LeanMqttConnection, LeanMqttError, client_id, make_client, publish_nowait

log = logging.getLogger("carepay.clearing.worker")

PLAIN_UP_TOPIC = "carepay/v1/term/+/up"
MAX_IN_FLIGHT = 4_000
"""Requests one worker processes at once; the receive loop waits when they are all busy."""
ANSWER_CACHE_ENTRIES = 50_000
"""Answers remembered per worker by ``terminal:msg_id`` for retransmitted duplicates."""
FUTURE_SKEW_S = 60
RECONNECT_MIN_S = 0.1
RECONNECT_MAX_S = 5.0


class RequestHandler(Protocol):
    """The clearing service: answers a verified request (purchase, void, refund, reversal, advice, batch)."""

    async def handle(self, msg: Message) -> Message | None: ...


@dataclass
class WorkerStats:
    received: int = 0
    answered: int = 0
    mac_failures: int = 0
    refused: int = 0
    errors: int = 0


def _terminal_of(topic: str) -> str | None:
    parts = topic.split("/")
    if len(parts) == 5 and parts[0] == "carepay" and parts[1] == "v1" and parts[2] == "term" and parts[4] == "up":
        return parts[3]
    return None


def signed_payload(answer: Message | Answered, key: bytes) -> bytes:
    """The wire bytes of ``answer`` MAC'd under ``key``: one model dump (:meth:`Message.signed_json`)."""
    return answer.signed_json(key)


def refusal(msg: Message, code: str, text: str) -> Message | None:
    """An answer with ``code`` for any request type (None for types that get no answer)."""
    common = {"terminal_id": msg.terminal_id, "msg_id": os.urandom(16).hex(), "sent_at": datetime.now(UTC),
              "orig_msg_id": msg.msg_id}
    if isinstance(msg, BatchSettle):
        return BatchSettleResult(batch_no=msg.batch_no, response_code=code, balanced=False,
                                 host_totals=BatchTotals(), **common)
    if isinstance(msg, BatchUpload):
        return BatchUploadResult(batch_no=msg.batch_no, response_code=code, **common)
    result_type = RESULT_TYPE.get(msg.type)
    if result_type is None:
        return None
    return TxnResult(type=result_type, batch_no=msg.batch_no, trace_no=msg.trace_no,  # type: ignore[attr-defined]
                     response_code=code, message=text[:200], **common)


_LIVE_WORKERS: weakref.WeakSet[ClearingWorker] = weakref.WeakSet()
metrics.QUEUE_DEPTH.set_function(lambda: sum(w.in_flight for w in list(_LIVE_WORKERS)))
"""``carepay_queue_depth`` is computed when scraped (no gauge update, and its lock, per message)."""

MQTT_CLIENT_ENV = "CAREPAY_MQTT_CLIENT"
"""Worker MQTT client on a real broker: ``lean`` (default, protocol.transport.LeanMqttConnection) or ``aiomqtt``."""


class ClearingWorker:
    """One worker: ``await worker.run()`` until ``stop()``; ``embedded=True`` for the amqtt broker (no $share)."""

    def __init__(self, url: str, service: RequestHandler, working_keys: WorkingKeys, sign_on: SignOnService, *,
                 max_age_s: int = 300, embedded: bool = False, username: str | None = None,
                 password: str | None = None, name: str = "w0",
                 on_connect: Callable[[], Awaitable[None]] | None = None, lean: bool | None = None) -> None:
        self._url = url
        # On a real broker the lean connection by default: measured 2.2x aiomqtt's closed-loop rate on this
        # machine (bench/e2e_auth.py: 1,076 -> 2,369 auth/s). CAREPAY_MQTT_CLIENT=aiomqtt (or lean=False) keeps
        # the maintained client; the embedded amqtt broker always uses aiomqtt.
        if lean is None:
            lean = not embedded and os.environ.get(MQTT_CLIENT_ENV, "lean").lower() != "aiomqtt"
        self._lean = lean
        self._service = service
        self._keys = working_keys
        self._sign_on = sign_on
        self._max_age_s = max_age_s
        self._topic = PLAIN_UP_TOPIC if embedded else SHARED_UP_TOPIC
        self._username = username
        self._password = password
        self._name = name
        self._on_connect = on_connect
        self._answers: OrderedDict[str, tuple[str, str, bytes]] = OrderedDict()  # see Answered
        self._metric_children: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._tasks: set[asyncio.Task[None]] = set()
        self._paused = False
        _LIVE_WORKERS.add(self)
        self._stopping = False
        self._ready = asyncio.Event()
        self._client: aiomqtt.Client | None = None
        self._conn: LeanMqttConnection | None = None
        self.stats = WorkerStats()

    def __repr__(self) -> str:
        return f"ClearingWorker(name={self._name}, topic={self._topic})"

    @property
    def ready(self) -> asyncio.Event:
        """Set while subscribed."""
        return self._ready

    def stop(self) -> None:
        """No reconnect after the current connection ends (cancel the task running :meth:`run` to end it now)."""
        self._stopping = True

    async def run(self) -> None:
        """Connect, subscribe, serve; reconnect with back-off when the broker goes away."""
        backoff = RECONNECT_MIN_S
        while not self._stopping:
            try:
                if self._lean:
                    await self._serve_lean()
                else:
                    await self._serve_aiomqtt()
                backoff = RECONNECT_MIN_S
            except (aiomqtt.MqttError, LeanMqttError, TimeoutError) as exc:
                log.warning("broker connection lost (%s); reconnecting", exc)
            finally:
                self._ready.clear()
                self._client = None
                self._conn = None
                self._paused = False
            if self._stopping:
                break
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RECONNECT_MAX_S)

    async def _serve_aiomqtt(self) -> None:
        async with make_client(self._url, identifier=client_id("clr", self._name),
                               username=self._username, password=self._password) as client:
            self._client = client
            await client.subscribe(self._topic, qos=1)
            self._ready.set()
            if self._on_connect is not None:
                await self._on_connect()

            def publish(topic: str, data: bytes) -> None:
                publish_nowait(client, topic, data)

            async for message in client.messages:
                await self._slots.acquire()
                task = asyncio.create_task(self._process(publish, str(message.topic), message.payload))
                self._tasks.add(task)
                task.add_done_callback(self._done)

    async def _serve_lean(self) -> None:
        """The same loop on :class:`LeanMqttConnection`: messages arrive by callback, reading pauses when
        ``MAX_IN_FLIGHT`` requests are being processed (back-pressure to the broker)."""
        conn = await LeanMqttConnection.open(self._url, self._on_lean_message, identifier=client_id("clr", self._name),
                                             username=self._username, password=self._password)
        self._conn = conn
        try:
            await conn.subscribe(self._topic, qos=1)
            self._ready.set()
            if self._on_connect is not None:
                await self._on_connect()
            await asyncio.shield(conn.closed)
        finally:
            conn.close()
        if not self._stopping:
            raise LeanMqttError("connection to the broker lost")

    def _on_lean_message(self, topic: str, payload: bytes) -> None:
        conn = self._conn
        if conn is None:
            return
        self._tasks.add(asyncio.create_task(self._process_lean(conn, topic, payload)))
        if len(self._tasks) >= MAX_IN_FLIGHT and not self._paused:
            self._paused = True
            conn.pause()

    async def _process_lean(self, conn: LeanMqttConnection, topic: str, payload: bytes) -> None:
        """One message on the lean connection, its bookkeeping at its end (a task done-callback would cost
        one more event-loop callback per message)."""
        try:
            await self._process(conn.publish, topic, payload)
        finally:
            self._tasks.discard(asyncio.current_task())  # type: ignore[arg-type]
            if self._paused and len(self._tasks) < MAX_IN_FLIGHT:
                self._paused = False
                current = self._conn  # the paused one: ``conn`` may have been replaced by a reconnect
                if current is not None:
                    current.resume()

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()

    @property
    def in_flight(self) -> int:
        """Requests received and not yet answered (``carepay_queue_depth``, read when scraped)."""
        return len(self._tasks)

    async def drain(self, timeout_s: float = 10.0) -> None:
        """Wait for the requests in flight to be answered (graceful stop)."""
        if self._tasks:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*list(self._tasks), return_exceptions=True), timeout_s)

    # --- one message ----------------------------------------------------------------------------

    async def _process(self, publish: Callable[[str, bytes], None], topic: str, payload: object) -> None:
        started = time.perf_counter()
        self.stats.received += 1
        try:
            answer, key = await self._answer(topic, payload)
        except Exception:  # never crash the worker on one message
            log.exception("request failed")
            self.stats.errors += 1
            return
        if answer is None:
            return
        try:
            data = signed_payload(answer, key) if key is not None else answer.to_json()  # type: ignore[union-attr]
            publish(down_topic(answer.terminal_id), data)
        except (aiomqtt.MqttError, LeanMqttError) as exc:
            log.warning("answer not published (%s); the terminal will time out and reverse", exc)
            return
        self.stats.answered += 1
        counted, latency = self._answered_metrics(answer.type, getattr(answer, "response_code", ""))
        counted.inc()
        latency.observe(time.perf_counter() - started)

    def _answered_metrics(self, answer_type: str, code: str) -> tuple[Any, Any]:
        """The labelled children for one (type, code), looked up once (a label lookup per message costs a lock)."""
        children = self._metric_children.get((answer_type, code))
        if children is None:
            req_type = answer_type.removesuffix("_result")
            children = (metrics.AUTH_REQUESTS.labels(type=req_type, code=code),
                        metrics.AUTH_LATENCY.labels(type=req_type))
            self._metric_children[(answer_type, code)] = children
        return children

    def _refuse(self, reason: str) -> None:
        self.stats.refused += 1
        metrics.REFUSED.labels(reason=reason).inc()

    async def _answer(self, topic: str, payload: object) -> tuple[Message | Answered | None, bytes | None]:
        """The (unsigned) answer and the key to MAC it with; (answer, None) when already MAC'd."""
        if not isinstance(payload, (bytes, bytearray)):
            self._refuse("malformed")
            return None, None
        payload = bytes(payload)
        try:
            msg = parse_message(payload)
        except MessageError:
            self._refuse("malformed")
            return None, None
        if _terminal_of(topic) != msg.terminal_id:
            self._refuse("topic")
            return None, None
        if isinstance(msg, SignOn):
            answer = await self._sign_on.handle(msg)
            if answer is None:
                self._refuse("sign_on_mac")
                metrics.MAC_FAILURES.labels(type="sign_on").inc()
                return None, None
            metrics.SIGN_ONS.labels(step="challenge" if not msg.host_nonce else "keys",
                                    code=getattr(answer, "response_code", "00")).inc()
            return answer, None
        if msg.type not in ("purchase", "offline_advice", "reversal", "void", "refund", "batch_settle",
                            "batch_upload", "heartbeat"):
            self._refuse("type")
            return None, None

        key = await self._verify_mac(msg, payload)
        if key is None:
            self.stats.mac_failures += 1
            metrics.MAC_FAILURES.labels(type=msg.type).inc()
            current = await self._keys.current(msg.terminal_id)
            return refusal(msg, RC.MAC_ERROR, "MAC error: sign on again"), current

        age_s = (datetime.now(UTC) - msg.sent_at).total_seconds()
        if age_s > self._max_age_s or age_s < -FUTURE_SKEW_S:
            self._refuse("stale")
            return refusal(msg, RC.INVALID_TXN, f"stale message (sent {age_s:.0f} s ago; limit {self._max_age_s} s)"), key

        cache_key = f"{msg.terminal_id}:{msg.msg_id}"
        cached = self._answers.get(cache_key)
        if cached is not None:
            self._refuse("replay")
            return Answered(msg.terminal_id, *cached), key

        if isinstance(msg, Heartbeat):
            return None, None
        try:
            handle = getattr(self._service, "handle_answered", None) or self._service.handle
            if getattr(self._service, "takes_payload", False):  # the ledger in its own process: the bytes go
                answer = await handle(msg, payload)
            else:
                answer = await handle(msg)
        except LedgerUnavailable as exc:  # it may have posted: no answer (the terminal reverses), never a decline
            log.warning("no answer to %s %s: %s", msg.type, msg.msg_id, exc)
            self.stats.errors += 1
            return None, None
        except Exception:
            log.exception("clearing service failed on %s", msg.type)
            self.stats.errors += 1
            return refusal(msg, RC.SYSTEM_ERROR, "system error"), key
        if answer is None:
            return None, None
        if not isinstance(answer, Answered):
            answer = Answered(msg.terminal_id, answer.type, getattr(answer, "response_code", ""),
                              answer.canonical_bytes())
        # Kept as ``(type, response_code, canonical bytes)`` — plain str/bytes the garbage collector does not track
        # — rather than models: 50,000 remembered models were ~100,000 tracked objects that every full collection
        # walked (pauses of 60-80 ms under load).
        self._answers[cache_key] = (answer.type, answer.response_code, answer.canonical)
        if len(self._answers) > ANSWER_CACHE_ENTRIES:
            self._answers.popitem(last=False)
        return answer, key

    async def _verify_mac(self, msg: Message, payload: bytes) -> bytes | None:
        """The TAK whose MAC ``msg`` carries (current, previous in its grace, then both re-read), or None.

        The MAC is checked over the payload's own bytes first (:func:`protocol.messages.without_mac`: the
        form every sender of ours writes, nothing re-serialised), then over the message's canonical bytes
        (:meth:`Message.canonical_bytes`, made at most once per message) for a sender that laid it out otherwise.
        """
        if len(msg.mac) != 2 * MESSAGE_MAC_BYTES:
            return None
        sent = without_mac(payload, msg.mac)
        canonical: bytes | None = None
        for refresh in (False, True):
            for key in await self._keys.candidates(msg.terminal_id, refresh=refresh):
                if sent is not None and hmac.compare_digest(mac_hex(key, sent), msg.mac):
                    return key
                if canonical is None:
                    canonical = msg.canonical_bytes()
                if canonical != sent and hmac.compare_digest(mac_hex(key, canonical), msg.mac):
                    return key
        return None


@contextlib.asynccontextmanager
async def clearing_runtime(engine: AsyncEngine, url: str, *, issuer_keys: Any, key_source: TerminalKeySource,
                           wkm: bytes, config: Any = None, embedded: bool = False, max_age_s: int = 300,
                           name: str = "w0", grace_s: int = KEY_GRACE_S,
                           ready_timeout_s: float = 10.0, service_process: bool = False,
                           ledger_argv: list[str] | None = None, ledger_env: dict[str, str] | None = None,
                           ) -> AsyncIterator[ClearingWorker]:
    """A clearing service plus one worker on ``url``, running until the block ends (tests, serve, demo).

    ``service_process=True`` (``carepay clearing serve``: the process is the worker) also tunes the garbage
    collector once the worker is up (:func:`tune_gc`); tests and the demo share their process and leave it alone.
    ``ledger_argv`` runs the clearing service in a child process (``clearing serve --ledger-process``) with the
    environment ``ledger_env`` (default: this process's).
    """
    from clearing.service import ClearingService

    await ensure_schema(engine)
    # ``ledger_argv``: the clearing service runs in a child process started with it (clearing.ledger_link)
    service: Any = (LedgerProcessClient(ledger_argv, ledger_env) if ledger_argv
                    else ClearingService(engine, issuer_keys, config))
    async with service:
        working = WorkingKeys(engine, wkm, grace_s=grace_s)
        log.info("working keys of %d terminals loaded", await working.preload())
        worker = ClearingWorker(url, service, working, SignOnService(key_source, working, wkm, engine),
                                max_age_s=max_age_s, embedded=embedded, name=name)
        task = asyncio.create_task(worker.run(), name=f"clearing-worker-{name}")
        try:
            await asyncio.wait_for(worker.ready.wait(), ready_timeout_s)
        except TimeoutError:
            task.cancel()
            raise ConnectionError(f"clearing worker could not subscribe on {url} within {ready_timeout_s} s") from None
        sampler = asyncio.create_task(sample_group_commit(service), name=f"group-commit-sampler-{name}")
        if service_process:
            tune_gc()
            sys.setswitchinterval(WORKER_SWITCH_INTERVAL_S)
        try:
            yield worker
        finally:
            sampler.cancel()
            worker.stop()
            await worker.drain()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await sampler


WORKER_SWITCH_INTERVAL_S = float(os.environ.get("CAREPAY_SWITCH_INTERVAL_S", "0.0005"))
"""How long a worker thread waiting for the interpreter lock waits before it asks for it (CPython's default is
5 ms). The ledger's database thread gives the lock up around every SQLite step and then needs it back, while the
event-loop thread runs answers and parses requests: with 5 ms it can wait that long for each step whenever the
loop is busy, and the batch — with every request in it — waits too. Set by ``clearing serve`` only."""


def tune_gc() -> None:
    """Garbage-collector setting for a long-running worker process, called once after start-up: everything
    alive then (modules, classes, pydantic schemas, SQLAlchemy metadata, key and registry caches) moves to the
    permanent generation (``gc.freeze()``), so the full collections that traffic still triggers no longer
    traverse it. Objects made later, cycles included, are collected as before; the thresholds stay CPython's.

    Measured (bench/e2e_auth.py --quick, one worker, collector time from ``gc.callbacks`` during the auth runs,
    ~8,000 requests): ~470 ms -> ~210 ms, and the longest pause of a full collection ~100 ms -> under ~40 ms. A larger
    young-generation threshold was tried and not kept: 3,000 saved no more within the noise and made middle-
    generation pauses ~12 ms; 20,000 made young collections take up to 26 ms (p99 at 1,000/s 11 -> ~40 ms).
    """
    gc.collect()
    gc.freeze()


GROUP_COMMIT_SAMPLE_S = 0.5


async def sample_group_commit(service: Any) -> None:
    """Feed ``carepay_group_commit_batch_size`` from the writer's counters (the writer keeps totals only):
    each interval, every batch committed in it is observed at the interval's mean batch size."""
    stats = getattr(getattr(service, "writer", None), "stats", None)
    if stats is None:
        return
    last = [stats.batches, stats.requests]

    def tick() -> None:
        batches, requests = stats.batches - last[0], stats.requests - last[1]
        last[:] = [stats.batches, stats.requests]
        if batches > 0:
            mean = requests / batches
            for _ in range(batches):
                metrics.GROUP_COMMIT_BATCH_SIZE.observe(mean)

    try:
        while True:
            await asyncio.sleep(GROUP_COMMIT_SAMPLE_S)
            tick()
    finally:
        tick()
