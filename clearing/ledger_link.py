"""The clearing service in a process of its own beside a worker (``carepay clearing serve --ledger-process``).

One worker process is bound by its interpreter lock: the event-loop thread (MQTT, parsing, MAC checks,
answers) and the ledger's database thread (the authorisation pipeline, cryptograms, the group-commit batch)
take turns on one core while the machine's other core waits. With ``--ledger-process`` each worker starts a
child (:mod:`ops.ledger_child`) that runs the :class:`clearing.service.ClearingService` — pipeline and
group-commit writer — and the worker hands it every request it has verified (MAC, age, replay) as the bytes it
received; the child answers with the canonical bytes of the answer, which the worker MACs and publishes.

The link is the child's stdin and stdout, in frames: ``>II`` (body length, request id) then the body.
Worker → child: the request's bytes. Child → worker: ``A`` type NUL response code NUL canonical answer bytes;
``N`` (no answer: a heartbeat); ``E`` and a reason (the service failed on it: answered ``96`` as in-process);
request id 0 with ``R`` once the child is ready.

When the child dies, the requests it held get no answer at all — it may have committed some of them, so a
decline would be a lie: the terminals time out and reverse, the reversal finds what was posted — and the worker
starts a new child (its requests wait for it, up to :data:`READY_WAIT_S`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import struct
from collections.abc import Sequence
from typing import Any

from clearing import metrics
from protocol.messages import Answered, Message

log = logging.getLogger("carepay.clearing.ledger_link")

FRAME = struct.Struct(">II")
MAX_FRAME_BODY = 1 << 20
"""Largest frame body either side accepts (a batch upload of a full terminal batch is well under it)."""
READY_WAIT_S = 10.0
"""How long a request waits for a (re)starting ledger process before it is left unanswered."""
START_TIMEOUT_S = 60.0
"""How long :meth:`LedgerProcessClient.start` waits for the first ledger process to be ready."""
RESTART_DELAY_S = 0.5
READ_CHUNK = 1 << 16


class FrameError(ValueError):
    """A frame that cannot be read (length beyond :data:`MAX_FRAME_BODY`, an unknown answer kind)."""


class LedgerUnavailable(Exception):
    """The ledger process died or did not come back in time: the request is left unanswered."""


def frame(rid: int, body: bytes) -> bytes:
    if len(body) > MAX_FRAME_BODY:
        raise FrameError(f"frame body of {len(body)} bytes (limit {MAX_FRAME_BODY})")
    return FRAME.pack(len(body), rid) + body


class FrameReader:
    """Frames out of a byte stream fed in arbitrary pieces."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """The frames completed by ``data``; :class:`FrameError` (the stream is then unusable) on a bad length."""
        buf = self._buf
        buf += data
        out: list[tuple[int, bytes]] = []
        pos = 0
        while len(buf) - pos >= FRAME.size:
            size, rid = FRAME.unpack_from(buf, pos)
            if size > MAX_FRAME_BODY:
                raise FrameError(f"frame body of {size} bytes announced (limit {MAX_FRAME_BODY})")
            end = pos + FRAME.size + size
            if end > len(buf):
                break
            out.append((rid, bytes(buf[pos + FRAME.size:end])))
            pos = end
        del buf[:pos]
        return out


def answer_body(answer: Answered | Message | None) -> bytes:
    """The child's reply body for what the service returned."""
    if answer is None:
        return b"N"
    if not isinstance(answer, Answered):
        answer = Answered(answer.terminal_id, answer.type, getattr(answer, "response_code", ""),
                          answer.canonical_bytes())
    return b"A" + answer.type.encode() + b"\0" + answer.response_code.encode() + b"\0" + answer.canonical


def error_body(reason: str) -> bytes:
    return b"E" + reason.encode()[:200]


