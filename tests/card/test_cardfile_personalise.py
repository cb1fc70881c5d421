"""Card decks on disk (cards carried between terminals and runs) and personalisation data."""

from __future__ import annotations

import json
from datetime import date

import pytest
from card_kit import AID, NOW, TODAY
from hypothesis import given, settings
from hypothesis import strategies as st

from keys.issuer import IssuerKeySet
from protocol import card_files as cf
from protocol.ids import id_birth_date, is_valid_card_no, is_valid_id_no
from simulator.card import VirtualCard
from simulator.cardfile import CardDeck, DeckError, deck_from_dict, load_deck
from simulator.channel import SimReader
from simulator.personalise import BEIJING_DISTRICTS, issue_cards
from simulator.psam import VirtualPsam
from terminal_agent.card_session import CardSession
from terminal_agent.psam_session import PsamSession


def swipe(deck: CardDeck, index: int, terminal_id: str, amount_fen: int) -> int:
    rd = SimReader(deck.cards[index], VirtualPsam(deck.key_sets(), terminal_id=terminal_id))
    ps = PsamSession(rd.psam)
    ps.open()
    s = CardSession(rd.card, ps, AID, clock=lambda: NOW)
    s.start()
    txn = s.authorize(amount_fen, "voucher")
    s.complete(txn)
    return txn.atc


def test_card_state_travels_between_terminals(tmp_path) -> None:
    path = tmp_path / "cards.json"
    CardDeck(cards=issue_cards(3, aid=AID, today=TODAY), issuer="demo:carepay-demo").save(path)
    first = load_deck(path)
    first.persist_on_commit()
    assert swipe(first, 1, "T0000001", 500) == 1
    second = load_deck(path)  # another terminal, another run
    second.persist_on_commit()
    assert second.cards[1].atc == 1 and len(second.cards[1].log) == 1
    assert swipe(second, 1, "T0000002", 700) == 2
    third = load_deck(path)
    c = third.cards[1]
    assert c.atc == 2 and [cf.parse(cf.LOG_RECORD, r, "r").terminal_id for r in c.log] == ["T0000002", "T0000001"]
    assert third.cards[0].atc == 0


def test_round_trip(tmp_path) -> None:
    cards = issue_cards(2, aid=AID, suite="3des", today=TODAY)
    cards[0].atc = 5
    cards[0].log.append(bytes(cf.LOG_RECORD_BYTES))
    deck = CardDeck(cards=cards)
    again = deck_from_dict(json.loads(json.dumps(deck.to_dict())))
    assert [c.to_dict() for c in again.cards] == [c.to_dict() for c in cards]


def test_bad_deck_files(tmp_path) -> None:
    with pytest.raises(DeckError, match="cannot read"):
        load_deck(tmp_path / "missing.json")
    p = tmp_path / "x.json"
    p.write_text("{not json")
    with pytest.raises(DeckError, match="not JSON"):
        load_deck(p)
    p.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(DeckError, match="not a carepay-card-deck"):
        load_deck(p)
    good = CardDeck(cards=issue_cards(1, aid=AID)).to_dict()
    good["cards"][0]["keys"]["tac"] = "zz"
    with pytest.raises(DeckError, match="card #0"):
        deck_from_dict(good)
    with pytest.raises(DeckError, match="issuer"):
        CardDeck(cards=[], issuer="vault:x").key_sets()


@settings(deadline=None, max_examples=100)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                    max_leaves=20))
def test_junk_deck_documents_give_clear_errors(doc: object) -> None:
    with pytest.raises(DeckError):
        deck_from_dict(doc)


CARD_FIELDS = sorted(issue_cards(1, aid=AID)[0].to_dict())


@settings(deadline=None)
@given(st.dictionaries(st.sampled_from(CARD_FIELDS),
                       st.text(max_size=6) | st.integers() | st.lists(st.text(max_size=4), max_size=2), max_size=8))
def test_junk_card_dicts_raise_value_error(d: dict) -> None:
    d = {**d, "format": "carepay-card/1"}
    with pytest.raises(ValueError):
        VirtualCard.from_dict(d)


def test_personalised_data_is_valid() -> None:
    cards = issue_cards(40, aid=AID, seed=3, today=date(2026, 11, 28))
    serials = {c.app_serial for c in cards}
    assert len(serials) == 40
    categories = set()
    for c in cards:
        h = cf.parse(cf.CARDHOLDER, c.cardholder_ef, "cardholder")
        e = cf.parse(cf.ENTITLEMENT, c.entitlement_ef, "entitlement")
        assert is_valid_card_no(h.card_no)
        assert is_valid_id_no(h.id_no)
        assert h.district_code in BEIJING_DISTRICTS and h.street_code.startswith(h.district_code)
        assert len(h.street_code) == 9
        assert id_birth_date(h.id_no).strftime("%Y%m%d") == h.birth_date
        age = 2026 - int(h.birth_date[:4])
        cat = cf.Category(h.category)
        categories.add(cat)
        if cat is cf.Category.AGE80:
            assert age >= 80
        if cat in (cf.Category.AGE60, cf.Category.DISABLED_ELDERLY):
            assert age >= 60
        assert h.valid_until > "20261128"
        programs = cf.programs_from_bits(e.programs)
        assert "voucher" in programs
        if cat is cf.Category.DISABLED_ELDERLY:
            assert "nursing" in programs
    assert len(categories) >= 3
    # reproducible
    assert [c.to_dict() for c in issue_cards(5, aid=AID, seed=3, today=date(2026, 11, 28))] == \
        [c.to_dict() for c in cards[:5]]


def test_keys_come_from_the_issuer_key_set() -> None:
    ks = IssuerKeySet.demo("other-issuer", "sm4")
    card = issue_cards(1, aid=AID, key_set=ks)[0]
    assert card.keys["tac"] == ks.card_key("tac", 1, card.app_serial)


def test_program_codes_match_keys() -> None:
    from keys.cryptogram import PROGRAM_CODES

    assert PROGRAM_CODES == cf.PROGRAM_CODES
