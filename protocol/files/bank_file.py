"""Bank clearing file (银行清算文件): header, detail lines, trailer; one file per business date.

Default layout (DESIGN.md "File formats"), fields separated by ``|``::

    H|YYYYMMDD|bank_code|record_count|total_amount_fen
    D|rrn|provider_id|terminal_id|batch_no|trace_no|txn_type|program|card_no_masked|amount_fen|fee_fen|txn_time|status|orig_rrn
    T|record_count|total_amount_fen

``total_amount_fen`` is the sum of ``amount_fen`` over every detail line (amounts are unsigned; the
``txn_type`` says which way the money went). A file whose detail count or total disagrees with its
header or trailer, or with one malformed line, is rejected whole (BankFileError names the line).

Another bank's layout is another ``BankFileLayout`` value: other separator, other field order, a
header without totals. Two readers share it: ``parse_bank_file`` (records, every field checked in
Python) and ``read_bank_file_polars`` (columnar, for 1M-10M rows, the same rules vectorised).
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

import polars as pl

from protocol.files import txn_fields as tf
from protocol.files.fields import Date, FieldError, Int, Pattern
from protocol.files.layout import LINE_NO_COLUMN, LineError, RecordLayout, split_lines
from protocol.money import MAX_TOTAL_FEN

MAX_BANK_LINE_CHARS = 512
MAX_BANK_FILE_LINES = 20_000_000  # 10M details is the design load; twice that is refused unread
MAX_BANK_FILE_BYTES = MAX_BANK_FILE_LINES * 200
MAX_RECORDS_PYTHON = 2_000_000  # above this, parse_bank_file refuses: use read_bank_file_polars


class BankFileError(ValueError):
    """The bank file is rejected whole; the message gives the reason (and the line number)."""


@dataclass(frozen=True)
class BankHeader:
    business_date: date
    bank_code: str
    record_count: int | None
    total_amount_fen: int | None


@dataclass(frozen=True)
class BankDetail:
    """One transaction as the bank cleared it (明细)."""

    rrn: str | None
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


@dataclass(frozen=True)
class BankTrailer:
    record_count: int
    total_amount_fen: int


@dataclass(frozen=True)
class BankFile:
    header: BankHeader
    details: list[BankDetail]
    trailer: BankTrailer


@dataclass(frozen=True)
class BankFileLayout:
    """A bank's clearing-file layout.

    Conventions the engine relies on: the header record has ``business_date`` and may have
    ``record_count`` / ``total_amount_fen`` (checked when present); the trailer has both; the
    detail record has ``amount_fen`` (summed) and the reconciliation columns by these names.
    """

    name: str
    separator: str
    header: RecordLayout
    detail: RecordLayout
    trailer: RecordLayout
    encoding: str = "utf-8"
    max_line_chars: int = MAX_BANK_LINE_CHARS


COUNT = Int("record_count", low=0, high=MAX_BANK_FILE_LINES)
TOTAL = Int("total_amount_fen", low=0, high=MAX_TOTAL_FEN)

DEFAULT_LAYOUT = BankFileLayout(
    name="carepay-default",
    separator="|",
    header=RecordLayout(
        "header",
        BankHeader,
        (
            Date("business_date", fmt="%Y%m%d"),
            Pattern("bank_code", regex="[0-9A-Za-z]{1,20}", what="1-20 letters or digits"),
            COUNT,
            TOTAL,
        ),
        tag="H",
    ),
    detail=RecordLayout(
        "detail",
        BankDetail,
        (
            tf.rrn(optional=True),
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
        tag="D",
    ),
    trailer=RecordLayout("trailer", BankTrailer, (COUNT, TOTAL), tag="T"),
)


def _check_totals(header: Any, trailer: Any, count: int, total_fen: int) -> None:
    checks = (
        (
            "trailer",
            "record_count",
            getattr(trailer, "record_count", None),
            count,
            "the file has",
            "detail lines",
        ),
        (
            "trailer",
            "total_amount_fen",
            getattr(trailer, "total_amount_fen", None),
            total_fen,
            "detail lines sum to",
            "",
        ),
        (
            "header",
            "record_count",
            getattr(header, "record_count", None),
            count,
            "the file has",
            "detail lines",
        ),
        (
            "header",
            "total_amount_fen",
            getattr(header, "total_amount_fen", None),
            total_fen,
            "detail lines sum to",
            "",
        ),
    )
    for where, name, declared, actual, verb, unit in checks:
        if declared is not None and declared != actual:
            raise BankFileError(f"{where} {name} {declared} but {verb} {actual} {unit}".rstrip())


def _read_text(path: str | Path, layout: BankFileLayout) -> str:
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_BANK_FILE_BYTES:
            raise BankFileError(f"file of {size} bytes exceeds the limit of {MAX_BANK_FILE_BYTES}")
        text = path.read_bytes().decode(layout.encoding)
    except UnicodeDecodeError as exc:
        raise BankFileError(f"file is not {layout.encoding} (byte {exc.start})") from None
    except OSError as exc:
        raise BankFileError(f"cannot read bank file: {exc.strerror}") from None
    return text


def parse_bank_text(text: str, layout: BankFileLayout = DEFAULT_LAYOUT) -> BankFile:
    """Parse the file's text (see ``parse_bank_file``)."""
    lines = split_lines(text.removeprefix("\ufeff"))
    if len(lines) - 2 > MAX_RECORDS_PYTHON:
        raise BankFileError(
            f"{len(lines) - 2} detail lines: above {MAX_RECORDS_PYTHON} use read_bank_file_polars"
        )
    if len(lines) < 2:
        raise BankFileError("file needs at least a header and a trailer line")
    sep = layout.separator

    def parse(rec: RecordLayout, line_no: int):
        line = lines[line_no - 1]
        if len(line) > layout.max_line_chars:
            raise BankFileError(f"line {line_no}: longer than {layout.max_line_chars} characters")
        try:
            return rec.parse_line(line, sep)
        except FieldError as exc:
            raise BankFileError(f"line {line_no}: {exc}") from None

    header = parse(layout.header, 1)
    trailer = parse(layout.trailer, len(lines))
    details = [parse(layout.detail, n) for n in range(2, len(lines))]
    _check_totals(header, trailer, len(details), sum(d.amount_fen for d in details))
    return BankFile(header, details, trailer)


