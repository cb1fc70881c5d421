"""Serial reader driver (串口读卡器驱动): ``protocol.reader_frame`` frames over pyserial, one channel per slot.

:class:`SerialReader` owns the port; ``reader.card`` and ``reader.psam`` are
``protocol.channel.CardChannel`` objects sharing it (one exchange at a time, under a lock).

- Every exchange has a deadline (``timeout_ms``); no answer → :class:`ChannelTimeout`.
- Before each request, bytes already on the line are fed to the decoder (events are kept) and any
  partial frame is dropped, so a truncated or garbled answer costs one timeout, never the session.
- Unsolicited event frames (card inserted/removed) update :meth:`SerialReader.card_known_present`
  and queue in :meth:`SerialReader.pop_events` whenever they arrive.
- pyserial opens and configures the port (baud, 8N1, raw); the exchange itself reads and writes the
  port's file descriptor with ``select`` — pyserial's ``read``/``write`` add a select and an ioctl per
  call, which on a pty doubled the cost of an exchange.
- Waiting for the answer (``hybrid_wait``, on by default): the driver knows the baud rate and the
  answer's size from the command (its Le), so it knows when the answer can be complete on the line.
  It blocks until just before that moment, then polls the port for a short, bounded time (the
  size is predicted from the last answer to a command of the same shape, else from the Le). The
  timer's wake-up happens while the answer is still on the line, so the process is already
  running when the last byte lands and the OS wake-up latency (hundreds of µs on a VM) leaves the
  critical path. An answer that comes earlier (a short error answer, a fast link) wakes the
  blocking wait as usual; one that comes later than the bounded poll is waited for blocking. Cost:
  at most :data:`HYBRID_SPIN_S` of CPU per exchange (the idea of the kernel's hybrid polling for
  fast storage). ``hybrid_wait=False`` blocks for every answer.
- Reconnect: an I/O error closes the port; the next exchange reopens it (up to
  ``reconnect_attempts``, ``reconnect_delay_ms`` apart). Status / power commands are retried once
  over the new connection; an APDU never is (its effect on the card is unknown) — it raises
  :class:`ReaderUnavailable`.
"""

from __future__ import annotations

import itertools
import os
import select
import threading
import time

import serial

from protocol import reader_frame as rf
from protocol.channel import (
    DEFAULT_APDU_TIMEOUT_MS,
    SLOT_CARD,
    SLOT_NAMES,
    SLOT_PSAM,
    CardRemoved,
    ChannelError,
    ChannelTimeout,
    ReaderUnavailable,
    transmit_each,
)

DEFAULT_BAUD = 115_200
READ_POLL_S = 0.05
READ_CHUNK_BYTES = 4096
BITS_PER_BYTE = 10  # 8N1
HYBRID_MARGIN_S = 0.0003
"""Hybrid wait: wake this long before the answer could be complete on the line, then poll."""
HYBRID_SPIN_S = 0.002
"""Hybrid wait: poll at most this long past the predicted end of the answer, then block again."""
DEFAULT_RECONNECT_ATTEMPTS = 3
DEFAULT_RECONNECT_DELAY_MS = 200
MAX_QUEUED_EVENTS = 64


MAX_ANSWER_SHAPES = 256


def _shape(cmd: int, slot: int, data: bytes) -> bytes:
    """What predicts an answer's size: the command, the slot, and each APDU's header, length and last byte."""
    if cmd == rf.CMD_APDU_BATCH:
        try:
            items = rf.parse_batch_request(data)
        except rf.FrameError:
            items = []
        return bytes([cmd, slot]) + b"".join(a[:4] + bytes([len(a) & 0xFF, a[-1] if a else 0]) for a in items)
    return bytes([cmd, slot]) + data[:4] + bytes([len(data) & 0xFF, data[-1] if data else 0])


def _answer_frame_bytes(cmd: int, data: bytes) -> int:
    """The bytes of the answer frame a command draws when the card answers in full (from the APDU's Le)."""
    head = rf.FRAME_OVERHEAD_BYTES + rf.MIN_BODY_BYTES + 1  # + status byte
    if cmd == rf.CMD_APDU:
        return head + rf.batch_answer_bound([data]) - rf.BATCH_ANSWER_HEAD_BYTES
    if cmd == rf.CMD_APDU_BATCH:
        try:
            return head + rf.batch_answer_bound(rf.parse_batch_request(data))
        except rf.FrameError:
            return head
    if cmd == rf.CMD_POWER_ON:
        return head + rf.MAX_ATR_BYTES // 2  # a typical ATR: the wait must not overshoot short ones by much
    return head + 1


