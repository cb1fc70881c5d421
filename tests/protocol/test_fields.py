"""Field types: the scalar parser and the vectorised (polars) check accept exactly the same texts."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.files import txn_fields as tf
from protocol.files.fields import Choice, Date, FieldError, FreeText, Int, Pattern
from protocol.files.layout import LINE_NO_COLUMN, LineError, RecordLayout

FIELDS = [
    tf.rrn(optional=True),
    tf.PROVIDER_ID,
    tf.BATCH_NO,
    tf.TXN_TYPE,
    tf.CARD_NO_MASKED,
    tf.AMOUNT_FEN,
    Int("net_fen", low=-1000, high=1000),
    Date("d8", fmt="%Y%m%d"),
    Date("d10", fmt="%Y-%m-%d", optional=True),
    tf.TXN_TIME,
    FreeText("name", max_chars=10),
]

pieces = st.sampled_from(
    [
        "0",
        "1",
        "9",
        "-",
        "+",
        "Z",
        "T",
        ":",
        ".",
        "*",
        "a",
        "A",
        " ",
        "2026",
        "12",
        "31",
        "02",
        "30",
        "+08:00",
        "PURCHASE",
        "621700",
        "****",
        "٣",
        "\x00",
        "|",
        "é",
    ]
)
texts = st.one_of(st.lists(pieces, max_size=12).map("".join), st.text(max_size=30))


def scalar(field, text):
    try:
        return True, field.parse(text)
    except FieldError:
        return False, None


@settings(max_examples=300, deadline=None)
@given(st.lists(texts, min_size=1, max_size=20))
def test_scalar_and_columnar_agree(values: list[str]) -> None:
    frame = pl.DataFrame({"v": values})
    for field in FIELDS:
        out = frame.select(
            field.pl_valid(pl.col("v")).alias("ok"),
            field.pl_convert(pl.col("v")).cast(field.pl_dtype).alias("val"),
        )
        for text, ok, val in zip(values, out["ok"], out["val"], strict=True):
            s_ok, s_val = scalar(field, text)
            assert s_ok == ok, (field.name, text)
            if ok:
                assert s_val == val, (field.name, text)


@pytest.mark.parametrize(
    ("field", "good", "bad"),
    [
        (
            tf.TXN_TIME,
            ["2026-01-15T10:00:00+08:00", "2026-01-15T10:00:00.5Z", "2026-01-15T10:00:00.123456-05:30"],
            [
                "2026-01-15T10:00:00",
                "2026-01-15 10:00:00+08:00",
                "2026-02-30T10:00:00+08:00",
                "2026-01-15T10:00:00+0800",
            ],
        ),
        (tf.AMOUNT_FEN, ["0", "100", "0000100"], ["-1", "+1", "1.0", " 1", "", "99999999999999999999"]),
        (tf.CARD_NO_MASKED, ["621700*********0012"], ["6217000000000000012", "621700********0012"]),
        (Date("d", fmt="%Y%m%d"), ["20240229"], ["20230229", "2024-02-29", "2024022"]),
        (Choice("c", values=("A", "B")), ["A"], ["a", "C", ""]),
        (FreeText("n", max_chars=5), ["养老驿站"], ["养老驿站一二", "a|b", "a\tb"]),
        (Pattern("p", regex="[0-9]{2}", what="2 digits"), ["12"], ["1", "123", "١٢"]),
    ],
)
def test_field_examples(field, good: list[str], bad: list[str]) -> None:
    for g in good:
        field.parse(g)
    for b in bad:
        with pytest.raises(FieldError):
            field.parse(b)


def test_datetime_value_and_format() -> None:
    value = tf.TXN_TIME.parse("2026-01-15T10:00:00Z")
    assert value == datetime(2026, 1, 15, 10, tzinfo=UTC)
    assert tf.TXN_TIME.format(value) == "2026-01-15T10:00:00+00:00"
    with pytest.raises(FieldError, match="time zone"):
        tf.TXN_TIME.format(datetime(2026, 1, 15, 10))


def test_format_checks_values() -> None:
    with pytest.raises(FieldError):
        tf.AMOUNT_FEN.format(-1)
    with pytest.raises(FieldError):
        tf.AMOUNT_FEN.format(1.5)
    with pytest.raises(FieldError):
        tf.TXN_TYPE.format("PAY")
    with pytest.raises(FieldError, match="required"):
        tf.PROVIDER_ID.format(None)
    assert tf.ORIG_RRN.format(None) == ""
    with pytest.raises(FieldError):
        Date("d").format(datetime(2026, 1, 1))


def test_error_messages_do_not_echo_values() -> None:
    with pytest.raises(FieldError) as err:
        tf.CARD_NO_MASKED.parse("6217000000000000012")
    assert "6217000000000000012" not in str(err.value)


def test_layout_declaration_must_match_record() -> None:
    @dataclass(frozen=True)
    class Rec:
        a: int
        b: str

    with pytest.raises(TypeError, match="differ"):
        RecordLayout("x", Rec, (Int("a"), Pattern("c", regex="x", what="x")))
    layout = RecordLayout("x", Rec, (Int("a"), Pattern("b", regex="[a-z]+", what="letters")), tag="R")
    assert layout.parse_line("R|5|abc", "|") == Rec(5, "abc")
    assert layout.format_line(Rec(5, "abc"), "|") == "R|5|abc"
    with pytest.raises(FieldError, match="3 fields, expected 2"):
        layout.parse_line("R|5|abc|d", "|")  # 3 values after the tag
    frame = pl.DataFrame({LINE_NO_COLUMN: [7, 8], "a": ["1", "x"], "b": ["ab", "cd"]})
    with pytest.raises(LineError, match="line 8: a must be a whole number") as err:
        layout.pl_typed(frame)
    assert err.value.line_no == 8


def test_optional_date_columnar_null() -> None:
    field = Date("d", optional=True)
    out = pl.DataFrame({"v": ["", "2026-01-01"]}).select(field.pl_convert(pl.col("v")).cast(pl.Date))
    assert out.to_series().to_list() == [None, date(2026, 1, 1)]
