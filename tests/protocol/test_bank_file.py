"""Bank clearing file: round trips, whole-file rejection, scalar and columnar readers agree."""

from __future__ import annotations

import os
from dataclasses import dataclass, make_dataclass, replace
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.files.bank_file import (
    DEFAULT_LAYOUT,
    BankDetail,
    BankFileError,
    BankFileLayout,
    BankHeader,
    BankTrailer,
    details_frame_schema,
    format_bank_file,
    parse_bank_file,
    parse_bank_text,
    read_bank_file_polars,
    read_bank_frame,
    write_bank_file,
)
from protocol.files.fields import Date, Pattern
from protocol.files.layout import RecordLayout
from tests.protocol.strategies_files import bank_details

CST = timezone(timedelta(hours=8))
DAY = date(2026, 1, 15)
FILE_SETTINGS = settings(
    max_examples=int(os.environ.get("CAREPAY_FUZZ_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def detail(trace: int = 1, amount: int = 1000, **kw) -> BankDetail:
    base = BankDetail(
        rrn=f"{trace:012d}",
        provider_id="110105000000001",
        terminal_id="T0000001",
        batch_no="000001",
        trace_no=f"{trace:06d}",
        txn_type="PURCHASE",
        program="voucher",
        card_no_masked="621700*********0012",
        amount_fen=amount,
        fee_fen=3,
        txn_time=datetime(2026, 1, 15, 10, 0, tzinfo=CST),
        status="SUCCESS",
        orig_rrn=None,
    )
    return replace(base, **kw)


def sample_text(n: int = 3) -> str:
    return format_bank_file(DAY, "BOB", [detail(i, 100 * i) for i in range(1, n + 1)])


def test_format_matches_design() -> None:
    lines = sample_text(2).splitlines()
    assert lines[0] == "H|20260115|BOB|2|300"
    assert lines[1] == (
        "D|000000000001|110105000000001|T0000001|000001|000001|PURCHASE|voucher|"
        "621700*********0012|100|3|2026-01-15T10:00:00+08:00|SUCCESS|"
    )
    assert lines[-1] == "T|2|300"


def test_write_and_parse_file(tmp_path: Path) -> None:
    details = [detail(1), detail(2, txn_type="VOID", orig_rrn="000000000001"), detail(3, rrn=None)]
    path = write_bank_file(tmp_path / "bank.txt", DAY, "BOB", details)
    bank = parse_bank_file(path)
    assert bank.details == details
    assert bank.header == BankHeader(DAY, "BOB", 3, 3000)
    assert bank.trailer.record_count == 3 and bank.trailer.total_amount_fen == 3000


def test_empty_day(tmp_path: Path) -> None:
    path = write_bank_file(tmp_path / "bank.txt", DAY, "BOB", [])
    assert parse_bank_file(path).details == []
    assert read_bank_file_polars(path).height == 0


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda ls: [*ls[:-1], "T|4|600"], "trailer record_count 4"),
        (lambda ls: [*ls[:-1], "T|3|601"], "trailer total_amount_fen 601"),
        (lambda ls: ["H|20260115|BOB|2|600", *ls[1:]], "header record_count 2"),
        (lambda ls: ["H|20260115|BOB|3|1", *ls[1:]], "header total_amount_fen 1"),
        (lambda ls: [*ls[:2], ls[2] + "|extra", *ls[3:]], "line 3: detail record has 14 fields"),
        (lambda ls: [*ls[:2], "", *ls[2:]], "line 3"),
        (
            lambda ls: [*ls[:3], ls[3].replace("PURCHASE", "PAYMENT"), ls[4]],
            "line 4: txn_type must be one of",
        ),
        (lambda ls: [ls[0], ls[1].replace("+08:00", ""), *ls[2:]], "line 2: txn_time must be ISO 8601"),
        (lambda ls: [ls[0], ls[1].replace("|100|", "|-100|"), *ls[2:]], "line 2: amount_fen"),
        (
            lambda ls: [ls[0], ls[1].replace("621700*********0012", "6217000000000000012"), *ls[2:]],
            "line 2: card_no_masked",
        ),
        (
            lambda ls: [ls[0], ls[1].replace("D|", "X|", 1), *ls[2:]],
            "line 2: detail record must start with 'D'",
        ),
        (lambda ls: ls[1:], "line 1: header record must start with 'H'"),
        (lambda ls: ls[:-1], "line 4: trailer record must start with 'T'"),
        (
            lambda ls: [ls[0].replace("20260115", "20260230"), *ls[1:]],
            "line 1: business_date is not a calendar",
        ),
        (lambda ls: [ls[0], ls[1].replace("2026-01-15T10", "2026-02-30T10"), *ls[2:]], "line 2: txn_time"),
        (lambda ls: [ls[0], "D|" + "x" * 600, *ls[2:]], "line 2: longer than"),
        (lambda ls: ["H|20260115|BOB"], "at least a header and a trailer"),
    ],
)
def test_rejected_whole(tmp_path: Path, mutate, fragment: str) -> None:
    lines = mutate(sample_text().splitlines())
    path = tmp_path / "bank.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(BankFileError, match=fragment.replace("|", r"\|").replace("*", r"\*")):
        parse_bank_file(path)
    with pytest.raises(BankFileError, match=fragment.replace("|", r"\|").replace("*", r"\*")):
        read_bank_frame(path)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bank.txt"
    path.write_bytes(sample_text().encode() + b"\xff\xfe")
    with pytest.raises(BankFileError, match="not utf-8"):
        parse_bank_file(path)
    with pytest.raises(BankFileError):
        read_bank_frame(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BankFileError, match="cannot read"):
        parse_bank_file(tmp_path / "nope.txt")
    with pytest.raises(BankFileError, match="cannot read"):
        read_bank_frame(tmp_path / "nope.txt")


