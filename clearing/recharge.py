"""Recharge import (充值), voucher expiry and the year-end rollover (结转).

- :func:`import_recharge` — the monthly civil-affairs file: all-or-nothing per file,
  idempotent per batch id (a second import of the same file is a no-op reported as
  ``already_imported``; the same batch id with other content is rejected), every bad
  line reported with its reason. Money moves ``fund:{program}:{district}`` →
  ``card:{card_no}:{program}``; each voucher line is also a *lot* with its expiry date.
- :func:`expire_vouchers` — sweeps expired voucher money to ``expired:voucher``
  (end of day calls it). Spending uses the soonest-expiring lots first, so the money
  left on a card belongs to its latest-expiring lots.
- :func:`rollover_year_end` — moves unspent voucher money into the card's
  ``restricted`` account, which only the designated service categories may spend.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from clearing import idempotency as idem
from clearing.accounts import card_account, expired_account, fund_account
from clearing.audit import append_audit
from clearing.db import write_transaction
from clearing.ledger import IdempotencyConflict, TransferSpec, post_transfers_sync
from clearing.schema import accounts, cards, voucher_lots
from protocol.files.recharge import RechargeFileError, parse_recharge
from protocol.ids import mask_card_no

IN_CHUNK = 500


@dataclass
class RechargeReport:
    """The outcome of one import: ``imported``, ``already_imported`` or ``rejected`` (with every reason)."""

    status: str
    batch_id: str | None
    lines: int = 0
    total_fen: int = 0
    rejects: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _reject(line_no: int, reason: str) -> dict[str, Any]:
    return {"line_no": line_no, "reason": reason}


async def import_recharge(engine: AsyncEngine, path: str | Path, *, actor: str = "operator") -> RechargeReport:
    """Import one recharge file; see the module docstring. Never raises for bad content."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        return RechargeReport("rejected", None, rejects=[_reject(0, f"cannot read file: {exc.strerror}")])
    try:
        parsed = parse_recharge(p)
    except RechargeFileError as exc:
        return RechargeReport("rejected", None, rejects=[_reject(0, str(exc))])
    if not parsed.lines and not parsed.rejects:
        return RechargeReport("rejected", parsed.batch_id, rejects=[_reject(0, "no recharge lines")])
    file_hash = hashlib.sha256(raw).hexdigest()
    try:
        async with write_transaction(engine) as conn:
            return await conn.run_sync(_import_sync, parsed, file_hash, actor)
    except IdempotencyConflict:
        return RechargeReport("rejected", parsed.batch_id, rejects=[_reject(
            0, f"batch {parsed.batch_id} was already imported with different content")])
    except _Rejected as exc:
        return exc.report


class _Rejected(Exception):
    def __init__(self, report: RechargeReport):
        super().__init__(report.status)
        self.report = report


def _import_sync(conn: Connection, parsed: Any, file_hash: str, actor: str = "operator") -> RechargeReport:
    batch_id = parsed.batch_id
    if not parsed.rejects:
        stored = idem.lookup_sync(conn, "recharge", batch_id, file_hash)
        if stored is not None:
            return RechargeReport("already_imported", batch_id, stored["lines"], stored["total_fen"])
    known: dict[str, Any] = {}
    nos = sorted({ln.card_no for ln in parsed.lines})
    for i in range(0, len(nos), IN_CHUNK):
        q = select(cards.c.card_no, cards.c.id_no, cards.c.status, cards.c.programs, cards.c.district).where(
            cards.c.card_no.in_(nos[i:i + IN_CHUNK]))
        for r in conn.execute(q):
            known[r.card_no] = r
    rejects = [_reject(r.line_no, r.reason) for r in parsed.rejects]
    line_nos = _line_numbers(parsed)
    for ln, line_no in zip(parsed.lines, line_nos, strict=True):
        card = known.get(ln.card_no)
        if card is None:
            rejects.append(_reject(line_no, f"card {mask_card_no(ln.card_no)} is not registered"))
        elif card.id_no != ln.id_no.upper():
            rejects.append(_reject(line_no, "resident ID does not match the card"))
        elif card.status in ("closed", "cancelled"):
            rejects.append(_reject(line_no, f"card {mask_card_no(ln.card_no)} is {card.status}"))
        elif ln.program not in card.programs.split(","):
            rejects.append(_reject(line_no, f"card is not entitled to {ln.program}"))
    if rejects:
        raise _Rejected(RechargeReport("rejected", batch_id, rejects=sorted(rejects, key=lambda r: r["line_no"])))
    specs = [TransferSpec(fund_account(ln.program, known[ln.card_no].district), card_account(ln.card_no, ln.program),
                          ln.amount_fen, "recharge", f"recharge:{batch_id}:{line_no}", memo=f"{ln.period}")
             for ln, line_no in zip(parsed.lines, line_nos, strict=True)]
    post_transfers_sync(conn, specs)
    now = datetime.now(UTC)
    lots = [{"card_no": ln.card_no, "program": ln.program, "batch_id": batch_id, "amount_fen": ln.amount_fen,
             "period": ln.period, "expires_on": ln.expires_on, "closed_at": None, "created_at": now}
            for ln in parsed.lines if ln.program == "voucher"]
    if lots:
        conn.execute(voucher_lots.insert(), lots)
    total = sum(ln.amount_fen for ln in parsed.lines)
    idem.store_sync(conn, "recharge", batch_id, file_hash, {"lines": len(parsed.lines), "total_fen": total})
    append_audit(conn, actor, "recharge.import", f"batch:{batch_id}",
                 {"lines": len(parsed.lines), "total_fen": total, "file_sha256": file_hash})
    return RechargeReport("imported", batch_id, len(parsed.lines), total)


