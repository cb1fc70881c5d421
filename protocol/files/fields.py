"""Field types for the text file layouts: one declaration gives a scalar parser, a writer and a polars check.

Every field type turns text into a value (``parse``), a value back into text (``format``), and, for
the columnar path, gives a vectorised validity test (``pl_valid``) and conversion (``pl_convert``)
that accept exactly what ``parse`` accepts. Errors name the field and the rule, never the value
(a card or ID number must not reach a log through an error message).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import polars as pl

MAX_INT_DIGITS = 18  # fits a signed 64-bit integer


class FieldError(ValueError):
    """A field's text does not satisfy its declaration."""


@dataclass(frozen=True)
class Field:
    """Base field: ``optional`` fields accept empty text as None."""

    name: str
    optional: bool = False

    # scalar path ---------------------------------------------------------------------------
    def parse(self, text: str) -> Any:
        if text == "":
            if self.optional:
                return None
            raise FieldError(f"{self.name} is empty")
        return self._parse(text)

    def format(self, value: Any) -> str:
        if value is None:
            if self.optional:
                return ""
            raise FieldError(f"{self.name} is required")
        text = self._format(value)
        if text == "" and not self.optional:  # would read back as missing
            raise FieldError(f"{self.name} is empty")
        return text

    def _parse(self, text: str) -> Any:
        raise NotImplementedError

    def _format(self, value: Any) -> str:
        return str(value)

    # columnar path (polars) --------------------------------------------------------------
    def pl_valid(self, col: pl.Expr) -> pl.Expr:
        """Boolean expression: True where the text is valid for this field."""
        valid = self._pl_valid(col).fill_null(False)
        return (col == "") | valid if self.optional else (col != "") & valid

    def pl_convert(self, col: pl.Expr) -> pl.Expr:
        """The typed value (null for an empty optional field); apply after ``pl_valid`` passed."""
        return pl.when(col == "").then(None).otherwise(self._pl_convert(col))

    def _pl_valid(self, col: pl.Expr) -> pl.Expr:
        raise NotImplementedError(f"{type(self).__name__} has no columnar form")

    def _pl_convert(self, col: pl.Expr) -> pl.Expr:
        return col

    @property
    def pl_dtype(self) -> Any:
        return pl.String


@dataclass(frozen=True)
class Pattern(Field):
    """Text matching ``regex`` in full (ASCII classes only), optionally passed through ``check``.

    ``check`` (a scalar validator such as a Luhn test) runs only on the scalar path; a field with a
    check has no columnar form.
    """

    regex: str = ""
    what: str = ""
    check: Callable[[str], Any] | None = None
    max_chars: int = 256

    def _parse(self, text: str) -> str:
        if len(text) > self.max_chars or not text.isascii() or re.fullmatch(self.regex, text) is None:
            raise FieldError(f"{self.name} must be {self.what}")
        if self.check is not None:
            try:
                checked = self.check(text)
            except ValueError as exc:
                raise FieldError(f"{self.name}: {exc}") from None
            if isinstance(checked, str):  # a check may normalise (e.g. ID check char x -> X)
                return checked
        return text

    def _format(self, value: Any) -> str:
        return self._parse(str(value))

    def _pl_valid(self, col: pl.Expr) -> pl.Expr:
        if self.check is not None:
            raise NotImplementedError(f"field {self.name} has a scalar-only check")
        return col.str.contains(f"^(?:{self.regex})$")


@dataclass(frozen=True)
class FreeText(Field):
    """Any text without control characters or the layout's separators, up to ``max_chars``."""

    max_chars: int = 100
    forbidden: str = "|"

    def _parse(self, text: str) -> str:
        if len(text) > self.max_chars:
            raise FieldError(f"{self.name} longer than {self.max_chars} characters")
        if any(ord(c) < 0x20 or c == "\x7f" or c in self.forbidden for c in text):
            raise FieldError(f"{self.name} contains a control character or a separator")
        return text

    def _format(self, value: Any) -> str:
        return self._parse(str(value))

    def _pl_valid(self, col: pl.Expr) -> pl.Expr:
        bad = "[\\x00-\\x1f\\x7f" + "".join(re.escape(c) for c in self.forbidden) + "]"
        return (col.str.len_chars() <= self.max_chars) & ~col.str.contains(bad)


@dataclass(frozen=True)
class Choice(Field):
    """One of a fixed set of words."""

    values: Sequence[str] = ()

    def _parse(self, text: str) -> str:
        if text not in self.values:
            raise FieldError(f"{self.name} must be one of {', '.join(self.values)}")
        return text

    def _format(self, value: Any) -> str:
        return self._parse(str(value))

    def _pl_valid(self, col: pl.Expr) -> pl.Expr:
        return col.is_in(list(self.values))


