"""BER-TLV: tags, lengths, nesting, round trips, malformed input, FCI."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.tlv import (
    ALG_SM4,
    MAX_TLV_DEPTH,
    Tlv,
    TlvError,
    build_fci,
    decode,
    decode_one,
    encode,
    find,
    find_all,
    length_bytes,
    parse_fci,
    tag_bytes,
)


def test_multibyte_tag_and_long_length() -> None:
    value = bytes(300)
    raw = Tlv(0xBF0C, children=(Tlv(0x9F4D, value),)).to_bytes()
    assert raw[:2] == b"\xbf\x0c" and raw[2] == 0x82
    top = decode_one(raw)
    assert top.constructed and top.children[0].tag == 0x9F4D and top.children[0].value == value


@pytest.mark.parametrize(
    ("n", "hexstr"), [(0, "00"), (127, "7F"), (128, "8180"), (255, "81FF"), (256, "820100")]
)
def test_length_forms(n: int, hexstr: str) -> None:
    assert length_bytes(n).hex().upper() == hexstr


def test_long_form_non_minimal_accepted() -> None:
    assert decode(bytes.fromhex("5A8103010203"))[0].value == b"\x01\x02\x03"


@pytest.mark.parametrize(
    ("hexstr", "fragment"),
    [
        ("9F", "truncated multi-byte tag"),
        ("5A", "truncated length"),
        ("5A05010203", "needs 5 bytes"),
        ("5A80", "indefinite"),
        ("5A85", "exceeds"),
        ("5A82FF", "truncated long-form"),
        ("9F8080808001", "longer than"),
        ("6F035A0201", "needs 2 bytes"),  # inner object truncated inside the template
    ],
)
def test_malformed(hexstr: str, fragment: str) -> None:
    with pytest.raises(TlvError, match=fragment):
        decode(bytes.fromhex(hexstr))


def test_depth_limit() -> None:
    raw = b""
    for _ in range(MAX_TLV_DEPTH):
        raw = bytes([0x70]) + length_bytes(len(raw)) + raw
    assert len(list(decode_one(raw).walk())) == MAX_TLV_DEPTH
    raw = bytes([0x70]) + length_bytes(len(raw)) + raw
    with pytest.raises(TlvError, match="deeper"):
        decode(raw)


def test_decode_one_rejects_trailing() -> None:
    with pytest.raises(TlvError, match="expected one"):
        decode_one(bytes.fromhex("5A01015A0102"))


def test_primitive_with_children_rejected() -> None:
    with pytest.raises(TlvError):
        Tlv(0x5A, children=(Tlv(0x5A, b"\x01"),))


def test_invalid_tag_int() -> None:
    with pytest.raises(TlvError):
        tag_bytes(0x9F)  # 9F announces a second byte
    with pytest.raises(TlvError):
        tag_bytes(0x9F81)  # the last byte still announces a continuation
    with pytest.raises(TlvError):
        tag_bytes(0x5A01)  # a one-byte tag followed by a stray byte
    assert tag_bytes(0x9F8000) == bytes.fromhex("9F8000")


def test_find_and_find_all() -> None:
    tlvs = decode(bytes.fromhex("70095A01015F2003414243" + "5A0102"))
    assert find(tlvs, 0x5F20).value == b"ABC"
    assert [t.value for t in find_all(tlvs, 0x5A)] == [b"\x01", b"\x02"]
    assert find(tlvs, 0x9F99) is None
    assert tlvs[0].find(0x5A).value == b"\x01"


def test_repr_hides_values() -> None:
    assert "0102" not in repr(Tlv(0x5A, b"\x01\x02"))


def test_fci_round_trip() -> None:
    aid = bytes.fromhex("D15600000599")
    raw = build_fci(
        aid, app_serial=bytes.fromhex("1234567890ABCDEF"), key_version=2, algorithm=ALG_SM4, label="CAREPAY"
    )
    fci = parse_fci(raw)
    assert fci.df_name == aid
    assert fci.app_serial == bytes.fromhex("1234567890ABCDEF")
    assert fci.key_version == 2 and fci.algorithm == ALG_SM4
    assert fci.to_bytes() == raw


def test_fci_rejects_wrong_template() -> None:
    with pytest.raises(TlvError, match="6F"):
        parse_fci(bytes.fromhex("700384015A"))
    with pytest.raises(TlvError, match="DF name"):
        parse_fci(bytes.fromhex("6F02A500"))


# --- property tests -------------------------------------------------------------------------


def _tags(constructed: bool) -> st.SearchStrategy[int]:
    one = st.integers(0, 0x1E).map(lambda low: (0x20 if constructed else 0) | (0x40 * 1) | low)
    two = st.integers(0, 0x7F).map(lambda b2: ((0x3F if constructed else 0x1F) | 0x80) << 8 | b2)
    return one | two


primitive = st.builds(Tlv, _tags(False), st.binary(max_size=300))
tlv_tree = st.recursive(
    primitive,
    lambda kids: st.builds(
        lambda tag, ch: Tlv(tag, children=tuple(ch)), _tags(True), st.lists(kids, max_size=4)
    ),
    max_leaves=12,
)


@given(st.lists(tlv_tree, max_size=4))
def test_round_trip(tlvs: list[Tlv]) -> None:
    raw = encode(tlvs)
    assert decode(raw) == tlvs
    assert encode(decode(raw)) == raw


@given(st.binary(max_size=200))
def test_random_bytes_decode_or_tlverror(raw: bytes) -> None:
    try:
        tlvs = decode(raw)
    except TlvError:
        return
    # an accepted input decodes to objects whose total encoded size accounts for every byte
    assert sum(len(t.to_bytes()) for t in tlvs) <= len(raw)
    assert decode(encode(tlvs)) == tlvs
