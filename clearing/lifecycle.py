"""Card lifecycle (卡片生命周期): issue/register, report lost (挂失), unblock (解挂), replace (补卡/换卡),
extend eligibility (延期), cancel (注销) and the multi-card merge migration (多卡合一).

Every change runs in one write transaction; money moves are ordinary transfers
(never edits): replace moves each program balance to the new card in one atomic
correction, cancel returns balances to the fund (policy ``return_to_fund``) or
freezes them on the cancelled card (policy ``freeze``), migration credits balances
from another bank's elderly-quota accounts out of ``migration:{program}``.
Operations are idempotent through the idempotency table where repeating them
could move money twice.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import re
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from clearing import idempotency as idem
from clearing.accounts import PROGRAMS, card_account, ensure_accounts_sync, fund_account, migration_account
from clearing.audit import append_audit
from clearing.db import write_transaction
from clearing.ledger import TransferSpec, post_transfers_sync
from clearing.schema import accounts, cards
from protocol.ids import IdError, check_card_no, check_id_no, mask_card_no

CARD_STATUSES = ("issued", "active", "lost", "closed", "cancelled")
CANCEL_POLICIES = ("return_to_fund", "freeze")
DEFAULT_CANCEL_POLICY = "return_to_fund"
CARD_PROGRAMS = ("voucher", "nursing")
MIGRATION_COLUMNS = ("source_bank", "source_account", "card_no", "id_no", "program", "amount_fen")
MAX_MIGRATION_LINES = 1_000_000
MAX_REGISTER_BATCH = 100_000


class LifecycleError(ValueError):
    """A lifecycle step that is not allowed (unknown card, wrong status, bad input)."""


@dataclass(frozen=True)
class Card:
    card_no: str
    app_serial: str
    id_no: str
    district: str
    street: str
    status: str
    category: str
    valid_until: date
    programs: tuple[str, ...]
    key_version: int
    suite: str
    replaced_by: str | None

    @classmethod
    def from_row(cls, r: Any) -> Card:
        m = r._mapping
        return cls(m["card_no"], m["app_serial"], m["id_no"], m["district"], m["street"], m["status"], m["category"],
                   m["valid_until"], tuple(p for p in m["programs"].split(",") if p), int(m["key_version"]),
                   m["suite"], m["replaced_by"])


async def get_card(conn: AsyncConnection, card_no: str) -> Card | None:
    r = (await conn.execute(select(cards).where(cards.c.card_no == card_no))).first()
    return None if r is None else Card.from_row(r)


def _get_card_sync(conn: Connection, card_no: str) -> Card | None:
    r = conn.execute(select(cards).where(cards.c.card_no == card_no).with_for_update()).first()
    return None if r is None else Card.from_row(r)


# --- registration (personalisation deck) ----------------------------------------------------------------


def _field(obj: Any, *names: str, default: Any = None) -> Any:
    for n in names:
        if isinstance(obj, dict) and n in obj:
            return obj[n]
        if not isinstance(obj, dict) and hasattr(obj, n):
            return getattr(obj, n)
    return default


def _as_date(v: Any) -> date:
    if isinstance(v, datetime):
        return v.date()
    if isinstance(v, date):
        return v
    s = str(v)
    return date.fromisoformat(s) if "-" in s else datetime.strptime(s, "%Y%m%d").date()


def card_row(spec: Any, now: datetime | None = None) -> dict[str, Any]:
    """Normalise one deck entry (dict or dataclass; ``simulator.personalise`` field names accepted)."""
    if dataclasses.is_dataclass(spec) and not isinstance(spec, type):
        spec = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)}
    try:
        card_no = check_card_no(str(_field(spec, "card_no")))
        id_no = check_id_no(str(_field(spec, "id_no")))
    except IdError as exc:
        raise LifecycleError(str(exc)) from None
    serial = _field(spec, "app_serial")
    serial = serial.hex().upper() if isinstance(serial, bytes | bytearray) else str(serial).upper()
    if not re.match(r"^[0-9A-F]{16}$", serial):
        raise LifecycleError(f"card {mask_card_no(card_no)}: app_serial must be 8 bytes hex")
    programs = _field(spec, "programs", default=("voucher",))
    programs = tuple(p for p in (programs.split(",") if isinstance(programs, str) else programs) if p)
    bad = [p for p in programs if p not in CARD_PROGRAMS]
    if bad or not programs:
        raise LifecycleError(f"card {mask_card_no(card_no)}: bad programs {programs}")
    category = _field(spec, "category", default="")
    category = getattr(category, "name", category)
    suite = _field(spec, "suite", default="sm4")
    suite = getattr(suite, "value", suite)
    district = str(_field(spec, "district", "district_code", default=""))
    if not re.match(r"^\d{6}$", district):
        raise LifecycleError(f"card {mask_card_no(card_no)}: district code must be 6 digits")
    now = now or datetime.now(UTC)
    return {
        "card_no": card_no, "app_serial": serial, "id_no": id_no,
        "holder_name": str(_field(spec, "holder_name", "name", default=""))[:64],
        "district": district, "street": str(_field(spec, "street", "street_code", default=""))[:9],
        "status": str(_field(spec, "status", default="active")), "category": str(category)[:32],
        "valid_until": _as_date(_field(spec, "valid_until")), "programs": ",".join(sorted(programs)),
        "key_version": int(_field(spec, "key_version", default=1)), "suite": str(suite),
        "replaced_by": None, "issued_at": now, "updated_at": now,
    }


DEFAULT_ACTOR = "operator"


async def register_cards(engine: AsyncEngine, deck: list[Any], *, actor: str = DEFAULT_ACTOR) -> int:
    """Register issued cards (发卡登记) and open their program accounts; returns how many were new.

    Cards already registered with the same card number and application serial are skipped;
    any other clash is an error and nothing is registered.
    """
    if len(deck) > MAX_REGISTER_BATCH:
        raise LifecycleError(f"at most {MAX_REGISTER_BATCH} cards per registration")
    rows = [card_row(c) for c in deck]
    for r in rows:
        if r["status"] not in CARD_STATUSES:
            raise LifecycleError(f"card {mask_card_no(r['card_no'])}: bad status {r['status']!r}")
    async with write_transaction(engine) as conn:
        n = await conn.run_sync(_register_sync, rows)
        if n:
            await conn.run_sync(append_audit, actor, "card.register", "cards", {"registered": n, "in_request": len(rows)})
        return n


def _register_sync(conn: Connection, rows: list[dict[str, Any]]) -> int:
    existing: dict[str, str] = {}
    serials: dict[str, str] = {}
    nos = [r["card_no"] for r in rows]
    for i in range(0, len(nos), 500):
        for no, serial in conn.execute(select(cards.c.card_no, cards.c.app_serial).where(cards.c.card_no.in_(nos[i:i + 500]))):
            existing[no] = serial
    sers = [r["app_serial"] for r in rows]
    for i in range(0, len(sers), 500):
        for no, serial in conn.execute(select(cards.c.card_no, cards.c.app_serial).where(cards.c.app_serial.in_(sers[i:i + 500]))):
            serials[serial] = no
    new = []
    seen: set[str] = set()
    for r in rows:
        if r["card_no"] in seen:
            raise LifecycleError(f"card {mask_card_no(r['card_no'])} twice in the deck")
        seen.add(r["card_no"])
        if r["card_no"] in existing:
            if existing[r["card_no"]] != r["app_serial"]:
                raise LifecycleError(f"card {mask_card_no(r['card_no'])} already registered with another serial")
            continue
        if r["app_serial"] in serials:
            raise LifecycleError(f"application serial of card {mask_card_no(r['card_no'])} belongs to another card")
        new.append(r)
    if new:
        conn.execute(cards.insert(), new)
        ensure_accounts_sync(conn, [card_account(r["card_no"], p) for r in new for p in r["programs"].split(",")])
    return len(new)


# --- status changes -------------------------------------------------------------------------------------


async def _set_status(engine: AsyncEngine, card_no: str, allowed_from: tuple[str, ...], to: str, action: str,
                      actor: str, **extra: Any) -> Card:
    async with write_transaction(engine) as conn:
        card = await conn.run_sync(_get_card_sync, card_no)
        if card is None:
            raise LifecycleError(f"unknown card {mask_card_no(card_no)}")
        if card.status not in allowed_from:
            raise LifecycleError(f"card {mask_card_no(card_no)} is {card.status}; cannot become {to}")
        await conn.execute(update(cards).where(cards.c.card_no == card_no)
                           .values(status=to, updated_at=datetime.now(UTC), **extra))
        await conn.run_sync(append_audit, actor, action, mask_card_no(card_no), {"from": card.status, "to": to})
        return dataclasses.replace(card, status=to, **{k: v for k, v in extra.items() if k in ("valid_until",)})


async def activate(engine: AsyncEngine, card_no: str, *, actor: str = DEFAULT_ACTOR) -> Card:
    """Activate an issued card (启用)."""
    return await _set_status(engine, card_no, ("issued",), "active", "card.activate", actor)


async def report_lost(engine: AsyncEngine, card_no: str, *, actor: str = DEFAULT_ACTOR) -> Card:
    """挂失: the card is blocked; purchases are declined ``62``. Reporting a lost card again is harmless."""
    async with engine.connect() as conn:
        card = await get_card(conn, card_no)
    if card is not None and card.status == "lost":
        return card
    return await _set_status(engine, card_no, ("issued", "active"), "lost", "card.lost", actor)


async def unblock(engine: AsyncEngine, card_no: str, *, actor: str = DEFAULT_ACTOR) -> Card:
    """解挂: a lost card found again becomes active."""
    return await _set_status(engine, card_no, ("lost",), "active", "card.unblock", actor)


async def extend(engine: AsyncEngine, card_no: str, valid_until: date, *, actor: str = DEFAULT_ACTOR) -> Card:
    """延期: a new eligibility valid-until date (must be later than the current one)."""
    async with write_transaction(engine) as conn:
        card = await conn.run_sync(_get_card_sync, card_no)
        if card is None:
            raise LifecycleError(f"unknown card {mask_card_no(card_no)}")
        if card.status in ("closed", "cancelled"):
            raise LifecycleError(f"card {mask_card_no(card_no)} is {card.status}")
        if valid_until <= card.valid_until:
            raise LifecycleError(f"new valid-until {valid_until} is not after {card.valid_until}")
        await conn.execute(update(cards).where(cards.c.card_no == card_no)
                           .values(valid_until=valid_until, updated_at=datetime.now(UTC)))
        await conn.run_sync(append_audit, actor, "card.extend", mask_card_no(card_no),
                            {"from": card.valid_until.isoformat(), "to": valid_until.isoformat()})
        return dataclasses.replace(card, valid_until=valid_until)


def _card_balances_sync(conn: Connection, card_no: str) -> dict[str, int]:
    codes = [card_account(card_no, p) for p in PROGRAMS]
    q = (select(accounts.c.code, accounts.c.credits_posted, accounts.c.debits_posted)
         .where(accounts.c.code.in_(codes)).order_by(accounts.c.id).with_for_update())
    return {code.rsplit(":", 1)[1]: int(c) - int(d) for code, c, d in conn.execute(q)}


async def replace(engine: AsyncEngine, old_card_no: str, new_card: Any, *, actor: str = DEFAULT_ACTOR) -> dict[str, Any]:
    """补卡/换卡: register ``new_card`` (same cardholder), move every balance to it, close the old card.

    One transaction: the new card, the correcting transfers and the old card's closure
    commit together or not at all. Idempotent: replacing again with the same new card
    returns the first answer.
    """
    row = card_row(new_card)
    async with write_transaction(engine) as conn:
        return await conn.run_sync(_replace_sync, old_card_no, row, actor)


def _replace_sync(conn: Connection, old_no: str, row: dict[str, Any], actor: str = DEFAULT_ACTOR) -> dict[str, Any]:
    key = f"{old_no}->{row['card_no']}"
    h = idem.request_hash({"old": old_no, "new": row["card_no"], "serial": row["app_serial"]})
    stored = idem.lookup_sync(conn, "card_replace", key, h)
    if stored is not None:
        return stored
    old = _get_card_sync(conn, old_no)
    if old is None:
        raise LifecycleError(f"unknown card {mask_card_no(old_no)}")
    if old.status in ("closed", "cancelled"):
        raise LifecycleError(f"card {mask_card_no(old_no)} is {old.status}")
    if row["id_no"] != old.id_no:
        raise LifecycleError("the new card belongs to another cardholder (resident ID differs)")
    row = {**row, "programs": ",".join(sorted(set(row["programs"].split(",")) | set(old.programs))),
           "status": "active", "valid_until": max(row["valid_until"], old.valid_until)}
    if _register_sync(conn, [row]) != 1:
        raise LifecycleError(f"new card {mask_card_no(row['card_no'])} is already registered")
    moved = {}
    specs = []
    for program, bal in sorted(_card_balances_sync(conn, old_no).items()):
        if bal > 0:
            specs.append(TransferSpec(card_account(old_no, program), card_account(row["card_no"], program), bal,
                                      "replace", f"replace:{key}:{program}", memo="card replacement"))
            moved[program] = bal
    post_transfers_sync(conn, specs)
    conn.execute(update(cards).where(cards.c.card_no == old_no)
                 .values(status="closed", replaced_by=row["card_no"], updated_at=datetime.now(UTC)))
    answer = {"old_card": mask_card_no(old_no), "new_card": mask_card_no(row["card_no"]), "moved_fen": moved}
    idem.store_sync(conn, "card_replace", key, h, answer)
    append_audit(conn, actor, "card.replace", mask_card_no(old_no), answer)
    return answer


async def cancel(engine: AsyncEngine, card_no: str, policy: str = DEFAULT_CANCEL_POLICY,
                 reason: str = "death", *, actor: str = DEFAULT_ACTOR) -> dict[str, Any]:
    """注销: close the card (e.g. on death data). ``return_to_fund`` moves every balance back to the
    program fund of the card's district; ``freeze`` leaves it frozen on the cancelled card."""
    if policy not in CANCEL_POLICIES:
        raise LifecycleError(f"cancel policy must be one of {', '.join(CANCEL_POLICIES)}")
    async with write_transaction(engine) as conn:
        return await conn.run_sync(_cancel_sync, card_no, policy, reason, actor)


