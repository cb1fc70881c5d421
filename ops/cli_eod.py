"""CLI verbs for end of day and the people after it: ``eod run``, ``reconcile``, ``errors …``, ``report …``,
``audit verify``, and ``sim bank-file`` (added to the ``sim`` group of ``ops.cli_sim``).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, TypeVar

import typer

from ops.errors import BadInput, CarepayError

T = TypeVar("T")

eod_app = typer.Typer(help="End of day (日终).\n\nExample:\n\n  carepay eod run --date 2026-11-27 --bank-file bank.txt",
                      no_args_is_help=True)
errors_app = typer.Typer(
    help="Error accounts (差错账): maker proposes, a different checker approves, then post.\n\nExample:\n\n"
    "  carepay errors list --status open\n\n  carepay errors propose EC-20261127-000001 --user alice --action adjust "
    "--note 'bank confirmed short'\n\n  carepay errors approve EC-20261127-000001 --user bob",
    no_args_is_help=True)
report_app = typer.Typer(
    help="Signed reports for staff and auditors.\n\nExample:\n\n  carepay report daily --date 2026-11-27 --format html "
    "--out daily.html\n\n  carepay report verify daily.html", no_args_is_help=True)
audit_app = typer.Typer(help="The SM3-chained audit log.\n\nExample:\n\n  carepay audit verify", no_args_is_help=True)

DB_HELP = "Database URL (default: SQLite file under the data directory)."
DATE_HELP = "Business date, YYYY-MM-DD."


def register(app: typer.Typer) -> None:
    """Add this module's verbs to the top-level app (``sim bank-file`` goes into the existing ``sim`` group)."""
    app.add_typer(eod_app, name="eod")
    app.command("reconcile", help=reconcile_cmd.__doc__)(reconcile_cmd)
    app.add_typer(errors_app, name="errors")
    app.add_typer(report_app, name="report")
    app.add_typer(audit_app, name="audit")
    try:
        from ops.cli_sim import sim_app
    except ImportError:  # the card-side helper's module is not there: give sim its own group
        sim_app = typer.Typer(help="Simulators.", no_args_is_help=True)
        app.add_typer(sim_app, name="sim")
    sim_app.command("bank-file", help=sim_bank_file.__doc__)(sim_bank_file)


# --- plumbing -----------------------------------------------------------------------------------------------


def _date(value: str) -> date:
    try:
        return date.fromisoformat(value) if "-" in value else datetime.strptime(value, "%Y%m%d").date()
    except ValueError:
        raise BadInput(f"date {value!r} is not YYYY-MM-DD") from None


def _settings() -> Any:
    from ops.config import load_settings

    return load_settings()


