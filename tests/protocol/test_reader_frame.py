"""The serial reader frame: one construct declaration builds and parses; the streaming decoder survives the line."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import reader_frame as rf

slots = st.integers(0, 255)
datas = st.binary(max_size=rf.MAX_DATA_BYTES)
requests = st.builds(lambda c, s, d: rf.request(c, s, d), st.integers(0, 0x7F), slots, datas)
responses = st.builds(lambda c, s, st_, d: rf.response(c, s, st_, d), st.integers(0, 0x7F), slots,
                      st.integers(0, 255), datas)
frames = st.one_of(requests, responses)


def test_known_bytes() -> None:
    f = rf.request(rf.CMD_APDU, 0, bytes.fromhex("0084000004"))
    raw = f.to_bytes()
    assert raw.hex().upper() == "020007120000840000049503"  # STX LEN=0007 CMD=12 SLOT=00 APDU BCC=95 ETX
    assert raw[0] == rf.STX and raw[-1] == rf.ETX
    assert raw[1:3] == (2 + 5).to_bytes(2, "big")
    assert raw[-2] == rf.bcc(raw[1:-2])
    assert rf.Frame.parse(raw) == f


@settings(deadline=None)
@given(frames)
def test_round_trip_and_fast_encoder_agree(frame: rf.Frame) -> None:
    raw = frame.to_bytes()
    assert rf.encode(frame) == raw  # the hot-path twin yields the construct declaration's bytes
    assert rf.Frame.parse(raw) == frame
    assert rf.FrameDecoder().feed(raw) == [frame]


@settings(deadline=None)
@given(st.lists(frames, min_size=1, max_size=4), st.data())
def test_split_at_every_offset(fs: list[rf.Frame], data: st.DataObject) -> None:
    stream = b"".join(f.to_bytes() for f in fs)
    cut = data.draw(st.integers(0, len(stream)))
    dec = rf.FrameDecoder()
    assert dec.feed(stream[:cut]) + dec.feed(stream[cut:]) == fs


def test_split_byte_by_byte() -> None:
    f = rf.response(rf.CMD_APDU, 1, rf.STATUS_OK, bytes(range(40)))
    raw = f.to_bytes()
    for cut in range(len(raw) + 1):
        dec = rf.FrameDecoder()
        assert dec.feed(raw[:cut]) + dec.feed(raw[cut:]) == [f]
    dec = rf.FrameDecoder()
    out = []
    for b in raw:
        out += dec.feed(bytes([b]))
    assert out == [f]


@settings(deadline=None, max_examples=300)
@given(st.binary(max_size=2000))
def test_random_bytes_never_crash_and_only_yield_real_frames(junk: bytes) -> None:
    dec = rf.FrameDecoder()
    out = dec.feed(junk)
    for f in out:
        raw = rf.encode(f)
        assert raw in junk  # a frame comes out only when its exact, checksum-valid bytes went in
        assert rf.Frame.parse(raw) == f
    assert dec.pending_bytes <= rf.MAX_FRAME_BYTES


@settings(deadline=None)
@given(st.binary(max_size=300), frames, st.binary(max_size=300))
def test_resync_after_garbage(before: bytes, frame: rf.Frame, after: bytes) -> None:
    dec = rf.FrameDecoder()
    got = dec.feed(before + frame.to_bytes() + after)
    # garbage may by chance contain frames, but the real one is always found
    assert frame in got + dec.feed(bytes(rf.MAX_FRAME_BYTES))  # flush any bogus length claim


def test_bad_checksum_rejected_and_counted() -> None:
    raw = bytearray(rf.response(rf.CMD_STATUS, 0, rf.STATUS_OK, b"\x01").to_bytes())
    raw[-2] ^= 0xFF
    dec = rf.FrameDecoder()
    assert dec.feed(bytes(raw)) == []
    assert dec.stats.bad_checksum == 1
    with pytest.raises(rf.FrameError, match="checksum"):
        rf.Frame.parse(bytes(raw))


def test_stray_stx_before_real_frame() -> None:
    f = rf.request(rf.CMD_STATUS, 0)
    dec = rf.FrameDecoder()
    assert dec.feed(b"\x02\x00\x05\x99" + f.to_bytes()) == [f]
    assert dec.stats.bad_end + dec.stats.bad_checksum >= 1


def test_oversize_length_rejected() -> None:
    dec = rf.FrameDecoder()
    over = (rf.MAX_BODY_BYTES + 1).to_bytes(2, "big")
    f = rf.request(rf.CMD_STATUS, 1)
    assert dec.feed(b"\x02" + over + b"\x12\x00" + f.to_bytes()) == [f]
    assert dec.stats.oversize == 1
    with pytest.raises(rf.FrameError):
        rf.Frame(rf.CMD_APDU, 0, bytes(rf.MAX_DATA_BYTES + 1))


def test_truncated_frame_then_reset() -> None:
    f = rf.response(rf.CMD_APDU, 0, rf.STATUS_OK, bytes(20))
    raw = f.to_bytes()
    dec = rf.FrameDecoder()
    assert dec.feed(raw[:10]) == []
    assert dec.pending_bytes == 10
    assert dec.reset() == 10
    assert dec.feed(raw) == [f]


def test_header_rules() -> None:
    with pytest.raises(rf.FrameError):
        rf.Frame(rf.CMD_APDU | rf.RESPONSE_BIT, 0, b"", None)  # a reader frame needs a status
    with pytest.raises(rf.FrameError):
        rf.Frame(rf.CMD_APDU, 0, b"", 0)  # a host frame has none
    ev = rf.response(rf.CMD_EVENT, 0, rf.STATUS_OK, bytes([rf.EVENT_INSERTED]))
    assert ev.is_event and ev.is_response and "event" in repr(ev)
    assert "bytes" in repr(rf.request(rf.CMD_APDU, 0, b"secret"))
    assert "secret" not in repr(rf.request(rf.CMD_APDU, 0, b"secret"))
