"""Whole-input fuzz: every parser of this package fails only with its declared error, never crashes."""

from __future__ import annotations

import doctest
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import protocol.apdu
import protocol.ids
import protocol.money
import protocol.status_words
import protocol.tlv
from protocol.files.bank_file import BankFileError, parse_bank_file, read_bank_frame
from protocol.files.journal import LAYOUT as JOURNAL
from protocol.files.journal import JournalFileError, parse_journal, read_journal_polars
from protocol.files.recharge import LAYOUT as RECHARGE
from protocol.files.recharge import RechargeFileError, parse_recharge
from protocol.files.settlement import LAYOUT as SETTLEMENT
from protocol.files.settlement import SettlementFileError, parse_settlement

FUZZ = settings(
    max_examples=int(os.environ.get("CAREPAY_FUZZ_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
bank_like = st.lists(
    st.sampled_from(
        ["H|20260115|BOB|1|100", "D|", "T|1|100", "T|0|0", "|", "\r", "\x1f", "\ufeff", "100", "D||"]
    ),
    max_size=8,
).map("\n".join)


@FUZZ
@given(st.one_of(st.binary(max_size=300), bank_like.map(str.encode)))
def test_bank_file_random_bytes(tmp_path: Path, raw: bytes) -> None:
    path = tmp_path / "bank.txt"
    path.write_bytes(raw)
    for reader in (parse_bank_file, read_bank_frame):
        try:
            reader(path)
        except BankFileError:
            pass


csv_like = st.lists(
    st.sampled_from(
        [
            ",",
            '"',
            "\n",
            "\r\n",
            "0",
            "-1",
            "2026-01-15",
            "voucher",
            "PURCHASE",
            "000001",
            "x",
            "",
            "000000000001",
            "110105000000001",
            "T0000001",
            "621700*********0012",
            "2026-01-15T10:00:00Z",
            "SUCCESS",
            "6217000000000000012",
            "11010519491231002X",
            "202601",
            "B1",
            "10000",
        ]
    ),
    max_size=30,
).map("".join)


@FUZZ
@given(st.one_of(st.text(max_size=300), csv_like), st.binary(max_size=100))
def test_csv_parsers_random_text(tmp_path: Path, text: str, raw: bytes) -> None:
    for layout, parse, error in (
        (RECHARGE, parse_recharge, RechargeFileError),
        (SETTLEMENT, parse_settlement, SettlementFileError),
        (JOURNAL, parse_journal, JournalFileError),
    ):
        for candidate in (",".join(layout.header) + "\n" + text, "x\n" + text):
            try:
                parse(candidate)  # contains a newline: always text, never a file name
            except error:
                pass
    for content in (",".join(JOURNAL.header).encode() + b"\n" + text.encode(), raw):
        path = tmp_path / "j.csv"
        path.write_bytes(content)
        try:
            read_journal_polars(path)
        except JournalFileError:
            pass


@pytest.mark.parametrize(
    "module", [protocol.apdu, protocol.status_words, protocol.tlv, protocol.ids, protocol.money]
)
def test_doctests(module) -> None:
    result = doctest.testmod(module)
    assert result.failed == 0 and result.attempted > 0
