"""The virtual serial reader on a pseudo-terminal (虚拟串口读卡器): card slot + PSAM slot behind real frames.

``PtyReader`` opens a pty pair (``os.openpty``), puts it in raw mode and answers
``protocol.reader_frame`` frames arriving on the master side; a terminal opens the slave path
(printed by ``carepay sim reader --pty``) with the real serial driver, exactly as it would open
``/dev/ttyUSB0``. The reader keeps the slave open itself, so terminals may come and go.

- Card insert/remove (:meth:`insert`, :meth:`remove`) send an unsolicited event frame.
- Link-speed emulation (``baud``): every frame costs ``len * 10 / baud`` seconds on the line
  (8N1: 10 bit times a byte), in both directions, so timings look like a real 115200-baud reader.
  One exchange = one timed wait (:class:`LinkClock`): the request's and the answer's line time are
  waited out together after the card has answered, then the whole answer is written at once. An OS
  sleep wakes late (0.1-0.5 ms, far more on a loaded machine); the lateness is carried forward as
  credit (at most ``LINK_CREDIT_MAX_S``) and taken off the next wait, so the emulated line keeps
  real-UART time over a session instead of adding every wake-up delay. ``link_stats()`` tells how late.
- Fault injection for tests: :meth:`inject_garbage` (bytes on the line), :meth:`truncate_next`
  (the next answer is cut short), ``card.remove_after(n)`` (pull the card before the n-th APDU),
  and the card's own tear hook (``VirtualCard.arm_tear``).
- Control lines (``carepay sim reader`` reads them from stdin): ``insert N``, ``remove``,
  ``remove-after N``, ``tear [INS]``, ``garbage HEX``, ``status``, ``quit``.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time
import tty
from collections.abc import Callable

from protocol import reader_frame as rf
from protocol.channel import SLOT_CARD, SLOT_PSAM, CardRemoved, ChannelError
from simulator.card import VirtualCard
from simulator.cardfile import CardDeck
from simulator.channel import SimSlot, SlotDevice

POLL_INTERVAL_S = 0.05
READ_CHUNK_BYTES = 4096
BITS_PER_BYTE = 10  # 8N1
LINK_CREDIT_MAX_S = 0.001  # most sleep overshoot carried forward and taken off the next frame's wait
LINK_IDLE_RESET_S = 0.05  # a line idle this long starts a fresh timeline (credit forgotten)


class LinkClock:
    """Link-speed pacing (串口速率仿真) with a deadline clock: one sleep per frame, overshoot carried as credit.

    ``pace(nbytes)`` returns when ``nbytes`` would have finished crossing the line at ``baud`` (8N1),
    counted from the call. A sleep that wakes late leaves credit (bounded by ``LINK_CREDIT_MAX_S``)
    which shortens the next wait, so the line's total time over an exchange sequence stays what a
    UART would take (the credit can never make a wait negative, and is forgotten after an idle line).
    """

    def __init__(self, baud: int) -> None:
        self.baud = baud
        self.byte_s = BITS_PER_BYTE / baud
        self.credit_s = 0.0
        self._last_end = 0.0
        self.waits = 0
        self.line_s = 0.0  # emulated line time asked for
        self.slept_s = 0.0  # time actually spent waiting
        self.late_s = 0.0  # total wake-up lateness (before credit)

    def pace(self, nbytes: int) -> None:
        start = time.perf_counter()
        if start - self._last_end > LINK_IDLE_RESET_S:
            self.credit_s = 0.0
        due = nbytes * self.byte_s
        used = min(self.credit_s, due)
        self.credit_s -= used
        deadline = start + due - used
        self.waits += 1
        self.line_s += due
        if deadline > start:
            time.sleep(deadline - start)
            woke = time.perf_counter()
            late = max(0.0, woke - deadline)
            self.late_s += late
            self.credit_s = min(LINK_CREDIT_MAX_S, self.credit_s + late)
        else:
            woke = start
        self.slept_s += woke - start
        self._last_end = woke

    def stats(self) -> dict[str, float]:
        """Waits, line time asked for, time slept, wake-up lateness, outstanding credit (ms)."""
        return {"waits": self.waits, "line_ms": round(self.line_s * 1000, 3),
                "slept_ms": round(self.slept_s * 1000, 3), "late_ms": round(self.late_s * 1000, 3),
                "credit_ms": round(self.credit_s * 1000, 3)}


class PtyReader:
    """A virtual reader on a pty. ``start()`` serves in a daemon thread; ``serve_forever()`` in the caller's."""

    def __init__(self, psam: SlotDevice, card: SlotDevice | None = None, *, baud: int | None = None,
                 deck: CardDeck | None = None, log: Callable[[str], None] | None = None,
                 apdu_batch: bool = True, busy_poll_s: float = 0.0) -> None:
        self.card = SimSlot("card", card)
        self.psam = SimSlot("psam", psam)
        self.deck = deck
        self.baud = baud
        self.apdu_batch = apdu_batch  # False: behave like a reader without CMD_APDU_BATCH
        # a reader's controller polls its UART and never sleeps; the emulator polls without blocking for this long
        # after each answer (the next command of a session usually follows within it), so the OS wake-up of a
        # blocked process is not counted as line or card time
        self.busy_poll_s = busy_poll_s
        self._poll_until = 0.0
        self.link = LinkClock(baud) if baud else None
        self.log = log or (lambda _msg: None)
        self.master_fd, self.slave_fd = os.openpty()
        tty.setraw(self.slave_fd)
        tty.setraw(self.master_fd)
        os.set_blocking(self.master_fd, False)  # nobody listening: output is lost, as on a real UART
        self.path = os.ttyname(self.slave_fd)
        self.decoder = rf.FrameDecoder()
        self.frames_in = 0
        self.frames_out = 0
        self.bytes_on_line = 0
        self.bytes_dropped = 0
        self._stop = threading.Event()
        self._wlock = threading.Lock()
        self._truncate_next = False
        self._after: list[rf.Frame] = []
        self._thread: threading.Thread | None = None

    # --- lifecycle

    def start(self) -> PtyReader:
        self._thread = threading.Thread(target=self.serve_forever, name="pty-reader", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)

    def close(self) -> None:
        self.stop()
        for fd in (self.master_fd, self.slave_fd):
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> PtyReader:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- slots and events

    def insert(self, card: VirtualCard | SlotDevice) -> None:
        self.card.insert(card)
        self._send(rf.response(rf.CMD_EVENT, SLOT_CARD, rf.STATUS_OK, bytes([rf.EVENT_INSERTED])))
        self.log(f"card inserted: {card!r}")

    def remove(self) -> None:
        self.card.remove()
        self._send(rf.response(rf.CMD_EVENT, SLOT_CARD, rf.STATUS_OK, bytes([rf.EVENT_REMOVED])))
        self.log("card removed")

    def inject_garbage(self, data: bytes) -> None:
        """Write raw bytes on the line (noise the terminal must skip)."""
        self._write(data)

    def truncate_next(self) -> None:
        """Cut the next answer frame in half (the terminal must time out and recover)."""
        self._truncate_next = True

    def link_stats(self) -> dict[str, float]:
        """The link emulation's timing counters (empty without ``baud``)."""
        return self.link.stats() if self.link is not None else {}

    # --- serving

    def _send(self, frame: rf.Frame, request_bytes: int = 0) -> None:
        """Write one frame; with link emulation, first wait out the request's and this answer's line time."""
        raw = rf.encode(frame)
        if self._truncate_next and not frame.is_event:
            self._truncate_next = False
            raw = raw[: len(raw) // 2]
        nbytes = request_bytes + len(raw)
        self.bytes_on_line += nbytes
        if self.link is not None:  # one wait per exchange: request in, processing, answer out
            self.link.pace(nbytes)
        self._write(raw)
        self.frames_out += 1

    def _write(self, raw: bytes) -> None:
        with self._wlock:
            try:
                written = os.write(self.master_fd, raw)
            except BlockingIOError:
                written = 0
            except OSError:
                return
        self.bytes_dropped += len(raw) - written

    def serve_forever(self) -> None:
        while not self._stop.is_set():
            try:
                wait = 0.0 if time.perf_counter() < self._poll_until else POLL_INTERVAL_S
                ready, _, _ = select.select([self.master_fd], [], [], wait)
                if not ready:
                    continue
                chunk = os.read(self.master_fd, READ_CHUNK_BYTES)
            except OSError:
                if self._stop.is_set():
                    return
                time.sleep(POLL_INTERVAL_S)
                continue
            for frame in self.decoder.feed(chunk):
                self.frames_in += 1
                try:
                    answer = self.handle(frame)
                except Exception as exc:  # a simulator bug must not kill the reader: the card goes mute
                    self.log(f"error handling {frame!r}: {type(exc).__name__}")
                    answer = rf.response(frame.command, frame.slot, rf.STATUS_CARD_MUTE)
                if answer is not None:
                    self._send(answer, request_bytes=len(frame.data) + rf.FRAME_OVERHEAD_BYTES + rf.MIN_BODY_BYTES)
                while self._after:
                    self._send(self._after.pop(0))
                if self.busy_poll_s:
                    self._poll_until = time.perf_counter() + self.busy_poll_s

    def handle(self, frame: rf.Frame) -> rf.Frame | None:
        """The answer to one host frame (None for frames a reader ignores)."""
        if frame.is_response:
            return None
        cmd = frame.command
        if frame.slot == SLOT_CARD:
            slot = self.card
        elif frame.slot == SLOT_PSAM:
            slot = self.psam
        else:
            return rf.response(cmd, frame.slot, rf.STATUS_BAD_SLOT)
        if cmd == rf.CMD_STATUS:
            presence = (rf.PRESENCE_POWERED if slot.powered else rf.PRESENCE_PRESENT) if slot.card_present() \
                else rf.PRESENCE_ABSENT
            return rf.response(cmd, frame.slot, rf.STATUS_OK, bytes([presence]))
        if cmd == rf.CMD_POWER_OFF:
            slot.power_off()
            return rf.response(cmd, frame.slot)
        if cmd == rf.CMD_POWER_ON:
            return rf.response(cmd, frame.slot, *self._power_on(slot))
        if cmd == rf.CMD_APDU:
            status, rsp = self._apdu(slot, frame.slot, frame.data)
            return rf.response(cmd, frame.slot, status, rsp)
        if cmd == rf.CMD_APDU_BATCH and self.apdu_batch:
            try:
                apdus = rf.parse_batch_request(frame.data)
            except rf.FrameError:  # nothing runs
                return rf.response(cmd, frame.slot, rf.STATUS_BAD_FRAME)
            items: list[tuple[int, bytes]] = []
            for apdu in apdus:  # in order; stop after the first item the slot could not run
                status, rsp = self._apdu(slot, frame.slot, apdu) if apdu else self._power_on(slot)
                items.append((status, rsp))
                if status != rf.STATUS_OK:
                    break
            return rf.response(cmd, frame.slot, rf.STATUS_OK, rf.batch_answer(items))
        return rf.response(cmd, frame.slot, rf.STATUS_UNKNOWN_COMMAND)

    @staticmethod
    def _power_on(slot: SimSlot) -> tuple[int, bytes]:
        try:
            return rf.STATUS_OK, slot.power_on()
        except CardRemoved:
            return rf.STATUS_NO_CARD, b""

    def _apdu(self, slot: SimSlot, slot_no: int, apdu: bytes) -> tuple[int, bytes]:
        """Run one APDU in a slot: (reader status, response APDU)."""
        was_present = slot.card_present()
        try:
            return rf.STATUS_OK, slot.transmit(apdu)
        except CardRemoved:
            if was_present:  # pulled during this command: tell the host after the answer
                self._after.append(rf.response(rf.CMD_EVENT, slot_no, rf.STATUS_OK, bytes([rf.EVENT_REMOVED])))
            return rf.STATUS_NO_CARD, b""
        except ChannelError:
            return rf.STATUS_NOT_POWERED, b""

    # --- control lines

    def control(self, line: str) -> str:
        """Apply one control line; returns a one-line reply."""
        words = line.split()
        if not words:
            return ""
        verb, args = words[0].lower(), words[1:]
        try:
            if verb == "insert":
                if self.deck is None:
                    return "error: no card deck loaded"
                card = self.deck.find(args[0] if args else "0")
                self.insert(card)
                return f"inserted {card.label or card.app_serial.hex().upper()}"
            if verb == "remove":
                self.remove()
                return "removed"
            if verb == "remove-after":
                self.card.remove_after(int(args[0]))
                return f"card will be pulled before APDU {int(args[0])}"
            if verb == "tear":
                dev = self.card.device
                if not isinstance(dev, VirtualCard):
                    return "error: no card"
                dev.arm_tear(int(args[0], 16) if args else None)
                return "tear armed"
            if verb == "garbage":
                self.inject_garbage(bytes.fromhex(args[0]) if args else os.urandom(16))
                return "garbage sent"
            if verb == "status":
                return (f"pty={self.path} card={'present' if self.card.card_present() else 'absent'} "
                        f"frames_in={self.frames_in} frames_out={self.frames_out} "
                        f"garbage_bytes={self.decoder.stats.garbage_bytes} bad_checksum={self.decoder.stats.bad_checksum}"
                        + "".join(f" link_{k}={v}" for k, v in self.link_stats().items()))
            if verb == "quit":
                self._stop.set()
                return "bye"
        except (ValueError, IndexError) as exc:
            return f"error: {exc}"
        return f"error: unknown control {verb!r} (insert N | remove | remove-after N | tear [INS] | garbage HEX | status | quit)"