def _cancel_sync(conn: Connection, card_no: str, policy: str, reason: str,
                 actor: str = DEFAULT_ACTOR) -> dict[str, Any]:
    h = idem.request_hash({"policy": policy})
    stored = idem.lookup_sync(conn, "card_cancel", card_no, h)
    if stored is not None:
        return stored
    card = _get_card_sync(conn, card_no)
    if card is None:
        raise LifecycleError(f"unknown card {mask_card_no(card_no)}")
    if card.status in ("closed", "cancelled"):
        raise LifecycleError(f"card {mask_card_no(card_no)} is already {card.status}")
    bals = _card_balances_sync(conn, card_no)
    returned: dict[str, int] = {}
    if policy == "return_to_fund":
        specs = []
        for program, bal in sorted(bals.items()):
            if bal > 0:
                fund_program = "voucher" if program == "restricted" else program
                specs.append(TransferSpec(card_account(card_no, program), fund_account(fund_program, card.district),
                                          bal, "cancel", f"cancel:{card_no}:{program}", memo=f"cancel: {reason}"[:200]))
                returned[program] = bal
        post_transfers_sync(conn, specs)
    conn.execute(update(cards).where(cards.c.card_no == card_no)
                 .values(status="cancelled", updated_at=datetime.now(UTC)))
    frozen = {p: b for p, b in bals.items() if b > 0} if policy == "freeze" else {}
    answer = {"card": mask_card_no(card_no), "policy": policy, "returned_fen": returned, "frozen_fen": frozen}
    idem.store_sync(conn, "card_cancel", card_no, h, answer)
    append_audit(conn, actor, "card.cancel", mask_card_no(card_no), {**answer, "reason": reason[:200]})
    return answer


