"""The virtual card and PSAM at the APDU level (in-process channel): status words, access conditions, counters."""

from __future__ import annotations

import pytest
from card_kit import AID, make_card
from hypothesis import given, settings
from hypothesis import strategies as st

from keys.issuer import IssuerKeySet
from keys.mac import challenge_iv, line_protection_mac
from keys.suite import encrypt_ecb
from protocol import card_files as cf
from protocol.channel import CardRemoved, ChannelError
from simulator.card import VirtualCard
from simulator.channel import SimReader
from simulator.psam import VirtualPsam


def sw(raw: bytes) -> int:
    return int.from_bytes(raw[-2:], "big")


@pytest.fixture
def card() -> VirtualCard:
    return make_card("sm4")


@pytest.fixture
def rd(card: VirtualCard) -> SimReader:
    r = SimReader(card, VirtualPsam(IssuerKeySet.demo()))
    r.card.power_on()
    r.psam.power_on()
    return r


def select(rd: SimReader) -> bytes:
    out = rd.card.transmit(bytes([0, 0xA4, 4, 0, len(AID)]) + AID + b"\x00")
    assert sw(out) == 0x9000
    return out[:-2]


def challenge(rd: SimReader, n: int = 4) -> bytes:
    out = rd.card.transmit(bytes([0, 0x84, 0, 0, n]))
    assert sw(out) == 0x9000 and len(out) == n + 2
    return out[:-2]


def sm_command(card: VirtualCard, ch: bytes, ins: int, p1: int, p2: int, data: bytes, le: int | None = None,
               key: bytes | None = None) -> bytes:
    header = bytes([cf.CLA_SM, ins, p1, p2, len(data) + 4])
    mac = line_protection_mac(key or card.keys["sm_mac"], header + data, ch, card.suite)
    return header + data + mac + (bytes([le]) if le is not None else b"")


def external_auth(rd: SimReader, card: VirtualCard) -> None:
    ch = challenge(rd, 8)
    crypto = encrypt_ecb(card.keys["external_auth"], challenge_iv(ch, card.suite), card.suite)
    assert sw(rd.card.transmit(bytes([0, 0x82, 0, 0, len(crypto)]) + crypto)) == 0x9000


RECORD = bytes(cf.LOG_RECORD_BYTES)


def test_select_fci(rd: SimReader, card: VirtualCard) -> None:
    fci = cf.parse_fci(select(rd))
    assert fci["aid"] == AID and fci["app_serial"] == card.app_serial and fci["suite"] == "sm4" and fci["atc"] == 0


def test_wrong_aid_6a82_and_deselects(rd: SimReader) -> None:
    assert sw(rd.card.transmit(bytes.fromhex("00A4040005D156000099"))) == 0x6A82
    assert sw(rd.card.transmit(bytes([0, 0xB0, 0x86, 0, 8]))) == 0x6985  # nothing selected


def test_cardholder_needs_secure_messaging(rd: SimReader, card: VirtualCard) -> None:
    select(rd)
    assert sw(rd.card.transmit(bytes([0, 0xB0, 0x85, 0, 0]))) == 0x6982
    ch = challenge(rd)
    out = rd.card.transmit(sm_command(card, ch, 0xB0, 0x85, 0, b"", cf.CARDHOLDER_BYTES))
    assert sw(out) == 0x9000 and out[:-2] == card.cardholder_ef
    # the challenge is used up
    assert sw(rd.card.transmit(sm_command(card, ch, 0xB0, 0x85, 0, b"", 0))) == 0x6985
    # entitlement is free to read
    assert rd.card.transmit(bytes([0, 0xB0, 0x86, 0, 8]))[:-2] == card.entitlement_ef


def test_append_record_mac_checks(rd: SimReader, card: VirtualCard) -> None:
    select(rd)
    p2 = cf.SFI_TXN_LOG << 3
    # without external authentication: refused even with a good MAC
    ch = challenge(rd)
    assert sw(rd.card.transmit(sm_command(card, ch, 0xE2, 0, p2, RECORD))) == 0x6982
    external_auth(rd, card)
    ch = challenge(rd)
    bad = bytearray(sm_command(card, ch, 0xE2, 0, p2, RECORD))
    bad[-1] ^= 0x01
    assert sw(rd.card.transmit(bytes(bad))) == 0x9302
    ch = challenge(rd)
    assert sw(rd.card.transmit(bytes([4, 0xE2, 0, p2, 2, 0xAA, 0xBB]))) == 0x6988  # no room for a MAC
    assert card.log == []
    ch = challenge(rd)
    wrong_key = sm_command(card, ch, 0xE2, 0, p2, RECORD, key=bytes(16))
    assert sw(rd.card.transmit(wrong_key)) == 0x9302
    ch = challenge(rd)
    assert sw(rd.card.transmit(sm_command(card, ch, 0xE2, 0, p2, RECORD))) == 0x9000
    assert card.log == [RECORD]
    assert rd.card.transmit(bytes([0, 0xB2, 1, p2 | 4, 0]))[:-2] == RECORD
    assert sw(rd.card.transmit(bytes([0, 0xB2, 2, p2 | 4, 0]))) == 0x6A83