def test_crlf_and_bom_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bank.txt"
    path.write_bytes(b"\xef\xbb\xbf" + sample_text().replace("\n", "\r\n").encode())
    assert len(parse_bank_file(path).details) == 3
    assert read_bank_frame(path).details.height == 3


def test_zero_padded_amounts_accepted() -> None:
    text = sample_text(1).replace("|100|3|", "|0000000100|003|")
    assert parse_bank_text(text).details[0].amount_fen == 100


def test_polars_frame_types(tmp_path: Path) -> None:
    path = tmp_path / "bank.txt"
    path.write_text(sample_text(), encoding="utf-8")
    frame = read_bank_file_polars(path)
    assert dict(frame.schema) == details_frame_schema()
    assert frame["line_no"].to_list() == [2, 3, 4]
    assert frame["amount_fen"].sum() == 600
    assert frame["txn_time"][0] == datetime(2026, 1, 15, 2, 0, tzinfo=UTC)
    assert frame["orig_rrn"].null_count() == 3


def test_other_layout_is_a_declaration(tmp_path: Path) -> None:
    """A bank with comma separators, a header without totals and the amount before the RRN."""
    fields = {f.name: f for f in DEFAULT_LAYOUT.detail.fields}
    order = ["amount_fen", *[n for n in fields if n != "amount_fen"]]

    Detail = make_dataclass("OtherDetail", [(n, object) for n in order], frozen=True)

    @dataclass(frozen=True)
    class OtherHeader:  # this bank's header carries no count or total
        business_date: date
        bank_code: str

    layout = BankFileLayout(
        name="other-bank",
        separator=",",
        header=RecordLayout(
            "header",
            OtherHeader,
            (Date("business_date", fmt="%Y-%m-%d"), Pattern("bank_code", regex="[A-Z]{3}", what="3 letters")),
            tag="HDR",
        ),
        detail=RecordLayout("detail", Detail, tuple(fields[n] for n in order), tag="DTL"),
        trailer=RecordLayout("trailer", BankTrailer, DEFAULT_LAYOUT.trailer.fields, tag="END"),
        encoding="gbk",
    )
    text = (
        "HDR,2026-01-15,BOB\n"
        "DTL,500,000000000001,110105000000001,T0000001,000001,000001,PURCHASE,nursing,621700*********0012,"
        "0,2026-01-15T10:00:00+08:00,SUCCESS,\n"
        "END,1,500\n"
    )
    bank = parse_bank_text(text, layout)
    assert bank.details[0].amount_fen == 500 and bank.details[0].program == "nursing"
    with pytest.raises(BankFileError, match="trailer total_amount_fen 501"):
        parse_bank_text(text.replace("END,1,500", "END,1,501"), layout)
    assert format_bank_file(DAY, "BOB", bank.details, layout) == text
    path = tmp_path / "other.txt"
    path.write_text(text, encoding="gbk")
    frame = read_bank_frame(path, layout)
    assert frame.header.bank_code == "BOB" and frame.details["amount_fen"].to_list() == [500]
    assert parse_bank_file(path, layout).details == bank.details
    path.write_text(text.replace(",nursing,", ",dental,"), encoding="gbk")
    with pytest.raises(BankFileError, match="line 2: program must be one of"):
        read_bank_frame(path, layout)


