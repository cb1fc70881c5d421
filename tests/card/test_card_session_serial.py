"""The card session through the REAL serial driver against the pty reader: happy paths and every refusal."""

from __future__ import annotations

import time
from datetime import date

import pytest
from card_kit import AID, NOW, SHORT_TIMEOUT_MS, TEST_TIMEOUT_MS, make_card

from keys.cryptogram import cryptogram_data, verify_tac
from keys.issuer import IssuerKeySet
from protocol import reader_frame as rf
from protocol.channel import ChannelTimeout
from protocol.ids import is_valid_card_no
from simulator.psam import VirtualPsam
from simulator.reader_pty import PtyReader
from terminal_agent.card_session import CardSessionError, CardTransaction, PendingCryptogram, Reason
from terminal_agent.psam_session import PsamSession
from terminal_agent.serial_driver import SerialReader


def host_verifies(txn: CardTransaction, key_sets: dict) -> bool:
    """What the clearing host does: re-derive the card's TAC key, recompute, compare."""
    ks = key_sets[txn.suite]
    key = ks.card_key("tac", txn.key_version, bytes.fromhex(txn.app_serial))
    data = cryptogram_data(txn.amount_fen, txn.program, txn.terminal_id, txn.ttn, txn.txn_date, txn.txn_time,
                           txn.atc)
    return verify_tac(key, data, bytes.fromhex(txn.tac), ks.suite)


def test_happy_path(suite, pty_reader, session_for, key_sets) -> None:
    card = make_card(suite)
    pty_reader.insert(card)
    s = session_for()
    info = s.start()
    assert info.suite == suite and info.atc == 0 and info.key_version == 1
    assert is_valid_card_no(info.card_no)
    summary = info.summary()
    assert info.card_no not in str(summary) and info.cardholder.id_no not in str(summary)
    assert summary["card_no"].startswith(info.card_no[:6]) and summary["card_no"].endswith(info.card_no[-4:])
    txn = s.authorize(1_500, "voucher")
    assert (txn.atc, txn.ttn, txn.terminal_id) == (1, 1, "T0000042")
    assert (txn.txn_date, txn.txn_time) == ("20261128", "103000")
    assert host_verifies(txn, key_sets)
    s.complete(txn)
    log = s.read_log()
    assert log[0]["atc"] == 1 and log[0]["amount_fen"] == 1_500 and log[0]["tac"] == txn.tac
    assert card.atc == 1 and len(card.log) == 1
    # a second swipe counts on
    s.start()
    txn2 = s.authorize(800, "voucher")
    assert (txn2.atc, txn2.ttn) == (2, 2) and host_verifies(txn2, key_sets)
    # a tampered amount fails the host's check
    assert not host_verifies(CardTransaction(**{**txn2.to_dict(), "amount_fen": 8000}), key_sets)


def test_wrong_aid_6a82(pty_reader, session_for) -> None:
    pty_reader.insert(make_card())
    with pytest.raises(CardSessionError) as ei:
        session_for(aid=bytes.fromhex("D156000005FFFFFFFF")).start()
    assert ei.value.reason is Reason.WRONG_AID and ei.value.sw == 0x6A82


def test_forged_card_refused(pty_reader, session_for) -> None:
    forged = make_card(key_set=IssuerKeySet.demo("a-forger", "sm4"))
    pty_reader.insert(forged)
    with pytest.raises(CardSessionError) as ei:
        session_for().start()
    assert ei.value.reason is Reason.FORGED and ei.value.response_code == "14"
    assert "not genuine" in str(ei.value)


def test_unknown_key_version_refused(pty_reader, session_for) -> None:
    ks = IssuerKeySet.demo("carepay-demo", "sm4", versions=(1, 2))
    pty_reader.insert(make_card(key_set=ks, key_version=2))
    with pytest.raises(CardSessionError) as ei:
        session_for().start()
    assert ei.value.reason is Reason.UNKNOWN_KEY_VERSION