def test_update_record_and_cyclic_log(rd: SimReader, card: VirtualCard) -> None:
    select(rd)
    external_auth(rd, card)
    p2 = cf.SFI_TXN_LOG << 3
    for i in range(cf.LOG_RECORDS + 3):
        ch = challenge(rd)
        rec = bytes([i]) * cf.LOG_RECORD_BYTES
        assert sw(rd.card.transmit(sm_command(card, ch, 0xE2, 0, p2, rec))) == 0x9000
    assert len(card.log) == cf.LOG_RECORDS and card.log[0][0] == cf.LOG_RECORDS + 2
    ch = challenge(rd)
    assert sw(rd.card.transmit(sm_command(card, ch, 0xDC, 2, p2 | 4, RECORD))) == 0x9000
    assert card.log[1] == RECORD


def test_update_binary_extends_eligibility(rd: SimReader, card: VirtualCard) -> None:
    select(rd)
    external_auth(rd, card)
    offset = cf.CARDHOLDER_BYTES - 4
    ch = challenge(rd)
    assert sw(rd.card.transmit(sm_command(card, ch, 0xD6, 0x85, offset, bytes.fromhex("20351231")))) == 0x9000
    assert cf.parse(cf.CARDHOLDER, card.cardholder_ef, "x").valid_until == "20351231"


def test_external_auth_counter_63cx_then_6983(rd: SimReader, card: VirtualCard) -> None:
    select(rd)
    for left in (2, 1, 0):
        challenge(rd, 8)
        assert sw(rd.card.transmit(bytes([0, 0x82, 0, 0, 16]) + bytes(16))) == 0x63C0 | left
    challenge(rd, 8)
    assert sw(rd.card.transmit(bytes([0, 0x82, 0, 0, 16]) + bytes(16))) == 0x6983
    assert card.ext_auth_tries_left == 0


def test_pin_verify_change_and_query(rd: SimReader, card: VirtualCard) -> None:
    select(rd)
    assert sw(rd.card.transmit(bytes([0, 0x20, 0, 0]))) == 0x63C3  # tries left query
    old, new = cf.pin_block(card.pin), cf.pin_block("2468")
    assert sw(rd.card.transmit(bytes([0x80, 0x5E, 1, 0, len(old) + 1 + len(new)]) + old + b"\xff" + new)) == 0x9000
    assert card.pin == "2468"
    assert sw(rd.card.transmit(bytes([0, 0x20, 0, 0, len(new)]) + new)) == 0x9000
    assert sw(rd.card.transmit(bytes([0, 0x20, 0, 0, len(old)]) + old)) == 0x63C2


def test_cryptogram_counts_and_proves(rd: SimReader, card: VirtualCard) -> None:
    select(rd)
    req = cf.CRYPTOGRAM_REQUEST.build({"amount_fen": 100, "program": 1, "terminal_id": "T0000001", "ttn": 9,
                                       "txn_date": "20261128", "txn_time": "101010"})
    out = rd.card.transmit(bytes([0x80, 0xC8, 0, 0, len(req)]) + req + b"\x06")
    assert sw(out) == 0x9000 and int.from_bytes(out[:2], "big") == 1
    proof = rd.card.transmit(bytes([0x80, 0x5A, 0, 0, 2, 0, 1, 0]))
    assert sw(proof) == 0x9000 and proof[:24] == req and proof[26:30] == out[2:6]
    assert sw(rd.card.transmit(bytes([0x80, 0x5A, 0, 0, 2, 0, 9, 0]))) == 0x6A88
    # PIN flag without a verified PIN
    assert sw(rd.card.transmit(bytes([0x80, 0xC8, 1, 0, len(req)]) + req)) == 0x6982
    # a program the card does not hold
    nursing = req[:4] + b"\x02" + req[5:]
    if "nursing" not in cf.programs_from_bits(cf.parse(cf.ENTITLEMENT, card.entitlement_ef, "e").programs):
        assert sw(rd.card.transmit(bytes([0x80, 0xC8, 0, 0, len(req)]) + nursing)) == 0x6985
    assert card.atc == 1