def _run(factory: Callable[[Any], Awaitable[T]], db: str | None, init: bool = True) -> T:
    """Open the engine (initialising the schema), run ``factory(engine)``, dispose; errors become one line."""
    from clearing.db import DatabaseError, init_db, make_engine

    async def go() -> T:
        url = db or _settings().resolved_db_url()
        if url.startswith("sqlite+aiosqlite:///"):
            Path(url.removeprefix("sqlite+aiosqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        try:
            engine = make_engine(url)
        except DatabaseError as exc:
            raise BadInput(str(exc)) from None
        try:
            if init:
                await init_db(engine)
            return await factory(engine)
        finally:
            await engine.dispose()

    try:
        return asyncio.run(go())
    except CarepayError:
        raise
    except Exception as exc:
        raise _translate(exc) from None


def _translate(exc: Exception) -> CarepayError:
    from clearing.eod import EodError
    from clearing.error_cases import CaseError
    from clearing.reports import ReportError

    if isinstance(exc, (EodError, ReportError)):
        return BadInput(str(exc))
    if isinstance(exc, CaseError):
        return CarepayError(str(exc))
    return CarepayError(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")


def _keystore() -> Any | None:
    """The key store when one is configured (path + officers' component files), else None."""
    settings = _settings()
    if not (settings.keystore_path and os.environ.get("CAREPAY_KEY_COMPONENTS")):
        return None
    from keys.store import KeyStore

    try:
        return KeyStore.from_env(settings.keystore_path)
    except Exception as exc:
        raise CarepayError(f"key store: {exc}") from None


def _signer(data_dir: Path) -> Any:
    from clearing.signing import signer_for

    return signer_for(data_dir, _keystore())


def _trusted_key(explicit: str | None) -> str | None:
    """The clearing public key a verifier trusts: --public-key, else the key store's, else the data dir's."""
    from clearing.signing import trusted_public_key

    return explicit or trusted_public_key(Path(_settings().data_dir), _keystore())


def _config(out: Path | None, d: date, user: str) -> Any:
    from clearing.calendar import CalendarError, load_calendar
    from clearing.eod import EodConfig, default_out_dir

    s = _settings()
    data_dir = Path(s.data_dir)
    try:
        cal = load_calendar(data_dir, timezone=s.clearing.timezone)
    except CalendarError as exc:
        raise BadInput(str(exc)) from None
    return EodConfig(data_dir=data_dir, out_dir=out or default_out_dir(data_dir, d), signer=_signer(data_dir),
                     calendar=cal, cutoff_local_time=s.clearing.cutoff_local_time, timezone=s.clearing.timezone,
                     fee_rate_ppm=s.clearing.fee_rate_ppm, bank_code=s.clearing.bank_code, actor=user)


def _print(doc: Any, as_json: bool, text: str) -> None:
    if as_json:
        sys.stdout.write(json.dumps(doc, ensure_ascii=False, default=str) + "\n")
    else:
        typer.echo(text)


def _bank_file(path: Path | None) -> Path | None:
    if path is not None and not path.is_file():
        raise BadInput(f"bank file {path} not found")
    return path


# --- eod run / reconcile ------------------------------------------------------------------------------------


@eod_app.command("run")
def eod_run(
    date_: str = typer.Option(..., "--date", help=DATE_HELP),
    bank_file: Path | None = typer.Option(None, "--bank-file", help="The bank's clearing file for the date."),
    db: str | None = typer.Option(None, "--db", help=DB_HELP),
    out: Path | None = typer.Option(None, "--out", help="Report directory (default DATA_DIR/reports/DATE)."),
    user: str = typer.Option("system:eod", "--user", help="Who runs it (audit trail)."),
    early: bool = typer.Option(False, "--early", help="Close the date before its configured cut-off time."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Cut-off, provider settlement, reconciliation and signed reports for a business date.

    Example: carepay eod run --date 2026-11-27 --bank-file bank-20261127.txt --json
    """
    from clearing.eod import run_eod
    from clearing.reconcile import cutoff_instant

    d = _date(date_)
    cfg = _config(out, d, user)
    cutoff = cutoff_instant(d, cfg.cutoff_local_time, cfg.timezone)
    if datetime.now(UTC) < cutoff and not early:
        raise BadInput(f"{d} is still open until its cut-off {cutoff.isoformat()} (UTC); pass --early to close it now "
                       "(later postings then go to the next business date)")
    doc = _run(lambda e: run_eod(e, d, cfg, _bank_file(bank_file)), db)
    s = doc["settlement"]
    lines = [f"business date {d}: {s['providers']} providers settled (net {s['net_fen']} fen, fee {s['fee_fen']} fen)"
             + (" [rerun: stored settlement reused]" if s["rerun"] else "")]
    if doc["reconciliation"]:
        lines.append("reconciliation: " + ", ".join(f"{k} {v}" for k, v in doc["reconciliation"]["counts"].items()))
    lines.append(f"reports and manifest in {doc['out_dir']}")
    _print(doc, as_json, "\n".join(lines))


def reconcile_cmd(
    date_: str = typer.Option(..., "--date", help=DATE_HELP),
    bank_file: Path = typer.Option(..., "--bank-file", help="The bank's clearing file for the date."),
    db: str | None = typer.Option(None, "--db", help=DB_HELP),
    out: Path | None = typer.Option(None, "--out", help="Where the manifest goes (default DATA_DIR/reports/DATE)."),
    user: str = typer.Option("system:reconcile", "--user", help="Who runs it (audit trail)."),
    as_json: bool = typer.Option(False, "--json", help="Print {business_date, counts, breaks}."),
) -> None:
    """Reconcile the host journal of a date with the bank's clearing file (对账).

    Example: carepay reconcile --date 2026-11-27 --bank-file bank-20261127.txt --json
    """
    from clearing.eod import reconcile, write_manifest

    d = _date(date_)
    cfg = _config(out, d, user)
    path = _bank_file(bank_file)
    assert path is not None

    async def go(engine: Any) -> dict[str, Any]:
        doc = await reconcile(engine, d, path, cfg)
        await write_manifest(engine, d, cfg, doc, None, [])
        return doc

    doc = _run(go, db)
    public = {"business_date": doc["business_date"], "counts": doc["counts"], "breaks": doc["breaks"]}
    r = doc["run"]
    _print(public, as_json, f"{d} run {r['run_no']}: " + ", ".join(f"{k} {v}" for k, v in doc["counts"].items())
           + f"; breaks new {r['new']}, persisting {r['persisting']}, resolved {r['resolved']}; "
           f"cases opened {r['cases_opened']}")


# --- errors ----------------------------------------------------------------------------------------------------

CASE_FIELDS = ("case_no", "business_date", "class", "complexity", "status", "rrn", "provider_id", "card_no_masked",
               "host_amount_fen", "bank_amount_fen", "diff_fen", "due_at", "overdue", "action", "maker", "checker")


def _case_doc(c: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.isoformat() if isinstance(v, (date, datetime)) else v) for k, v in c.items()}


@errors_app.command("list")
def errors_list(
    status: str | None = typer.Option(None, "--status", help="open, proposed, approved or closed."),
    date_: str | None = typer.Option(None, "--date", help=DATE_HELP),
    overdue: bool = typer.Option(False, "--overdue", help="Only cases past their due time."),
    db: str | None = typer.Option(None, "--db", help=DB_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list."),
) -> None:
    """List error cases. Example: carepay errors list --status open --overdue"""
    from clearing.error_cases import list_cases_sync

    d = _date(date_) if date_ else None

    async def go(engine: Any) -> list[dict[str, Any]]:
        async with engine.connect() as conn:
            return await conn.run_sync(lambda c: list_cases_sync(c, status, d, overdue))

    cases = _run(go, db)
    text = "\n".join(
        f"{c['case_no']}  {c['status']:<8} {c['class']:<16} rrn {c['rrn']:<12} diff {c['diff_fen']:>8} fen  due "
        f"{c['due_at']:%Y-%m-%d %H:%M}Z{'  OVERDUE' if c['overdue'] else ''}" for c in cases) or "no cases"
    _print([{k: _case_doc(c).get(k) for k in CASE_FIELDS} for c in cases], as_json, text)


@errors_app.command("show")
def errors_show(
    case_no: str = typer.Argument(..., help="Case number, e.g. EC-20261127-000001."),
    db: str | None = typer.Option(None, "--db", help=DB_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Show one error case. Example: carepay errors show EC-20261127-000001"""
    from clearing.error_cases import get_case_sync, is_overdue

    async def go(engine: Any) -> dict[str, Any]:
        async with engine.connect() as conn:
            c = await conn.run_sync(get_case_sync, case_no)
        c["overdue"] = is_overdue(c, datetime.now(UTC))
        return c

    c = _case_doc(_run(go, db))
    _print(c, as_json, "\n".join(f"{k:>24}: {v}" for k, v in c.items() if v is not None))


def _case_step(fn_name: str, case_no: str, db: str | None, *args: Any) -> dict[str, Any]:
    from clearing import error_cases as ec
    from clearing.audit import append_audit
    from clearing.db import write_transaction

    fn = getattr(ec, fn_name)

    async def go(engine: Any) -> dict[str, Any]:
        try:
            async with write_transaction(engine) as conn:
                return await conn.run_sync(fn, case_no, *args)
        except ec.MakerCheckerViolation:
            async with write_transaction(engine) as conn:  # the refusal itself is on the record
                await conn.run_sync(append_audit, args[0], "case.refused", case_no,
                                    {"step": fn_name.removesuffix("_sync"), "reason": "maker cannot check own proposal"})
            raise

    return _case_doc(_run(go, db))


USER_HELP = "Who does this step (maker or checker)."


@errors_app.command("open")
def errors_open(
    date_: str = typer.Option(..., "--date", help=DATE_HELP),
    rrn: str = typer.Option(..., "--rrn", help="The transaction's retrieval reference number."),
    cls: str = typer.Option("other", "--class", help="host_only, bank_only, amount_mismatch, status_mismatch, "
                            "duplicate or other."),
    bank_amount: int | None = typer.Option(None, "--bank-amount", help="What the bank reported (fen), if anything."),
    user: str = typer.Option(..., "--user", help="Who opens it."),
    note: str = typer.Option(..., "--note", help="Why."),
    db: str | None = typer.Option(None, "--db", help=DB_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the case as JSON."),
) -> None:
    """Open a case by hand. Example: carepay errors open --date 2026-11-27 --rrn 000000000042 --user alice --note 'cardholder complaint'"""
    from clearing.calendar import load_calendar
    from clearing.db import write_transaction
    from clearing.error_cases import get_case_sync, open_manual_case_sync

    d = _date(date_)
    s = _settings()
    cal = load_calendar(Path(s.data_dir), timezone=s.clearing.timezone)

    async def go(engine: Any) -> dict[str, Any]:
        async with write_transaction(engine) as conn:
            case_no = await conn.run_sync(open_manual_case_sync, d, rrn, cls, user, note, cal, bank_amount)
            return await conn.run_sync(get_case_sync, case_no)

    c = _case_doc(_run(go, db))
    _print(c, as_json, f"{c['case_no']}: opened ({c['class']}, due {c['due_at']})")


@errors_app.command("propose")
def errors_propose(
    case_no: str = typer.Argument(..., help="Case number."),
    user: str = typer.Option(..., "--user", help=USER_HELP),
    action: str = typer.Option(..., "--action", help="adjust, reverse, refund, write_off or dismiss."),
    note: str = typer.Option(..., "--note", help="The explanation."),
    db: str | None = typer.Option(None, "--db", help=DB_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the case as JSON."),
) -> None:
    """Maker proposes a resolution. Example: carepay errors propose EC-20261127-000001 --user alice --action dismiss --note 'timing'"""
    c = _case_step("propose_sync", case_no, db, user, action, note)
    _print(c, as_json, f"{case_no}: proposed {action} by {user}")


@errors_app.command("approve")
def errors_approve(
    case_no: str = typer.Argument(..., help="Case number."),
    user: str = typer.Option(..., "--user", help=USER_HELP),
    note: str = typer.Option("", "--note", help="Checker's note."),
    db: str | None = typer.Option(None, "--db", help=DB_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the case as JSON."),
) -> None:
    """Checker (not the maker) approves. Example: carepay errors approve EC-20261127-000001 --user bob"""
    c = _case_step("approve_sync", case_no, db, user, note)
    _print(c, as_json, f"{case_no}: approved by {user}")


@errors_app.command("reject")
def errors_reject(
    case_no: str = typer.Argument(..., help="Case number."),
    user: str = typer.Option(..., "--user", help=USER_HELP),
    note: str = typer.Option(..., "--note", help="Why."),
    db: str | None = typer.Option(None, "--db", help=DB_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the case as JSON."),
) -> None:
    """Checker (not the maker) rejects; the case is open again. Example: carepay errors reject EC-… --user bob --note 'wrong'"""
    c = _case_step("reject_sync", case_no, db, user, note)
    _print(c, as_json, f"{case_no}: rejected by {user}, open again")


@errors_app.command("post")
def errors_post(
    case_no: str = typer.Argument(..., help="Case number."),
    user: str = typer.Option(..., "--user", help="Who posts."),
    db: str | None = typer.Option(None, "--db", help=DB_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the case as JSON."),
) -> None:
    """Post the approved correction and close the case. Example: carepay errors post EC-20261127-000001 --user bob"""
    c = _case_step("post_sync", case_no, db, user)
    _print(c, as_json, f"{case_no}: posted {c.get('correction_transfer_keys')} and closed")


# --- reports ---------------------------------------------------------------------------------------------------


def _report(kind: str, date_: str, fmt: str, out: Path, db: str | None, user: str, as_json: bool) -> None:
    from clearing.db import write_transaction
    from clearing.reports import FORMATS, produce_sync
    from clearing.signing import sig_path

    if fmt not in FORMATS:
        raise BadInput("--format must be csv or html")
    d = _date(date_)
    signer = _signer(Path(_settings().data_dir))

    async def go(engine: Any) -> Path:
        async with write_transaction(engine) as conn:
            return await conn.run_sync(produce_sync, kind, d, fmt, out, signer, user, "report command")

    path = _run(go, db)
    _print({"report": str(path), "signature": str(sig_path(path))}, as_json, f"{path} (signed: {sig_path(path).name})")


def _report_command(kind: str, summary: str) -> None:
    def cmd(
        date_: str = typer.Option(..., "--date", help=DATE_HELP),
        fmt: str = typer.Option("html", "--format", help="csv or html."),
        out: Path = typer.Option(..., "--out", help="File to write; the signature goes beside it (.sig.json)."),
        db: str | None = typer.Option(None, "--db", help=DB_HELP),
        user: str = typer.Option(os.environ.get("USER", "operator"), "--user", help="Who produces it (access trail)."),
        as_json: bool = typer.Option(False, "--json", help="Print the paths as JSON."),
    ) -> None:
        _report(kind, date_, fmt, out, db, user, as_json)

    cmd.__doc__ = f"{summary}\n\nExample: carepay report {kind} --date 2026-11-27 --format html --out {kind}.html"
    report_app.command(kind, help=cmd.__doc__)(cmd)


for _kind, _summary in (
    ("daily", "Daily reconciliation report: summary, classes, discrepancies, batches, open cases by age."),
    ("settlement", "Provider settlement statements."),
    ("stats", "Program statistics by district, street, provider, program and month (month to date)."),
    ("journal", "Journal export: every host transaction of the date (card numbers masked)."),
    ("access", "Data-access trail: who viewed, exported, copied or deleted cardholder data."),
):
    _report_command(_kind, _summary)


@report_app.command("verify")
def report_verify(
    path: Path = typer.Argument(..., help="The report file (its .sig.json beside it)."),
    public_key: str | None = typer.Option(None, "--public-key", help="Trusted clearing SM2 public key (hex); "
                                          "default: the data directory's clearing key when present."),
    chain: bool = typer.Option(False, "--chain", help="PATH is a directory (or manifest): check every daily "
                               "manifest's signature and its link to the previous day's."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Check a report's SM3 digest and SM2 signature: exit 0 intact, 1 tampered, 2 missing.

    Example: carepay report verify carepay-data/reports/2026-11-27/daily-20261127.html
    """
    from clearing.signing import SIG_SUFFIX, VerifyStatus, verify_file

    trusted = _trusted_key(public_key)
    if chain:
        from clearing.eod import verify_manifest_chain

        files = sorted(p for p in path.rglob("manifest-*.json") if not p.name.endswith(SIG_SUFFIX)) if path.is_dir() else [path]
        if not files:
            _print({"path": str(path), "status": "missing"}, as_json, f"{path}: no manifests found")
            raise typer.Exit(int(VerifyStatus.MISSING))
        problems = verify_manifest_chain(files, trusted)
        _print({"path": str(path), "manifests": len(files), "status": "tampered" if problems else "intact",
                "problems": problems}, as_json,
               "\n".join(problems) if problems else f"{len(files)} manifests: chain intact")
        raise typer.Exit(int(VerifyStatus.TAMPERED if problems else VerifyStatus.INTACT))
    res = verify_file(path, trusted)
    reason = res.reason if trusted or not res.ok else "intact, but no trusted clearing key at hand: self-consistency only"
    _print({"path": str(path), "status": res.status.name.lower(), "reason": reason, "digest_sm3": res.digest_sm3,
            "signer": res.signer, "trusted_key": bool(trusted)}, as_json, f"{path}: {res.status.name.lower()} ({reason})")
    raise typer.Exit(int(res.status))


# --- audit -----------------------------------------------------------------------------------------------------


@audit_app.command("verify")
def audit_verify(
    db: str | None = typer.Option(None, "--db", help=DB_HELP),
    manifest: Path | None = typer.Option(None, "--manifest", help="A signed daily manifest: also check the chain "
                                         "still reaches the audit head it recorded (catches a cut tail)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Walk the SM3 audit chain: exit 0 only when intact. Example: carepay audit verify --json"""
    from clearing.audit import verify_chain
    from clearing.signing import verify_file

    head = None
    if manifest is not None:
        res = verify_file(manifest, _trusted_key(None))
        if not res.ok:
            raise CarepayError(f"manifest {manifest.name}: {res.reason}")
        doc = json.loads(manifest.read_text(encoding="utf-8"))
        head = (int(doc["audit_head"]["seq"]), str(doc["audit_head"]["entry_hash"]))
    report = _run(lambda e: verify_chain(e, head), db)
    _print({"intact": report.intact, "entries": report.entries, "head_hash": report.head_hash,
            "problem": report.problem, "first_bad_seq": report.first_bad_seq}, as_json,
           f"audit chain intact: {report.entries} entries, head {report.head_hash[:16]}…" if report.intact
           else f"audit chain BROKEN: {report.problem}")
    raise typer.Exit(0 if report.intact else 1)


# --- sim bank-file ---------------------------------------------------------------------------------------------


def sim_bank_file(
    date_: str = typer.Option(..., "--date", help=DATE_HELP),
    out: Path = typer.Option(..., "--out", help="Bank file to write; the truth file goes beside it (.truth.json)."),
    discrepancies: float = typer.Option(0.01, "--discrepancies", help="Share of rows perturbed (0..0.5)."),
    seed: int = typer.Option(0, "--seed", help="Random seed."),
    db: str | None = typer.Option(None, "--db", help=DB_HELP),
    bank_code: str | None = typer.Option(None, "--bank-code", help="Bank code in the header."),
    as_json: bool = typer.Option(False, "--json", help="Print a summary as JSON."),
) -> None:
    """The bank's clearing file for a date from the host journal, with injected discrepancies of every class.

    Example: carepay sim bank-file --date 2026-11-27 --out bank-20261127.txt --discrepancies 0.02 --seed 7
    """
    from clearing.settlement import journal_frame_sync
    from simulator import bank_file as bf

    d = _date(date_)
    if not 0 <= discrepancies <= bf.MAX_DISCREPANCY_RATE:
        raise BadInput(f"--discrepancies must be within 0..{bf.MAX_DISCREPANCY_RATE}")

    async def go(engine: Any) -> Any:
        async with engine.connect() as conn:
            return await conn.run_sync(journal_frame_sync, d)

    journal = _run(go, db)
    result = bf.generate(journal, discrepancies, seed)
    bf.write(out, result.rows, d, bank_code or _settings().clearing.bank_code)
    bf.write_truth(bf.truth_path(out), result, d, discrepancies, seed)
    counts = {c: int((result.truth["class"] == c).sum()) for c in bf.INJECTED_CLASSES}
    _print({"bank_file": str(out), "truth_file": str(bf.truth_path(out)), "rows": result.rows.height,
            "injected": counts, "blank_rrn": len(result.blank_rrn)}, as_json,
           f"{out}: {result.rows.height} rows; injected " + ", ".join(f"{k} {v}" for k, v in counts.items()))