def test_bad_mac_9302() -> None:
    """A PSAM whose secure-messaging master differs: the card refuses the read with 9302."""
    good = IssuerKeySet.demo("carepay-demo", "sm4")
    skewed = IssuerKeySet.demo("carepay-demo", "sm4")
    skewed.put("sm_mac", 1, bytes(16))
    with PtyReader(VirtualPsam(skewed), make_card(key_set=good)) as rd, \
            SerialReader(rd.path, timeout_ms=TEST_TIMEOUT_MS) as sr:
        ps = PsamSession(sr.psam)
        ps.open()
        from terminal_agent.card_session import CardSession

        with pytest.raises(CardSessionError) as ei:
            CardSession(sr.card, ps, AID, clock=lambda: NOW).start()
        assert ei.value.reason is Reason.BAD_MAC and ei.value.sw == 0x9302


def test_pin_wrong_three_times_then_blocked(pty_reader, session_for) -> None:
    card = make_card()
    pty_reader.insert(card)
    s = session_for(pin_threshold_fen=1_000)
    s.start()
    with pytest.raises(CardSessionError) as ei:
        s.authorize(5_000, "voucher")
    assert ei.value.reason is Reason.PIN_REQUIRED
    for left in (2, 1):
        with pytest.raises(CardSessionError) as ei:
            s.authorize(5_000, "voucher", pin="000000")
        assert ei.value.reason is Reason.PIN_WRONG and ei.value.tries_left == left and ei.value.sw == 0x63C0 | left
    with pytest.raises(CardSessionError) as ei:
        s.authorize(5_000, "voucher", pin="000000")
    assert ei.value.reason is Reason.PIN_BLOCKED and ei.value.sw == 0x63C0
    with pytest.raises(CardSessionError) as ei:  # even the right PIN now
        s.authorize(5_000, "voucher", pin=card.pin)
    assert ei.value.reason is Reason.PIN_BLOCKED and ei.value.sw == 0x6983
    assert card.atc == 0  # nothing was charged
    # under the threshold no PIN is asked
    assert s.authorize(500, "voucher").atc == 1


def test_right_pin_resets_counter(pty_reader, session_for) -> None:
    card = make_card()
    pty_reader.insert(card)
    s = session_for(pin_threshold_fen=1_000)
    s.start()
    with pytest.raises(CardSessionError):
        s.authorize(5_000, "voucher", pin="999999")
    txn = s.authorize(5_000, "voucher", pin=lambda: card.pin)
    assert txn.pin_verified and card.pin_tries_left == 3


def test_expired_eligibility(pty_reader, session_for) -> None:
    card = make_card(valid_until=date(2026, 11, 27))
    pty_reader.insert(card)
    s = session_for()
    s.start()
    with pytest.raises(CardSessionError) as ei:
        s.authorize(1_000, "voucher")
    assert ei.value.reason is Reason.EXPIRED and ei.value.response_code == "54"
    assert card.atc == 0


def test_program_not_allowed(pty_reader, session_for) -> None:
    card = make_card(programs=("voucher",), valid_until=date(2030, 1, 1))
    pty_reader.insert(card)
    s = session_for()
    s.start()
    with pytest.raises(CardSessionError) as ei:
        s.authorize(1_000, "nursing")
    assert ei.value.reason is Reason.PROGRAM_NOT_ALLOWED and ei.value.response_code == "57"


def test_card_removed_mid_session_then_recovered(pty_reader, session_for, key_sets) -> None:
    """Pulled just before the cryptogram reaches the card: nothing charged; recovery says so."""
    card = make_card()
    pty_reader.insert(card)
    s = session_for()
    s.start()
    pending: list[PendingCryptogram] = []
    pty_reader.card.remove_after(1)  # the next card APDU is the cryptogram
    with pytest.raises(CardSessionError) as ei:
        s.authorize(1_000, "voucher", on_pending=pending.append)
    assert ei.value.reason is Reason.CARD_REMOVED and ei.value.pending == pending[0]
    assert pending[0].card_no not in repr(pending[0]) and pending[0].card_no not in str(ei.value)
    events: list = []
    deadline = time.monotonic() + 1
    while (0, False) not in events and time.monotonic() < deadline:
        events += s.card.reader.poll_events()
        time.sleep(0.01)
    assert (0, False) in events  # the reader told the terminal the card is gone
    assert card.atc == 0
    pty_reader.insert(card)
    s.start()
    assert s.recover(PendingCryptogram.from_dict(pending[0].to_dict())) is None  # never counted: safe to drop