def test_history_bounded(rd: SimReader, card: VirtualCard) -> None:
    select(rd)
    req = cf.CRYPTOGRAM_REQUEST.build({"amount_fen": 100, "program": 1, "terminal_id": "T0000001", "ttn": 9,
                                       "txn_date": "20261128", "txn_time": "101010"})
    for _ in range(cf.CRYPTOGRAM_HISTORY + 2):
        assert sw(rd.card.transmit(bytes([0x80, 0xC8, 0, 0, len(req)]) + req)) == 0x9000
    assert len(card.cryptograms) == cf.CRYPTOGRAM_HISTORY
    assert sw(rd.card.transmit(bytes([0x80, 0x5A, 0, 0, 2, 0, 1]))) == 0x6A88


def test_slot_rules(rd: SimReader, card: VirtualCard) -> None:
    rd.card.remove()
    with pytest.raises(CardRemoved):
        rd.card.transmit(bytes.fromhex("0084000004"))
    with pytest.raises(CardRemoved):
        rd.card.power_on()
    rd.card.insert(card)
    with pytest.raises(ChannelError):
        rd.card.transmit(bytes.fromhex("0084000004"))  # not powered yet
    assert rd.card.power_on().startswith(b"\x3b")


def test_psam_unknown_version_and_bad_input() -> None:
    p = VirtualPsam(IssuerKeySet.demo())
    assert sw(p.process(bytes([0x80, 0xF0, 9, cf.SUITE_CODES["sm4"], 9]) + bytes(9))) == 0x6A88
    assert sw(p.process(bytes([0x80, 0xF0, 1, cf.SUITE_CODES["3des"], 9]) + bytes(9))) == 0x6A88  # no 3DES keys
    assert sw(p.process(bytes([0x80, 0xF0, 1, cf.SUITE_CODES["sm4"], 9]) + bytes(9))) == 0x6700
    assert sw(p.process(b"\x80")) == 0x6700
    assert sw(p.process(bytes([0x00, 0xB0, 0x96, 0, 8])))== 0x9000


def test_psam_ttn_persists(tmp_path) -> None:
    state = tmp_path / "psam.json"
    p = VirtualPsam(IssuerKeySet.demo(), terminal_id="T0000009", state_path=state)
    for want in (1, 2, 3):
        assert p.process(bytes([0x80, 0xF6, 0, 0, 4]))[:4] == want.to_bytes(4, "big")
    again = VirtualPsam(IssuerKeySet.demo(), state_path=state)
    assert again.terminal_id == "T0000009"
    assert again.process(bytes([0x80, 0xF6, 0, 0, 4]))[:4] == (4).to_bytes(4, "big")
    assert "key" not in state.read_text().lower()


def test_card_repr_hides_keys(card: VirtualCard) -> None:
    r = repr(card)
    assert all(k.hex().upper() not in r and k.hex() not in r for k in card.keys.values())


apdus = st.one_of(
    st.binary(max_size=300),
    st.builds(lambda cla, ins, p1, p2, data: bytes([cla, ins, p1, p2, len(data)]) + data,
              st.sampled_from([0x00, 0x04, 0x80, 0x84]), st.sampled_from([0xA4, 0x84, 0x88, 0x82, 0xB0, 0xB2, 0xD6,
                                                                          0xDC, 0xE2, 0x20, 0x5E, 0xC8, 0x5A, 0xF0,
                                                                          0xF2, 0xF4, 0xF6]),
              st.integers(0, 255), st.integers(0, 255), st.binary(min_size=1, max_size=40)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(apdus, max_size=8))
def test_random_apdus_never_crash_card_or_psam(seq: list[bytes]) -> None:
    card = make_card("3des")
    psam = VirtualPsam(IssuerKeySet.demo("carepay-demo", "3des"))
    select_apdu = bytes([0, 0xA4, 4, 0, len(AID)]) + AID
    for dev in (card, psam):
        dev.power_on()
        dev.process(select_apdu)
        for apdu in seq:
            out = dev.process(apdu)
            assert len(out) >= 2
    assert card.atc <= len(seq)
