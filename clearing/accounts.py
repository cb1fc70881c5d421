"""Ledger accounts (账户): their codes, kinds and flags, creation and balances.

Balance of an account = ``credits_posted - debits_posted``. Money flows:

- recharge (充值): ``fund:{program}:{district}`` → ``card:{card_no}:{program}``
- purchase (消费): ``card:{card_no}:{program}`` → ``provider:{provider_id}:payable``
- void / refund / reversal: the reverse of the purchase
- expiry: ``card:…:voucher`` → ``expired:voucher``; rollover (结转): ``card:…:voucher`` → ``card:…:restricted``
- migration (多卡合一): ``migration:{program}`` → card accounts
- suspense (挂账), bank fee expense and bank settlement for end of day.

Beneficiary (card) accounts carry ``FLAG_NO_OVERDRAFT``; fund, migration, provider,
bank and suspense accounts may go negative (they are sources or net positions).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection

from clearing.schema import FLAG_NO_OVERDRAFT, accounts

PROGRAMS = ("voucher", "nursing", "restricted")
CARD_PROGRAMS = PROGRAMS
BANK_FEE_EXPENSE = "bank:fee_expense"
BANK_SETTLEMENT = "bank:settlement"
SUSPENSE = "suspense"


class AccountError(Exception):
    """An account code that is malformed or not in the ledger."""


def card_account(card_no: str, program: str) -> str:
    if program not in PROGRAMS:
        raise AccountError(f"unknown program {program!r}")
    return f"card:{card_no}:{program}"


def provider_payable(provider_id: str) -> str:
    return f"provider:{provider_id}:payable"


def fund_account(program: str, district: str) -> str:
    return f"fund:{program}:{district}"


def expired_account(program: str = "voucher") -> str:
    return f"expired:{program}"


def migration_account(program: str) -> str:
    return f"migration:{program}"


@dataclass(frozen=True)
class AccountSpec:
    """What an account is, derived from its code."""

    code: str
    kind: str
    program: str | None
    owner: str | None
    flags: int


def spec_for(code: str) -> AccountSpec:
    """The kind, program, owner and flags of an account code (``card:…`` accounts never overdraw)."""
    parts = code.split(":")
    kind = parts[0]
    if kind == "card" and len(parts) == 3 and parts[2] in PROGRAMS:
        return AccountSpec(code, "card", parts[2], parts[1], FLAG_NO_OVERDRAFT)
    if kind == "provider" and len(parts) == 3 and parts[2] == "payable":
        return AccountSpec(code, "provider", None, parts[1], 0)
    if kind == "fund" and len(parts) == 3:
        return AccountSpec(code, "fund", parts[1], parts[2], 0)
    if kind in ("expired", "migration") and len(parts) == 2:
        return AccountSpec(code, kind, parts[1], None, 0)
    if code in (BANK_FEE_EXPENSE, BANK_SETTLEMENT):
        return AccountSpec(code, "bank", None, None, 0)
    if code == SUSPENSE:
        return AccountSpec(code, "suspense", None, None, 0)
    raise AccountError(f"malformed account code {code!r}")


def ensure_accounts_sync(conn: Connection, codes: Iterable[str]) -> dict[str, int]:
    """Create the accounts that do not exist yet (``ON CONFLICT DO NOTHING``); returns ``{code: id}``."""
    wanted = sorted(set(codes))
    if not wanted:
        return {}
    specs = [spec_for(c) for c in wanted]
    now = datetime.now(UTC)
    rows = [{"code": s.code, "kind": s.kind, "program": s.program, "owner": s.owner, "flags": s.flags,
             "debits_posted": 0, "credits_posted": 0, "created_at": now} for s in specs]
    ins = sqlite_insert(accounts) if conn.dialect.name == "sqlite" else pg_insert(accounts)
    conn.execute(ins.on_conflict_do_nothing(index_elements=["code"]), rows)
    ids: dict[str, int] = {}
    for chunk in _chunks(wanted, 500):
        ids.update((code, aid) for code, aid in conn.execute(select(accounts.c.code, accounts.c.id).where(accounts.c.code.in_(chunk))))
    return ids


async def ensure_accounts(conn: AsyncConnection, codes: Iterable[str]) -> dict[str, int]:
    return await conn.run_sync(ensure_accounts_sync, list(codes))


def _chunks(items: list[str], n: int) -> Iterable[list[str]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


async def balance(conn: AsyncConnection, code: str) -> int | None:
    """``credits - debits`` of one account, ``None`` when it does not exist."""
    row = (await conn.execute(select(accounts.c.credits_posted, accounts.c.debits_posted)
                              .where(accounts.c.code == code))).first()
    return None if row is None else int(row[0]) - int(row[1])


async def balances(conn: AsyncConnection, codes: Iterable[str]) -> dict[str, int]:
    """Balances of the given codes that exist."""
    wanted = list(set(codes))
    out: dict[str, int] = {}
    for chunk in _chunks(wanted, 500):
        res = await conn.execute(select(accounts.c.code, accounts.c.credits_posted, accounts.c.debits_posted)
                                 .where(accounts.c.code.in_(chunk)))
        out.update({code: int(c) - int(d) for code, c, d in res})
    return out


async def card_balances(conn: AsyncConnection, card_no: str) -> dict[str, int]:
    """``{program: balance}`` of a card's accounts."""
    got = await balances(conn, [card_account(card_no, p) for p in PROGRAMS])
    return {code.rsplit(":", 1)[1]: b for code, b in got.items()}
