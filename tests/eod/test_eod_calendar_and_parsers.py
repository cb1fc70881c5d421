"""Calendar arithmetic and configuration; malformed signature files never crash the verifier."""

from __future__ import annotations

from datetime import date, time, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clearing.calendar import BusinessCalendar, CalendarError, load_calendar
from clearing.signing import VerifyStatus, sig_path, signer_for, verify_file

dates = st.dates(min_value=date(2020, 1, 1), max_value=date(2035, 12, 31))


@given(d=dates, n=st.integers(min_value=1, max_value=10), holidays=st.sets(dates, max_size=20))
def test_add_business_days_lands_on_a_business_day(d: date, n: int, holidays: set[date]) -> None:
    cal = BusinessCalendar(holidays=frozenset(holidays))
    out = cal.add_business_days(d, n)
    assert out > d and cal.is_business_day(out)
    between = [d + timedelta(days=i) for i in range(1, (out - d).days)]
    assert sum(cal.is_business_day(x) for x in between) == n - 1


def test_holidays_and_makeup_workdays(tmp_path: Path) -> None:
    (tmp_path / "holidays.toml").write_text(
        'holidays = ["2026-10-01", "2026-10-02"]\nworkdays = ["2026-10-10"]\ndue_local_time = "16:30"\n')
    cal = load_calendar(tmp_path)
    assert cal.add_business_days(date(2026, 9, 30), 1) == date(2026, 10, 5)
    assert cal.is_business_day(date(2026, 10, 10))  # a Saturday worked (调休)
    assert cal.due_local_time == time(16, 30)
    (tmp_path / "holidays.toml").write_text('holidays = ["2026-13-01"]\n')
    with pytest.raises(CalendarError):
        load_calendar(tmp_path)
    (tmp_path / "holidays.toml").write_text("holidays = [")
    with pytest.raises(CalendarError):
        load_calendar(tmp_path)


@settings(max_examples=60, deadline=None)
@given(garbage=st.binary(max_size=400))
def test_verify_never_crashes_on_a_garbage_signature_file(tmp_path_factory: pytest.TempPathFactory,
                                                          garbage: bytes) -> None:
    d = tmp_path_factory.mktemp("sig")
    report = d / "r.csv"
    report.write_text("a,b\n1,2\n")
    signer_for(d / "data").sign_file(report)
    sig_path(report).write_bytes(garbage)
    assert verify_file(report).status is VerifyStatus.TAMPERED


@settings(max_examples=80, deadline=None)
@given(text=st.one_of(
    st.text(max_size=200),
    st.builds(lambda hs, t: f"holidays = {hs!r}\ndue_local_time = {t!r}\n".replace("'", '"'),
              st.lists(st.text(alphabet="0123456789-", max_size=12), max_size=4), st.text(max_size=8)),
))
def test_holiday_file_parser_fails_cleanly(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    d = tmp_path_factory.mktemp("cal")
    (d / "holidays.toml").write_text(text, encoding="utf-8")
    try:
        cal = load_calendar(d)
    except CalendarError:
        return
    assert isinstance(cal, BusinessCalendar)