def test_tear_after_commit_recovers_same_tac(pty_reader, session_for, key_sets) -> None:
    """The card counts and answers, the answer is lost: recovery returns that very cryptogram, no second one."""
    card = make_card()
    pty_reader.insert(card)
    s = session_for()
    s.start()
    saved: list[dict] = []
    card.arm_tear(0xC8)
    with pytest.raises(CardSessionError) as ei:
        s.authorize(2_500, "voucher", on_pending=lambda p: saved.append(p.to_dict()))
    assert ei.value.reason is Reason.CARD_REMOVED
    assert card.atc == 1  # committed before the tear
    pty_reader.insert(card)
    info = s.start()
    assert info.atc == 1
    txn = s.recover(PendingCryptogram.from_dict(saved[0]))
    assert txn is not None and txn.recovered and txn.atc == 1 and txn.amount_fen == 2_500
    assert host_verifies(txn, key_sets)
    assert txn.tac == card.cryptograms[0][2].hex().upper()
    assert card.atc == 1  # no second cryptogram
    # another card in the reader is refused for recovery
    other = make_card(index=7)
    pty_reader.insert(other)
    s.start()
    with pytest.raises(CardSessionError) as e2:
        s.recover(PendingCryptogram.from_dict(saved[0]))
    assert e2.value.reason is Reason.RECOVERY_MISMATCH


def test_tear_during_log_append_resume_is_idempotent(pty_reader, session_for) -> None:
    card = make_card()
    pty_reader.insert(card)
    s = session_for()
    s.start()
    txn = s.authorize(1_200, "voucher")
    card.arm_tear(0xE2)
    with pytest.raises(CardSessionError) as ei:
        s.complete(txn)
    assert ei.value.reason is Reason.CARD_REMOVED
    assert len(card.log) == 1  # committed
    pty_reader.insert(card)
    s.start()
    s.complete(txn, resume=True)
    assert len(card.log) == 1  # not appended twice


def test_garbage_on_the_line_is_skipped(pty_reader, serial_reader, session_for, key_sets) -> None:
    pty_reader.insert(make_card())
    s = session_for()
    pty_reader.inject_garbage(b"\x02\x00\x09garbage\x03\xff\x02\x02\x02")
    time.sleep(0.02)
    s.start()
    pty_reader.inject_garbage(bytes(range(256)))
    txn = s.authorize(700, "voucher")
    assert host_verifies(txn, key_sets)
    assert serial_reader.decoder.stats.garbage_bytes > 0
    assert serial_reader.stats()["garbage_bytes"] == serial_reader.decoder.stats.garbage_bytes


def test_truncated_answer_times_out_then_the_line_recovers(pty_reader, serial_reader, session_for) -> None:
    pty_reader.insert(make_card())
    s = session_for()
    pty_reader.truncate_next()
    serial_reader.timeout_ms = SHORT_TIMEOUT_MS
    t0 = time.monotonic()
    with pytest.raises(ChannelTimeout):
        serial_reader.exchange(rf.CMD_STATUS, 0)
    assert SHORT_TIMEOUT_MS / 1000 <= time.monotonic() - t0 < SHORT_TIMEOUT_MS / 1000 + 2
    assert serial_reader.timeouts == 1
    serial_reader.timeout_ms = TEST_TIMEOUT_MS
    info = s.start()  # the next exchange works: the partial frame was dropped
    assert info.atc == 0


def test_insert_remove_events_reach_the_driver(pty_reader, serial_reader) -> None:
    serial_reader.card.card_present()
    pty_reader.insert(make_card())
    pty_reader.remove()
    deadline = time.monotonic() + 1
    events: list = []
    while len(events) < 2 and time.monotonic() < deadline:
        events += serial_reader.poll_events()
        time.sleep(0.01)
    assert events == [(0, True), (0, False)]
    assert serial_reader.card_known_present() is False
    assert serial_reader.card.card_present() is False
    with pytest.raises(CardSessionError) as ei:
        from terminal_agent.card_session import CardSession

        ps = PsamSession(serial_reader.psam)
        ps.open()
        CardSession(serial_reader.card, ps, AID).start()
    assert ei.value.reason is Reason.CARD_REMOVED
