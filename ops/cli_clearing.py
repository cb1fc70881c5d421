"""CLI verbs of the clearing staff: ``carepay clearing init-db|check|provider …|terminal …``,
``carepay recharge import|expire|rollover`` and ``carepay card register|show|lost|unblock|replace|extend|cancel|migrate``.

Every verb takes ``--db URL`` (default: the configured database, else an SQLite file under the
data directory) and ``--json`` where it prints results. Card and resident ID numbers are masked.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from datetime import date
from pathlib import Path
from typing import Any, TypeVar

import typer

from ops.errors import BadInput, CarepayError

T = TypeVar("T")

clearing_app = typer.Typer(
    help="Clearing: database, ledger check, provider and terminal registry.\n\n"
    "Examples:\n\n  carepay clearing init-db --db sqlite:///carepay.db\n\n"
    "  carepay clearing provider add --id P00000000000001 --name 幸福驿站 --programs voucher "
    "--categories meal,bathing --settle-account 6222000011112222",
    no_args_is_help=True,
)
provider_app = typer.Typer(help="Providers (服务商): add, list, suspend, withdraw, activate.\n\n"
                           "Example:\n\n  carepay clearing provider list --json", no_args_is_help=True)
terminal_app = typer.Typer(help="Terminals (终端): register, list, export install data.\n\n"
                           "Example:\n\n  carepay clearing terminal export-install --out install.csv",
                           no_args_is_help=True)
recharge_app = typer.Typer(help="Recharge (充值): import the civil-affairs subsidy file; voucher expiry; rollover.\n\n"
                           "Example:\n\n  carepay recharge import recharge-202603.csv --json", no_args_is_help=True)
card_app = typer.Typer(help="Card lifecycle (卡片): register, lost, unblock, replace, extend, cancel, migrate.\n\n"
                       "Example:\n\n  carepay card lost 6218880000000000015", no_args_is_help=True)
clearing_app.add_typer(provider_app, name="provider")
clearing_app.add_typer(terminal_app, name="terminal")

DbOpt = typer.Option(None, "--db", help="Database URL (sqlite+aiosqlite:///FILE or postgresql+asyncpg://…).")
JsonOpt = typer.Option(False, "--json", help="Print one JSON document.")
UserOpt = typer.Option(os.environ.get("USER", "operator"), "--user", help="Who does this (written to the audit log).")


def register(app: typer.Typer) -> None:
    """Add this module's verbs to the top-level app."""
    app.add_typer(clearing_app, name="clearing")
    app.add_typer(recharge_app, name="recharge")
    app.add_typer(card_app, name="card")


def _db_url(db: str | None) -> str:
    if db:
        return db
    from ops.config import load_settings

    s = load_settings()
    if not s.db_url:
        s.data_dir.mkdir(parents=True, exist_ok=True)
    return s.resolved_db_url()


def _run(db: str | None, work: Callable[[Any], Awaitable[T]], *, init: bool = True) -> T:
    """Open the database, run ``work(engine)``, map domain errors to one-line CLI errors."""
    from clearing.db import DatabaseError, init_db, make_engine
    from clearing.ledger import IdempotencyConflict, InsufficientFunds
    from clearing.lifecycle import LifecycleError
    from clearing.registry import RegistryError

    async def main() -> T:
        try:
            engine = make_engine(_db_url(db))
        except DatabaseError as exc:
            raise BadInput(str(exc)) from None
        try:
            if init:
                await init_db(engine)
            return await work(engine)
        finally:
            await engine.dispose()

    try:
        return asyncio.run(main())
    except (RegistryError, LifecycleError) as exc:
        raise BadInput(str(exc)) from None
    except (IdempotencyConflict, InsufficientFunds) as exc:
        raise CarepayError(str(exc)) from None
    except OSError as exc:
        raise CarepayError(f"{exc.filename or 'database'}: {exc.strerror or exc}") from None


def _print(obj: Any, as_json: bool, text: str) -> None:
    typer.echo(json.dumps(obj, ensure_ascii=False, default=str) if as_json else text)