def parse_bank_file(path: str | Path, layout: BankFileLayout = DEFAULT_LAYOUT) -> BankFile:
    """Parse and check a bank clearing file; BankFileError (whole file rejected) with the reason."""
    return parse_bank_text(_read_text(path, layout), layout)


def format_bank_file(
    business_date: date,
    bank_code: str,
    details: Iterable[BankDetail],
    layout: BankFileLayout = DEFAULT_LAYOUT,
) -> str:
    """The file's text with header and trailer computed from the details."""
    details = list(details)
    total = sum(d.amount_fen for d in details)
    sep = layout.separator
    known = {
        "business_date": business_date,
        "bank_code": bank_code,
        "record_count": len(details),
        "total_amount_fen": total,
    }

    def summary(rec: RecordLayout) -> Any:  # header/trailer of any layout, from the values it declares
        return rec.record(**{name: known[name] for name in rec.names})

    try:
        lines = [layout.header.format_line(summary(layout.header), sep)]
        lines += [layout.detail.format_line(d, sep) for d in details]
        lines.append(layout.trailer.format_line(summary(layout.trailer), sep))
    except FieldError as exc:
        raise BankFileError(f"cannot write bank file: {exc}") from None
    return "\n".join(lines) + "\n"


def write_bank_file(
    path: str | Path,
    business_date: date,
    bank_code: str,
    details: Iterable[BankDetail],
    layout: BankFileLayout = DEFAULT_LAYOUT,
) -> Path:
    """Write a bank clearing file (used by the simulator's bank side); returns the path."""
    path = Path(path)
    text = format_bank_file(business_date, bank_code, details, layout)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding=layout.encoding)
    tmp.replace(path)
    return path


# --- columnar path -----------------------------------------------------------------------------


@dataclass(frozen=True)
class BankFrame:
    """A bank file read column-wise: header and trailer records, details as a typed DataFrame."""

    header: BankHeader
    details: pl.DataFrame
    trailer: BankTrailer


def _has_unit_separator(source: Path | bytes) -> bool:
    if isinstance(source, bytes):
        return b"\x1f" in source
    with open(source, "rb") as f:
        if not os.fstat(f.fileno()).st_size:
            return False
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:  # memchr over the mapping, no copy
            return m.find(b"\x1f") >= 0


def _raise_scalar_error(source: Path | bytes, layout: BankFileLayout) -> None:
    raw = source if isinstance(source, bytes) else source.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BankFileError(f"file is not {layout.encoding} (byte {exc.start})") from None
    parse_bank_text(text, layout)  # raises BankFileError naming the first bad line
    raise BankFileError("bank file contains a control character (unit separator)")


