"""Error accounts (差错账处理): one case per reconciliation break, worked by a maker and a checker.

Life of a case: ``open`` → ``proposed`` (maker: adjust | reverse | refund | write_off | dismiss,
with an explanation) → ``approved`` (checker ≠ maker) or back to ``open`` (rejected) →
``closed`` once the correcting transfers post (``posted_at`` records when). Every step
writes an audit entry in the same transaction.

Money under investigation (挂账): when a case opens, its *exposure* — the signed money
difference between the bank and the host, counting only successful rows and signing
voids/refunds/reversals negative — is parked in ``suspense`` against ``bank:settlement``;
the cases opened together share at most two parking transfers (one per direction, key
``cases:{first}..{last}:suspense:dr|cr``) and each records its own share (``exposure_fen``).
Posting a decision moves the case's share out of suspense (a transfer naming the parking one):

- ``dismiss`` / ``reverse``: back to ``bank:settlement`` (explained; or reversed at the bank);
- ``adjust``:    to/from the provider's payable (next settlement carries the difference);
- ``refund``:    to the cardholder's program account (only when the bank holds more than the host);
- ``write_off``: to/from ``bank:fee_expense`` (the bank absorbs it).

Due time: general cases one business day, complex ones (one-sided rows: 单边账 need the
other party) three, at the calendar's due local time. Overdue = not closed past due.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

import polars as pl
from sqlalchemy import func, select, update
from sqlalchemy.engine import Connection

from clearing.accounts import BANK_FEE_EXPENSE, BANK_SETTLEMENT, SUSPENSE, card_account, provider_payable
from clearing.audit import AuditEntry, append_audit, append_audit_batch
from clearing.calendar import COMPLEX_DUE_BUSINESS_DAYS, GENERAL_DUE_BUSINESS_DAYS, BusinessCalendar
from clearing.db import executemany_sync, sqlite_datetime
from clearing.eod_schema import error_cases
from clearing.schema import host_txns
from clearing.settlement import Posting, post_transfers_sync
from keys.sm3 import sm3

try:
    from prometheus_client import Gauge

    ERROR_CASES_OPEN = Gauge("carepay_error_cases_open", "Error cases not closed, by overdue", ("overdue",))
except ValueError:  # already registered (module reloaded)
    from prometheus_client import REGISTRY

    ERROR_CASES_OPEN = REGISTRY._names_to_collectors["carepay_error_cases_open"]  # type: ignore[assignment]

ACTIONS = ("adjust", "reverse", "refund", "write_off", "dismiss")
COMPLEX_CLASSES = ("host_only", "bank_only")
OPEN, PROPOSED, APPROVED, CLOSED = "open", "proposed", "approved", "closed"
MAX_NOTE_CHARS = 400
MIN_NOTE_CHARS = 4
CASE_COLUMNS = (
    "case_no", "business_date", "break_key", "class", "complexity", "rrn", "provider_id", "terminal_id",
    "card_no_masked", "host_amount_fen", "bank_amount_fen", "diff_fen", "exposure_fen", "status", "source",
    "opened_at", "due_at", "suspense_transfer_key", "rejections",
)
NEGATIVE_TYPES = ("VOID", "REFUND", "REVERSAL")
AUDIT_PER_CASE_MAX = 1_000
"""Up to this many cases opened in one run get one audit entry each; more get one batch entry whose
SM3 digest binds every case row (case_no|break_key|amounts|suspense key, in case order)."""


class CaseError(Exception):
    """A workflow step that is not allowed (wrong state, unknown case, bad proposal)."""


class MakerCheckerViolation(CaseError):
    """The checker is the maker: four eyes are required."""


def exposure_expr() -> pl.Expr:
    """Signed money at stake (fen): bank's effective amount − host's, negated for money flowing back."""
    eff_h = pl.when(pl.col("host_status") == "SUCCESS").then(pl.col("host_amount_fen")).otherwise(0).fill_null(0)
    eff_b = pl.when(pl.col("bank_status") == "SUCCESS").then(pl.col("bank_amount_fen")).otherwise(0).fill_null(0)
    sign = pl.when(pl.col("txn_type").is_in(list(NEGATIVE_TYPES))).then(-1).otherwise(1)
    return ((eff_b - eff_h) * sign).cast(pl.Int64)


def suspense_postings(first_case: str, last_case: str, exposures: pl.Series, business_date: date) -> list[Posting]:
    """Park the exposure of newly opened cases in suspense: one transfer per direction for the whole set.

    Bank holds less (negative exposure) → suspense debited; bank holds more → suspense credited. Each
    case records its own signed share (``exposure_fen``) and the key of the transfer that parked it.
    """
    short = -int(exposures.filter(exposures < 0).sum())
    long_ = int(exposures.filter(exposures > 0).sum())
    tag = f"cases:{first_case}..{last_case}"
    memo = f"suspense for error cases {first_case}..{last_case}"
    out = []
    if short:
        out.append(Posting(f"{tag}:suspense:dr", SUSPENSE, BANK_SETTLEMENT, short, "suspense", business_date, memo=memo))
    if long_:
        out.append(Posting(f"{tag}:suspense:cr", BANK_SETTLEMENT, SUSPENSE, long_, "suspense", business_date, memo=memo))
    return out


def open_cases_sync(conn: Connection, breaks: pl.DataFrame, business_date: date, calendar: BusinessCalendar,
                    actor: str = "system:eod", source: str = "auto") -> list[str]:
    """Open a case for every break (``in_grace`` ones excluded) that has none yet; set-based.

    ``breaks`` columns: BREAK_SCHEMA of clearing.reconcile plus ``break_key`` (and optionally ``in_grace``).
    Returns the new case numbers. Rows are built column-wise and written with one executemany; the money
    goes to suspense in at most two transfers (:func:`suspense_postings`). One audit entry per opened
    case, or, beyond :data:`AUDIT_PER_CASE_MAX`, one batch entry whose SM3 digest binds all of them.
    """
    todo = breaks.filter(~pl.col("in_grace")) if "in_grace" in breaks.columns else breaks
    if todo.is_empty():
        return []
    have = set(conn.execute(select(error_cases.c.break_key).where(error_cases.c.business_date == business_date)).scalars())
    if have:
        todo = todo.filter(~pl.col("break_key").is_in(list(have)))
    if todo.is_empty():
        return []
    start = int(conn.execute(select(func.count()).select_from(error_cases)
                             .where(error_cases.c.business_date == business_date)).scalar_one())
    now = datetime.now(UTC)
    due_general = calendar.due_at(business_date, GENERAL_DUE_BUSINESS_DAYS).astimezone(UTC)
    due_complex = calendar.due_at(business_date, COMPLEX_DUE_BUSINESS_DAYS).astimezone(UTC)
    d = f"{business_date:%Y%m%d}"
    frame = todo.with_row_index("_n", offset=start + 1).with_columns(
        case_no=pl.format("EC-{}-{}", pl.lit(d), pl.col("_n").cast(pl.String).str.zfill(6)),
        complexity=pl.when(pl.col("class").is_in(list(COMPLEX_CLASSES))).then(pl.lit("complex")).otherwise(pl.lit("general")),
        exposure_fen=exposure_expr(),
    )
    first, last = frame["case_no"][0], frame["case_no"][-1]
    postings = suspense_postings(first, last, frame["exposure_fen"], business_date)
    keys = {p.transfer_key.rsplit(":", 1)[1]: p.transfer_key for p in postings}
    # dates/times pre-encoded once per batch (SQLite stores them as text; PostgreSQL takes the objects)
    enc = sqlite_datetime if conn.dialect.name == "sqlite" else (lambda v: v)
    now_v, due_c, due_g = enc(now), enc(due_complex), enc(due_general)
    bdate_v = business_date.isoformat() if conn.dialect.name == "sqlite" else business_date
    out = frame.select(
        "case_no", "break_key", "class", "complexity",
        *[pl.col(c).fill_null("") for c in ("rrn", "provider_id", "terminal_id", "card_no_masked")],
        "host_amount_fen", "bank_amount_fen", pl.col("diff_fen").cast(pl.Int64), "exposure_fen",
        pl.when(pl.col("exposure_fen") < 0).then(pl.lit(keys.get("dr")))
        .when(pl.col("exposure_fen") > 0).then(pl.lit(keys.get("cr"))).otherwise(pl.lit(None, pl.String))
        .alias("suspense_transfer_key"),
    )
    rows = [(r[0], bdate_v, *r[1:12], OPEN, source, now_v, due_c if r[3] == "complex" else due_g, r[12], 0)
            for r in out.rows()]
    executemany_sync(conn, error_cases, CASE_COLUMNS, rows)
    post_transfers_sync(conn, postings, check_existing=False)  # keys name brand-new case numbers
    if len(rows) <= AUDIT_PER_CASE_MAX:
        audits = [AuditEntry(actor, "case.open", r[0], {
            "class": r[3], "rrn": r[5], "host_amount_fen": r[9], "bank_amount_fen": r[10], "exposure_fen": r[12],
            "suspense": r[17]}) for r in rows]
    else:  # at scale: one entry binding every opened case by digest
        lines = "\n".join(f"{r[0]}|{r[2]}|{r[9]}|{r[10]}|{r[12]}|{r[17] or ''}" for r in rows)
        audits = [AuditEntry(actor, "case.open.batch", f"{first}..{last}", {
            "count": len(rows), "first": first, "last": last,
            "digest_fields": "case_no|break_key|host_amount_fen|bank_amount_fen|exposure_fen|suspense_transfer_key",
            "cases_sm3": sm3(lines.encode("utf-8")).hex(), "suspense_transfers": sorted(keys.values())})]
    append_audit_batch(conn, audits)
    return [r[0] for r in rows]


MANUAL_CLASSES = (*COMPLEX_CLASSES, "amount_mismatch", "status_mismatch", "duplicate", "other")


def open_manual_case_sync(conn: Connection, business_date: date, rrn: str, cls: str, user: str, note: str,
                          calendar: BusinessCalendar, bank_amount_fen: int | None = None) -> str:
    """Open a case by hand (e.g. a cardholder complaint, a bank query) for a host transaction's RRN.

    The host side comes from the journal; ``bank_amount_fen`` (when the bank reported one) makes the
    difference and the suspense exposure. Returns the case number.
    """
    user = _user(user)
    note = _note(note, "a manual case")
    if cls not in MANUAL_CLASSES:
        raise CaseError(f"class must be one of {', '.join(MANUAL_CLASSES)}")
    if bank_amount_fen is not None and bank_amount_fen < 0:
        raise CaseError("bank amount must not be negative")
    row = conn.execute(select(host_txns.c.provider_id, host_txns.c.terminal_id, host_txns.c.card_no,
                              host_txns.c.amount_fen, host_txns.c.status, host_txns.c.txn_type)
                       .where(host_txns.c.rrn == rrn)).first()
    if row is None and bank_amount_fen is None:
        raise CaseError(f"no host transaction with RRN {rrn!r}: give the bank's amount (--bank-amount)")
    from clearing.reconcile import mask_card_expr

    n = int(conn.execute(select(func.count()).select_from(error_cases)
                         .where(error_cases.c.business_date == business_date)).scalar_one())
    frame = pl.DataFrame({
        "break_key": [f"manual|{rrn}|{n + 1}"], "class": [cls], "rrn": [rrn],
        "provider_id": [row[0] if row else ""], "terminal_id": [row[1] if row else ""],
        "card_no_masked": [row[2] or "" if row else ""], "txn_type": [row[5] if row else "PURCHASE"],
        "host_amount_fen": [int(row[3]) if row else None], "host_status": [row[4] if row else None],
        "bank_amount_fen": [bank_amount_fen], "bank_status": ["SUCCESS" if bank_amount_fen is not None else None],
    }, schema_overrides={"host_amount_fen": pl.Int64, "bank_amount_fen": pl.Int64, "host_status": pl.String,
                         "bank_status": pl.String})
    frame = frame.with_columns(
        mask_card_expr("card_no_masked"),
        diff_fen=(pl.col("bank_amount_fen").fill_null(0) - pl.col("host_amount_fen").fill_null(0)),
    )
    if bank_amount_fen is None:  # nothing known on the bank side: no money parked yet
        frame = frame.with_columns(host_status=pl.lit(None, pl.String))
    case_no = open_cases_sync(conn, frame, business_date, calendar, actor=user, source="manual")[0]
    append_audit(conn, user, "case.open.manual", case_no, {"rrn": rrn, "class": cls, "note": note})
    return case_no


def get_case_sync(conn: Connection, case_no: str) -> dict[str, Any]:
    row = conn.execute(select(error_cases).where(error_cases.c.case_no == case_no)).mappings().first()
    if row is None:
        raise CaseError(f"no error case {case_no!r}")
    return dict(row)


def list_cases_sync(conn: Connection, status: str | None = None, business_date: date | None = None,
                    overdue_only: bool = False, now: datetime | None = None) -> list[dict[str, Any]]:
    q = select(error_cases).order_by(error_cases.c.case_no)
    if status:
        q = q.where(error_cases.c.status == status)
    if business_date:
        q = q.where(error_cases.c.business_date == business_date)
    rows = [dict(r) for r in conn.execute(q).mappings()]
    at = now or datetime.now(UTC)
    for r in rows:
        r["overdue"] = is_overdue(r, at)
    return [r for r in rows if r["overdue"]] if overdue_only else rows


def is_overdue(case: dict[str, Any], now: datetime) -> bool:
    return case["status"] != CLOSED and case["due_at"] is not None and case["due_at"] < now


def _note(note: str, what: str) -> str:
    note = (note or "").strip()
    if len(note) < MIN_NOTE_CHARS:
        raise CaseError(f"{what} needs an explanation of at least {MIN_NOTE_CHARS} characters")
    return note[:MAX_NOTE_CHARS]


def _user(user: str) -> str:
    user = (user or "").strip()
    if not user:
        raise CaseError("a user name is required (--user)")
    return user[:64]


def propose_sync(conn: Connection, case_no: str, maker: str, action: str, note: str) -> dict[str, Any]:
    """Maker proposes a resolution for an open case."""
    maker = _user(maker)
    if action not in ACTIONS:
        raise CaseError(f"action must be one of {', '.join(ACTIONS)}")
    note = _note(note, "a proposal")
    case = get_case_sync(conn, case_no)
    if case["status"] != OPEN:
        raise CaseError(f"case {case_no} is {case['status']}, only an open case takes a proposal")
    amount = _suspense_amount(conn, case)
    if action == "refund" and amount <= 0:
        raise CaseError("refund applies only when the bank holds more than the host (money to return)")
    now = datetime.now(UTC)
    conn.execute(update(error_cases).where(error_cases.c.case_no == case_no).values(
        status=PROPOSED, action=action, proposal_note=note, maker=maker, proposed_at=now, proposal_amount_fen=abs(amount),
        checker=None, decided_at=None, decision_note=None))
    append_audit(conn, maker, "case.propose", case_no, {"action": action, "note": note, "amount_fen": abs(amount)})
    return get_case_sync(conn, case_no)


def _decide(conn: Connection, case_no: str, checker: str, note: str, approve: bool) -> dict[str, Any]:
    checker = _user(checker)
    case = get_case_sync(conn, case_no)
    if case["status"] != PROPOSED:
        raise CaseError(f"case {case_no} is {case['status']}, only a proposed case can be decided")
    if case["maker"] == checker:
        raise MakerCheckerViolation(f"{checker} made this proposal; a different person must check it")
    now = datetime.now(UTC)
    if approve:
        conn.execute(update(error_cases).where(error_cases.c.case_no == case_no).values(
            status=APPROVED, checker=checker, decided_at=now, decision_note=(note or "")[:MAX_NOTE_CHARS]))
        append_audit(conn, checker, "case.approve", case_no, {"action": case["action"], "note": note or ""})
    else:
        conn.execute(update(error_cases).where(error_cases.c.case_no == case_no).values(
            status=OPEN, checker=checker, decided_at=now, decision_note=_note(note, "a rejection"),
            rejections=case["rejections"] + 1))
        append_audit(conn, checker, "case.reject", case_no, {"action": case["action"], "note": note})
    return get_case_sync(conn, case_no)


def approve_sync(conn: Connection, case_no: str, checker: str, note: str = "") -> dict[str, Any]:
    """Checker (≠ maker) approves the proposal."""
    return _decide(conn, case_no, checker, note, approve=True)


def reject_sync(conn: Connection, case_no: str, checker: str, note: str) -> dict[str, Any]:
    """Checker (≠ maker) rejects the proposal: the case is open again for a new proposal."""
    return _decide(conn, case_no, checker, note, approve=False)


def _suspense_amount(conn: Connection, case: dict[str, Any]) -> int:
    """Signed amount parked for the case: + when suspense was credited (bank holds more), − when debited."""
    return int(case["exposure_fen"] or 0) if case["suspense_transfer_key"] else 0


def correction_postings(conn: Connection, case: dict[str, Any]) -> list[Posting]:
    """The transfers that carry the approved decision out of suspense."""
    amount = _suspense_amount(conn, case)
    if amount == 0:
        return []
    action, cno, bdate = case["action"], case["case_no"], case["business_date"]
    if action in ("dismiss", "reverse"):
        target = BANK_SETTLEMENT
    elif action == "adjust":
        if not case["provider_id"]:
            raise CaseError("adjust needs the case's provider")
        target = provider_payable(case["provider_id"])
    elif action == "write_off":
        target = BANK_FEE_EXPENSE
    elif action == "refund":
        row = conn.execute(select(host_txns.c.card_no, host_txns.c.program).where(host_txns.c.rrn == case["rrn"])).first()
        if row is None or not row[0] or not row[1]:
            raise CaseError("refund needs a host transaction with a card and program for the case's RRN")
        target = card_account(row[0], row[1])
    else:
        raise CaseError(f"unknown action {action!r}")
    key = f"case:{cno}:{action}"
    memo = f"error case {cno}: {action}"
    if amount > 0:  # suspense holds a credit: pay it out to the target
        return [Posting(key, SUSPENSE, target, amount, "correction", bdate, rrn=case["rrn"] or None,
                        corrects_key=case["suspense_transfer_key"], memo=memo)]
    return [Posting(key, target, SUSPENSE, -amount, "correction", bdate, rrn=case["rrn"] or None,
                    corrects_key=case["suspense_transfer_key"], memo=memo)]


def post_sync(conn: Connection, case_no: str, user: str) -> dict[str, Any]:
    """Post the approved decision's correcting transfers and close the case."""
    user = _user(user)
    case = get_case_sync(conn, case_no)
    if case["status"] != APPROVED:
        raise CaseError(f"case {case_no} is {case['status']}, only an approved case can be posted")
    postings = correction_postings(conn, case)
    posted = post_transfers_sync(conn, postings)
    now = datetime.now(UTC)
    keys = sorted(posted)
    conn.execute(update(error_cases).where(error_cases.c.case_no == case_no).values(
        status=CLOSED, posted_by=user, posted_at=now, closed_at=now, correction_transfer_keys=json.dumps(keys),
        resolution=f"{case['action']}: {case['proposal_note']}"[:MAX_NOTE_CHARS]))
    append_audit(conn, user, "case.post", case_no, {"action": case["action"], "transfers": keys})
    append_audit(conn, user, "case.close", case_no, {})
    return get_case_sync(conn, case_no)