def _line_numbers(parsed: Any) -> list[int]:
    """File line numbers of the accepted lines: the data lines (header is line 1) minus the rejected ones."""
    bad = {r.line_no for r in parsed.rejects}
    return [n for n in range(2, 2 + len(parsed.lines) + len(parsed.rejects)) if n not in bad][:len(parsed.lines)]


# --- expiry and rollover -------------------------------------------------------------------------------


def _voucher_balances(conn: Connection, card_nos: list[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for i in range(0, len(card_nos), IN_CHUNK):
        codes = [card_account(no, "voucher") for no in card_nos[i:i + IN_CHUNK]]
        q = select(accounts.c.owner, accounts.c.credits_posted, accounts.c.debits_posted).where(
            accounts.c.code.in_(codes)).with_for_update()
        out.update({owner: int(c) - int(d) for owner, c, d in conn.execute(q)})
    return out


def expiring_amounts(lots: list[dict[str, Any]], balance: int, as_of: date) -> tuple[int, list[int]]:
    """How much of ``balance`` sits in lots expired before ``as_of``, and those lots' ids.

    The balance is assigned to the open lots latest-expiry first (no expiry = latest),
    i.e. spending consumed the soonest-expiring money first.
    """
    order = sorted(lots, key=lambda lot: (lot["expires_on"] is None, lot["expires_on"] or date.max, lot["id"]),
                   reverse=True)
    left = max(balance, 0)
    expired = 0
    for lot in order:
        take = min(left, int(lot["amount_fen"]))
        left -= take
        if lot["expires_on"] is not None and lot["expires_on"] < as_of:
            expired += take
    ids = [lot["id"] for lot in lots if lot["expires_on"] is not None and lot["expires_on"] < as_of]
    return expired, ids


async def expire_vouchers(engine: AsyncEngine, as_of: date, *, actor: str = "operator") -> dict[str, Any]:
    """Sweep voucher money whose lots expired before ``as_of`` to ``expired:voucher``; idempotent."""
    async with write_transaction(engine) as conn:
        out = await conn.run_sync(_expire_sync, as_of)
        if out["cards"]:
            await conn.run_sync(append_audit, actor, "voucher.expire", f"as_of:{as_of.isoformat()}", out)
        return out


def _expire_sync(conn: Connection, as_of: date) -> dict[str, Any]:
    due = list(conn.execute(select(voucher_lots.c.card_no).distinct().where(
        voucher_lots.c.closed_at.is_(None), voucher_lots.c.expires_on.is_not(None),
        voucher_lots.c.expires_on < as_of)).scalars())
    if not due:
        return {"cards": 0, "expired_fen": 0}
    lots: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for i in range(0, len(due), IN_CHUNK):
        q = select(voucher_lots).where(voucher_lots.c.card_no.in_(due[i:i + IN_CHUNK]), voucher_lots.c.closed_at.is_(None))
        for r in conn.execute(q):
            lots[r.card_no].append(dict(r._mapping))
    bals = _voucher_balances(conn, due)
    specs, closed = [], []
    for card_no in due:
        amount, ids = expiring_amounts(lots[card_no], bals.get(card_no, 0), as_of)
        closed += ids
        if amount > 0:
            specs.append(TransferSpec(card_account(card_no, "voucher"), expired_account("voucher"), amount, "expire",
                                      f"expire:{card_no}:{as_of.isoformat()}:{min(ids)}", memo=f"expired before {as_of}"))
    post_transfers_sync(conn, specs)
    now = datetime.now(UTC)
    for i in range(0, len(closed), IN_CHUNK):
        conn.execute(update(voucher_lots).where(voucher_lots.c.id.in_(closed[i:i + IN_CHUNK])).values(closed_at=now))
    return {"cards": len(specs), "expired_fen": sum(s.amount_fen for s in specs)}


async def rollover_year_end(engine: AsyncEngine, year: int, *, actor: str = "operator") -> dict[str, Any]:
    """结转: after sweeping vouchers that expired before 31 December, move every card's unspent voucher balance into its
    ``restricted`` account (spendable only on :data:`clearing.registry.RESTRICTED_SERVICE_CATEGORIES`).
    Idempotent per year."""
    await expire_vouchers(engine, date(year, 12, 31), actor=actor)  # money valid through 31 December rolls over
    async with write_transaction(engine) as conn:
        out = await conn.run_sync(_rollover_sync, year)
        if not out["already_done"]:
            await conn.run_sync(append_audit, actor, "voucher.rollover", f"year:{year}", out)
        return out


def _rollover_sync(conn: Connection, year: int) -> dict[str, Any]:
    h = idem.request_hash({"year": year})
    stored = idem.lookup_sync(conn, "rollover", str(year), h)
    if stored is not None:
        return {**stored, "already_done": True}
    q = (select(accounts.c.owner, accounts.c.credits_posted - accounts.c.debits_posted)
         .where(accounts.c.kind == "card", accounts.c.program == "voucher",
                accounts.c.credits_posted > accounts.c.debits_posted)
         .order_by(accounts.c.id).with_for_update())
    rows = [(owner, int(b)) for owner, b in conn.execute(q)]
    specs = [TransferSpec(card_account(no, "voucher"), card_account(no, "restricted"), b, "rollover",
                          f"rollover:{year}:{no}", memo=f"year-end rollover {year}") for no, b in rows]
    post_transfers_sync(conn, specs)
    conn.execute(update(voucher_lots).where(voucher_lots.c.closed_at.is_(None), voucher_lots.c.period <= f"{year}12")
                 .values(closed_at=datetime.now(UTC)))
    answer = {"year": year, "cards": len(specs), "moved_fen": sum(s.amount_fen for s in specs), "already_done": False}
    idem.store_sync(conn, "rollover", str(year), h, answer)
    return answer
