"""Recharge file: header, every line validated, rejects with reasons (masked), round trip."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.files.recharge import (
    LAYOUT,
    MAX_RECHARGE_LINE_CHARS,
    RechargeFileError,
    RechargeLine,
    format_recharge,
    parse_recharge,
    write_recharge,
)
from protocol.ids import make_card_no, make_id_no
from tests.protocol.strategies_files import recharge_lines

HEADER = "batch_id,card_no,id_no,program,amount_fen,period,expires_on"
CARD = make_card_no("621700", 42)
ID_NO = "11010519491231002X"


def line(**kw) -> str:
    fields = {
        "batch_id": "B202601",
        "card_no": CARD,
        "id_no": ID_NO,
        "program": "voucher",
        "amount_fen": "10000",
        "period": "202601",
        "expires_on": "2026-12-31",
    } | kw
    return ",".join(fields.values())


def test_valid_file(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    path.write_text(f"{HEADER}\n{line()}\n{line(card_no=make_card_no('621700', 43), expires_on='')}\n")
    result = parse_recharge(path)
    assert result.ok and result.batch_id == "B202601" and result.total_fen == 20000
    assert result.lines[0] == RechargeLine(
        "B202601", CARD, ID_NO, "voucher", 10000, "202601", date(2026, 12, 31)
    )
    assert result.lines[1].expires_on is None
    assert parse_recharge(str(path)).lines == result.lines  # a str naming the file works too


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (line(card_no=CARD[:-1] + str((int(CARD[-1]) + 1) % 10)), "Luhn"),
        (line(card_no=CARD[:-1]), "card_no must be 19 digits"),
        (line(id_no="110105194912310021"), "MOD 11-2"),
        (line(id_no="11010519491331002X"), "calendar date"),
        (line(program="restricted"), "program must be one of voucher, nursing"),
        (line(amount_fen="0"), "amount_fen must be within 1.."),
        (line(amount_fen="-100"), "amount_fen must be a whole number"),
        (line(amount_fen="100.00"), "amount_fen must be a whole number"),
        (line(period="202613"), "period must be a month"),
        (line(expires_on="2026-02-30"), "calendar date"),
        (line(expires_on="2025-12-31"), "before the start of the period"),
        (line(batch_id="B202602"), "batch_id differs"),
        (line() + ",extra", "8 columns"),
        (line(program='"vou,cher"'), "program must be one of"),
        ("x" * (MAX_RECHARGE_LINE_CHARS + 1), "longer than"),
        (line(), "same card, program and period as line 2"),
    ],
)
def test_rejects_with_reason(bad: str, reason: str) -> None:
    result = parse_recharge(f"{HEADER}\n{line()}\n{bad}\n")
    assert len(result.lines) == 1 and not result.ok
    [reject] = result.rejects
    assert reject.line_no == 3 and reason in reject.reason, reject.reason


def test_rejects_are_masked() -> None:
    result = parse_recharge(f"{HEADER}\n{line()}\n{line(amount_fen='0')}\n")
    _line_no, raw, _reason = result.rejects[0]
    assert CARD not in raw and ID_NO not in raw
    assert "621700*********" in raw and "110105********002X" in raw
    assert CARD not in repr(result.lines[0]) and ID_NO not in repr(result.lines[0])


def test_lowercase_x_normalised() -> None:
    result = parse_recharge(f"{HEADER}\n{line(id_no=ID_NO.lower())}\n")
    assert result.lines[0].id_no == ID_NO


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "no header"),
        ("batch_id,card_no,id_no,program,amount,period,expires_on\n", "header must be"),
        (f"{line()}\n", "header must be"),
    ],
)
def test_bad_file_raises(text: str, fragment: str) -> None:
    with pytest.raises(RechargeFileError, match=fragment):
        parse_recharge(text)
    with pytest.raises(RechargeFileError, match="no header"):
        parse_recharge("\n")


def test_blank_lines_skipped_and_bom() -> None:
    result = parse_recharge(f"\ufeff{HEADER}\r\n\r\n{line()}\r\n\r\n")
    assert result.ok and len(result.lines) == 1
    assert result.line_nos == [3]


def test_missing_file_and_not_utf8(tmp_path: Path) -> None:
    with pytest.raises(RechargeFileError, match=r"cannot read missing\.csv"):
        parse_recharge(str(tmp_path / "missing.csv"))
    (tmp_path / "gbk.csv").write_bytes(f"{HEADER}\n{line()},养老\n".encode("gbk"))
    with pytest.raises(RechargeFileError, match="not UTF-8"):
        parse_recharge(tmp_path / "gbk.csv")


def test_header_only_is_not_ok() -> None:
    result = parse_recharge(f"{HEADER}\n")
    assert result.lines == [] and not result.ok


def test_write_round_trip(tmp_path: Path) -> None:
    lines = [
        RechargeLine(
            "B1",
            make_card_no("621700", i),
            make_id_no("110105", date(1940, 5, 6), i),
            "nursing",
            5000 + i,
            "202602",
            None,
        )
        for i in range(5)
    ]
    path = write_recharge(tmp_path / "r.csv", lines)
    assert path.read_text().splitlines()[0] == HEADER
    assert parse_recharge(path).lines == lines


def test_writer_refuses_invalid() -> None:
    bad = RechargeLine("B1", "6217000000000000013", ID_NO, "voucher", 100, "202601", None)
    with pytest.raises(RechargeFileError, match="Luhn"):
        format_recharge([bad])


@settings(max_examples=50, deadline=None)
@given(st.lists(recharge_lines(), max_size=15, unique_by=lambda r: (r.card_no, r.program, r.period)))
def test_round_trip(lines: list[RechargeLine]) -> None:
    result = parse_recharge(format_recharge(lines))
    assert result.lines == lines and result.rejects == []


fields_pool = st.sampled_from(
    [
        "B202601",
        CARD,
        ID_NO,
        "voucher",
        "nursing",
        "10000",
        "202601",
        "2026-12-31",
        "",
        "0",
        "x",
        "6217000000000000013",
        "110105194912310021",
        "202613",
        "-1",
        '"',
    ]
)


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.lists(fields_pool, min_size=5, max_size=9).map(",".join), st.text(max_size=80)))
def test_random_line_is_rejected_or_really_valid(raw: str) -> None:
    raw = raw.replace("\n", " ").replace("\r", " ")
    result = parse_recharge(f"{HEADER}\n{line()}\n{raw}\n")
    if result.rejects:
        assert [r.line_no for r in result.rejects] == [3]
        return
    if len(result.lines) == 1:  # blank line skipped
        assert not raw.strip()
        return
    rec = result.lines[1]
    # accepted: every rule really holds
    assert rec.batch_id == "B202601" and rec.program in ("voucher", "nursing") and rec.amount_fen > 0
    assert LAYOUT.record.from_values(LAYOUT.record.to_values(rec)) == rec
