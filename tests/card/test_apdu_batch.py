"""The APDU batch (CMD_APDU_BATCH): the frame bodies, the pty reader, the real serial driver and the card session.

A batch carries independent commands for one slot in one exchange; a reader without it is detected and
served one command at a time; a card pulled in the middle of a batch leaves the answers of the commands
that ran, and a purchase interrupted anywhere over the serial path is still charged exactly once.
"""

from __future__ import annotations

import pytest
from card_kit import AID, NOW, TEST_TIMEOUT_MS, make_card
from hypothesis import given, settings
from hypothesis import strategies as st
from test_pull_anywhere import CARD_APDUS_PER_PURCHASE, MAX_ATTEMPTS, Terminal, assert_charged_once

from keys.issuer import IssuerKeySet
from protocol import card_files as cf
from protocol import reader_frame as rf
from protocol.apdu import HEADER, Command
from protocol.channel import CardRemoved, transmit_many
from simulator.channel import SimReader
from simulator.psam import VirtualPsam
from simulator.reader_pty import PtyReader
from terminal_agent.card_session import CardSession, CardSessionError, Reason
from terminal_agent.psam_session import PsamSession
from terminal_agent.serial_driver import SerialReader

GET_CHALLENGE_4 = bytes([cf.CLA_PLAIN, cf.INS_GET_CHALLENGE, 0, 0, 4])
SELECT = bytes([cf.CLA_PLAIN, cf.INS_SELECT, 0x04, 0x00, len(AID)]) + AID + b"\x00"
READ_ENTITLEMENT = bytes([cf.CLA_PLAIN, cf.INS_READ_BINARY, 0x80 | cf.SFI_ENTITLEMENT, 0, cf.ENTITLEMENT_BYTES])

apdus = st.binary(min_size=4, max_size=40)


# --- frame bodies


@settings(deadline=None)
@given(st.lists(apdus, min_size=1, max_size=rf.MAX_BATCH_ITEMS))
def test_batch_request_round_trip(items: list[bytes]) -> None:
    try:
        data = rf.batch_request(items)
    except rf.FrameError:  # refused only when the worst-case answers would not fit one frame
        assert rf.batch_answer_bound(items) > rf.MAX_DATA_BYTES
        return
    assert rf.parse_batch_request(data) == items
    assert rf.Frame.parse(rf.request(rf.CMD_APDU_BATCH, 0, data).to_bytes()).data == data


@settings(deadline=None)
@given(st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=60)), max_size=rf.MAX_BATCH_ITEMS))
def test_batch_answer_round_trip(items: list[tuple[int, bytes]]) -> None:
    assert rf.parse_batch_answer(rf.batch_answer(items)) == items


@settings(deadline=None)
@given(st.binary(max_size=rf.MAX_DATA_BYTES))
def test_hostile_batch_bodies_raise_frame_error_only(data: bytes) -> None:
    for parse in (rf.parse_batch_request, rf.parse_batch_answer):
        try:
            items = parse(data)
        except rf.FrameError:
            continue
        assert len(items) <= rf.MAX_BATCH_ITEMS


def test_batch_limits() -> None:
    with pytest.raises(rf.FrameError):
        rf.batch_request([])
    with pytest.raises(rf.FrameError):
        rf.batch_request([GET_CHALLENGE_4] * (rf.MAX_BATCH_ITEMS + 1))
    with pytest.raises(rf.FrameError):  # two reads of 256 bytes could not be answered in one frame
        rf.batch_request([bytes([0, 0xB0, 0, 0, 0])] * 2)
    assert rf.batch_answer_bound([GET_CHALLENGE_4, bytes([0, 0x20, 0, 0])]) == (3 + 4 + 2) + (3 + 0 + 2)


@settings(deadline=None)
@given(st.binary(min_size=4, max_size=300))
def test_apdu_header_fast_path_matches_the_declaration(raw: bytes) -> None:
    h = HEADER.parse(raw[:4])
    try:
        cmd = Command.parse(raw)
    except ValueError:
        return
    assert (cmd.cla, cmd.ins, cmd.p1, cmd.p2) == (h.cla, h.ins, h.p1, h.p2)
    assert cmd.header() == HEADER.build({"cla": h.cla, "ins": h.ins, "p1": h.p1, "p2": h.p2})


# --- reader and driver over the pty


