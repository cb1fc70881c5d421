"""Provider settlement file and journal export: round trips, checks, columnar reader."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.files.journal import (
    JournalFileError,
    JournalRow,
    format_journal,
    parse_journal,
    read_journal_polars,
    write_journal,
)
from protocol.files.settlement import (
    SettlementFileError,
    SettlementRow,
    format_settlement,
    parse_settlement,
    write_settlement,
)
from tests.protocol.strategies_files import journal_rows, settlement_rows

CST = timezone(timedelta(hours=8))
SETTLEMENT_HEADER = (
    "business_date,provider_id,provider_name,settle_account,purchase_count,purchase_fen,void_count,"
    "void_fen,refund_count,refund_fen,net_fen,fee_fen"
)
JOURNAL_HEADER = (
    "rrn,business_date,provider_id,terminal_id,batch_no,trace_no,txn_type,program,card_no_masked,"
    "amount_fen,fee_fen,txn_time,status,orig_rrn"
)


def srow(**kw) -> SettlementRow:
    base = SettlementRow(
        date(2026, 1, 15),
        "110105000000001",
        "朝阳区某某养老驿站, 第一分店",
        "6217000000000000012",
        10,
        100000,
        1,
        10000,
        2,
        5000,
        85000,
        300,
    )
    return replace(base, **kw)


def jrow(**kw) -> JournalRow:
    base = JournalRow(
        "000000000001",
        date(2026, 1, 15),
        "110105000000001",
        "T0000001",
        "000001",
        "000001",
        "PURCHASE",
        "voucher",
        "621700*********0012",
        1000,
        3,
        datetime(2026, 1, 15, 10, 0, tzinfo=CST),
        "SUCCESS",
        None,
    )
    return replace(base, **kw)


def test_settlement_header_and_quoting(tmp_path: Path) -> None:
    path = write_settlement(
        tmp_path / "s.csv",
        [srow(), srow(provider_id="110105000000002", net_fen=-5000, purchase_fen=0, void_fen=0)],
    )
    text = path.read_text(encoding="utf-8")
    assert text.splitlines()[0] == SETTLEMENT_HEADER
    assert '"朝阳区某某养老驿站, 第一分店"' in text
    rows = parse_settlement(path)
    assert rows[0] == srow() and rows[1].net_fen == -5000


def test_settlement_net_must_add_up() -> None:
    with pytest.raises(SettlementFileError, match="net_fen 1 is not purchase - void - refund = 85000"):
        format_settlement([srow(net_fen=1)])
    text = format_settlement([srow()]).replace(",85000,", ",85001,")
    with pytest.raises(SettlementFileError, match="line 2: net_fen 85001"):
        parse_settlement(text)


def test_settlement_bad_header() -> None:
    with pytest.raises(SettlementFileError, match="header must be"):
        parse_settlement("business_date,provider\n")


@settings(max_examples=40, deadline=None)
@given(st.lists(settlement_rows(), max_size=10))
def test_settlement_round_trip(rows: list[SettlementRow]) -> None:
    assert parse_settlement(format_settlement(rows)) == rows


def test_journal_round_trip_and_polars(tmp_path: Path) -> None:
    rows = [jrow(), jrow(rrn="000000000002", txn_type="VOID", orig_rrn="000000000001")]
    path = write_journal(tmp_path / "j.csv", rows)
    assert path.read_text().splitlines()[0] == JOURNAL_HEADER
    assert parse_journal(path) == rows
    frame = read_journal_polars(path)
    assert frame["line_no"].to_list() == [2, 3]
    assert frame["orig_rrn"].to_list() == [None, "000000000001"]
    assert frame["business_date"][0] == date(2026, 1, 15)
    assert frame["txn_time"][0] == datetime(2026, 1, 15, 2, 0, tzinfo=UTC)


def test_journal_extra_columns_and_reordering(tmp_path: Path) -> None:
    text = format_journal([jrow()])
    header, body = text.splitlines()
    cols, vals = header.split(","), body.split(",")
    text2 = ",".join(["note", *reversed(cols)]) + "\n" + ",".join(["hello", *reversed(vals)]) + "\n"
    assert parse_journal(text2) == [jrow()]
    (tmp_path / "j.csv").write_text(text2)
    assert read_journal_polars(tmp_path / "j.csv")["rrn"].to_list() == ["000000000001"]


def test_journal_missing_column() -> None:
    text = format_journal([jrow()]).replace("orig_rrn", "original")
    with pytest.raises(JournalFileError, match="lacks column"):
        parse_journal(text)


def test_journal_bad_line_named(tmp_path: Path) -> None:
    text = format_journal([jrow(), jrow()]).replace("PURCHASE", "PAY", 2)
    lines = text.splitlines()
    lines[1] = lines[1].replace("PAY", "PURCHASE")
    text = "\n".join(lines) + "\n"
    with pytest.raises(JournalFileError, match="line 3: txn_type"):
        parse_journal(text)
    (tmp_path / "j.csv").write_text(text)
    with pytest.raises(JournalFileError, match="line 3: txn_type"):
        read_journal_polars(tmp_path / "j.csv")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(journal_rows, max_size=12))
def test_journal_round_trip_both_readers(tmp_path: Path, rows: list[JournalRow]) -> None:
    text = format_journal(rows)
    assert parse_journal(text) == rows
    path = tmp_path / "j.csv"
    path.write_text(text, encoding="utf-8")
    frame = read_journal_polars(path)
    assert frame.height == len(rows)
    assert frame["amount_fen"].to_list() == [r.amount_fen for r in rows]
    assert frame["txn_time"].to_list() == [r.txn_time for r in rows]
