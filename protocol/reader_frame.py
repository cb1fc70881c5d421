"""The serial reader frame (读卡器串口帧), as the real serial driver and the pty simulator speak it.

Layout (close to common desktop contact readers)::

    STX(02) ‖ LEN(2, big-endian) ‖ CMD(1) ‖ SLOT(1) ‖ [STATUS(1)] ‖ DATA ‖ BCC(1) ‖ ETX(03)

- ``LEN`` counts CMD, SLOT, STATUS (when present) and DATA.
- ``BCC`` is the XOR of every byte from LEN through DATA.
- Host → reader frames carry a command (``CMD_*``, high bit clear) and no status.
- Reader → host frames set the high bit of CMD (:data:`RESPONSE_BIT`) and carry a
  status byte (``STATUS_*``): the answer to a command (same CMD | 80, same slot), or an
  unsolicited event (``CMD_EVENT | 80``) with one data byte, ``EVENT_INSERTED`` / ``EVENT_REMOVED``.

Commands: power on (answer data = ATR), power off, APDU (data = command APDU; answer
data = response APDU), status (answer data = one byte, ``PRESENCE_*``), and APDU batch
(:data:`CMD_APDU_BATCH`: several APDUs for one slot in one frame — see :func:`batch_request`).

APDU batch (house extension, like the multi-APDU "script" commands of many desktop readers): the
request data is ``N × (LEN(2) ‖ APDU)`` for one slot, at most :data:`MAX_BATCH_ITEMS`; the reader
runs them in order and answers ``M × (STATUS(1) ‖ LEN(2) ‖ response APDU)``, stopping after the
first item whose reader status is not OK (card pulled, mute), so ``M ≤ N``. An item of length 0
is a cold reset (power on) of the slot, answered with the ATR — so a session opens with one
exchange: power on + SELECT. A batch whose answers
might not fit one frame (:func:`batch_answer_bound`) is refused as a bad frame before any item
runs. It saves line turnarounds when the next command does not depend on the previous answer
(an authentication followed by GET CHALLENGE; two file reads). A reader without it answers
``STATUS_UNKNOWN_COMMAND`` and runs nothing; the driver then sends the items one by one.

One construct ``Struct`` (:data:`FRAME`) builds and parses a frame. :class:`FrameDecoder`
cuts frames out of a byte stream: split reads, garbage between frames, bad checksums,
bad end bytes and over-long length fields are all survived by dropping the start byte
and rescanning, with counters for each kind of damage.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import reduce
from operator import xor

from construct import (
    Byte,
    Checksum,
    ChecksumError,
    Const,
    ConstructError,
    GreedyBytes,
    If,
    Int16ub,
    Prefixed,
    RawCopy,
    Struct,
    this,
)

from protocol.apdu import ApduError, Command

STX = 0x02
ETX = 0x03
RESPONSE_BIT = 0x80

CMD_POWER_ON = 0x10
CMD_POWER_OFF = 0x11
CMD_APDU = 0x12
CMD_STATUS = 0x13
CMD_APDU_BATCH = 0x14
CMD_EVENT = 0x20
COMMANDS = {CMD_POWER_ON: "power_on", CMD_POWER_OFF: "power_off", CMD_APDU: "apdu", CMD_STATUS: "status",
            CMD_APDU_BATCH: "apdu_batch", CMD_EVENT: "event"}

STATUS_OK = 0x00
STATUS_NO_CARD = 0x01
STATUS_NOT_POWERED = 0x02
STATUS_BAD_FRAME = 0x03
STATUS_UNKNOWN_COMMAND = 0x04
STATUS_CARD_MUTE = 0x05
STATUS_BAD_SLOT = 0x06
STATUS_NAMES = {STATUS_OK: "ok", STATUS_NO_CARD: "no card", STATUS_NOT_POWERED: "slot not powered",
                STATUS_BAD_FRAME: "bad frame", STATUS_UNKNOWN_COMMAND: "unknown command",
                STATUS_CARD_MUTE: "card mute", STATUS_BAD_SLOT: "no such slot"}

EVENT_REMOVED = 0x00
EVENT_INSERTED = 0x01
PRESENCE_ABSENT = 0x00
PRESENCE_PRESENT = 0x01
PRESENCE_POWERED = 0x02

FRAME_OVERHEAD_BYTES = 5  # STX, LEN(2), BCC, ETX (CMD, SLOT and STATUS count in LEN)
MIN_BODY_BYTES = 2  # CMD SLOT
MAX_DATA_BYTES = 300  # an extended-free APDU (5 + 255 + 1) or response (256 + 2), with room to spare
MAX_BODY_BYTES = MIN_BODY_BYTES + 1 + MAX_DATA_BYTES
MAX_FRAME_BYTES = FRAME_OVERHEAD_BYTES + MAX_BODY_BYTES
MAX_BUFFER_BYTES = 4 * MAX_FRAME_BYTES  # decoder never holds more than this
MAX_BATCH_ITEMS = 4
BATCH_ITEM_HEAD_BYTES = 2  # request item: LEN(2)
BATCH_ANSWER_HEAD_BYTES = 3  # answer item: STATUS(1) LEN(2)
MAX_ATR_BYTES = 33  # ISO 7816-3: TS + at most 32 bytes


class FrameError(ValueError):
    """A frame could not be built or parsed (length, checksum, start/end byte, field range)."""


def bcc(data: bytes) -> int:
    """Block check character: XOR of the bytes.

    >>> hex(bcc(bytes.fromhex("0007120000840000 04")))
    '0x95'
    """
    return reduce(xor, data, 0)


_BODY = Struct(
    "cmd" / Byte,
    "slot" / Byte,
    "status" / If(this.cmd & RESPONSE_BIT, Byte),
    "data" / GreedyBytes,
)

FRAME = Struct(
    "stx" / Const(bytes([STX])),
    "body" / RawCopy(Prefixed(Int16ub, _BODY)),
    "bcc" / Checksum(Byte, bcc, this.body.data),
    "etx" / Const(bytes([ETX])),
)
"""The reader frame, declared once: ``FRAME.build`` computes LEN and BCC, ``FRAME.parse`` checks them."""


@dataclass(frozen=True)
class Frame:
    """One reader frame. ``status`` is set (not None) exactly on reader → host frames."""

    cmd: int
    slot: int
    data: bytes = b""
    status: int | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.cmd <= 0xFF or not 0 <= self.slot <= 0xFF:
            raise FrameError("cmd and slot must be bytes")
        is_response = bool(self.cmd & RESPONSE_BIT)
        if is_response != (self.status is not None):
            raise FrameError("a reader frame (cmd with bit 80) carries a status byte; a host frame does not")
        if self.status is not None and not 0 <= self.status <= 0xFF:
            raise FrameError("status must be a byte")
        if len(self.data) > MAX_DATA_BYTES:
            raise FrameError(f"frame data of {len(self.data)} bytes exceeds MAX_DATA_BYTES={MAX_DATA_BYTES}")

    @property
    def is_response(self) -> bool:
        return bool(self.cmd & RESPONSE_BIT)

    @property
    def is_event(self) -> bool:
        return self.cmd == CMD_EVENT | RESPONSE_BIT

    @property
    def command(self) -> int:
        """The command without the response bit."""
        return self.cmd & ~RESPONSE_BIT & 0xFF

    def to_bytes(self) -> bytes:
        return FRAME.build({"body": {"value": {"cmd": self.cmd, "slot": self.slot, "status": self.status,
                                               "data": self.data}}})

    @classmethod
    def parse(cls, raw: bytes) -> Frame:
        """Parse exactly one frame; FrameError on any damage."""
        if len(raw) > MAX_FRAME_BYTES:
            raise FrameError(f"frame of {len(raw)} bytes exceeds MAX_FRAME_BYTES={MAX_FRAME_BYTES}")
        try:
            parsed = FRAME.parse(raw)
        except ChecksumError:
            raise FrameError("frame checksum (BCC) mismatch") from None
        except ConstructError as exc:
            raise FrameError(f"malformed frame: {type(exc).__name__}") from None
        body = parsed.body.value
        if len(raw) != len(parsed.body.data) + 3:
            raise FrameError("trailing bytes after the frame")
        return cls(body.cmd, body.slot, bytes(body.data), body.status)

    def __repr__(self) -> str:
        name = COMMANDS.get(self.command, f"0x{self.command:02X}")
        kind = "rsp" if self.is_response else "cmd"
        st = "" if self.status is None else f", status={STATUS_NAMES.get(self.status, self.status)}"
        return f"Frame({kind} {name}, slot={self.slot}{st}, data=<{len(self.data)} bytes>)"


def request(cmd: int, slot: int, data: bytes = b"") -> Frame:
    """A host → reader frame."""
    return Frame(cmd, slot, data, None)


def response(cmd: int, slot: int, status: int = STATUS_OK, data: bytes = b"") -> Frame:
    """A reader → host frame answering ``cmd`` (or an event when ``cmd`` is CMD_EVENT)."""
    return Frame(cmd | RESPONSE_BIT, slot, data, status)


@dataclass
class DecoderStats:
    """Damage counters of one decoder (exported as metrics by whoever owns a registry)."""

    frames: int = 0
    garbage_bytes: int = 0
    bad_checksum: int = 0
    bad_end: int = 0
    oversize: int = 0
    undersize: int = 0


@dataclass
class FrameDecoder:
    """Streaming decoder: ``feed(chunk)`` returns the complete, valid frames found so far.

    Handles frames split across reads, several frames per read, garbage before and between
    frames. A candidate frame with a bad BCC, a missing ETX or a LEN outside
    [MIN_BODY_BYTES, MAX_BODY_BYTES] costs only its STX byte: the decoder rescans from the
    next byte, so a real frame hidden behind a stray STX is still found.
    """

    stats: DecoderStats = field(default_factory=DecoderStats)
    _buf: bytearray = field(default_factory=bytearray, repr=False)

    def reset(self) -> int:
        """Drop any partial frame (after a timeout); returns the bytes dropped."""
        n = len(self._buf)
        self.stats.garbage_bytes += n
        self._buf.clear()
        return n

    @property
    def pending_bytes(self) -> int:
        return len(self._buf)

    def feed(self, chunk: bytes) -> list[Frame]:
        buf = self._buf
        buf += chunk
        out: list[Frame] = []
        stats = self.stats
        while buf:
            start = buf.find(STX)
            if start < 0:
                stats.garbage_bytes += len(buf)
                buf.clear()
                break
            if start:
                stats.garbage_bytes += start
                del buf[:start]
            if len(buf) < 3:
                break
            length = (buf[1] << 8) | buf[2]
            if length > MAX_BODY_BYTES:
                stats.oversize += 1
                stats.garbage_bytes += 1
                del buf[:1]
                continue
            if length < MIN_BODY_BYTES:
                stats.undersize += 1
                stats.garbage_bytes += 1
                del buf[:1]
                continue
            total = length + FRAME_OVERHEAD_BYTES
            if len(buf) < total:
                break
            if buf[total - 1] != ETX:
                stats.bad_end += 1
                stats.garbage_bytes += 1
                del buf[:1]
                continue
            if bcc(buf[1 : total - 2]) != buf[total - 2]:
                stats.bad_checksum += 1
                stats.garbage_bytes += 1
                del buf[:1]
                continue
            cmd = buf[3]
            if cmd & RESPONSE_BIT and length < MIN_BODY_BYTES + 1:
                stats.undersize += 1
                stats.garbage_bytes += 1
                del buf[:1]
                continue
            out.append(_fast_parse(bytes(buf[:total])))
            stats.frames += 1
            del buf[:total]
        if len(buf) > MAX_BUFFER_BYTES:  # cannot happen with the length check; keep the bound explicit
            stats.garbage_bytes += len(buf)
            buf.clear()
        return out


def _fast_parse(raw: bytes) -> Frame:
    """Parse a frame whose framing and BCC the decoder has already checked (hot path: no construct)."""
    cmd, slot = raw[3], raw[4]
    if cmd & RESPONSE_BIT:
        return Frame(cmd, slot, raw[6:-2], raw[5])
    return Frame(cmd, slot, raw[5:-2], None)


def encode(frame: Frame) -> bytes:
    """Frame bytes; the hot-path twin of ``frame.to_bytes()`` (same bytes, checked by the tests)."""
    head = bytes([frame.cmd, frame.slot]) if frame.status is None else bytes([frame.cmd, frame.slot, frame.status])
    body = len(head) + len(frame.data)
    lenb = body.to_bytes(2, "big")
    inner = lenb + head + frame.data
    return bytes([STX]) + inner + bytes([bcc(inner), ETX])


# --- APDU batch bodies (CMD_APDU_BATCH)


def _expected_answer_bytes(apdu: bytes) -> int:
    """The most response bytes a command can draw: Ne (from its Le) plus SW1 SW2."""
    n = len(apdu)
    if n == 0:  # power on: the ATR
        return MAX_ATR_BYTES
    if n == 5:  # short case 2 (the common one): Le in the last byte, 00 = 256
        return (apdu[4] or 256) + 2
    if n > 5 and apdu[4] and n == 6 + apdu[4]:  # short case 4
        return (apdu[5 + apdu[4]] or 256) + 2
    if n < 5 or (apdu[4] and n == 5 + apdu[4]):  # case 1, short case 3: no response data
        return 2
    try:  # extended forms (and malformed ones: a status word only)
        le = Command.parse(apdu).le
    except ApduError:
        le = None
    return (le or 0) + 2


def batch_answer_bound(apdus: list[bytes]) -> int:
    """The largest answer data a batch of ``apdus`` can produce (items' Ne + SW + item heads)."""
    return sum(BATCH_ANSWER_HEAD_BYTES + _expected_answer_bytes(a) for a in apdus)


def _batch_problem(apdus: list[bytes]) -> str | None:
    """Why ``apdus`` cannot go as one CMD_APDU_BATCH (item count, request size, worst-case answer size), or None."""
    if not 1 <= len(apdus) <= MAX_BATCH_ITEMS:
        return f"an APDU batch holds 1..{MAX_BATCH_ITEMS} commands, not {len(apdus)}"
    size = sum(BATCH_ITEM_HEAD_BYTES + len(a) for a in apdus)
    if size > MAX_DATA_BYTES:
        return f"APDU batch of {size} bytes exceeds MAX_DATA_BYTES={MAX_DATA_BYTES}"
    if batch_answer_bound(apdus) > MAX_DATA_BYTES:
        return "the answers of this APDU batch might not fit one frame"
    return None


def batch_fits(apdus: list[bytes]) -> bool:
    """True when ``apdus`` can go as one CMD_APDU_BATCH (item count, request size, worst-case answer size)."""
    return _batch_problem(apdus) is None


def batch_request(apdus: list[bytes]) -> bytes:
    """The data of a CMD_APDU_BATCH request; FrameError when the batch cannot be one frame."""
    problem = _batch_problem(apdus)
    if problem is not None:
        raise FrameError(problem)
    return b"".join(len(a).to_bytes(2, "big") + a for a in apdus)  # an empty item is a power on


def _items(data: bytes, head: int, what: str) -> list[tuple[int, bytes]]:
    """Cut ``data`` into at most MAX_BATCH_ITEMS items of ``[STATUS(1)] ‖ LEN(2) ‖ body`` (``head`` = 3 or 2):
    ``(status or 0, body)`` each; FrameError when an item is cut short or there are too many."""
    items: list[tuple[int, bytes]] = []
    i, n = 0, len(data)
    while i < n:
        if n - i < head:
            raise FrameError(f"{what} truncated")
        ln = (data[i + head - 2] << 8) | data[i + head - 1]
        status = data[i] if head == BATCH_ANSWER_HEAD_BYTES else 0
        i += head
        if i + ln > n:
            raise FrameError(f"{what} length disagrees with the data")
        items.append((status, bytes(data[i:i + ln])))
        i += ln
        if len(items) > MAX_BATCH_ITEMS:
            raise FrameError(f"{what}s: at most {MAX_BATCH_ITEMS}")
    return items


def parse_batch_request(data: bytes) -> list[bytes]:
    """The APDUs of a CMD_APDU_BATCH request; FrameError on a malformed or over-large batch."""
    items = [body for _, body in _items(data, BATCH_ITEM_HEAD_BYTES, "APDU batch item")]
    if not items:
        raise FrameError("empty APDU batch")
    if batch_answer_bound(items) > MAX_DATA_BYTES:
        raise FrameError("the answers of this APDU batch might not fit one frame")
    return items


def batch_answer(items: list[tuple[int, bytes]]) -> bytes:
    """The data of a CMD_APDU_BATCH answer from ``(status, response APDU)`` per item run."""
    return b"".join(bytes([status]) + len(rsp).to_bytes(2, "big") + rsp for status, rsp in items)


def parse_batch_answer(data: bytes) -> list[tuple[int, bytes]]:
    """``(status, response APDU)`` per item the reader ran; FrameError when malformed."""
    return _items(data, BATCH_ANSWER_HEAD_BYTES, "APDU batch answer item")
