"""A card pulled (or torn) at ANY step of a purchase: the next start recovers — never a lost or double charge."""

from __future__ import annotations

import pytest
from card_kit import AID, NOW, make_card

from keys.issuer import IssuerKeySet
from protocol import card_files as cf
from simulator.card import VirtualCard
from simulator.channel import SimReader
from simulator.psam import VirtualPsam
from terminal_agent.card_session import (
    CardSession,
    CardSessionError,
    CardTransaction,
    PendingCryptogram,
    Reason,
)
from terminal_agent.psam_session import PsamSession

MAX_ATTEMPTS = 4


class Terminal:
    """The terminal's duty as card_session documents it: persist the pending record, recover before anything."""

    def __init__(self, rd: SimReader) -> None:
        psam = PsamSession(rd.psam)
        psam.open()
        self.session = CardSession(rd.card, psam, AID, clock=lambda: NOW)
        self.pending: dict | None = None  # what the journal would hold
        self.awaiting_completion: CardTransaction | None = None
        self.charged: list[CardTransaction] = []  # what went to the host
        self.interruptions = 0

    def purchase(self, amount_fen: int) -> None:
        s = self.session
        s.start()
        if self.awaiting_completion is None:
            txn = None
            if self.pending is not None:
                txn = s.recover(PendingCryptogram.from_dict(self.pending))
                self.pending = None
            if txn is None:
                txn = s.authorize(amount_fen, "voucher", on_pending=lambda p: setattr(self, "pending", p.to_dict()))
                self.pending = None
            self.charged.append(txn)
            self.awaiting_completion = txn
        s.complete(self.awaiting_completion, resume=True)
        self.awaiting_completion = None


def run_with_fault(card: VirtualCard, fault) -> Terminal:  # type: ignore[no-untyped-def]
    rd = SimReader(card, VirtualPsam(IssuerKeySet.demo("carepay-demo", card.suite)))
    term = Terminal(rd)
    fault(rd, card)
    for _ in range(MAX_ATTEMPTS):
        try:
            term.purchase(1_000)
            return term
        except CardSessionError as exc:
            assert exc.reason is Reason.CARD_REMOVED, exc
            term.interruptions += 1
            rd.card.insert(card)  # the cardholder puts the card back
    raise AssertionError("purchase never completed")


def assert_charged_once(term: Terminal, card: VirtualCard) -> None:
    assert len(term.charged) == 1  # one proof to the host: no lost, no double charge
    txn = term.charged[0]
    assert card.atc == txn.atc == 1
    records = [cf.parse(cf.LOG_RECORD, r, "log") for r in card.log]
    assert len(records) == 1 and records[0].tac.hex().upper() == txn.tac


CARD_APDUS_PER_PURCHASE = 11  # select, auth, challenge, SM read, read, cryptogram, read log, challenge, ext auth, …


@pytest.mark.parametrize("after", range(1, CARD_APDUS_PER_PURCHASE + 1))
def test_pulled_before_any_card_apdu(after: int) -> None:
    card = make_card()
    term = run_with_fault(card, lambda rd, _card: rd.card.remove_after(after))
    assert term.interruptions == 1
    assert_charged_once(term, card)


@pytest.mark.parametrize("ins", [cf.INS_SELECT, cf.INS_INTERNAL_AUTH, cf.INS_GET_CHALLENGE, cf.INS_READ_BINARY,
                                 cf.INS_CRYPTOGRAM, cf.INS_EXTERNAL_AUTH, cf.INS_APPEND_RECORD])
def test_torn_after_commit_of_any_command(ins: int) -> None:
    card = make_card("3des")
    term = run_with_fault(card, lambda _rd, c: c.arm_tear(ins))
    assert term.interruptions == 1
    assert_charged_once(term, card)