def _reader(card=None, *, apdu_batch: bool = True) -> PtyReader:  # type: ignore[no-untyped-def]
    """A pty reader with ``card`` in its slot, not yet serving (``with`` or ``start()`` starts it)."""
    psam = VirtualPsam(IssuerKeySet.demo("carepay-demo", "sm4"), terminal_id="T0000042")
    rd = PtyReader(psam, apdu_batch=apdu_batch)
    if card is not None:
        rd.card.insert(card)
    return rd


@pytest.mark.parametrize("apdu_batch", [True, False])
def test_driver_batches_or_falls_back(apdu_batch: bool) -> None:
    card = make_card()
    with _reader(card, apdu_batch=apdu_batch) as rd, SerialReader(rd.path, timeout_ms=TEST_TIMEOUT_MS) as sr:
        sr.card.power_on()
        sr.poll_events()
        before, frames_before = sr.exchanges, rd.frames_in
        answers = transmit_many(sr.card, [SELECT, GET_CHALLENGE_4, READ_ENTITLEMENT])
        assert [a[-2:] for a in answers] == [b"\x90\x00"] * 3
        assert len(answers[1]) == 4 + 2 and len(answers[2]) == cf.ENTITLEMENT_BYTES + 2
        assert answers[2][:-2] == card.entitlement_ef
        # one exchange with a batching reader; one refused batch and then one per command without
        assert sr.exchanges - before == (1 if apdu_batch else 4)
        assert rd.frames_in - frames_before == sr.exchanges - before
        assert sr.batching is apdu_batch
        # the next batch to a reader without the command goes straight to single commands
        before = sr.exchanges
        transmit_many(sr.card, [GET_CHALLENGE_4, GET_CHALLENGE_4])
        assert sr.exchanges - before == (1 if apdu_batch else 2)


def test_card_pulled_mid_batch_keeps_the_answers_that_ran() -> None:
    card = make_card()
    with _reader(card) as rd, SerialReader(rd.path, timeout_ms=TEST_TIMEOUT_MS) as sr:
        sr.card.power_on()
        rd.card.remove_after(2)  # the second command of the batch finds the slot empty
        with pytest.raises(CardRemoved) as ei:
            transmit_many(sr.card, [SELECT, GET_CHALLENGE_4, READ_ENTITLEMENT])
        assert len(ei.value.answers) == 1 and ei.value.answers[0][-2:] == b"\x90\x00"


def test_a_purchase_takes_nine_exchanges_with_batches_and_sixteen_without() -> None:
    # without the command: 16 single exchanges plus the one refused batch (asked once per reader connection);
    # with it: 10, and 9 when start(purchase=True) draws the TTN with the PSAM's authentication check
    for apdu_batch, purchase, expected in ((True, True, 9), (True, False, 10), (False, True, 16 + 1)):
        card = make_card()
        with _reader(card, apdu_batch=apdu_batch) as rd, SerialReader(rd.path, timeout_ms=TEST_TIMEOUT_MS) as sr:
            psam = PsamSession(sr.psam)
            psam.open()
            s = CardSession(sr.card, psam, AID, clock=lambda: NOW)
            before = sr.exchanges
            s.start(purchase=purchase)
            txn = s.authorize(1_000, "voucher")
            s.complete(txn)
            assert sr.exchanges - before == expected
            assert card.atc == 1 and len(card.log) == 1 and txn.ttn == 1
            # the next purchase draws the next TTN whichever way it was drawn
            s.start(purchase=purchase)
            assert s.authorize(500, "voucher").ttn == 2


def test_a_prefetched_ttn_left_unused_is_a_gap_not_a_reuse() -> None:
    card = make_card()
    rd = SimReader(card, VirtualPsam(IssuerKeySet.demo("carepay-demo", "sm4")))
    psam = PsamSession(rd.psam)
    psam.open()
    s = CardSession(rd.card, psam, AID, clock=lambda: NOW)
    s.start(purchase=True)  # TTN 1 drawn, then the session stops (e.g. the cardholder walks away)
    s.start(purchase=True)  # TTN 2
    txn = s.authorize(1_000, "voucher")
    assert txn.ttn == 2


def test_external_auth_falls_back_to_a_fresh_challenge_when_the_card_lost_it() -> None:
    card = make_card()
    rd = SimReader(card, VirtualPsam(IssuerKeySet.demo("carepay-demo", "sm4")))
    psam = PsamSession(rd.psam)
    psam.open()
    s = CardSession(rd.card, psam, AID, clock=lambda: NOW)
    s.start()
    txn = s.authorize(1_000, "voucher")
    # the card is reset behind the session's back (e.g. a reader glitch): the challenge fetched with the
    # cryptogram is gone; the session re-selects and asks for a fresh challenge instead of failing
    rd.card.power_on()
    rd.card.transmit(SELECT)
    s.complete(txn)
    assert len(card.log) == 1 and card.ext_auth_tries_left == cf.EXTERNAL_AUTH_TRIES