class SerialChannel:
    """One slot of a :class:`SerialReader`."""

    def __init__(self, reader: SerialReader, slot: int) -> None:
        self.reader = reader
        self.slot = slot
        self.name = SLOT_NAMES.get(slot, str(slot))

    def _check(self, frame: rf.Frame, what: str) -> bytes:
        if frame.status == rf.STATUS_OK:
            return frame.data
        raise self._error(frame.status or 0, what)

    def _error(self, status: int, what: str) -> ChannelError:
        if status == rf.STATUS_NO_CARD:
            return CardRemoved(f"no card in the {self.name} slot ({what})")
        if status == rf.STATUS_CARD_MUTE:
            return ChannelTimeout(f"{self.name} card mute ({what})")
        return ChannelError(f"{self.name} slot: reader says {rf.STATUS_NAMES.get(status, status)} ({what})")

    def power_on(self) -> bytes:
        return self._check(self.reader.exchange(rf.CMD_POWER_ON, self.slot, idempotent=True), "power on")

    def power_off(self) -> None:
        try:
            self.reader.exchange(rf.CMD_POWER_OFF, self.slot, idempotent=True)
        except ChannelError:
            pass

    def transmit(self, apdu: bytes) -> bytes:
        return self._check(self.reader.exchange(rf.CMD_APDU, self.slot, apdu), "APDU")

    def transmit_many(self, apdus: list[bytes]) -> list[bytes]:
        """Several independent APDUs in as few exchanges as the frame allows (``CMD_APDU_BATCH``).

        A reader that does not know the batch command answers "unknown command" without running
        anything; from then on this reader gets the commands one by one. On a failed item the raised
        ChannelError carries the answers of the items that ran before it.
        """
        out: list[bytes] = []
        rest = list(apdus)
        while rest:
            n, request = self._fit(rest) if self.reader.batching else (len(rest), None)
            group, rest = rest[:n], rest[n:]
            try:
                out += transmit_each(self, group) if request is None else self._batch(group, request)
            except ChannelError as exc:
                exc.answers = tuple(out) + exc.answers
                raise
        return out

    @staticmethod
    def _fit(apdus: list[bytes]) -> tuple[int, bytes | None]:
        """How many leading commands go in one frame, with their batch request (None: a single command)."""
        for n in range(min(len(apdus), rf.MAX_BATCH_ITEMS), 1, -1):
            try:
                return n, rf.batch_request(apdus[:n])
            except rf.FrameError:  # too big for one frame: try fewer
                continue
        return 1, None

    def _batch(self, group: list[bytes], request: bytes) -> list[bytes]:
        frame = self.reader.exchange(rf.CMD_APDU_BATCH, self.slot, request)
        if frame.status == rf.STATUS_UNKNOWN_COMMAND:  # nothing ran: this reader has no batch command
            self.reader.batching = False
            return transmit_each(self, group)
        self._check(frame, "APDU batch")
        try:
            items = rf.parse_batch_answer(frame.data)[: len(group)]
        except rf.FrameError as exc:
            raise ChannelError(f"{self.name} slot: malformed APDU batch answer ({exc})") from None
        ran = [rsp for _, rsp in itertools.takewhile(lambda item: item[0] == rf.STATUS_OK, items)]
        if len(ran) < len(group):
            err = self._error(items[len(ran)][0], "APDU batch item") if len(ran) < len(items) else ChannelError(
                f"{self.name} slot: the reader ran {len(ran)} of {len(group)} batched commands")
            err.answers = tuple(ran)
            raise err
        return ran

    def card_present(self) -> bool:
        data = self._check(self.reader.exchange(rf.CMD_STATUS, self.slot, idempotent=True), "status")
        return bool(data) and data[0] != rf.PRESENCE_ABSENT


