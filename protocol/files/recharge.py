"""Recharge file (充值文件) from civil affairs: the monthly subsidy issuance, one batch per file.

CSV, UTF-8, header row ``batch_id,card_no,id_no,program,amount_fen,period,expires_on``. Every line
is checked (Luhn card number, MOD 11-2 resident ID, program, amount > 0 in fen, period YYYYMM,
expiry date or empty and not before the period, batch id the same on every line, no card charged
twice for the same program and period). ``parse_recharge`` never raises for a bad line: the line
goes to ``rejects`` with its reason, and the importer decides (all-or-nothing per file). A bad
header, an empty file, or too many lines raise RechargeFileError.

Rejected lines are kept with card and ID numbers masked: a person reads them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import NamedTuple

from protocol.files.fields import Choice, Date, FieldError, Int, Pattern
from protocol.files.layout import CsvLayout, RecordLayout, read_text
from protocol.ids import CARD_NO_DIGITS, ID_NO_CHARS, check_card_no, check_id_no, mask_in_text
from protocol.money import MAX_AMOUNT_FEN

MAX_RECHARGE_LINES = 2_000_000  # Beijing has ~4.5M cardholders over several programs and batches
MAX_RECHARGE_LINE_CHARS = 200
MAX_RECHARGE_FILE_BYTES = MAX_RECHARGE_LINES * MAX_RECHARGE_LINE_CHARS
RECHARGE_PROGRAMS = ("voucher", "nursing")
BATCH_ID_REGEX = "[0-9A-Za-z][0-9A-Za-z_-]{0,31}"


class RechargeFileError(ValueError):
    """The whole recharge file is unusable (header, size, encoding)."""


@dataclass(frozen=True)
class RechargeLine:
    """One cardholder's subsidy for a program and month."""

    batch_id: str
    card_no: str
    id_no: str
    program: str
    amount_fen: int
    period: str
    expires_on: date | None

    def __repr__(self) -> str:  # card and ID numbers masked
        return mask_in_text(
            f"RechargeLine(batch_id={self.batch_id!r}, card_no={self.card_no!r}, id_no={self.id_no!r}, "
            f"program={self.program!r}, amount_fen={self.amount_fen}, period={self.period!r}, "
            f"expires_on={self.expires_on!r})"
        )


class RechargeReject(NamedTuple):
    line_no: int
    raw: str  # the line with card and ID numbers masked
    reason: str


@dataclass
class RechargeFile:
    batch_id: str | None
    lines: list[RechargeLine] = field(default_factory=list)
    rejects: list[RechargeReject] = field(default_factory=list)
    line_nos: list[int] = field(default_factory=list)  # file line number of each of ``lines`` (header = 1)

    @property
    def total_fen(self) -> int:
        return sum(line.amount_fen for line in self.lines)

    @property
    def ok(self) -> bool:
        """True when every line is valid (the file may be imported)."""
        return not self.rejects and bool(self.lines)


def _expiry_after_period(line: RechargeLine) -> str | None:
    if line.expires_on is not None and line.expires_on < date(int(line.period[:4]), int(line.period[4:]), 1):
        return "expires_on is before the start of the period"
    return None


LAYOUT = CsvLayout(
    RecordLayout(
        "recharge",
        RechargeLine,
        (
            Pattern("batch_id", regex=BATCH_ID_REGEX, what="1-32 letters, digits, _ or -"),
            Pattern(
                "card_no",
                regex=f"[0-9]{{{CARD_NO_DIGITS}}}",
                what=f"{CARD_NO_DIGITS} digits",
                check=check_card_no,
            ),
            Pattern(
                "id_no",
                regex=f"[0-9]{{{ID_NO_CHARS - 1}}}[0-9Xx]",
                what=f"{ID_NO_CHARS} characters",
                check=check_id_no,
            ),
            Choice("program", values=RECHARGE_PROGRAMS),
            Int("amount_fen", low=1, high=MAX_AMOUNT_FEN),
            Pattern("period", regex="[0-9]{4}(?:0[1-9]|1[0-2])", what="a month YYYYMM"),
            Date("expires_on", optional=True, fmt="%Y-%m-%d"),
        ),
        checks=(_expiry_after_period,),
    ),
    max_line_chars=MAX_RECHARGE_LINE_CHARS,
    max_lines=MAX_RECHARGE_LINES,
)


def parse_recharge(path_or_text: str | Path) -> RechargeFile:
    """Parse a recharge file (a Path, a str naming a file, or the CSV text itself)."""
    try:
        text = read_text(path_or_text, MAX_RECHARGE_FILE_BYTES)
        rows = list(LAYOUT.rows(text))
    except FieldError as exc:
        raise RechargeFileError(f"recharge file rejected: {exc}") from None
    result = RechargeFile(batch_id=None)
    seen: dict[tuple[str, str, str], int] = {}
    for line_no, raw, record, reason in rows:
        if record is not None:
            if result.batch_id is None:
                result.batch_id = record.batch_id
            key = (record.card_no, record.program, record.period)
            if record.batch_id != result.batch_id:
                reason = f"batch_id differs from the file's batch {result.batch_id}"
            elif key in seen:
                reason = f"same card, program and period as line {seen[key]}"
            else:
                seen[key] = line_no
                result.lines.append(record)
                result.line_nos.append(line_no)
                continue
        result.rejects.append(RechargeReject(line_no, mask_in_text(raw), reason or "invalid"))
    return result


def format_recharge(lines: Iterable[RechargeLine]) -> str:
    try:
        return LAYOUT.format(lines)
    except FieldError as exc:
        raise RechargeFileError(f"cannot write recharge file: {exc}") from None


def write_recharge(path: str | Path, lines: Iterable[RechargeLine]) -> Path:
    """Write a recharge file (used by the simulator and tests); returns the path."""
    path = Path(path)
    path.write_text(format_recharge(lines), encoding="utf-8")
    return path