@FILE_SETTINGS
@given(st.lists(bank_details, max_size=20))
def test_round_trip(tmp_path: Path, details: list[BankDetail]) -> None:
    text = format_bank_file(DAY, "BOB", details)
    bank = parse_bank_text(text)
    assert bank.details == details
    path = tmp_path / "rt.txt"
    path.write_text(text, encoding="utf-8")
    frame = read_bank_file_polars(path)
    assert frame.height == len(details)
    assert frame["amount_fen"].to_list() == [d.amount_fen for d in details]
    assert frame["rrn"].to_list() == [d.rrn for d in details]
    assert frame["txn_time"].to_list() == [d.txn_time for d in details]


line_alphabet = st.sampled_from(list("D|0123456789AT*-:+.T voucherPURCHASESUCCESS"))
detail_like = st.lists(
    st.sampled_from(
        [
            "D",
            "",
            "000000000001",
            "110105000000001",
            "T0000001",
            "000001",
            "PURCHASE",
            "voucher",
            "621700*********0012",
            "100",
            "0",
            "2026-01-15T10:00:00+08:00",
            "SUCCESS",
            "x",
            "-1",
            "2026-01-15T10:00:00Z",
            "00000000000A",
            "nursing",
            "REFUND",
        ]
    ),
    min_size=12,
    max_size=15,
).map("|".join)


VALID_FIELDS = DEFAULT_LAYOUT.detail.format_line(detail(), "|").split("|")
one_field_swapped = st.tuples(st.integers(0, len(VALID_FIELDS) - 1), detail_like).map(
    lambda t: "|".join([*VALID_FIELDS[: t[0]], t[1].split("|")[0], *VALID_FIELDS[t[0] + 1 :]])
)


@FILE_SETTINGS
@given(st.one_of(st.text(line_alphabet, max_size=120), detail_like, one_field_swapped, st.text(max_size=60)))
def test_random_line_rejected_or_really_valid(tmp_path: Path, line: str) -> None:
    """A random line in place of a detail: both readers agree, and accept only a genuinely valid detail."""
    lines = sample_text(2).splitlines()
    lines[1] = line.replace("\n", " ").replace("\r", " ")
    text = "\n".join(lines) + "\n"
    path = tmp_path / "fuzz.txt"
    path.write_text(text, encoding="utf-8")
    try:
        scalar = parse_bank_text(text)
    except BankFileError as exc:
        with pytest.raises(BankFileError) as err:
            read_bank_frame(path)
        assert str(err.value).split(":")[0] == str(exc).split(":")[0]  # same line or same total reason
        return
    frame = read_bank_frame(path)
    d = scalar.details[0]
    # accepted: then it is a real detail, field by field, and writes back as an equivalent line
    again = DEFAULT_LAYOUT.detail.parse_line(DEFAULT_LAYOUT.detail.format_line(d, "|"), "|")
    assert again == d
    assert frame.details.height == 2
    assert frame.details["amount_fen"][0] == d.amount_fen


def test_many_rows_polars_quick(tmp_path: Path) -> None:
    n = 50_000
    d = detail()
    line = DEFAULT_LAYOUT.detail.format_line(d, "|")
    path = tmp_path / "big.txt"
    path.write_text(f"H|20260115|BOB|{n}|{n * 1000}\n" + (line + "\n") * n + f"T|{n}|{n * 1000}\n")
    frame = read_bank_file_polars(path)
    assert frame.height == n and frame["amount_fen"].sum() == n * 1000
    assert isinstance(frame, pl.DataFrame)


def test_swapped_field_accepted_when_valid(tmp_path: Path) -> None:
    """The swap strategy above can produce accepted lines: a valid replacement is accepted by both readers."""
    fields = list(VALID_FIELDS)
    fields[9] = "0"  # amount_fen 0 is valid
    lines = sample_text(2).splitlines()
    lines[1] = "|".join(fields)
    lines[0], lines[-1] = "H|20260115|BOB|2|200", "T|2|200"
    text = "\n".join(lines) + "\n"
    (tmp_path / "b.txt").write_text(text)
    assert parse_bank_text(text).details[0].amount_fen == 0
    assert read_bank_frame(tmp_path / "b.txt").details["amount_fen"][0] == 0


def test_unit_separator_in_a_line_both_readers_name_the_line(tmp_path: Path) -> None:
    # found by hypothesis: a detail line that is just "\x1f" made the polars reader fail on the column split
    lines = sample_text(2).splitlines()
    lines[1] = "\x1f"
    text = "\n".join(lines) + "\n"
    path = tmp_path / "sep.txt"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(BankFileError) as scalar:
        parse_bank_text(text)
    with pytest.raises(BankFileError) as frame:
        read_bank_frame(path)
    assert str(frame.value) == str(scalar.value) and str(frame.value).startswith("line 2")