def read_answer(terminal_id: str, body: bytes) -> Answered | None:
    """What a reply body says: the answer, None (no answer), or :class:`RuntimeError` (the service failed)."""
    kind, rest = body[:1], body[1:]
    if kind == b"A":
        parts = rest.split(b"\0", 2)
        if len(parts) != 3:
            raise FrameError("answer frame without type and response code")
        try:
            return Answered(terminal_id, parts[0].decode("ascii"), parts[1].decode("ascii"), parts[2])
        except UnicodeDecodeError:
            raise FrameError("answer frame with a type or code that is not ASCII") from None
    if kind == b"N":
        return None
    if kind == b"E":
        raise RuntimeError(f"ledger process: {rest.decode(errors='replace')}")
    raise FrameError(f"unknown answer kind {kind!r}")


class LedgerProcessClient:
    """The worker's clearing service when the ledger runs in a child process (see the module docstring).

    ``argv`` starts the child (``python -m ops.ledger_child …``); :meth:`handle_answered` takes the message and
    the bytes it came in (``takes_payload``) and returns the child's answer."""

    takes_payload = True

    def __init__(self, argv: Sequence[str], env: dict[str, str] | None = None):
        self._argv = list(argv)
        self._env = env
        self._proc: asyncio.subprocess.Process | None = None
        self._pending: dict[int, tuple[str, asyncio.Future[Answered | None]]] = {}
        self._ids = itertools.count(1)
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._ready = asyncio.Event()
        self._exited = asyncio.Event()  # a ledger process has exited (start() stops waiting for the first)
        self._stopping = False
        self._supervisor: asyncio.Task[None] | None = None
        self.restarts = 0

    def __repr__(self) -> str:
        return (f"LedgerProcessClient(pid={self._proc.pid if self._proc else None}, pending={len(self._pending)}, "
                f"restarts={self.restarts})")

    async def start(self) -> None:
        """Start the ledger process and wait until it is ready; :class:`LedgerUnavailable` when it exits first
        (its reason is on stderr: a database it cannot open, keys it cannot read) or is not ready in time."""
        await self._spawn()
        self._supervisor = asyncio.create_task(self._supervise(), name="carepay-ledger-link")
        ready = asyncio.ensure_future(self._ready.wait())
        exited = asyncio.ensure_future(self._exited.wait())
        try:
            await asyncio.wait({ready, exited}, timeout=START_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
            exited.cancel()
        if not self._ready.is_set():
            await self.stop()
            raise LedgerUnavailable("the ledger process did not start (see its messages above)")

    async def stop(self) -> None:
        """Close the child's input (it finishes what it holds and exits), then wait for it."""
        self._stopping = True
        proc = self._proc
        if proc is not None and proc.stdin is not None:
            with contextlib.suppress(Exception):
                self._flush()
                proc.stdin.close()
        if self._supervisor is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._supervisor), 15)
            except TimeoutError:
                if proc is not None and proc.returncode is None:
                    proc.kill()
                with contextlib.suppress(BaseException):
                    await self._supervisor
        self._fail_pending()

    async def __aenter__(self) -> LedgerProcessClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def handle_answered(self, msg: Message, payload: bytes | None = None) -> Answered | None:
        if not self._ready.is_set():
            try:
                await asyncio.wait_for(self._ready.wait(), READY_WAIT_S)
            except TimeoutError:
                raise LedgerUnavailable("the ledger process is not running") from None
        body = payload if payload is not None else msg.wire_json()
        rid = next(self._ids)
        fut: asyncio.Future[Answered | None] = asyncio.get_running_loop().create_future()
        self._pending[rid] = (msg.terminal_id, fut)
        self._out.append(frame(rid, body))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return await fut

    handle = handle_answered

    def _flush(self) -> None:
        """Every frame queued in this event-loop turn in one write."""
        self._flush_scheduled = False
        if not self._out:
            return
        data, self._out = b"".join(self._out), []
        proc = self._proc
        if proc is None or proc.stdin is None or proc.stdin.is_closing():
            return  # the child is gone: its pending requests are failed by the supervisor
        proc.stdin.write(data)

    async def _spawn(self) -> None:
        self._ready.clear()
        self._proc = await asyncio.create_subprocess_exec(
            *self._argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=self._env)

    async def _supervise(self) -> None:
        while True:
            proc = self._proc
            assert proc is not None and proc.stdout is not None
            try:
                await self._read(proc.stdout)
            except (FrameError, ConnectionError) as exc:
                log.error("ledger process link broken: %s", exc)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            code = await proc.wait()
            self._exited.set()
            self._ready.clear()
            lost = self._fail_pending()
            if self._stopping:
                return
            log.error("ledger process %s exited (%s); %d request(s) left unanswered; restarting",
                      proc.pid, code, lost)
            metrics.LEDGER_UNANSWERED.inc(lost)
            await asyncio.sleep(RESTART_DELAY_S)
            if self._stopping:
                return
            self.restarts += 1
            metrics.LEDGER_PROCESS_RESTARTS.inc()
            try:
                await self._spawn()
            except OSError as exc:
                log.error("ledger process could not start: %s", exc)
                await asyncio.sleep(RESTART_DELAY_S)

    async def _read(self, stdout: asyncio.StreamReader) -> None:
        reader = FrameReader()
        pending = self._pending
        while True:
            data = await stdout.read(READ_CHUNK)
            if not data:
                return
            for rid, body in reader.feed(data):
                if rid == 0:
                    if body == b"R":
                        self._ready.set()
                    continue
                entry = pending.pop(rid, None)
                if entry is None:
                    continue
                terminal_id, fut = entry
                if fut.done():
                    continue
                try:
                    fut.set_result(read_answer(terminal_id, body))
                except (FrameError, RuntimeError) as exc:
                    fut.set_exception(exc)

    def _fail_pending(self) -> int:
        pending, self._pending = self._pending, {}
        self._out = []
        for _, fut in pending.values():
            if not fut.done():
                fut.set_exception(LedgerUnavailable("the ledger process ended before it answered"))
        return len(pending)


