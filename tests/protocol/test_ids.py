"""Card numbers (Luhn), resident IDs (MOD 11-2), masking, POS identifiers."""

from __future__ import annotations

from datetime import date

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import ids
from protocol.ids import IdError


def test_known_good_id() -> None:
    assert ids.is_valid_id_no("11010519491231002X")
    assert ids.check_id_no("11010519491231002x") == "11010519491231002X"
    assert ids.id_check_char("11010519491231002") == "X"


def test_generated_ids_match_known_answer() -> None:
    assert ids.make_id_no("110105", date(1949, 12, 31), 2) == "11010519491231002X"


@pytest.mark.parametrize("pos", range(18))
def test_id_single_char_corruption_detected(pos: int) -> None:
    good = "11010519491231002X"
    for repl in "0123456789X":
        if repl == good[pos]:
            continue
        bad = good[:pos] + repl + good[pos + 1 :]
        assert not ids.is_valid_id_no(bad), bad


def test_id_transposition_detected() -> None:
    good = ids.make_id_no("110105", date(1950, 3, 17), 123)
    for i in range(16):
        if good[i] != good[i + 1]:
            bad = good[:i] + good[i + 1] + good[i] + good[i + 2 :]
            assert not ids.is_valid_id_no(bad)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("1101051949123100", "18 characters"),
        ("11010519491331002X", "not a calendar date"),  # month 13
        ("11010518991231002X", "plausible"),  # before 1900 (check char aside)
        ("1101051949123100A2", "17 digits"),
        ("110105194912310021", "MOD 11-2"),
    ],
)
def test_id_errors(value: str, fragment: str) -> None:
    with pytest.raises(IdError, match=fragment):
        ids.check_id_no(value)


def test_id_future_birth_date_rejected() -> None:
    future = ids.make_id_no("110105", date(2030, 1, 1), 1)
    assert not ids.is_valid_id_no(future, today=date(2026, 1, 1))
    assert ids.is_valid_id_no(future, today=date(2031, 1, 1))


def test_error_message_never_echoes_value() -> None:
    with pytest.raises(IdError) as err:
        ids.check_id_no("110105194912310021")
    assert "1101051949" not in str(err.value)
    with pytest.raises(IdError) as err:
        ids.check_card_no("6217000000000000013")
    assert "621700" not in str(err.value)


def test_card_no_luhn() -> None:
    assert ids.luhn_ok("79927398713")
    card = ids.make_card_no("621700", 1)
    assert card == "6217000000000000012" and ids.is_valid_card_no(card)
    assert not ids.is_valid_card_no("6217000000000000013")
    assert not ids.is_valid_card_no("79927398713")  # Luhn ok but not 19 digits


@given(
    st.from_regex(r"[0-9]{6}", fullmatch=True),
    st.integers(0, 10**12 - 1),
    st.integers(0, 18),
    st.integers(1, 9),
)
def test_card_no_single_digit_error_detected(prefix: str, serial: int, pos: int, delta: int) -> None:
    card = ids.make_card_no(prefix, serial)
    assert ids.is_valid_card_no(card) and len(card) == 19
    bad = card[:pos] + str((int(card[pos]) + delta) % 10) + card[pos + 1 :]
    assert not ids.is_valid_card_no(bad)


@given(
    st.dates(date(1900, 1, 1), date(2020, 12, 31)),
    st.integers(0, 999),
    st.from_regex(r"[1-8][0-9]{5}", fullmatch=True),
)
def test_make_id_no_always_valid(born: date, seq: int, district: str) -> None:
    id_no = ids.make_id_no(district, born, seq)
    assert ids.check_id_no(id_no) == id_no
    assert ids.id_birth_date(id_no) == born


@given(st.text(max_size=25))
def test_validators_total(value: str) -> None:
    for fn in (ids.is_valid_card_no, ids.is_valid_id_no, ids.is_valid_terminal_id, ids.is_valid_rrn):
        assert fn(value) in (True, False)


def test_masking() -> None:
    assert ids.mask_card_no("6217000000000000012") == "621700*********0012"
    assert ids.mask_id_no("110105194912311234") == "110105********1234"
    assert ids.mask_id_no("short") == "*****"
    assert ids.is_masked_card_no(ids.mask_card_no("6217000000000000012"))
    assert not ids.is_masked_card_no("6217000000000000012")


def test_mask_in_text() -> None:
    text = "card 6217000000000000012 id 11010519491231002X rrn 123456789012"
    out = ids.mask_in_text(text)
    assert out == "card 621700*********0012 id 110105********002X rrn 123456789012"


@pytest.mark.parametrize(
    ("check", "good", "bad"),
    [
        (ids.check_terminal_id, "T0000001", ["T000001", "T00000012", "T000 001", "T000000|"]),
        (ids.check_provider_id, "110105000000001", ["11010500000000", "１１０１０５０００００００１"[:15]]),
        (ids.check_batch_no, "000001", ["00001", "00000A"]),
        (ids.check_trace_no, "123456", ["1234567", "-12345"]),
        (ids.check_rrn, "000000123456", ["00000012345"]),
        (ids.check_auth_code, "A1B2C3", ["A1B2C"]),
        (ids.check_district_code, "110105", ["11010"]),
        (ids.check_street_code, "110105001", ["11010500"]),
    ],
)
def test_pos_identifiers(check, good: str, bad: list[str]) -> None:
    assert check(good) == good
    for b in bad:
        with pytest.raises(IdError):
            check(b)


def test_pydantic_types() -> None:
    from pydantic import BaseModel, ValidationError

    class Row(BaseModel):
        card_no: ids.CardNo
        id_no: ids.IdNo
        terminal_id: ids.TerminalId

    Row(card_no="6217000000000000012", id_no="11010519491231002X", terminal_id="T0000001")
    with pytest.raises(ValidationError):
        Row(card_no="6217000000000000013", id_no="11010519491231002X", terminal_id="T0000001")