def auto_resolve_sync(conn: Connection, business_date: date, break_keys: list[str], actor: str = "system:reconcile") -> list[str]:
    """Close still-open cases whose break a later run no longer finds (resolved): suspense released."""
    if not break_keys:
        return []
    rows = conn.execute(select(error_cases).where(error_cases.c.business_date == business_date)
                        .where(error_cases.c.break_key.in_(break_keys)).where(error_cases.c.status == OPEN)).mappings()
    closed = []
    for r in [dict(x) for x in rows]:
        r["action"] = "dismiss"
        posted = post_transfers_sync(conn, correction_postings(conn, r))
        now = datetime.now(UTC)
        conn.execute(update(error_cases).where(error_cases.c.case_no == r["case_no"]).values(
            status=CLOSED, action="dismiss", posted_by=actor, posted_at=now, closed_at=now,
            correction_transfer_keys=json.dumps(sorted(posted)), resolution="resolved: the break is gone on a later run"))
        append_audit(conn, actor, "case.resolved", r["case_no"], {"transfers": sorted(posted)})
        closed.append(r["case_no"])
    return closed


@dataclass(frozen=True)
class CaseAging:
    """Open cases by age bucket (days since opened) and overdue count."""

    buckets: dict[str, int]
    overdue: int
    open_total: int


AGE_BUCKETS = (("0-1d", 0, 1), ("2-7d", 2, 7), ("8-30d", 8, 30), (">30d", 31, 10**6))


def aging_sync(conn: Connection, now: datetime | None = None) -> CaseAging:
    at = now or datetime.now(UTC)
    rows = conn.execute(select(error_cases.c.opened_at, error_cases.c.due_at, error_cases.c.status)
                        .where(error_cases.c.status != CLOSED)).all()
    buckets = {name: 0 for name, _, _ in AGE_BUCKETS}
    overdue = 0
    for opened, due, _status in rows:
        age = (at - opened).days
        for name, lo, hi in AGE_BUCKETS:
            if lo <= age <= hi:
                buckets[name] += 1
                break
        if due < at:
            overdue += 1
    ERROR_CASES_OPEN.labels(overdue="true").set(overdue)
    ERROR_CASES_OPEN.labels(overdue="false").set(len(rows) - overdue)
    return CaseAging(buckets, overdue, len(rows))
