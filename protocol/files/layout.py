"""Layout declarations and the generic engine that parses and writes them.

A ``RecordLayout`` names a record class (a dataclass) and its fields in order, with an optional
record-type tag (``H``/``D``/``T``) and record-level checks. A ``CsvLayout`` wraps one for CSV
files with a header row. Parsing and writing are generic: a new bank or a new export is a new
declaration, not new code.
"""

from __future__ import annotations

import csv
import dataclasses
import io
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from protocol.files.fields import Field, FieldError

LINE_NO_COLUMN = "line_no"


class LineError(FieldError):
    """A line that does not satisfy its layout; ``line_no`` is 1-based."""

    def __init__(self, line_no: int, reason: str) -> None:
        self.line_no = line_no
        self.reason = reason
        super().__init__(f"line {line_no}: {reason}")


@dataclass(frozen=True)
class RecordLayout:
    """One record kind: its class, its fields in file order, an optional leading tag, record checks.

    ``checks`` are functions of the parsed record returning a reason (str) when the record is
    inconsistent (e.g. net != purchase - void - refund), else None.
    """

    name: str
    record: type
    fields: tuple[Field, ...]
    tag: str | None = None
    checks: tuple[Callable[[Any], str | None], ...] = ()

    def __post_init__(self) -> None:
        declared = [f.name for f in dataclasses.fields(self.record)]
        if declared != self.names:
            raise TypeError(
                f"layout {self.name}: fields {self.names} differ from {self.record.__name__} {declared}"
            )

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.fields]

    def from_values(self, values: Sequence[str]) -> Any:
        """Parse one record from its field texts (without the tag)."""
        if len(values) != len(self.fields):
            raise FieldError(f"{self.name} record has {len(values)} fields, expected {len(self.fields)}")
        record = self.record(*(f.parse(v) for f, v in zip(self.fields, values, strict=True)))
        for check in self.checks:
            reason = check(record)
            if reason:
                raise FieldError(reason)
        return record

    def to_values(self, record: Any) -> list[str]:
        if not isinstance(record, self.record):
            raise FieldError(f"{self.name} layout writes {self.record.__name__}, got {type(record).__name__}")
        for check in self.checks:
            reason = check(record)
            if reason:
                raise FieldError(reason)
        return [f.format(getattr(record, f.name)) for f in self.fields]

    def parse_line(self, line: str, separator: str) -> Any:
        values = line.split(separator)
        if self.tag is not None:
            if values[0] != self.tag:
                raise FieldError(f"{self.name} record must start with {self.tag!r}")
            values = values[1:]
        return self.from_values(values)

    def format_line(self, record: Any, separator: str) -> str:
        values = self.to_values(record)
        if any(separator in v for v in values):
            raise FieldError(f"{self.name} record: a field contains the separator {separator!r}")
        return separator.join(([self.tag] if self.tag is not None else []) + values)

    # columnar path ------------------------------------------------------------------------
    def pl_typed(self, frame: pl.DataFrame | pl.LazyFrame) -> pl.DataFrame:
        """Validate string columns named after the fields (plus ``line_no``) and convert them.

        One lazy pass computes every field's typed value and validity flag (polars shares the
        common sub-expressions, so a datetime is parsed once). Raises LineError naming the first
        bad line and field. Record-level ``checks`` have no columnar form: a layout with checks
        must be read on the scalar path.
        """
        if self.checks:
            raise NotImplementedError(f"layout {self.name} has record checks: use the scalar parser")
        flags = [f"_ok_{n}" for n in self.names]
        computed = (
            frame.lazy()
            .select(
                pl.col(LINE_NO_COLUMN),
                *(f.pl_convert(pl.col(f.name)).cast(f.pl_dtype).alias(f.name) for f in self.fields),
                *(f.pl_valid(pl.col(f.name)).alias(flag) for f, flag in zip(self.fields, flags, strict=True)),
            )
            .collect()
        )
        bad = computed.select(pl.col(LINE_NO_COLUMN), *flags).filter(~pl.all_horizontal(flags))
        if bad.height:
            row = bad.row(0, named=True)
            field = next(f for f, flag in zip(self.fields, flags, strict=True) if not row[flag])
            raw = (
                frame.lazy()
                .filter(pl.col(LINE_NO_COLUMN) == row[LINE_NO_COLUMN])
                .select(field.name)
                .collect()
            )
            try:
                field.parse(raw[field.name][0])
                reason = f"{field.name} is invalid"
            except FieldError as exc:  # the scalar parser words the reason
                reason = str(exc)
            raise LineError(row[LINE_NO_COLUMN], reason)
        return computed.drop(flags)


