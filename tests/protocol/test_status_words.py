"""Status word table, patterns and helpers."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import status_words as sw


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0x9000, "9000 success"),
        (0x6A82, "6A82 file not found"),
        (0x9302, "9302 MAC invalid"),
        (0x9401, "9401 insufficient balance"),
        (0x6988, "6988 secure messaging data objects incorrect"),
        (0x6983, "6983 authentication method blocked"),
        (0x6110, "6110 16 response bytes available (GET RESPONSE)"),
        (0x6100, "6100 256 response bytes available (GET RESPONSE)"),
        (0x6C17, "6C17 wrong Le, correct Le is 23"),
        (0x63C1, "63C1 verification failed, 1 try left"),
        (0x63C0, "63C0 verification failed, 0 tries left"),
        (0x1234, "1234 unknown status"),
    ],
)
def test_describe(value: int, text: str) -> None:
    assert sw.describe(value) == text


def test_named_constants() -> None:
    assert (sw.SW_OK, sw.SW_FILE_NOT_FOUND, sw.SW_MAC_INVALID, sw.SW_SM_DATA_INCORRECT) == (
        0x9000,
        0x6A82,
        0x9302,
        0x6988,
    )
    assert (sw.SW_AUTH_BLOCKED, sw.SW_CONDITIONS_NOT_SATISFIED, sw.SW_SECURITY_NOT_SATISFIED) == (
        0x6983,
        0x6985,
        0x6982,
    )
    assert (sw.SW_WRONG_LENGTH, sw.SW_INS_NOT_SUPPORTED, sw.SW_CLA_NOT_SUPPORTED) == (0x6700, 0x6D00, 0x6E00)
    assert (sw.SW_RECORD_NOT_FOUND, sw.SW_INCORRECT_P1P2, sw.SW_INSUFFICIENT_BALANCE, sw.SW_WRONG_DATA) == (
        0x6A83,
        0x6A86,
        0x9401,
        0x6A80,
    )


def test_verify_failed_sequence() -> None:
    assert [sw.verify_failed(n) for n in (2, 1, 0)] == [0x63C2, 0x63C1, 0x63C0]
    assert sw.tries_left(0x63C2) == 2 and sw.tries_left(0x9000) is None
    with pytest.raises(ValueError):
        sw.verify_failed(16)


def test_pattern_helpers() -> None:
    assert sw.bytes_available(0x6108) == 8 and sw.bytes_available(0x6100) == 256
    assert sw.bytes_available(0x9000) is None
    assert sw.correct_le(0x6C04) == 4 and sw.correct_le(0x6A82) is None
    assert sw.bytes_available_sw(256) == 0x6100 and sw.wrong_le_sw(23) == 0x6C17


@given(st.integers(0, 0xFFFF))
def test_describe_total(value: int) -> None:
    text = sw.describe(value)
    assert text.startswith(f"{value:04X} ")


@given(st.integers().filter(lambda v: not 0 <= v <= 0xFFFF))
def test_describe_rejects_out_of_range(value: int) -> None:
    with pytest.raises(ValueError):
        sw.describe(value)
