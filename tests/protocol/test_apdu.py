"""APDU commands/responses: case classification, round trips, malformed input, T=0 helpers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.apdu import (
    MAX_APDU_BYTES,
    MAX_T0_EXCHANGES,
    ApduError,
    Command,
    Response,
    get_response,
    transceive_t0,
)
from protocol.status_words import SW_FILE_NOT_FOUND, SW_OK, StatusWordError

byte = st.integers(0, 255)


@st.composite
def commands(draw, extended: bool = True):
    max_data = 300 if extended else 255
    data = draw(st.binary(max_size=max_data))
    le = draw(st.none() | st.integers(1, 70000 if extended else 256).map(lambda n: min(n, 65536)))
    return Command(draw(byte), draw(byte), draw(byte), draw(byte), data, le)


@pytest.mark.parametrize(
    ("hexstr", "case", "data", "le"),
    [
        ("0084000008", 2, "", 8),
        ("00A4040005D156000001", 3, "D156000001", None),
        ("00A4040005D15600000100", 4, "D156000001", 256),
        ("805C000204", 2, "", 4),
        ("00B0950000", 2, "", 256),
        ("80DC0000", 1, "", None),
        ("8054010000000F" + "11" * 15 + "0008", 4, "11" * 15, 8),  # extended case 4
        ("80CA0000000100", 2, "", 256),  # extended case 2 Le 0100
        ("80CA0000000000", 2, "", 65536),  # extended case 2 Le 0000
    ],
)
def test_parse_classifies_cases(hexstr: str, case: int, data: str, le: int | None) -> None:
    cmd = Command.parse(bytes.fromhex(hexstr))
    assert cmd.case == case
    assert cmd.data == bytes.fromhex(data)
    assert cmd.le == le


def test_le_zero_means_256_short() -> None:
    cmd = Command(0x00, 0xB0, 0x95, 0x00, le=0)
    assert cmd.le == 256
    assert cmd.to_bytes() == bytes.fromhex("00B0950000")


def test_extended_encoding_used_only_when_needed() -> None:
    short = Command(0x00, 0xD6, 0, 0, b"\x01" * 255, 256)
    assert not short.extended and len(short.to_bytes()) == 4 + 1 + 255 + 1
    ext = Command(0x00, 0xD6, 0, 0, b"\x01" * 256, 10)
    assert ext.extended
    raw = ext.to_bytes()
    assert raw[4] == 0 and raw[5:7] == b"\x01\x00" and raw[-2:] == b"\x00\x0a"


@pytest.mark.parametrize(
    ("hexstr", "fragment"),
    [
        ("", "too short"),
        ("00A404", "too short"),
        ("00A4040005D1560000", "Lc=5"),  # data shorter than Lc
        ("00A4040005D1560000010000", "Lc=5"),  # two bytes too many
        ("00A4040000", None),  # valid: case 2 Le 256 (not an error)
        ("00A404000000", "extended"),  # 6 bytes with 00 marker is truncated
        ("00A40400000003AABB", "extended Lc=3"),
        ("00A4040000000001", "extended Lc of 0"),
    ],
)
def test_malformed_commands_raise(hexstr: str, fragment: str | None) -> None:
    raw = bytes.fromhex(hexstr)
    if fragment is None:
        Command.parse(raw)
        return
    with pytest.raises(ApduError, match=fragment):
        Command.parse(raw)


def test_over_max_length_rejected() -> None:
    with pytest.raises(ApduError, match="MAX_APDU_BYTES"):
        Command.parse(b"\x00" * (MAX_APDU_BYTES + 1))


def test_apdu_error_is_value_error() -> None:
    assert issubclass(ApduError, ValueError)


@pytest.mark.parametrize("bad", [{"cla": 256}, {"p1": -1}, {"le": 65537}, {"data": "text"}])
def test_invalid_fields_rejected(bad: dict) -> None:
    fields = {"cla": 0, "ins": 0xA4, "p1": 0, "p2": 0} | bad
    with pytest.raises(ApduError):
        Command(**fields)


def test_repr_hides_data() -> None:
    cmd = Command(0x84, 0xD4, 0, 0, bytes.fromhex("00112233445566778899AABBCCDDEEFF"))
    assert "0011" not in repr(cmd) and "16 bytes" in repr(cmd)
    assert "1101" not in repr(Response(b"110105194912310021", SW_OK))


@given(commands())
def test_command_round_trip(cmd: Command) -> None:
    assert Command.parse(cmd.to_bytes()) == cmd


@given(commands(extended=False))
def test_short_commands_stay_short(cmd: Command) -> None:
    raw = cmd.to_bytes()
    assert len(raw) == 4 + (1 + len(cmd.data) if cmd.data else 0) + (1 if cmd.le is not None else 0)


@given(st.binary(max_size=600))
def test_random_bytes_parse_or_apduerror(raw: bytes) -> None:
    try:
        cmd = Command.parse(raw)
    except ApduError:
        return
    # anything accepted re-encodes to the same bytes, unless it was extended-form where short would do
    assert Command.parse(cmd.to_bytes()) == cmd
    assert cmd.to_bytes() == raw or (len(raw) > 5 and raw[4] == 0 and not cmd.extended)


@given(st.binary(max_size=300), st.integers(0, 0xFFFF))
def test_response_round_trip(data: bytes, sw: int) -> None:
    resp = Response(data, sw)
    parsed = Response.parse(resp.to_bytes())
    assert parsed == resp
    assert parsed.sw1 == sw >> 8 and parsed.sw2 == sw & 0xFF
    assert parsed.ok == (sw == 0x9000)
    assert parsed.sw_hex == f"{sw:04X}"


@given(st.binary(max_size=1))
def test_response_too_short(raw: bytes) -> None:
    with pytest.raises(ApduError, match="too short"):
        Response.parse(raw)


def test_expect_ok() -> None:
    assert Response(b"\x01", SW_OK).expect_ok() == b"\x01"
    with pytest.raises(StatusWordError, match="6A82 file not found") as err:
        Response.status(SW_FILE_NOT_FOUND).expect_ok("select ADF")
    assert err.value.sw == SW_FILE_NOT_FOUND


def test_get_response_builder() -> None:
    assert get_response(8).to_bytes() == bytes.fromhex("00C0000008")
    assert get_response(256).to_bytes() == bytes.fromhex("00C0000000")
    with pytest.raises(ApduError):
        get_response(0)


class FakeT0Card:
    """A T=0 card that answers 61xx then serves data in chunks, and insists on an exact Le (6Cxx)."""

    def __init__(self, payload: bytes, chunk: int = 200, strict_le: bool = False) -> None:
        self.payload = payload
        self.chunk = chunk
        self.strict_le = strict_le
        self.sent: list[bytes] = []
        self.pending = b""

    def __call__(self, raw: bytes) -> bytes:
        self.sent.append(raw)
        cmd = Command.parse(raw)
        if cmd.ins == 0xC0:
            part, self.pending = self.pending[: cmd.le], self.pending[cmd.le :]
            sw = 0x6100 | min(len(self.pending), 256) & 0xFF if self.pending else SW_OK
            return part + sw.to_bytes(2, "big")
        if self.strict_le:
            if cmd.le != len(self.payload):
                return bytes([0x6C, len(self.payload) & 0xFF])
            return self.payload + b"\x90\x00"
        self.pending = self.payload
        return bytes([0x61, min(len(self.pending), 256) & 0xFF])


def test_t0_follows_61xx_chain() -> None:
    payload = bytes(range(256)) + bytes(range(100))
    card = FakeT0Card(payload)
    resp = transceive_t0(card, Command(0x80, 0x50, 0x01, 0x02, b"\x01" * 11, 15))
    assert resp.ok and resp.data == payload
    assert card.sent[1] == bytes.fromhex("00C0000000")  # 61 00 -> 256 bytes
    assert card.sent[2] == bytes.fromhex("00C0000064")


def test_t0_resends_on_6cxx() -> None:
    card = FakeT0Card(b"\xaa" * 23, strict_le=True)
    resp = transceive_t0(card, Command(0x00, 0xB2, 0x01, 0xC4, le=256))
    assert resp.data == b"\xaa" * 23 and resp.ok
    assert card.sent[1] == bytes.fromhex("00B201C417")


def test_t0_case4_as_case3() -> None:
    card = FakeT0Card(b"\x55" * 8)
    resp = transceive_t0(card, Command(0x80, 0x70, 0, 0, b"\x01" * 4, 8), case4_as_case3=True)
    assert card.sent[0] == bytes.fromhex("807000000401010101")
    assert resp.data == b"\x55" * 8


def test_t0_bounded() -> None:
    calls = []

    def endless(raw: bytes) -> bytes:
        calls.append(raw)
        return b"\x61\x01"

    with pytest.raises(ApduError, match="did not finish"):
        transceive_t0(endless, Command(0, 0xB0, 0, 0, le=1))
    assert len(calls) == MAX_T0_EXCHANGES + 1


def test_t0_passes_errors_through() -> None:
    resp = transceive_t0(lambda raw: b"\x6a\x82", Command(0, 0xA4, 0, 0, b"\x3f\x00"))
    assert resp.sw == SW_FILE_NOT_FOUND and resp.data == b""
