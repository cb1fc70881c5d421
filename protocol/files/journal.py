"""Journal export (交易流水): every host transaction of a business date, one row each.

CSV, UTF-8, header ``rrn,business_date,provider_id,terminal_id,batch_no,trace_no,txn_type,program,
card_no_masked,amount_fen,fee_fen,txn_time,status,orig_rrn`` — the bank detail line's fields plus
``business_date``, declared from the same field rules (``txn_fields``) so the two compare column
for column. Readers accept extra columns (the export may carry more, "at least" these).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path

import polars as pl

from protocol.files import txn_fields as tf
from protocol.files.fields import Date, FieldError
from protocol.files.layout import CsvLayout, LineError, RecordLayout

MAX_JOURNAL_LINES = 20_000_000
MAX_JOURNAL_LINE_CHARS = 512
MAX_JOURNAL_FILE_BYTES = MAX_JOURNAL_LINES * 200


class JournalFileError(ValueError):
    """A journal export that cannot be read or written; the message names the line."""


@dataclass(frozen=True)
class JournalRow:
    rrn: str
    business_date: date
    provider_id: str
    terminal_id: str
    batch_no: str
    trace_no: str
    txn_type: str
    program: str
    card_no_masked: str
    amount_fen: int
    fee_fen: int
    txn_time: datetime
    status: str
    orig_rrn: str | None


LAYOUT = CsvLayout(
    RecordLayout(
        "journal",
        JournalRow,
        (
            tf.rrn(),
            Date("business_date"),
            tf.PROVIDER_ID,
            tf.TERMINAL_ID,
            tf.BATCH_NO,
            tf.TRACE_NO,
            tf.TXN_TYPE,
            tf.PROGRAM,
            tf.CARD_NO_MASKED,
            tf.AMOUNT_FEN,
            tf.FEE_FEN,
            tf.TXN_TIME,
            tf.STATUS,
            tf.ORIG_RRN,
        ),
    ),
    max_line_chars=MAX_JOURNAL_LINE_CHARS,
    max_lines=MAX_JOURNAL_LINES,
    extra_columns_ok=True,
)


def format_journal(rows: Iterable[JournalRow]) -> str:
    return LAYOUT.format_or_raise(rows, JournalFileError, "journal")


def write_journal(path: str | Path, rows: Iterable[JournalRow]) -> Path:
    path = Path(path)
    path.write_text(format_journal(rows), encoding="utf-8")
    return path


def parse_journal(path_or_text: str | Path) -> list[JournalRow]:
    """Read a journal export row by row; JournalFileError on the first bad line."""
    return LAYOUT.parse_all(path_or_text, MAX_JOURNAL_FILE_BYTES, JournalFileError, "journal")


def read_journal_polars(path: str | Path) -> pl.DataFrame:
    """A journal export as a typed DataFrame (``line_no`` plus the declared columns)."""
    try:
        return LAYOUT.read_polars(path)
    except LineError as exc:
        raise JournalFileError(str(exc)) from None
    except FieldError as exc:
        raise JournalFileError(f"journal rejected: {exc}") from None
    except pl.exceptions.PolarsError as exc:
        raise JournalFileError(f"journal unreadable: {str(exc).splitlines()[0]}") from None
