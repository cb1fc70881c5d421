"""Fen/yuan formatting and exact parsing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol.money import MAX_AMOUNT_FEN, MoneyError, check_amount_fen, format_fen, parse_fen, parse_yuan


@pytest.mark.parametrize(
    ("fen", "text"),
    [
        (123456, "1,234.56"),
        (0, "0.00"),
        (5, "0.05"),
        (-5, "-0.05"),
        (-123456789, "-1,234,567.89"),
        (100, "1.00"),
    ],
)
def test_format(fen: int, text: str) -> None:
    assert format_fen(fen) == text
    assert parse_yuan(text) == fen


@pytest.mark.parametrize(("text", "fen"), [("12", 1200), ("12.5", 1250), ("+0.01", 1), (" 1234.56 ", 123456)])
def test_parse(text: str, fen: int) -> None:
    assert parse_yuan(text) == fen


@pytest.mark.parametrize("bad", ["", "1.234", "1,23.00", "12,34", "abc", "1e3", "--1", "1.", ".5", "１２"])
def test_parse_rejects(bad: str) -> None:
    with pytest.raises(MoneyError):
        parse_yuan(bad)


def test_format_rejects_float() -> None:
    with pytest.raises(MoneyError):
        format_fen(1.5)  # type: ignore[arg-type]
    with pytest.raises(MoneyError):
        format_fen(True)  # type: ignore[arg-type]


def test_amount_checks() -> None:
    assert check_amount_fen(1) == 1
    assert check_amount_fen(0, allow_zero=True) == 0
    for bad in (0, -1, MAX_AMOUNT_FEN + 1):
        with pytest.raises(MoneyError):
            check_amount_fen(bad)
    assert parse_fen("10000") == 10000
    for bad in ("0", "-5", "1.00", "", "10 000", str(MAX_AMOUNT_FEN + 1)):
        with pytest.raises(MoneyError):
            parse_fen(bad)


@given(st.integers(-(10**15), 10**15))
def test_round_trip(fen: int) -> None:
    assert parse_yuan(format_fen(fen)) == fen
    assert parse_yuan(format_fen(fen, thousands=False)) == fen


@given(st.text(max_size=20))
def test_random_text_parses_or_moneyerror(text: str) -> None:
    try:
        fen = parse_yuan(text)
    except MoneyError:
        return
    assert isinstance(fen, int)
    assert parse_yuan(format_fen(fen)) == fen
