"""Hypothesis strategies for the file-format records (shared by the file tests)."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

from hypothesis import strategies as st

from protocol.files.bank_file import BankDetail
from protocol.files.journal import JournalRow
from protocol.files.recharge import RechargeLine
from protocol.files.settlement import SettlementRow
from protocol.files.txn_fields import PROGRAMS, TXN_STATUSES, TXN_TYPES
from protocol.ids import make_card_no, make_id_no, mask_card_no
from protocol.money import MAX_AMOUNT_FEN

ALNUM = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def alnum(n: int) -> st.SearchStrategy[str]:
    return st.text(ALNUM, min_size=n, max_size=n)


def digits(n: int) -> st.SearchStrategy[str]:
    return st.text("0123456789", min_size=n, max_size=n)


dates = st.dates(date(1990, 1, 1), date(2099, 12, 31))
offsets = st.integers(-12 * 60, 14 * 60).map(lambda m: timezone(timedelta(minutes=m)))
aware_datetimes = st.datetimes(datetime(2000, 1, 1), datetime(2099, 12, 31), timezones=offsets)
card_nos = st.builds(make_card_no, digits(6), st.integers(0, 10**12 - 1))
masked_cards = card_nos.map(mask_card_no)
amounts = st.integers(0, MAX_AMOUNT_FEN)

bank_details = st.builds(
    BankDetail,
    rrn=st.none() | alnum(12),
    provider_id=alnum(15),
    terminal_id=alnum(8),
    batch_no=digits(6),
    trace_no=digits(6),
    txn_type=st.sampled_from(TXN_TYPES),
    program=st.sampled_from(PROGRAMS),
    card_no_masked=masked_cards,
    amount_fen=amounts,
    fee_fen=amounts,
    txn_time=aware_datetimes,
    status=st.sampled_from(TXN_STATUSES),
    orig_rrn=st.none() | alnum(12),
)

journal_rows = st.builds(
    JournalRow,
    rrn=alnum(12),
    business_date=dates,
    provider_id=alnum(15),
    terminal_id=alnum(8),
    batch_no=digits(6),
    trace_no=digits(6),
    txn_type=st.sampled_from(TXN_TYPES),
    program=st.sampled_from(PROGRAMS),
    card_no_masked=masked_cards,
    amount_fen=amounts,
    fee_fen=amounts,
    txn_time=aware_datetimes,
    status=st.sampled_from(TXN_STATUSES),
    orig_rrn=st.none() | alnum(12),
)


@st.composite
def recharge_lines(draw, batch_id: str = "B202601"):
    period_year = draw(st.integers(2020, 2030))
    period_month = draw(st.integers(1, 12))
    expires = draw(st.none() | st.dates(date(period_year, period_month, 1), date(2035, 12, 31)))
    born = draw(st.dates(date(1910, 1, 1), date(1966, 12, 31)))
    return RechargeLine(
        batch_id=batch_id,
        card_no=draw(card_nos),
        id_no=make_id_no(
            draw(st.sampled_from(["110105", "110108", "110101", "120101"])), born, draw(st.integers(0, 999))
        ),
        program=draw(st.sampled_from(["voucher", "nursing"])),
        amount_fen=draw(st.integers(1, MAX_AMOUNT_FEN)),
        period=f"{period_year:04d}{period_month:02d}",
        expires_on=expires,
    )


@st.composite
def settlement_rows(draw):
    p, v, r = (draw(st.integers(0, 10**12)) for _ in range(3))
    return SettlementRow(
        business_date=draw(dates),
        provider_id=draw(alnum(15)),
        provider_name=draw(
            st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=100)
        ),
        settle_account=draw(st.text(ALNUM + "-", min_size=1, max_size=40)),
        purchase_count=draw(st.integers(0, 10**6)),
        purchase_fen=p,
        void_count=draw(st.integers(0, 10**6)),
        void_fen=v,
        refund_count=draw(st.integers(0, 10**6)),
        refund_fen=r,
        net_fen=p - v - r,
        fee_fen=draw(st.integers(0, 10**9)),
    )