def read_bank_frame(path: str | Path, layout: BankFileLayout = DEFAULT_LAYOUT) -> BankFrame:
    """Read, validate and type a bank file with polars; the same rules as ``parse_bank_file``.

    The file is read as one string column (one row per line, in parallel), split on the
    separator, and every field checked with vectorised expressions. Columns: ``line_no`` (1-based
    line number in the file) then the detail fields, typed (Int64 amounts, UTC datetimes, nulls
    for empty optional fields).
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise BankFileError(f"cannot read bank file: {exc.strerror}") from None
    if size > MAX_BANK_FILE_BYTES:
        raise BankFileError(f"file of {size} bytes exceeds the limit of {MAX_BANK_FILE_BYTES}")
    source: Path | bytes = path
    if layout.encoding.lower().replace("-", "") != "utf8":  # polars reads UTF-8 only: transcode first
        try:
            source = path.read_bytes().decode(layout.encoding).encode("utf-8")
        except UnicodeDecodeError as exc:
            raise BankFileError(f"file is not {layout.encoding} (byte {exc.start})") from None
    if _has_unit_separator(source):
        # no valid line holds a control character, and the column split below relies on that: let the
        # line-by-line reader name the first bad line, so both readers report the same error
        _raise_scalar_error(source, layout)
    try:
        lines = pl.read_csv(
            source,
            has_header=False,
            separator="\x1f",  # unit separator: never in a valid line, so each line is one field
            quote_char=None,
            infer_schema=False,
            empty_string_is_null=False,
            new_columns=["line"],
            encoding="utf8",
            raise_if_empty=False,
        )
    except pl.exceptions.PolarsError as exc:
        raise BankFileError(
            f"bank file unreadable as {layout.encoding} lines: {str(exc).splitlines()[0]}"
        ) from None
    if lines.width != 1:
        raise BankFileError("bank file contains a control character (unit separator)")
    text = lines["line"].str.strip_suffix("\r")
    if text.len() and text[0].startswith("\ufeff"):
        text[0] = text[0].removeprefix("\ufeff")
    n = text.len()
    if n < 2:
        raise BankFileError("file needs at least a header and a trailer line")
    if n - 2 > MAX_BANK_FILE_LINES:
        raise BankFileError(f"file has {n} lines, over the limit of {MAX_BANK_FILE_LINES}")
    too_long = (text.str.len_chars() > layout.max_line_chars).arg_true()
    if too_long.len():
        raise BankFileError(f"line {too_long[0] + 1}: longer than {layout.max_line_chars} characters")

    def one(rec: RecordLayout, line_no: int):
        try:
            return rec.parse_line(text[line_no - 1], layout.separator)
        except FieldError as exc:
            raise BankFileError(f"line {line_no}: {exc}") from None

    header, trailer = one(layout.header, 1), one(layout.trailer, n)
    details = _details_frame(text.slice(1, n - 2), layout)
    total = details["amount_fen"].sum() if details.height else 0
    _check_totals(header, trailer, details.height, int(total))
    return BankFrame(header, details, trailer)


def _details_frame(lines: pl.Series, layout: BankFileLayout) -> pl.DataFrame:
    rec = layout.detail
    sep = layout.separator
    n_fields = len(rec.fields) + (1 if rec.tag is not None else 0)
    tag_col, rest_col = "_tag", "_rest"
    names = ([tag_col] if rec.tag is not None else []) + rec.names + [rest_col]
    # splitn keeps anything past the last field in one extra column: non-null means too many fields,
    # a null last field means too few
    split = (
        pl.DataFrame({"line": lines})
        .with_row_index(LINE_NO_COLUMN, offset=2)
        .lazy()
        .select(
            pl.col(LINE_NO_COLUMN).cast(pl.Int64),
            pl.col("line").str.splitn(sep, n_fields + 1).struct.rename_fields(names).alias("s"),
        )
        .unnest("s")
        .collect()
    )
    shape_bad = split.filter(
        pl.col(rest_col).is_not_null()
        | pl.col(rec.names[-1]).is_null()
        | ((pl.col(tag_col) != rec.tag) if rec.tag is not None else pl.lit(False))
    )
    if shape_bad.height:
        line_no = shape_bad[LINE_NO_COLUMN][0]
        try:
            rec.parse_line(lines[line_no - 2], sep)
            reason = f"{rec.name} record is malformed"
        except FieldError as exc:
            reason = str(exc)
        raise BankFileError(f"line {line_no}: {reason}")
    try:
        return rec.pl_typed(split.drop([c for c in (tag_col, rest_col) if c in split.columns]))
    except LineError as exc:
        raise BankFileError(str(exc)) from None


def read_bank_file_polars(path: str | Path, layout: BankFileLayout = DEFAULT_LAYOUT) -> pl.DataFrame:
    """The checked detail lines of a bank file as a typed polars DataFrame (for reconciliation)."""
    return read_bank_frame(path, layout).details


DETAIL_FIELDS: tuple[str, ...] = tuple(f.name for f in DEFAULT_LAYOUT.detail.fields)
"""The detail line's fields in file order (DESIGN.md), shared by the reconciliation engine and the simulator."""


def details_frame_schema(layout: BankFileLayout = DEFAULT_LAYOUT) -> dict[str, pl.DataType]:
    """Column names and dtypes of ``read_bank_file_polars`` output (for building matching frames)."""
    return {LINE_NO_COLUMN: pl.Int64, **{f.name: f.pl_dtype for f in layout.detail.fields}}