def test_forged_card_gets_no_mac_from_the_psam_batch() -> None:
    card = make_card(key_set=IssuerKeySet.demo("some-other-issuer", "sm4"))
    rd = SimReader(card, VirtualPsam(IssuerKeySet.demo("carepay-demo", "sm4")))
    psam = PsamSession(rd.psam)
    psam.open()
    s = CardSession(rd.card, psam, AID, clock=lambda: NOW)
    with pytest.raises(CardSessionError) as ei:
        s.start()
    assert ei.value.reason is Reason.FORGED and s.info is None


class _PtyRig:
    """The pull-anywhere rig of test_pull_anywhere, over the pty reader and the real serial driver."""

    def __init__(self, card) -> None:  # type: ignore[no-untyped-def]
        self.pty = _reader(card).start()
        self.serial = SerialReader(self.pty.path, timeout_ms=TEST_TIMEOUT_MS).open()
        self.card = self.serial.card
        self.psam = self.serial.psam

    def close(self) -> None:
        self.serial.close()
        self.pty.close()


@pytest.mark.parametrize("after", range(1, CARD_APDUS_PER_PURCHASE + 1))
def test_pulled_before_any_card_apdu_over_serial(after: int) -> None:
    card = make_card()
    rig = _PtyRig(card)
    try:
        term = Terminal(rig)  # type: ignore[arg-type]
        rig.pty.card.remove_after(after)
        for _ in range(MAX_ATTEMPTS):
            try:
                term.purchase(1_000)
                break
            except CardSessionError as exc:
                assert exc.reason is Reason.CARD_REMOVED, exc
                term.interruptions += 1
                rig.pty.insert(card)
        else:
            raise AssertionError("purchase never completed")
        assert term.interruptions == 1
        assert_charged_once(term, card)
    finally:
        rig.close()


@settings(deadline=None)
@given(st.binary(min_size=1, max_size=300))
def test_answer_bound_fast_path_matches_the_apdu_parser(raw: bytes) -> None:
    try:
        le = Command.parse(raw).le
    except ValueError:
        le = None
    assert rf.batch_answer_bound([raw]) == rf.BATCH_ANSWER_HEAD_BYTES + (le or 0) + 2


@settings(deadline=None)
@given(st.lists(apdus, min_size=0, max_size=rf.MAX_BATCH_ITEMS + 1))
def test_batch_fits_agrees_with_batch_request(items: list[bytes]) -> None:
    try:
        rf.batch_request(items)
        built = True
    except rf.FrameError:
        built = False
    assert rf.batch_fits(items) is built


def test_power_on_item_on_an_empty_slot_means_no_card() -> None:
    with _reader(None) as rd, SerialReader(rd.path, timeout_ms=TEST_TIMEOUT_MS) as sr:
        with pytest.raises(CardRemoved) as ei:
            transmit_many(sr.card, [b"", SELECT])
        assert ei.value.answers == ()
        psam = PsamSession(sr.psam)
        psam.open()
        s = CardSession(sr.card, psam, AID, clock=lambda: NOW)
        with pytest.raises(CardSessionError) as se:
            s.start()
        assert se.value.reason is Reason.CARD_REMOVED and "no card in the reader" in str(se.value)
        rd.insert(make_card())
        assert s.start().atc == 0


@settings(deadline=None, max_examples=200)
@given(st.sampled_from([cf.CARDHOLDER, cf.ENTITLEMENT, cf.LOG_RECORD, cf.CRYPTOGRAM_REQUEST]), st.data())
def test_compiled_card_file_parsers_agree_with_the_declarations(struct, data: st.DataObject) -> None:  # type: ignore[no-untyped-def]
    raw = data.draw(st.binary(min_size=struct.sizeof(), max_size=struct.sizeof()))
    if data.draw(st.booleans()) and struct is cf.CARDHOLDER:
        raw = b"\x01" + raw[1:]  # past the format byte, into the field adapters
    try:
        expected = dict(struct.parse(raw))
    except Exception:  # whatever the declaration raises, the compiled parser gives CardFileError
        with pytest.raises(cf.CardFileError):
            cf.parse(struct, raw, "file")
        return
    got = cf.parse(struct, raw, "file")
    assert {k: v for k, v in dict(got).items() if not k.startswith("_")} == \
        {k: v for k, v in expected.items() if not k.startswith("_")}
