"""Business-day calendar (工作日历) for error-case due times.

Weekends are non-working unless listed as make-up working days (调休上班);
public holidays are configuration: a TOML file (``$CAREPAY_HOLIDAYS_FILE`` or
``<data dir>/holidays.toml``)::

    holidays = ["2026-10-01", "2026-10-02"]   # days off
    workdays = ["2026-09-27"]                 # weekend days worked (调休)
    due_local_time = "17:00"                  # cases fall due at this local time

No holidays are built in: a wrong list is worse than none, so the bank loads its own.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

HOLIDAYS_ENV = "CAREPAY_HOLIDAYS_FILE"
HOLIDAYS_FILE = "holidays.toml"
DEFAULT_DUE_LOCAL_TIME = time(17, 0)
MAX_CALENDAR_DAYS = 5_000
GENERAL_DUE_BUSINESS_DAYS = 1
COMPLEX_DUE_BUSINESS_DAYS = 3


class CalendarError(ValueError):
    """A holiday file that cannot be read."""


@dataclass(frozen=True)
class BusinessCalendar:
    holidays: frozenset[date] = field(default_factory=frozenset)
    workdays: frozenset[date] = field(default_factory=frozenset)
    due_local_time: time = DEFAULT_DUE_LOCAL_TIME
    timezone: str = "Asia/Shanghai"

    def is_business_day(self, d: date) -> bool:
        if d in self.workdays:
            return True
        return d.weekday() < 5 and d not in self.holidays

    def add_business_days(self, d: date, n: int) -> date:
        """The ``n``-th business day after ``d`` (``n`` >= 0; 0 = ``d`` itself or the next business day).

        >>> BusinessCalendar().add_business_days(date(2026, 11, 27), 1)  # a Friday
        datetime.date(2026, 11, 30)
        """
        cur, left = d, n
        if left == 0:
            while not self.is_business_day(cur):
                cur += timedelta(days=1)
            return cur
        for _ in range(MAX_CALENDAR_DAYS):
            cur += timedelta(days=1)
            if self.is_business_day(cur):
                left -= 1
                if left == 0:
                    return cur
        raise CalendarError("no business day within the calendar horizon")

    def due_at(self, business_date: date, business_days: int) -> datetime:
        """The due instant: ``business_days`` business days after the date, at the due local time."""
        due_day = self.add_business_days(business_date, business_days)
        return datetime.combine(due_day, self.due_local_time, tzinfo=ZoneInfo(self.timezone))


def _dates(values: object, name: str) -> frozenset[date]:
    if not isinstance(values, list):
        raise CalendarError(f"{name} must be a list of YYYY-MM-DD dates")
    try:
        return frozenset(v.date() if isinstance(v, datetime) else v if isinstance(v, date)
                         else date.fromisoformat(str(v)) for v in values)
    except ValueError as exc:
        raise CalendarError(f"{name}: {exc}") from None


def load_calendar(data_dir: Path | None = None, path: Path | None = None, timezone: str = "Asia/Shanghai") -> BusinessCalendar:
    """The configured calendar: ``path``, else ``$CAREPAY_HOLIDAYS_FILE``, else ``data_dir/holidays.toml``."""
    candidate = path or (Path(os.environ[HOLIDAYS_ENV]) if os.environ.get(HOLIDAYS_ENV) else None)
    if candidate is None and data_dir is not None:
        candidate = data_dir / HOLIDAYS_FILE
    if candidate is None or not candidate.is_file():
        return BusinessCalendar(timezone=timezone)
    try:
        doc = tomllib.loads(candidate.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise CalendarError(f"holiday file {candidate.name}: {exc}") from None
    due = doc.get("due_local_time", DEFAULT_DUE_LOCAL_TIME)
    try:
        due_t = due if isinstance(due, time) else time.fromisoformat(str(due))
    except ValueError:
        raise CalendarError(f"due_local_time {due!r} is not HH:MM") from None
    return BusinessCalendar(
        holidays=_dates(doc.get("holidays", []), "holidays"),
        workdays=_dates(doc.get("workdays", []), "workdays"),
        due_local_time=due_t,
        timezone=timezone,
    )