@dataclass(frozen=True)
class Int(Field):
    """A decimal integer in ``low..high``: digits (leading zeros allowed, as banks pad), ``-`` only when
    ``low`` is negative, no plus, no spaces. Written without padding."""

    low: int = 0
    high: int = 10**MAX_INT_DIGITS - 1

    @property
    def _regex(self) -> str:
        sign = "-?" if self.low < 0 else ""
        return f"{sign}[0-9]{{1,{MAX_INT_DIGITS}}}"

    def _parse(self, text: str) -> int:
        if not text.isascii() or re.fullmatch(self._regex, text) is None:
            raise FieldError(f"{self.name} must be a whole number")
        value = int(text)
        if not self.low <= value <= self.high:
            raise FieldError(f"{self.name} must be within {self.low}..{self.high}")
        return value

    def _format(self, value: Any) -> str:
        if not isinstance(value, int) or isinstance(value, bool):
            raise FieldError(f"{self.name} must be an int")
        if not self.low <= value <= self.high:
            raise FieldError(f"{self.name} must be within {self.low}..{self.high}")
        return str(value)

    def _pl_valid(self, col: pl.Expr) -> pl.Expr:
        n = col.cast(pl.Int64, strict=False)
        return col.str.contains(f"^{self._regex}$") & (n >= self.low) & (n <= self.high)

    def _pl_convert(self, col: pl.Expr) -> pl.Expr:
        return col.cast(pl.Int64, strict=False)

    @property
    def pl_dtype(self) -> Any:
        return pl.Int64


_DATE_REGEX = {"%Y%m%d": r"[0-9]{8}", "%Y-%m-%d": r"[0-9]{4}-[0-9]{2}-[0-9]{2}"}


@dataclass(frozen=True)
class Date(Field):
    """A calendar date in ``fmt`` (``%Y%m%d`` or ``%Y-%m-%d``)."""

    fmt: str = "%Y-%m-%d"

    def _parse(self, text: str) -> date:
        if re.fullmatch(_DATE_REGEX[self.fmt], text) is None:
            raise FieldError(f"{self.name} must be a date {self.fmt.replace('%', '')}")
        try:
            return datetime.strptime(text, self.fmt).date()
        except ValueError:
            raise FieldError(f"{self.name} is not a calendar date") from None

    def _format(self, value: Any) -> str:
        if not isinstance(value, date) or isinstance(value, datetime):
            raise FieldError(f"{self.name} must be a date")
        return value.strftime(self.fmt) if value.year >= 1000 else self._bad_year()

    def _bad_year(self) -> str:
        raise FieldError(f"{self.name} year must have 4 digits")

    def _pl_valid(self, col: pl.Expr) -> pl.Expr:
        return (
            col.str.contains(f"^{_DATE_REGEX[self.fmt]}$")
            & col.str.to_date(self.fmt, strict=False).is_not_null()
        )

    def _pl_convert(self, col: pl.Expr) -> pl.Expr:
        return col.str.to_date(self.fmt, strict=False)

    @property
    def pl_dtype(self) -> Any:
        return pl.Date


ISO_DATETIME_REGEX = (
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,6})?(?:[+-][0-9]{2}:[0-9]{2}|Z)"
)


@dataclass(frozen=True)
class DateTimeTz(Field):
    """ISO 8601 ``YYYY-MM-DDThh:mm:ss[.ffffff]±hh:mm`` (or ``Z``): an offset is required."""

    def _parse(self, text: str) -> datetime:
        if re.fullmatch(ISO_DATETIME_REGEX, text) is None:
            raise FieldError(f"{self.name} must be ISO 8601 with an offset")
        try:
            value = datetime.fromisoformat(text)
        except ValueError:
            raise FieldError(f"{self.name} is not a valid date and time") from None
        return value

    def _format(self, value: Any) -> str:
        if not isinstance(value, datetime) or value.tzinfo is None or value.utcoffset() is None:
            raise FieldError(f"{self.name} must be a datetime with a time zone")
        text = value.isoformat()
        self._parse(text)
        return text

    def _pl_valid(self, col: pl.Expr) -> pl.Expr:
        return col.str.contains(f"^{ISO_DATETIME_REGEX}$") & self._pl_convert(col).is_not_null()

    def _pl_convert(self, col: pl.Expr) -> pl.Expr:
        normal = col.str.replace(r"Z$", "+00:00")
        return normal.str.to_datetime(
            "%Y-%m-%dT%H:%M:%S%.f%:z", strict=False, time_unit="us", time_zone="UTC", cache=False
        )  # timestamps are nearly all distinct: a lookup cache costs more than it saves

    @property
    def pl_dtype(self) -> Any:
        return pl.Datetime("us", "UTC")