# --- 多卡合一 merge migration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class MigrationLine:
    line_no: int
    source_bank: str
    source_account: str
    card_no: str
    id_no: str
    program: str
    amount_fen: int


def parse_migration(text: str) -> tuple[list[MigrationLine], list[str]]:
    """Parse a migration CSV (header ``source_bank,source_account,card_no,id_no,program,amount_fen``).

    Returns the lines and every problem found (one message per bad line; numbers masked).
    """
    lines: list[MigrationLine] = []
    problems: list[str] = []
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None or tuple(h.strip() for h in header) != MIGRATION_COLUMNS:
        return [], [f"line 1: header must be {','.join(MIGRATION_COLUMNS)}"]
    seen: set[tuple[str, str]] = set()
    for n, rec in enumerate(reader, start=2):
        if n > MAX_MIGRATION_LINES + 1:
            problems.append(f"more than {MAX_MIGRATION_LINES} lines")
            break
        if not rec or all(not x.strip() for x in rec):
            continue
        if len(rec) != len(MIGRATION_COLUMNS):
            problems.append(f"line {n}: expected {len(MIGRATION_COLUMNS)} fields, got {len(rec)}")
            continue
        bank, acct, card_no, id_no, program, amount = (x.strip() for x in rec)
        try:
            check_card_no(card_no)
            check_id_no(id_no)
        except IdError as exc:
            problems.append(f"line {n}: {exc}")
            continue
        if not re.match(r"^[0-9A-Za-z]{2,16}$", bank) or not re.match(r"^[0-9A-Za-z-]{1,40}$", acct):
            problems.append(f"line {n}: bad source bank or account")
            continue
        if program not in CARD_PROGRAMS:
            problems.append(f"line {n}: program must be voucher or nursing")
            continue
        if not amount.isdigit() or not 0 < int(amount) <= 100_000_000:
            problems.append(f"line {n}: amount_fen must be a positive integer (fen)")
            continue
        if (bank, acct) in seen:
            problems.append(f"line {n}: source account repeated")
            continue
        seen.add((bank, acct))
        lines.append(MigrationLine(n, bank, acct, card_no, id_no, program, int(amount)))
    return lines, problems


