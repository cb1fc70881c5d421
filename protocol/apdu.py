"""ISO 7816-4 APDUs (应用协议数据单元): command cases 1-4, responses, T=0 GET RESPONSE / 6Cxx handling.

A command APDU is ``CLA INS P1 P2 [Lc data] [Le]``. Short form: Lc 1..255, Le 1..256 (Le byte 00
means 256). Extended form (used only when the data or Le do not fit the short form): a 00 marker
byte, then Lc as 2 bytes (1..65535), Le as 2 bytes (0000 means 65536). ``le`` on a ``Command`` is
the number of bytes expected (Ne); ``le=0`` is accepted as "the short maximum" and stored as 256.

>>> Command(0x00, 0xA4, 0x04, 0x00, bytes.fromhex("D156000001"), le=256).to_bytes().hex().upper()
'00A4040005D15600000100'
>>> Command.parse(bytes.fromhex("805C000204"))
Command(cla=0x80, ins=0x5C, p1=0x00, p2=0x02, data=<0 bytes>, le=4)
>>> Response.parse(bytes.fromhex("000010009000")).ok
True
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from construct import Int8ub, Int16ub, Struct

from protocol.status_words import (
    SW_OK,
    StatusWordError,
    bytes_available,
    correct_le,
    describe,
    sw_hex,
)

HEADER_BYTES = 4
SW_BYTES = 2
MAX_SHORT_LC = 255
MAX_SHORT_LE = 256
MAX_EXTENDED_LC = 65535
MAX_EXTENDED_LE = 65536
MAX_APDU_BYTES = HEADER_BYTES + 3 + MAX_EXTENDED_LC + 2  # case 4 extended at its maximum
MAX_RESPONSE_DATA_BYTES = MAX_EXTENDED_LE
MAX_RESPONSE_BYTES = MAX_RESPONSE_DATA_BYTES + SW_BYTES
MAX_T0_EXCHANGES = 8  # GET RESPONSE / 6Cxx resends followed before giving up

INS_GET_RESPONSE = 0xC0

HEADER = Struct("cla" / Int8ub, "ins" / Int8ub, "p1" / Int8ub, "p2" / Int8ub)
"""The 4-byte command header, declared once: builds and parses."""

STATUS_WORD = Int16ub
"""SW1 SW2 as one big-endian 16-bit word."""


class ApduError(ValueError):
    """A malformed APDU (too short, Lc/length disagreement, over a limit) or a T=0 exchange gone wrong."""


@dataclass(frozen=True)
class Command:
    """A command APDU (命令APDU). ``le`` is None when no response data is expected.

    The repr shows the data length only: APDU data can carry keys being loaded or cardholder data.
    """

    cla: int
    ins: int
    p1: int
    p2: int
    data: bytes = b""
    le: int | None = None

    def __post_init__(self) -> None:
        for name in ("cla", "ins", "p1", "p2"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value <= 0xFF:
                raise ApduError(f"{name} must be a byte 0..255, got {value!r}")
        if not isinstance(self.data, bytes | bytearray):
            raise ApduError(f"data must be bytes, got {type(self.data).__name__}")
        object.__setattr__(self, "data", bytes(self.data))
        if len(self.data) > MAX_EXTENDED_LC:
            raise ApduError(f"data of {len(self.data)} bytes exceeds {MAX_EXTENDED_LC}")
        if self.le is not None:
            if not isinstance(self.le, int) or not 0 <= self.le <= MAX_EXTENDED_LE:
                raise ApduError(f"le must be 0..{MAX_EXTENDED_LE} or None, got {self.le!r}")
            if self.le == 0:
                object.__setattr__(self, "le", MAX_SHORT_LE)

    @property
    def case(self) -> int:
        """ISO 7816-3 case: 1 no data no Le, 2 Le only, 3 data only, 4 data and Le."""
        if self.data:
            return 4 if self.le is not None else 3
        return 2 if self.le is not None else 1

    @property
    def extended(self) -> bool:
        """True when this command needs the extended-length encoding."""
        return len(self.data) > MAX_SHORT_LC or (self.le is not None and self.le > MAX_SHORT_LE)

    def header(self) -> bytes:
        return bytes((self.cla, self.ins, self.p1, self.p2))  # == HEADER.build(...) (tested)

    def to_bytes(self) -> bytes:
        """The wire bytes, short form unless the data or Le need the extended form."""
        out = bytearray(self.header())
        if not self.extended:
            if self.data:
                out.append(len(self.data))
                out += self.data
            if self.le is not None:
                out.append(self.le & 0xFF)  # 256 -> 00
            return bytes(out)
        out.append(0x00)
        if self.data:
            out += len(self.data).to_bytes(2, "big")
            out += self.data
        if self.le is not None:
            out += (self.le & 0xFFFF).to_bytes(2, "big")  # 65536 -> 0000
        return bytes(out)

    def with_le(self, le: int | None) -> Command:
        """The same command with another Le (used to resend after 6Cxx)."""
        return Command(self.cla, self.ins, self.p1, self.p2, self.data, le)

    @classmethod
    def parse(cls, raw: bytes) -> Command:
        """Classify a command APDU into case 1/2/3/4 (short or extended); ApduError if malformed."""
        if not isinstance(raw, bytes | bytearray):
            raise ApduError(f"APDU must be bytes, got {type(raw).__name__}")
        n = len(raw)
        if n < HEADER_BYTES:
            raise ApduError(f"APDU too short: {n} bytes, a command needs at least {HEADER_BYTES}")
        if n > MAX_APDU_BYTES:
            raise ApduError(f"APDU of {n} bytes exceeds MAX_APDU_BYTES={MAX_APDU_BYTES}")
        # the header is four plain bytes (HEADER declares it; indexing is the hot path, same result — tested)
        data, le = cls._parse_body(bytes(raw[HEADER_BYTES:]))
        return cls(raw[0], raw[1], raw[2], raw[3], data, le)

    @staticmethod
    def _parse_body(body: bytes) -> tuple[bytes, int | None]:
        n = len(body)
        if n == 0:  # case 1
            return b"", None
        if n == 1:  # case 2 short
            return b"", body[0] or MAX_SHORT_LE
        if body[0] != 0:  # case 3 / 4 short
            lc = body[0]
            if n == 1 + lc:
                return body[1:], None
            if n == 2 + lc:
                return body[1:-1], body[-1] or MAX_SHORT_LE
            raise ApduError(f"Lc={lc} disagrees with {n - 1} bytes after it (expected {lc} or {lc + 1})")
        # extended: 00 marker
        if n == 3:  # case 2 extended
            return b"", int.from_bytes(body[1:3], "big") or MAX_EXTENDED_LE
        if n < 3:
            raise ApduError(f"extended-length APDU body of {n} bytes is truncated")
        lc = int.from_bytes(body[1:3], "big")
        if lc == 0:
            raise ApduError("extended Lc of 0 with trailing bytes is malformed")
        if n == 3 + lc:
            return body[3:], None
        if n == 5 + lc:
            return body[3:-2], int.from_bytes(body[-2:], "big") or MAX_EXTENDED_LE
        raise ApduError(f"extended Lc={lc} disagrees with {n - 3} bytes after it")

    def __repr__(self) -> str:
        return (
            f"Command(cla=0x{self.cla:02X}, ins=0x{self.ins:02X}, p1=0x{self.p1:02X}, p2=0x{self.p2:02X}, "
            f"data=<{len(self.data)} bytes>, le={self.le})"
        )


@dataclass(frozen=True)
class Response:
    """A response APDU (响应APDU): data then SW1 SW2."""

    data: bytes
    sw: int

    def __post_init__(self) -> None:
        if not isinstance(self.data, bytes | bytearray):
            raise ApduError(f"data must be bytes, got {type(self.data).__name__}")
        object.__setattr__(self, "data", bytes(self.data))
        if len(self.data) > MAX_RESPONSE_DATA_BYTES:
            raise ApduError(f"response data of {len(self.data)} bytes exceeds {MAX_RESPONSE_DATA_BYTES}")
        if not isinstance(self.sw, int) or not 0 <= self.sw <= 0xFFFF:
            raise ApduError(f"status word must be 0..0xFFFF, got {self.sw!r}")

    @property
    def sw1(self) -> int:
        return self.sw >> 8

    @property
    def sw2(self) -> int:
        return self.sw & 0xFF

    @property
    def ok(self) -> bool:
        return self.sw == SW_OK

    @property
    def sw_hex(self) -> str:
        return sw_hex(self.sw)

    def describe(self) -> str:
        return describe(self.sw)

    def expect_ok(self, context: str = "") -> bytes:
        """The data when SW is 9000; otherwise raise StatusWordError naming the status word."""
        if not self.ok:
            raise StatusWordError(self.sw, context)
        return self.data

    def to_bytes(self) -> bytes:
        return self.data + STATUS_WORD.build(self.sw)

    @classmethod
    def parse(cls, raw: bytes) -> Response:
        """Split data and SW; ApduError when fewer than 2 bytes or over MAX_RESPONSE_BYTES."""
        if not isinstance(raw, bytes | bytearray):
            raise ApduError(f"response must be bytes, got {type(raw).__name__}")
        if len(raw) < SW_BYTES:
            raise ApduError(f"response too short: {len(raw)} bytes, a status word needs {SW_BYTES}")
        if len(raw) > MAX_RESPONSE_BYTES:
            raise ApduError(f"response of {len(raw)} bytes exceeds MAX_RESPONSE_BYTES={MAX_RESPONSE_BYTES}")
        return cls(bytes(raw[:-SW_BYTES]), STATUS_WORD.parse(raw[-SW_BYTES:]))

    def __repr__(self) -> str:
        return f"Response(data=<{len(self.data)} bytes>, sw=0x{self.sw:04X})"

    @classmethod
    def status(cls, sw: int) -> Response:
        """A response with no data, only a status word."""
        return cls(b"", sw)


def get_response(le: int, cla: int = 0x00) -> Command:
    """GET RESPONSE (取响应): ``00 C0 00 00 Le`` fetching ``le`` bytes (1..256) announced by 61xx."""
    if not 1 <= le <= MAX_SHORT_LE:
        raise ApduError(f"GET RESPONSE Le must be 1..{MAX_SHORT_LE}, got {le}")
    return Command(cla, INS_GET_RESPONSE, 0x00, 0x00, b"", le)


def transceive_t0(
    send: Callable[[bytes], bytes],
    cmd: Command,
    *,
    case4_as_case3: bool = False,
    get_response_cla: int = 0x00,
) -> Response:
    """Exchange ``cmd`` the T=0 way: follow 61xx with GET RESPONSE, resend with the right Le on 6Cxx.

    ``send`` takes the raw command bytes and returns the raw response bytes. Data from chained
    61xx answers is concatenated. With ``case4_as_case3`` a case 4 command goes out without its Le
    (T=0 has no case 4 on the wire) and the card is expected to answer 61xx. At most
    MAX_T0_EXCHANGES follow-up exchanges are made; more raise ApduError.
    """
    wire = cmd.with_le(None) if case4_as_case3 and cmd.case == 4 else cmd
    collected = bytearray()
    for _ in range(MAX_T0_EXCHANGES + 1):
        resp = Response.parse(send(wire.to_bytes()))
        available = bytes_available(resp.sw)
        if available is not None:
            collected += resp.data
            wire = get_response(available, get_response_cla)
        else:
            le = correct_le(resp.sw)
            if le is not None:
                wire = wire.with_le(le)
            else:
                data = bytes(collected) + resp.data
                if len(data) > MAX_RESPONSE_DATA_BYTES:
                    raise ApduError(
                        f"chained response of {len(data)} bytes exceeds {MAX_RESPONSE_DATA_BYTES}"
                    )
                return Response(data, resp.sw)
        if len(collected) > MAX_RESPONSE_DATA_BYTES:
            raise ApduError(f"chained response exceeds {MAX_RESPONSE_DATA_BYTES} bytes")
    raise ApduError(f"T=0 exchange did not finish within {MAX_T0_EXCHANGES} GET RESPONSE/6Cxx rounds")
