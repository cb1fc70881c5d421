"""Provider settlement file (服务商结算文件): what each provider is paid for one business date.

CSV, UTF-8, header ``business_date,provider_id,provider_name,settle_account,purchase_count,
purchase_fen,void_count,void_fen,refund_count,refund_fen,net_fen,fee_fen``. ``net_fen`` is what the
provider is paid (purchases - voids - refunds; negative when refunds of earlier days outweigh the
day's purchases); ``fee_fen`` is borne by the issuing bank, not taken from the provider.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from protocol.files import txn_fields as tf
from protocol.files.fields import Date, FreeText, Int, Pattern
from protocol.files.layout import CsvLayout, RecordLayout
from protocol.money import MAX_TOTAL_FEN

MAX_SETTLEMENT_LINES = 100_000  # providers in one file
MAX_SETTLEMENT_LINE_CHARS = 1024
MAX_SETTLEMENT_FILE_BYTES = MAX_SETTLEMENT_LINES * MAX_SETTLEMENT_LINE_CHARS
MAX_PROVIDER_NAME_CHARS = 100
MAX_COUNT = 100_000_000


class SettlementFileError(ValueError):
    """A settlement file that cannot be read or written; the message names the line."""


@dataclass(frozen=True)
class SettlementRow:
    business_date: date
    provider_id: str
    provider_name: str
    settle_account: str
    purchase_count: int
    purchase_fen: int
    void_count: int
    void_fen: int
    refund_count: int
    refund_fen: int
    net_fen: int
    fee_fen: int


def _net_is_consistent(row: SettlementRow) -> str | None:
    expected = row.purchase_fen - row.void_fen - row.refund_fen
    if row.net_fen != expected:
        return f"net_fen {row.net_fen} is not purchase - void - refund = {expected}"
    return None


def _count(name: str) -> Int:
    return Int(name, low=0, high=MAX_COUNT)


def _fen(name: str) -> Int:
    return Int(name, low=0, high=MAX_TOTAL_FEN)


LAYOUT = CsvLayout(
    RecordLayout(
        "settlement",
        SettlementRow,
        (
            Date("business_date"),
            tf.PROVIDER_ID,
            FreeText("provider_name", max_chars=MAX_PROVIDER_NAME_CHARS, forbidden=""),
            Pattern("settle_account", regex="[0-9A-Za-z-]{1,40}", what="1-40 letters, digits or -"),
            _count("purchase_count"),
            _fen("purchase_fen"),
            _count("void_count"),
            _fen("void_fen"),
            _count("refund_count"),
            _fen("refund_fen"),
            Int("net_fen", low=-MAX_TOTAL_FEN, high=MAX_TOTAL_FEN),
            _fen("fee_fen"),
        ),
        checks=(_net_is_consistent,),
    ),
    max_line_chars=MAX_SETTLEMENT_LINE_CHARS,
    max_lines=MAX_SETTLEMENT_LINES,
)


def format_settlement(rows: Iterable[SettlementRow]) -> str:
    return LAYOUT.format_or_raise(rows, SettlementFileError, "settlement file")


def write_settlement(path: str | Path, rows: Iterable[SettlementRow]) -> Path:
    path = Path(path)
    path.write_text(format_settlement(rows), encoding="utf-8")
    return path


def parse_settlement(path_or_text: str | Path) -> list[SettlementRow]:
    """Read a settlement file; SettlementFileError on the first bad line (a file we wrote is all good)."""
    return LAYOUT.parse_all(path_or_text, MAX_SETTLEMENT_FILE_BYTES, SettlementFileError, "settlement file")