class SerialReader:
    """A framed serial reader with a card slot and a PSAM slot."""

    def __init__(self, port: str, *, baud: int = DEFAULT_BAUD, timeout_ms: int = DEFAULT_APDU_TIMEOUT_MS,
                 reconnect_attempts: int = DEFAULT_RECONNECT_ATTEMPTS,
                 reconnect_delay_ms: int = DEFAULT_RECONNECT_DELAY_MS, hybrid_wait: bool = True) -> None:
        self.port = port
        self.baud = baud
        self.hybrid_wait = hybrid_wait and baud > 0
        self._answer_sizes: dict[bytes, int] = {}  # command shape -> answer frame bytes last seen
        self.timeout_ms = timeout_ms
        self.reconnect_attempts = reconnect_attempts
        self.reconnect_delay_ms = reconnect_delay_ms
        self.decoder = rf.FrameDecoder()
        self._ser: serial.Serial | None = None
        self._opened_before = False
        self._lock = threading.Lock()
        self._events: list[tuple[int, bool]] = []
        self._present: dict[int, bool] = {}
        self.card = SerialChannel(self, SLOT_CARD)
        self.psam = SerialChannel(self, SLOT_PSAM)
        self.stray_frames = 0
        self.timeouts = 0
        self.reconnects = 0
        self.bytes_sent = 0
        self.bytes_received = 0
        self.exchanges = 0
        self.batching = True  # the reader runs CMD_APDU_BATCH (cleared when it answers "unknown command")

    def __repr__(self) -> str:
        return f"SerialReader(port={self.port!r}, baud={self.baud}, open={self._ser is not None})"

    def stats(self) -> dict[str, int]:
        """Counters for a metrics exporter: frames, line damage, timeouts, reconnects, bytes."""
        d = self.decoder.stats
        return {"frames": d.frames, "garbage_bytes": d.garbage_bytes, "bad_checksum": d.bad_checksum,
                "bad_end": d.bad_end, "oversize": d.oversize, "undersize": d.undersize,
                "stray_frames": self.stray_frames, "timeouts": self.timeouts, "reconnects": self.reconnects,
                "bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received, "exchanges": self.exchanges}

    # --- port

    def open(self) -> SerialReader:
        with self._lock:
            self._open_locked()
        return self

    def _open_locked(self) -> None:
        last: Exception | None = None
        for attempt in range(max(1, self.reconnect_attempts)):
            try:
                self._ser = serial.Serial(self.port, self.baud, timeout=READ_POLL_S, write_timeout=self.timeout_ms / 1000)
                self.decoder.reset()
                self.batching = True  # whatever is plugged in now is asked again
                if self._opened_before:
                    self.reconnects += 1
                self._opened_before = True
                return
            except (serial.SerialException, OSError, ValueError) as exc:
                last = exc
                if attempt + 1 < self.reconnect_attempts:
                    time.sleep(self.reconnect_delay_ms / 1000)
        raise ReaderUnavailable(f"cannot open serial reader {self.port}: {last}")

    def close(self) -> None:
        with self._lock:
            self._close_locked()

    def _close_locked(self) -> None:
        if self._ser is not None:
            try:
                self._ser.close()
            except (serial.SerialException, OSError):
                pass
            self._ser = None

    def __enter__(self) -> SerialReader:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- events

    def _on_event(self, frame: rf.Frame) -> None:
        inserted = bool(frame.data) and frame.data[0] == rf.EVENT_INSERTED
        self._present[frame.slot] = inserted
        if len(self._events) < MAX_QUEUED_EVENTS:
            self._events.append((frame.slot, inserted))

    def pop_events(self) -> list[tuple[int, bool]]:
        """Events seen so far as ``(slot, inserted)``, oldest first; clears the queue."""
        with self._lock:
            out, self._events = self._events, []
            return out

    def card_known_present(self, slot: int = SLOT_CARD) -> bool | None:
        """What the last event said about the slot (None before any event)."""
        return self._present.get(slot)

    def poll_events(self) -> list[tuple[int, bool]]:
        """Read whatever is on the line now (no request sent) and return the queued events."""
        with self._lock:
            if self._ser is not None:
                try:
                    self._drain_locked()
                except (serial.SerialException, OSError):
                    self._close_locked()
            out, self._events = self._events, []
            return out

    # --- exchange

    # --- raw I/O on the port pyserial opened and configured (hot path: pyserial's own read/write add a select
    # and an ioctl per call, which doubles the per-exchange cost on a pty)

    def _fd(self) -> int:
        assert self._ser is not None
        return self._ser.fileno()

    def _read_now(self, fd: int, *, ready: bool = False) -> bytes:
        """Whatever the port holds now, without waiting (pyserial leaves VMIN=0: an empty read means "nothing").

        ``ready``: select said readable; then an empty read means the device is gone (as pyserial judges it).
        """
        try:
            data = os.read(fd, READ_CHUNK_BYTES)
        except BlockingIOError:
            return b""
        if not data and ready:
            raise OSError("serial port readable but returned no data (device disconnected?)")
        return data

    def _write_all(self, fd: int, raw: bytes, deadline: float) -> None:
        view = memoryview(raw)
        while view:
            try:
                n = os.write(fd, view)
                view = view[n:]
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([], [fd], [], left)[1]:
                    raise ChannelTimeout(f"serial port {self.port} does not take data (write timeout)") from None

    def _hybrid_wait(self, fd: int, due: float, deadline: float) -> None:
        """Block until shortly before ``due`` (when the answer can be complete), then poll until it is readable
        or a bounded spin has passed; the caller's blocking loop takes over from there."""
        wake = min(due - HYBRID_MARGIN_S, deadline)
        left = wake - time.monotonic()
        if left > 0 and select.select([fd], [], [], left)[0]:
            return  # it came early: readable now
        stop = min(max(due, time.monotonic()) + HYBRID_SPIN_S, deadline)
        while time.monotonic() < stop:
            if select.select([fd], [], [], 0)[0]:
                return

    def _drain_locked(self) -> None:
        fd = self._fd()
        while True:
            data = self._read_now(fd)
            if not data:
                break
            self.bytes_received += len(data)
            for frame in self.decoder.feed(data):
                if frame.is_event:
                    self._on_event(frame)
                else:
                    self.stray_frames += 1
        self.decoder.reset()

    def exchange(self, cmd: int, slot: int, data: bytes = b"", *, idempotent: bool = False) -> rf.Frame:
        """Send one request, return the matching answer frame; ChannelTimeout / ReaderUnavailable."""
        with self._lock:
            for attempt in (0, 1):
                if self._ser is None:
                    self._open_locked()
                try:
                    return self._exchange_locked(cmd, slot, data)
                except (serial.SerialException, OSError) as exc:
                    self._close_locked()
                    if not idempotent or attempt:
                        raise ReaderUnavailable(f"serial link to {self.port} lost ({type(exc).__name__}); "
                                                "the command's effect is unknown") from None
            raise ReaderUnavailable(f"serial link to {self.port} lost")  # pragma: no cover

    def _exchange_locked(self, cmd: int, slot: int, data: bytes) -> rf.Frame:
        fd = self._fd()
        self._drain_locked()
        raw = rf.encode(rf.request(cmd, slot, data))
        deadline = time.monotonic() + self.timeout_ms / 1000
        self._write_all(fd, raw, deadline)
        sent_at = time.monotonic()
        self.bytes_sent += len(raw)
        self.exchanges += 1
        want = cmd | rf.RESPONSE_BIT
        shape = _shape(cmd, slot, data) if self.hybrid_wait else b""
        if self.hybrid_wait:
            expect = self._answer_sizes.get(shape) or _answer_frame_bytes(cmd, data)
            self._hybrid_wait(fd, sent_at + (len(raw) + expect) * BITS_PER_BYTE / self.baud, deadline)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.timeouts += 1
                self.decoder.reset()
                raise ChannelTimeout(f"no answer from the reader on {self.port} within {self.timeout_ms} ms "
                                     f"({rf.COMMANDS.get(cmd, cmd)}, {SLOT_NAMES.get(slot, slot)} slot)")
            if not select.select([fd], [], [], left)[0]:
                continue
            chunk = self._read_now(fd, ready=True)
            self.bytes_received += len(chunk)
            answer = None
            for frame in self.decoder.feed(chunk):  # every frame of the chunk: events may follow the answer
                if frame.is_event:
                    self._on_event(frame)
                elif answer is None and frame.cmd == want and frame.slot == slot:
                    answer = frame
                else:
                    self.stray_frames += 1
            if answer is not None:
                if shape:  # the next command of this shape most likely draws an answer of this size
                    if len(self._answer_sizes) >= MAX_ANSWER_SHAPES:
                        self._answer_sizes.clear()
                    self._answer_sizes[shape] = len(answer.data) + rf.FRAME_OVERHEAD_BYTES + rf.MIN_BODY_BYTES + 1
                return answer
