"""The serial driver's hybrid wait and the reader's busy polling: right answers whatever the link does."""

from __future__ import annotations

import pytest
from card_kit import AID, NOW, TEST_TIMEOUT_MS, make_card

from keys.issuer import IssuerKeySet
from protocol import card_files as cf
from protocol import reader_frame as rf
from simulator.psam import VirtualPsam
from simulator.reader_pty import PtyReader
from terminal_agent.card_session import CardSession
from terminal_agent.psam_session import PsamSession
from terminal_agent.serial_driver import SerialReader, _answer_frame_bytes


def _purchase(reader_baud: int | None, *, hybrid: bool, driver_baud: int = 115_200, busy_poll_s: float = 0.0) -> int:
    card = make_card()
    psam = VirtualPsam(IssuerKeySet.demo("carepay-demo", "sm4"), terminal_id="T0000042")
    with PtyReader(psam, baud=reader_baud, busy_poll_s=busy_poll_s) as rd:
        rd.card.insert(card)
        with SerialReader(rd.path, baud=driver_baud, timeout_ms=TEST_TIMEOUT_MS, hybrid_wait=hybrid) as sr:
            ps = PsamSession(sr.psam)
            ps.open()
            s = CardSession(sr.card, ps, AID, clock=lambda: NOW)
            s.start(purchase=True)
            txn = s.authorize(1_000, "voucher")
            s.complete(txn)
            assert card.atc == 1 and len(card.log) == 1
            assert sr.stats()["timeouts"] == 0
            return sr.exchanges


@pytest.mark.parametrize("hybrid", [True, False])
@pytest.mark.parametrize("busy_poll_s", [0.0, 0.002])
def test_purchase_over_an_emulated_115200_link(hybrid: bool, busy_poll_s: float) -> None:
    assert _purchase(115_200, hybrid=hybrid, busy_poll_s=busy_poll_s) == 2 + 9  # PSAM open (power, terminal id)


def test_answers_later_than_predicted_are_still_waited_for() -> None:
    # the driver believes 115200 baud, the line is twelve times slower: every prediction is early, the bounded
    # poll runs out and the blocking wait takes over
    assert _purchase(9_600, hybrid=True) == 11


def test_answers_earlier_than_predicted_wake_the_wait() -> None:
    # a driver told 1200 baud predicts answers ~100 times later than an undelayed reader gives them
    assert _purchase(None, hybrid=True, driver_baud=1_200) == 11


def test_predicted_answer_size_is_the_full_answer_frame() -> None:
    read = bytes([cf.CLA_PLAIN, cf.INS_READ_BINARY, 0x80 | cf.SFI_ENTITLEMENT, 0, cf.ENTITLEMENT_BYTES])
    full = rf.encode(rf.response(rf.CMD_APDU, 0, rf.STATUS_OK, bytes(cf.ENTITLEMENT_BYTES) + b"\x90\x00"))
    assert _answer_frame_bytes(rf.CMD_APDU, read) == len(full)
    batch = rf.batch_request([read, bytes([0, 0x84, 0, 0, 4])])
    answer = rf.batch_answer([(rf.STATUS_OK, bytes(cf.ENTITLEMENT_BYTES) + b"\x90\x00"), (rf.STATUS_OK, bytes(6))])
    assert _answer_frame_bytes(rf.CMD_APDU_BATCH, batch) == len(rf.encode(rf.response(rf.CMD_APDU_BATCH, 0,
                                                                                      rf.STATUS_OK, answer)))