async def migrate(engine: AsyncEngine, path: Path | str, *, actor: str = DEFAULT_ACTOR) -> dict[str, Any]:
    """多卡合一: credit balances from another bank's elderly-quota accounts onto registered cards.

    All-or-nothing per file, idempotent per file content (a second run reports ``already_imported``).
    """
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise LifecycleError("migration file is not UTF-8") from None
    lines, problems = parse_migration(text)
    async with write_transaction(engine) as conn:
        return await conn.run_sync(_migrate_sync, raw, lines, problems, actor)


def _migrate_sync(conn: Connection, raw: bytes, lines: list[MigrationLine], problems: list[str],
                  actor: str = DEFAULT_ACTOR) -> dict[str, Any]:
    h = idem.request_hash(raw)
    stored = idem.lookup_sync(conn, "migration", h, h)
    if stored is not None:
        return {**stored, "already_imported": True}
    problems = list(problems)
    nos = sorted({ln.card_no for ln in lines})
    known = {}
    for i in range(0, len(nos), 500):
        for r in conn.execute(select(cards).where(cards.c.card_no.in_(nos[i:i + 500]))):
            known[r.card_no] = Card.from_row(r)
    for ln in lines:
        card = known.get(ln.card_no)
        if card is None:
            problems.append(f"line {ln.line_no}: card {mask_card_no(ln.card_no)} is not registered")
        elif card.id_no != ln.id_no:
            problems.append(f"line {ln.line_no}: resident ID does not match the card")
        elif card.status in ("closed", "cancelled"):
            problems.append(f"line {ln.line_no}: card {mask_card_no(ln.card_no)} is {card.status}")
        elif ln.program not in card.programs:
            problems.append(f"line {ln.line_no}: card is not entitled to {ln.program}")
    if problems:
        raise MigrationRejected(problems)
    specs = [TransferSpec(migration_account(ln.program), card_account(ln.card_no, ln.program), ln.amount_fen,
                          "migration", f"migration:{ln.source_bank}:{ln.source_account}",
                          memo=f"多卡合一 {ln.source_bank}") for ln in lines]
    post_transfers_sync(conn, specs)
    answer = {"lines": len(lines), "amount_fen": sum(ln.amount_fen for ln in lines), "already_imported": False}
    idem.store_sync(conn, "migration", h, h, answer)
    append_audit(conn, actor, "card.migrate", f"file:{h[:16]}", {"lines": answer["lines"],
                                                                 "amount_fen": answer["amount_fen"]})
    return answer


class MigrationRejected(LifecycleError):
    """The migration file was rejected whole; ``problems`` lists every reason."""

    def __init__(self, problems: list[str]):
        super().__init__(f"migration file rejected: {len(problems)} problem(s); first: {problems[0]}")
        self.problems = problems