def _date(value: str, what: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise BadInput(f"{what} must be YYYY-MM-DD") from None


# --- clearing ------------------------------------------------------------------------------------------


@clearing_app.command("init-db")
def init_db_cmd(db: str = DbOpt, as_json: bool = JsonOpt) -> None:
    """Create or upgrade the clearing schema (versioned migrations; idempotent).

    Example: carepay clearing init-db --db sqlite:///carepay.db
    """
    from clearing.db import init_db, url_for_display
    from clearing.migrations import current_tables

    async def work(engine: Any) -> dict[str, Any]:
        applied = await init_db(engine)
        return {"db": url_for_display(str(engine.url)), "applied": applied, "tables": await current_tables(engine)}

    out = _run(db, work, init=False)
    _print(out, as_json, f"{out['db']}: migrations applied {out['applied'] or 'none (up to date)'}; "
                         f"{len(out['tables'])} tables")


@clearing_app.command("check")
def check_cmd(db: str = DbOpt, as_json: bool = JsonOpt) -> None:
    """Check the ledger invariants (Σ debits = Σ credits, no negative beneficiary, balances = transfers,
    each message posted once). Exit 1 when any is violated.

    Example: carepay clearing check --json
    """
    from clearing.invariants import check_invariants

    problems = _run(db, check_invariants)
    _print({"ok": not problems, "violations": problems}, as_json,
           "ledger consistent" if not problems else "\n".join(problems))
    if problems:
        raise typer.Exit(1)


# --- providers -----------------------------------------------------------------------------------------


def _provider_dict(p: Any) -> dict[str, Any]:
    return {"provider_id": p.provider_id, "name": p.name, "programs": list(p.programs),
            "service_categories": list(p.service_categories), "status": p.status,
            "settle_account": p.settle_account, "district": p.district}


@provider_app.command("add")
def provider_add(provider_id: str = typer.Option(..., "--id", help="15 characters 0-9A-Z."),
                 name: str = typer.Option(..., "--name"),
                 programs: str = typer.Option(..., "--programs", help="voucher or nursing (comma list)."),
                 categories: str = typer.Option(..., "--categories", help="Service categories, comma list."),
                 settle_account: str = typer.Option(..., "--settle-account", help="Bank account paid at settlement."),
                 district: str = typer.Option("", "--district", help="6-digit district code."),
                 db: str = DbOpt, as_json: bool = JsonOpt, user: str = UserOpt) -> None:
    """Register a provider (active) with the programs and service categories it may accept.

    Example: carepay clearing provider add --id P00000000000001 --name 幸福驿站 --programs voucher
    --categories meal,bathing --settle-account 6222000011112222
    """
    from clearing.registry import add_provider

    p = _run(db, lambda e: add_provider(e, provider_id, name, programs, categories, settle_account, district,
                                           actor=user))
    _print(_provider_dict(p), as_json, f"provider {p.provider_id} registered ({','.join(p.programs)})")


@provider_app.command("list")
def provider_list(status: str = typer.Option(None, "--status"), db: str = DbOpt, as_json: bool = JsonOpt) -> None:
    """List providers.

    Example: carepay clearing provider list --status active
    """
    from clearing.registry import list_providers

    rows = [_provider_dict(p) for p in _run(db, lambda e: list_providers(e, status))]
    _print(rows, as_json, "\n".join(f"{r['provider_id']}  {r['status']:9}  {','.join(r['programs']):15}  {r['name']}"
                                    for r in rows) or "no providers")


def _provider_status(provider_id: str, status: str, db: str | None, as_json: bool, user: str) -> None:
    from clearing.registry import set_provider_status

    p = _run(db, lambda e: set_provider_status(e, provider_id, status, actor=user))
    _print(_provider_dict(p), as_json, f"provider {p.provider_id} is {p.status}")


@provider_app.command("suspend")
def provider_suspend(provider_id: str, db: str = DbOpt, as_json: bool = JsonOpt, user: str = UserOpt) -> None:
    """Suspend a provider: its purchases are declined 58 until it is activated again.

    Example: carepay clearing provider suspend P00000000000001
    """
    _provider_status(provider_id, "suspended", db, as_json, user)


@provider_app.command("withdraw")
def provider_withdraw(provider_id: str, db: str = DbOpt, as_json: bool = JsonOpt, user: str = UserOpt) -> None:
    """Withdraw (清退) a provider for good: declined 58 from now on.

    Example: carepay clearing provider withdraw P00000000000001
    """
    _provider_status(provider_id, "withdrawn", db, as_json, user)


@provider_app.command("activate")
def provider_activate(provider_id: str, db: str = DbOpt, as_json: bool = JsonOpt, user: str = UserOpt) -> None:
    """Activate a suspended provider again.

    Example: carepay clearing provider activate P00000000000001
    """
    _provider_status(provider_id, "active", db, as_json, user)


# --- terminals -----------------------------------------------------------------------------------------


def _terminal_dict(t: Any) -> dict[str, Any]:
    return {"terminal_id": t.terminal_id, "provider_id": t.provider_id, "psam_serial": t.psam_serial,
            "install_date": t.install_date.isoformat(), "address": t.address, "status": t.status,
            "tmk_kcv": t.tmk_kcv, "sm2_public_key": t.sm2_public_key}


@terminal_app.command("register")
def terminal_register(terminal_id: str = typer.Option(..., "--id", help="8 characters 0-9A-Z."),
                      provider_id: str = typer.Option(..., "--provider"),
                      psam: str = typer.Option(..., "--psam", help="PSAM serial."),
                      install_date: str = typer.Option(..., "--install-date", help="YYYY-MM-DD"),
                      address: str = typer.Option("", "--address"),
                      sm2_public_key: str = typer.Option("", "--sm2-public-key", help="64-byte X‖Y hex."),
                      tmk_kcv: str = typer.Option("", "--tmk-kcv", help="TMK check value (6 hex)."),
                      db: str = DbOpt, as_json: bool = JsonOpt, user: str = UserOpt) -> None:
    """Bind a terminal to a provider, with its PSAM serial and install date.

    Example: carepay clearing terminal register --id T0000001 --provider P00000000000001 --psam PSAM0001
    --install-date 2026-03-01
    """
    from clearing.registry import register_terminal

    d = _date(install_date, "--install-date")
    t = _run(db, lambda e: register_terminal(e, terminal_id, provider_id, psam, d, address=address,
                                             sm2_public_key=sm2_public_key, tmk_kcv=tmk_kcv, actor=user))
    _print(_terminal_dict(t), as_json, f"terminal {t.terminal_id} registered to {t.provider_id}")


@terminal_app.command("list")
def terminal_list(provider_id: str = typer.Option(None, "--provider"), db: str = DbOpt,
                  as_json: bool = JsonOpt) -> None:
    """List terminals.

    Example: carepay clearing terminal list --provider P00000000000001 --json
    """
    from clearing.registry import list_terminals

    rows = [_terminal_dict(t) for t in _run(db, lambda e: list_terminals(e, provider_id))]
    _print(rows, as_json, "\n".join(f"{r['terminal_id']}  {r['provider_id']}  {r['status']:8}  {r['psam_serial']}  "
                                    f"{r['install_date']}" for r in rows) or "no terminals")


@terminal_app.command("export-install")
def terminal_export(out: Path = typer.Option(..., "--out", help="CSV file to write."),
                    provider_id: str = typer.Option(None, "--provider"), db: str = DbOpt,
                    as_json: bool = JsonOpt) -> None:
    """Write the install data (装机数据) CSV for the program's operations unit.

    Example: carepay clearing terminal export-install --out install.csv
    """
    from clearing.registry import export_install_csv

    text = _run(db, lambda e: export_install_csv(e, provider_id))
    try:
        out.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise CarepayError(f"cannot write {out}: {exc.strerror}") from None
    n = max(0, text.count("\n") - 1)
    _print({"path": str(out), "terminals": n}, as_json, f"{n} terminal(s) written to {out}")


# --- recharge ------------------------------------------------------------------------------------------


@recharge_app.command("import")
def recharge_import(file: Path = typer.Argument(..., help="Recharge CSV from civil affairs."), db: str = DbOpt,
                    as_json: bool = JsonOpt, user: str = UserOpt) -> None:
    """Import a recharge file: all or nothing, once per batch id; every bad line is reported (exit 2).

    Example: carepay recharge import recharge-202603.csv --json
    """
    from clearing.recharge import import_recharge

    report = _run(db, lambda e: import_recharge(e, file, actor=user))
    d = report.to_dict()
    if as_json:
        _print(d, True, "")
    else:
        head = f"batch {report.batch_id}: {report.status}"
        if report.status != "rejected":
            head += f", {report.lines} line(s), {report.total_fen / 100:.2f} yuan"
        typer.echo(head)
        for r in report.rejects:
            typer.echo(f"  line {r['line_no']}: {r['reason']}", err=True)
    if report.status == "rejected":
        raise typer.Exit(2)


@recharge_app.command("expire")
def recharge_expire(as_of: str = typer.Option(..., "--as-of", help="YYYY-MM-DD: lots expiring before it."),
                    db: str = DbOpt, as_json: bool = JsonOpt, user: str = UserOpt) -> None:
    """Sweep expired voucher money to the expired account (idempotent).

    Example: carepay recharge expire --as-of 2026-04-01
    """
    from clearing.recharge import expire_vouchers

    d = _date(as_of, "--as-of")
    out = _run(db, lambda e: expire_vouchers(e, d, actor=user))
    _print(out, as_json, f"{out['cards']} card(s), {out['expired_fen'] / 100:.2f} yuan expired")


@recharge_app.command("rollover")
def recharge_rollover(year: int = typer.Option(..., "--year"), db: str = DbOpt, as_json: bool = JsonOpt,
                      user: str = UserOpt) -> None:
    """Year-end rollover (结转): unspent vouchers move to the restricted account (idempotent per year).

    Example: carepay recharge rollover --year 2026
    """
    from clearing.recharge import rollover_year_end

    out = _run(db, lambda e: rollover_year_end(e, year, actor=user))
    _print(out, as_json, f"{out['cards']} card(s), {out['moved_fen'] / 100:.2f} yuan rolled over"
           + (" (already done)" if out.get("already_done") else ""))


# --- cards ---------------------------------------------------------------------------------------------


def _card_dict(c: Any) -> dict[str, Any]:
    from protocol.ids import mask_card_no, mask_id_no

    return {"card_no": mask_card_no(c.card_no), "id_no": mask_id_no(c.id_no), "status": c.status,
            "valid_until": c.valid_until.isoformat(), "programs": list(c.programs), "district": c.district,
            "replaced_by": mask_card_no(c.replaced_by) if c.replaced_by else None}


@card_app.command("register")
def card_register(file: Path = typer.Argument(..., help="JSON list of cards (the personalisation deck)."),
                  db: str = DbOpt, as_json: bool = JsonOpt, user: str = UserOpt) -> None:
    """Register issued cards from a JSON deck (card_no, app_serial, id_no, district, valid_until, programs, …).

    Example: carepay card register deck.json
    """
    from clearing.lifecycle import register_cards

    try:
        deck = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise BadInput(f"{file}: {exc}") from None
    if isinstance(deck, dict):
        deck = deck.get("cards", [])
    if not isinstance(deck, list):
        raise BadInput(f"{file}: expected a JSON list of cards")
    n = _run(db, lambda e: register_cards(e, deck, actor=user))
    _print({"registered": n, "in_file": len(deck)}, as_json, f"{n} new card(s) registered of {len(deck)}")


@card_app.command("show")
def card_show(card_no: str, db: str = DbOpt, as_json: bool = JsonOpt) -> None:
    """Show a card's status and balances (numbers masked).

    Example: carepay card show 6218880000000000015
    """
    from clearing.accounts import card_balances
    from clearing.lifecycle import LifecycleError, get_card

    async def work(engine: Any) -> dict[str, Any]:
        async with engine.connect() as conn:
            c = await get_card(conn, card_no)
            if c is None:
                raise LifecycleError("unknown card")
            return {**_card_dict(c), "balances_fen": await card_balances(conn, card_no)}

    out = _run(db, work)
    _print(out, as_json, f"{out['card_no']}  {out['status']}  valid until {out['valid_until']}  "
                         + "  ".join(f"{k}={v / 100:.2f}" for k, v in sorted(out["balances_fen"].items())))


@card_app.command("lost")
def card_lost(card_no: str, db: str = DbOpt, as_json: bool = JsonOpt, user: str = UserOpt) -> None:
    """Report a card lost (挂失): purchases are declined 62.

    Example: carepay card lost 6218880000000000015
    """
    from clearing.lifecycle import report_lost

    c = _run(db, lambda e: report_lost(e, card_no, actor=user))
    _print(_card_dict(c), as_json, f"card {_card_dict(c)['card_no']} is {c.status}")


@card_app.command("unblock")
def card_unblock(card_no: str, db: str = DbOpt, as_json: bool = JsonOpt, user: str = UserOpt) -> None:
    """Unblock a lost card (解挂).

    Example: carepay card unblock 6218880000000000015
    """
    from clearing.lifecycle import unblock

    c = _run(db, lambda e: unblock(e, card_no, actor=user))
    _print(_card_dict(c), as_json, f"card {_card_dict(c)['card_no']} is {c.status}")


@card_app.command("extend")
def card_extend(card_no: str, until: str = typer.Option(..., "--until", help="New valid-until, YYYY-MM-DD."),
                db: str = DbOpt, as_json: bool = JsonOpt, user: str = UserOpt) -> None:
    """Extend eligibility (延期).

    Example: carepay card extend 6218880000000000015 --until 2031-12-31
    """
    from clearing.lifecycle import extend

    d = _date(until, "--until")
    c = _run(db, lambda e: extend(e, card_no, d, actor=user))
    _print(_card_dict(c), as_json, f"card {_card_dict(c)['card_no']} valid until {c.valid_until}")


@card_app.command("replace")
def card_replace(card_no: str, new_card_no: str = typer.Option(..., "--new-card"),
                 app_serial: str = typer.Option(..., "--app-serial", help="The new card's application serial (hex)."),
                 key_version: int = typer.Option(1, "--key-version"), db: str = DbOpt,
                 as_json: bool = JsonOpt, user: str = UserOpt) -> None:
    """Replace a card (补卡/换卡): the new card gets the cardholder data and every balance; the old is closed.

    Example: carepay card replace 6218880000000000015 --new-card 6218880000000000023 --app-serial 00000000000000A1
    """
    from clearing.lifecycle import LifecycleError, get_card, replace

    async def work(engine: Any) -> dict[str, Any]:
        async with engine.connect() as conn:
            old = await get_card(conn, card_no)
        if old is None:
            raise LifecycleError("unknown card")
        spec = {"card_no": new_card_no, "app_serial": app_serial, "id_no": old.id_no, "district": old.district,
                "street": old.street, "category": old.category, "valid_until": old.valid_until,
                "programs": old.programs, "key_version": key_version, "suite": old.suite}
        return await replace(engine, card_no, spec, actor=user)

    out = _run(db, work)
    _print(out, as_json, f"card {out['old_card']} replaced by {out['new_card']}; moved "
                         + (", ".join(f"{k} {v / 100:.2f}" for k, v in out["moved_fen"].items()) or "nothing"))


@card_app.command("cancel")
def card_cancel(card_no: str, policy: str = typer.Option("return_to_fund", "--policy",
                                                         help="return_to_fund or freeze"),
                reason: str = typer.Option("death", "--reason"), db: str = DbOpt, as_json: bool = JsonOpt,
                user: str = UserOpt) -> None:
    """Cancel a card (注销), e.g. on death data; balances returned to the fund or frozen per policy.

    Example: carepay card cancel 6218880000000000015 --policy return_to_fund --reason death
    """
    from clearing.lifecycle import cancel

    out = _run(db, lambda e: cancel(e, card_no, policy, reason, actor=user))
    _print(out, as_json, f"card {out['card']} cancelled ({out['policy']})")


@card_app.command("migrate")
def card_migrate(file: Path = typer.Argument(..., help="CSV: source_bank,source_account,card_no,id_no,program,"
                                                       "amount_fen"),
                 db: str = DbOpt, as_json: bool = JsonOpt, user: str = UserOpt) -> None:
    """多卡合一: credit balances from another bank's elderly-quota accounts onto registered cards
    (all or nothing; a file imports once).

    Example: carepay card migrate quota-accounts.csv --json
    """
    from clearing.lifecycle import MigrationRejected, migrate

    try:
        out = _run(db, lambda e: migrate(e, file, actor=user))
    except BadInput as exc:
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, MigrationRejected):
            if as_json:
                typer.echo(json.dumps({"status": "rejected", "problems": cause.problems}, ensure_ascii=False))
            else:
                for p in cause.problems:
                    typer.echo(f"  {p}", err=True)
        raise
    _print(out, as_json, f"{out['lines']} account(s), {out['amount_fen'] / 100:.2f} yuan migrated"
           + (" (already imported)" if out.get("already_imported") else ""))