async def serve_link(service: Any, reader: asyncio.StreamReader, write: Any) -> None:
    """The child's side: read request frames from ``reader``, answer each through ``service`` (concurrently:
    the group-commit writer batches them), write reply frames with ``write`` (all of one event-loop turn
    together). Returns at end of input once every request read has been answered."""
    from protocol.messages import MessageError, parse_message

    loop = asyncio.get_running_loop()
    out: list[bytes] = []
    scheduled = False
    tasks: set[asyncio.Task[None]] = set()

    def flush() -> None:
        nonlocal scheduled, out
        scheduled = False
        if out:
            data, out = b"".join(out), []
            write(data)

    def reply(rid: int, body: bytes) -> None:
        nonlocal scheduled
        out.append(frame(rid, body))
        if not scheduled:
            scheduled = True
            loop.call_soon(flush)

    async def one(rid: int, body: bytes) -> None:
        try:
            msg = parse_message(body)
        except MessageError as exc:
            reply(rid, error_body(f"unreadable request: {exc}"))
            return
        try:
            answer = await service.handle_answered(msg)
        except Exception as exc:
            log.exception("clearing service failed on %s", msg.type)
            reply(rid, error_body(type(exc).__name__))
            return
        reply(rid, answer_body(answer))

    reply(0, b"R")
    frames = FrameReader()
    while True:
        data = await reader.read(READ_CHUNK)
        if not data:
            break
        for rid, body in frames.feed(data):
            task = loop.create_task(one(rid, body))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    if tasks:
        await asyncio.gather(*list(tasks), return_exceptions=True)
    flush()


async def serve_stdio(service: Any) -> None:
    """:func:`serve_link` on this process's stdin and stdout (the ledger process's side of the link): stdout then
    carries nothing but frames — ``print`` and anything else written to ``sys.stdout`` go to stderr."""
    import os
    import sys

    reader = asyncio.StreamReader()
    await asyncio.get_running_loop().connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin.buffer)
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=0)
    sys.stdout = sys.stderr
    try:
        await serve_link(service, reader, out.write)
    finally:
        out.close()