@dataclass(frozen=True)
class CsvLayout:
    """A CSV file (UTF-8, comma, header row) of one record kind.

    With ``extra_columns_ok`` the reader maps columns by header name and ignores unknown ones;
    otherwise the header must be exactly the declared names in order.
    """

    record: RecordLayout
    max_line_chars: int
    max_lines: int
    extra_columns_ok: bool = False

    @property
    def header(self) -> list[str]:
        return self.record.names

    def column_order(self, header: Sequence[str]) -> list[int]:
        """Indexes of the declared columns in a file's header row; FieldError when it does not fit."""
        header = [h.strip() for h in header]
        if not self.extra_columns_ok:
            if header != self.header:
                raise FieldError(f"header must be {','.join(self.header)}")
            return list(range(len(header)))
        missing = [n for n in self.header if n not in header]
        if missing:
            raise FieldError(f"header lacks column(s) {','.join(missing)}")
        if len(set(header)) != len(header):
            raise FieldError("header repeats a column name")
        return [header.index(n) for n in self.header]

    def rows(self, text: str) -> Iterator[tuple[int, str, Any | None, str | None]]:
        """Yield ``(line_no, raw, record, None)`` or ``(line_no, raw, None, reason)`` per data line.

        The header is line 1. Blank lines are skipped. Raises FieldError for a bad header or a
        file over ``max_lines``.
        """
        lines = split_lines(text)
        if not lines or not lines[0].strip():
            raise FieldError("file is empty: no header row")
        if len(lines) - 1 > self.max_lines:
            raise FieldError(f"file has {len(lines) - 1} lines, over the limit of {self.max_lines}")
        order = self.column_order(_csv_split(lines[0]))
        width = len(_csv_split(lines[0]))
        for line_no, raw in enumerate(lines[1:], start=2):
            if not raw.strip():
                continue
            if len(raw) > self.max_line_chars:
                yield line_no, raw, None, f"line longer than {self.max_line_chars} characters"
                continue
            try:
                values = _csv_split(raw)
                if len(values) != width:
                    raise FieldError(f"line has {len(values)} columns, header has {width}")
                yield line_no, raw, self.record.from_values([values[i] for i in order]), None
            except (FieldError, csv.Error) as exc:
                yield line_no, raw, None, str(exc)

    def format(self, records: Iterable[Any]) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(self.header)
        for record in records:
            writer.writerow(self.record.to_values(record))
        return out.getvalue()

    def format_or_raise(self, records: Iterable[Any], error: type[Exception], what: str) -> str:
        """:meth:`format`, with a field that cannot be written raised as ``error("cannot write WHAT: …")``."""
        try:
            return self.format(records)
        except FieldError as exc:
            raise error(f"cannot write {what}: {exc}") from None

    def parse_all(self, path_or_text: str | Path, max_bytes: int, error: type[Exception], what: str) -> list[Any]:
        """Every record of a file we expect to be wholly good: ``error`` on the first bad line or a bad file."""
        try:
            records = []
            for line_no, _raw, record, reason in self.rows(read_text(path_or_text, max_bytes)):
                if record is None:
                    raise error(f"line {line_no}: {reason}")
                records.append(record)
        except FieldError as exc:
            raise error(f"{what} rejected: {exc}") from None
        return records

    def read_polars(self, source: str | Path | bytes) -> pl.DataFrame:
        """The whole file as a typed DataFrame (plus ``line_no``); LineError on the first bad line."""
        raw = source if isinstance(source, bytes) else Path(source).read_bytes()
        frame = pl.read_csv(
            raw,
            infer_schema=False,
            empty_string_is_null=False,
            raise_if_empty=False,
        )
        if frame.width == 0:
            raise FieldError("file is empty: no header row")
        order = self.column_order(frame.columns)
        if frame.height > self.max_lines:
            raise FieldError(f"file has {frame.height} lines, over the limit of {self.max_lines}")
        frame = frame.select(
            *(pl.col(frame.columns[i]).alias(name) for i, name in zip(order, self.header, strict=True))
        ).with_row_index(LINE_NO_COLUMN, offset=2)
        frame = frame.with_columns(pl.col(LINE_NO_COLUMN).cast(pl.Int64))
        return self.record.pl_typed(frame)


def split_lines(text: str) -> list[str]:
    """Physical lines split on LF only (CRLF accepted, one final newline allowed).

    Not ``str.splitlines``: that also splits on U+2028, U+0085 and the like, which may sit inside
    a free-text field.
    """
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [ln[:-1] if ln.endswith("\r") else ln for ln in lines]


def _csv_split(line: str) -> list[str]:
    return next(csv.reader([line], strict=True))


def read_text(path_or_text: str | Path, max_bytes: int) -> str:
    """File contents, or the text itself; UTF-8, BOM dropped.

    A ``Path``, or a non-empty ``str`` without a newline, names a file; any other ``str`` is the
    file's text.
    """
    if isinstance(path_or_text, Path) or (path_or_text and "\n" not in path_or_text):
        path = Path(path_or_text)
        try:
            size = path.stat().st_size
            if size > max_bytes:
                raise FieldError(f"file of {size} bytes exceeds the limit of {max_bytes}")
            data = path.read_bytes()
        except OSError as exc:
            raise FieldError(f"cannot read {path.name}: {exc.strerror}") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise FieldError(f"file is not UTF-8 (byte {exc.start})") from None
    else:
        text = path_or_text
        if len(text) > max_bytes:
            raise FieldError(f"text of {len(text)} characters exceeds the limit of {max_bytes}")
    return text.removeprefix("\ufeff")
