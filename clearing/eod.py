"""End of day (日终): close the business date, settle providers, reconcile, write signed reports.

``run_eod`` is what ``carepay eod run --date D`` does:

1. **close** the settlement window of D (``clearing.windows.close_window_sync``) and, in the same
   write transaction, compute and post the provider settlement (``clearing.settlement``): a posting
   racing the close lands wholly before it (and is settled) or after it (and moves to the next open
   date). A rerun of a settled date recomputes nothing: the stored settlement is reused, files are
   rewritten with the same content;
2. **reconcile** (when a bank file is given): classify, persist breaks with their lifecycle, open
   error cases (suspense postings), release cases whose break is gone;
3. **reports** daily, settlement, stats, journal, access — CSV and HTML, each signed;
4. **manifest** ``manifest-YYYYMMDD.json``: counts, file digests, the audit head and the previous
   day's manifest digest (a hash chain), signed.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import polars as pl
from prometheus_client import Gauge
from sqlalchemy import bindparam, func, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from clearing.audit import GENESIS_HASH, AuditEntry, append_audit, append_audit_batch
from clearing.calendar import BusinessCalendar
from clearing.db import executemany_sync, write_transaction
from clearing.eod_schema import eod_runs, manifests, provider_settlements, recon_breaks, recon_runs
from clearing.error_cases import auto_resolve_sync, open_cases_sync
from clearing.reconcile import BREAK_SCHEMA, ReconResult, classify, cutoff_instant, flag_grace
from clearing.reports import KINDS, produce_sync
from clearing.schema import batch_settlements
from clearing.settlement import (
    SETTLEMENT_COLUMNS,
    compute_settlement,
    journal_frame_sync,
    post_transfers_sync,
    provider_frame_sync,
    settlement_postings,
    write_settlement_csv,
)
from clearing.signing import ReportSigner, canonical, file_sm3
from protocol.files.bank_file import BankFileError, read_bank_frame

MANIFEST_FORMAT = "carepay-recon-manifest"

try:
    RECON_ROWS = Gauge("carepay_recon_rows", "Rows of the last reconciliation run, by class", ("class",))
except ValueError:  # registered already (module reloaded)
    from prometheus_client import REGISTRY

    RECON_ROWS = REGISTRY._names_to_collectors["carepay_recon_rows"]  # type: ignore[assignment]
BREAK_ROW_COLUMNS = ("business_date", "break_key", "class", "side", "rrn", "provider_id", "terminal_id", "batch_no",
                     "trace_no", "txn_type", "program", "card_no_masked", "txn_time", "host_amount_fen",
                     "bank_amount_fen", "diff_fen", "host_status", "bank_status", "in_grace", "lifecycle",
                     "first_run_id", "last_run_id")
CARRIED_COLUMNS = ("break_key", "class", "side", "rrn", "provider_id", "terminal_id", "txn_type", "card_no_masked",
                   "host_amount_fen", "bank_amount_fen", "diff_fen", "host_status", "bank_status")


class EodError(Exception):
    """End of day cannot proceed (bad bank file, wrong date)."""


@dataclass
class EodConfig:
    data_dir: Path
    out_dir: Path
    signer: ReportSigner
    calendar: BusinessCalendar = field(default_factory=BusinessCalendar)
    cutoff_local_time: time = time(23, 0)
    timezone: str = "Asia/Shanghai"
    fee_rate_ppm: int = 6_000
    bank_code: str = "BJBANK"
    actor: str = "system:eod"


# --- close and settle -------------------------------------------------------------------------------------


def _settled_rows_sync(conn: Connection, d: date) -> pl.DataFrame:
    rows = conn.execute(select(*[provider_settlements.c[c] for c in SETTLEMENT_COLUMNS], provider_settlements.c.zero_net)
                        .where(provider_settlements.c.business_date == d).order_by(provider_settlements.c.provider_id)).all()
    schema: dict[str, Any] = {c: (pl.Int64 if c.endswith(("_fen", "_count")) else pl.String) for c in SETTLEMENT_COLUMNS}
    schema["business_date"] = pl.Date
    schema["zero_net"] = pl.Boolean
    return pl.DataFrame([tuple(r) for r in rows], schema=schema, orient="row")


def close_and_settle_sync(conn: Connection, d: date, cfg: EodConfig) -> dict[str, Any]:
    """Close D and settle it, in the caller's write transaction; idempotent per date."""
    run = conn.execute(select(eod_runs).where(eod_runs.c.business_date == d)).mappings().first()
    if run is not None:
        rows = _settled_rows_sync(conn, d)
        return {"rerun": True, "rows": rows, "closed_now": False}
    from clearing.windows import close_window_sync

    now = datetime.now(UTC)
    cutoff = cutoff_instant(d, cfg.cutoff_local_time, cfg.timezone)
    closed_now = close_window_sync(conn, d)
    journal = journal_frame_sync(conn, d)
    rows = compute_settlement(journal, provider_frame_sync(conn), d, cfg.fee_rate_ppm)
    postings = settlement_postings(rows, d)
    post_transfers_sync(conn, postings)
    fee_keys = {p.transfer_key.rsplit(":", 1)[1]: p.transfer_key for p in postings if p.code == "fee"}
    executemany_sync(conn, provider_settlements, (*SETTLEMENT_COLUMNS, "zero_net", "fee_transfer_key", "created_at"),
                     [(*r, fee_keys.get(r[1]), now) for r in rows.iter_rows()])
    fee_total = int(rows["fee_fen"].sum()) if rows.height else 0
    net_total = int(rows["net_fen"].sum()) if rows.height else 0
    conn.execute(eod_runs.insert().values(business_date=d, status="settled", cutoff_at=cutoff, closed_at=now,
                                          settled_at=now, fee_total_fen=fee_total, net_total_fen=net_total,
                                          provider_count=rows.height, updated_at=now))
    append_audit_batch(conn, [
        AuditEntry(cfg.actor, "eod.close", d.isoformat(), {"closed_now": closed_now, "early": now < cutoff}),
        AuditEntry(cfg.actor, "eod.settle", d.isoformat(), {
            "providers": rows.height, "zero_net": int(rows["zero_net"].sum()) if rows.height else 0,
            "net_fen": net_total, "fee_fen": fee_total, "fee_rate_ppm": cfg.fee_rate_ppm,
            "transfers": [p.transfer_key for p in postings]}),
    ])
    return {"rerun": False, "rows": rows, "closed_now": closed_now}


async def close_and_settle(engine: AsyncEngine, d: date, cfg: EodConfig) -> dict[str, Any]:
    """Close and settle D; writes and signs the settlement file. Returns a summary."""
    async with write_transaction(engine) as conn:
        out = await conn.run_sync(close_and_settle_sync, d, cfg)
    rows: pl.DataFrame = out["rows"]
    path = cfg.out_dir / f"settlement-{d:%Y%m%d}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_settlement_csv(rows, path)
    cfg.signer.sign_file(path)
    async with write_transaction(engine) as conn:
        await conn.execute(update(eod_runs).where(eod_runs.c.business_date == d).values(
            settlement_file=str(path), settlement_sm3=file_sm3(path), updated_at=datetime.now(UTC)))
    return {
        "business_date": d.isoformat(), "rerun": out["rerun"], "providers": rows.height,
        "zero_net_providers": int(rows["zero_net"].sum()) if rows.height else 0,
        "net_fen": int(rows["net_fen"].sum()) if rows.height else 0,
        "fee_fen": int(rows["fee_fen"].sum()) if rows.height else 0, "settlement_file": str(path),
    }


# --- reconciliation ---------------------------------------------------------------------------------------


def with_break_keys(breaks: pl.DataFrame) -> pl.DataFrame:
    return breaks.with_columns(break_key=pl.concat_str([pl.col("class"), pl.col("key"), pl.col("side")], separator="|"))


def persist_recon_sync(conn: Connection, d: date, bank_file: Path, bank_sm3: str, result: ReconResult,
                       breaks: pl.DataFrame, cfg: EodConfig) -> dict[str, Any]:
    """Store one reconciliation run: breaks with lifecycle, cases opened/released, audit. Set-based."""
    now = datetime.now(UTC)
    run_no = int(conn.execute(select(func.coalesce(func.max(recon_runs.c.run_no), 0))
                              .where(recon_runs.c.business_date == d)).scalar_one()) + 1
    unbalanced = _unbalanced_batches_sync(conn, d)
    run_id = conn.execute(recon_runs.insert().values(
        business_date=d, run_no=run_no, started_at=now, bank_file=str(bank_file), bank_file_sm3=bank_sm3,
        counts=json.dumps(result.counts), batches_unbalanced=unbalanced)).inserted_primary_key[0]

    prev = dict(conn.execute(select(recon_breaks.c.break_key, recon_breaks.c.in_grace)
                             .where(recon_breaks.c.business_date == d, recon_breaks.c.lifecycle != "resolved")).all())
    cur_keys = set(breaks["break_key"].to_list())
    is_prev = pl.col("break_key").is_in(list(prev))
    # grace (日期错位) holds while the break is new on its first run; a later run still finding it ends the grace
    cur = breaks.with_columns(
        lifecycle=pl.when(is_prev).then(pl.lit("persisting")).otherwise(pl.lit("new")),
        in_grace=pl.col("in_grace") & ~is_prev,
    )
    new = cur.filter(pl.col("lifecycle") == "new")
    persisting = cur.filter(pl.col("lifecycle") == "persisting")
    resolved = sorted(set(prev) - cur_keys)

    bdate_v = d.isoformat() if conn.dialect.name == "sqlite" else d  # encoded once, not per row
    rows = new.with_columns(business_date=pl.lit(bdate_v), first_run_id=pl.lit(run_id), last_run_id=pl.lit(run_id),
                            rrn=pl.col("rrn").fill_null(""))
    executemany_sync(conn, recon_breaks, BREAK_ROW_COLUMNS,
                     list(rows.select([pl.col(c).fill_null("") if BREAK_SCHEMA.get(c) == pl.String else pl.col(c)
                                       for c in BREAK_ROW_COLUMNS]).rows()))
    upd = (update(recon_breaks).where(recon_breaks.c.business_date == d)
           .where(recon_breaks.c.break_key == bindparam("_k")))
    if persisting.height:
        conn.execute(upd.values(lifecycle="persisting", last_run_id=run_id, in_grace=False),
                     [{"_k": k} for k in persisting["break_key"].to_list()])
    if resolved:
        conn.execute(upd.values(lifecycle="resolved", last_run_id=run_id), [{"_k": k} for k in resolved])
    carried = carry_grace_sync(conn, d, cur, run_id, cfg)
    if carried["cross_matched"]:  # the other half of yesterday's near-cut-off row: not a break of its own
        cur = cur.with_columns(in_grace=pl.col("in_grace") | pl.col("break_key").is_in(carried["cross_matched"]))
        conn.execute(upd.values(lifecycle="resolved", in_grace=True),
                     [{"_k": k} for k in carried["cross_matched"]])
    opened = open_cases_sync(conn, cur, d, cfg.calendar, actor=cfg.actor)
    released = auto_resolve_sync(conn, d, resolved, actor=cfg.actor)
    append_audit(conn, cfg.actor, "recon.run", f"{d.isoformat()}#{run_no}", {
        "bank_file": bank_file.name, "bank_file_sm3": bank_sm3, "counts": result.counts,
        "new": new.height, "persisting": persisting.height, "resolved": len(resolved),
        "in_grace": int(cur["in_grace"].sum()) if cur.height else 0, "cases_opened": len(opened),
        "cases_released": len(released), "batches_unbalanced": unbalanced,
        "carried_from_previous_day": carried["summary"]})
    return {"run_no": run_no, "run_id": run_id, "batches_unbalanced": unbalanced, "new": new.height, "persisting": persisting.height,
            "resolved": len(resolved), "cases_opened": len(opened), "cases_released": len(released),
            "in_grace": int(cur["in_grace"].sum()) if cur.height else 0, **carried["summary"]}


def carry_grace_sync(conn: Connection, d: date, cur: pl.DataFrame, run_id: int, cfg: EodConfig) -> dict[str, Any]:
    """Settle the previous day's breaks still in grace (日错位) against today's one-sided breaks.

    A host_only (bank_only) row of D−1 near the cut-off whose RRN appears today as bank_only (host_only)
    with the same amount was booked by the bank on the other day: both are resolved, no case opens.
    Every other grace break of D−1 has now outlived its grace: a case opens for it (on D−1).
    """
    prev_d = d - timedelta(days=1)
    rows = conn.execute(select(*[recon_breaks.c[c] for c in CARRIED_COLUMNS])
                        .where(recon_breaks.c.business_date == prev_d, recon_breaks.c.in_grace.is_(True),
                               recon_breaks.c.lifecycle != "resolved")).all()
    summary = {"grace_cross_matched": 0, "grace_expired": 0}
    if not rows:
        return {"cross_matched": [], "summary": summary}
    prev = pl.DataFrame([tuple(r) for r in rows], orient="row",
                        schema={c: (pl.Int64 if c.endswith("_fen") else pl.String) for c in CARRIED_COLUMNS})
    today = cur.filter(pl.col("class").is_in(["host_only", "bank_only"])).select(
        pl.col("rrn"), pl.col("class").alias("_today_class"), pl.col("break_key").alias("_today_key"),
        pl.coalesce("host_amount_fen", "bank_amount_fen").alias("_today_amount"))
    pair = prev.with_columns(_amount=pl.coalesce("host_amount_fen", "bank_amount_fen")).join(
        today, on="rrn", how="left")
    hit = (pl.col("_today_class").is_not_null() & (pl.col("_today_class") != pl.col("class"))
           & (pl.col("_today_amount") == pl.col("_amount")))
    matched = pair.filter(hit)
    expired = prev.join(matched.select("break_key"), on="break_key", how="anti")
    upd = (update(recon_breaks).where(recon_breaks.c.business_date == prev_d)
           .where(recon_breaks.c.break_key == bindparam("_k")))
    if matched.height:
        conn.execute(upd.values(lifecycle="resolved", last_run_id=run_id),
                     [{"_k": k} for k in matched["break_key"].to_list()])
    if expired.height:
        conn.execute(upd.values(in_grace=False, last_run_id=run_id),
                     [{"_k": k} for k in expired["break_key"].to_list()])
        open_cases_sync(conn, expired.with_columns(in_grace=pl.lit(False)), prev_d, cfg.calendar, actor=cfg.actor)
    summary = {"grace_cross_matched": matched.height, "grace_expired": expired.height}
    return {"cross_matched": matched["_today_key"].to_list(), "summary": summary}


def _unbalanced_batches_sync(conn: Connection, d: date) -> int:
    from clearing.reports import batch_results_sync

    if conn.execute(select(func.count()).select_from(batch_settlements)
                    .where(batch_settlements.c.business_date == d)).scalar_one() == 0:
        return 0
    b = batch_results_sync(conn, d)
    return b.filter(~pl.col("balanced")).select("terminal_id", "batch_no").unique().height


def load_bank_file(bank_file: Path, d: date) -> tuple[pl.DataFrame, str]:
    """Parse and check the bank file; EodError when rejected or for another date."""
    try:
        frame = read_bank_frame(bank_file)
    except BankFileError as exc:
        raise EodError(f"bank file rejected: {exc}") from None
    if frame.header.business_date != d:
        raise EodError(f"bank file is for {frame.header.business_date}, not {d}")
    return frame.details, file_sm3(bank_file)


async def reconcile(engine: AsyncEngine, d: date, bank_file: Path, cfg: EodConfig) -> dict[str, Any]:
    """Reconcile D against ``bank_file``; returns the CLI JSON document plus run details."""
    bank, bank_sm3 = load_bank_file(bank_file, d)
    async with engine.connect() as conn:
        journal = await conn.run_sync(journal_frame_sync, d)
    result = classify(journal, bank, host_rrn_unique=True)  # host_txns.rrn is UNIQUE NOT NULL
    breaks = with_break_keys(flag_grace(result.breaks, d, cfg.cutoff_local_time, cfg.timezone))
    async with write_transaction(engine) as conn:
        run = await conn.run_sync(persist_recon_sync, d, bank_file, bank_sm3, result, breaks, cfg)
    for cls, n in result.counts.items():
        RECON_ROWS.labels(**{"class": cls}).set(n)
    return {
        "business_date": d.isoformat(),
        "counts": result.counts,
        "breaks": [{"class": r["class"], "rrn": r["rrn"], "host_amount_fen": r["host_amount_fen"],
                    "bank_amount_fen": r["bank_amount_fen"]}
                   for r in result.breaks.select("class", "rrn", "host_amount_fen", "bank_amount_fen").iter_rows(named=True)],
        "run": run,
        "bank_file_sm3": bank_sm3,
    }


# --- reports and manifest ---------------------------------------------------------------------------------


def report_path(out_dir: Path, kind: str, d: date, fmt: str) -> Path:
    return out_dir / f"{kind}-{d:%Y%m%d}.{fmt}"


async def write_reports(engine: AsyncEngine, d: date, cfg: EodConfig, kinds: tuple[str, ...] = KINDS) -> list[Path]:
    """Every report kind as CSV and HTML into ``cfg.out_dir``, signed (access trail last)."""
    paths = []
    for kind in kinds:
        for fmt in ("csv", "html"):
            path = report_path(cfg.out_dir, kind, d, fmt)
            async with write_transaction(engine) as conn:
                await conn.run_sync(produce_sync, kind, d, fmt, path, cfg.signer, cfg.actor, "end of day")
            paths.append(path)
    return paths


def previous_manifest_sm3_sync(conn: Connection, d: date) -> str:
    row = conn.execute(select(manifests.c.manifest_sm3).where(manifests.c.business_date < d)
                       .order_by(manifests.c.business_date.desc()).limit(1)).first()
    return str(row[0]) if row else GENESIS_HASH


def write_manifest_sync(conn: Connection, d: date, cfg: EodConfig, recon: dict[str, Any] | None,
                        settlement: dict[str, Any] | None, files: list[Path]) -> Path:
    """The signed daily manifest, chained to the previous day's by its SM3 digest."""
    from clearing.audit import _head

    previous = previous_manifest_sm3_sync(conn, d)
    seq, head_hash = _head(conn)
    doc = {
        "format": MANIFEST_FORMAT, "version": 1, "business_date": d.isoformat(),
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "previous_manifest_sm3": previous,
        "reconciliation": None if recon is None else {
            "run_no": recon["run"]["run_no"], "bank_file_sm3": recon["bank_file_sm3"], "counts": recon["counts"],
            "new": recon["run"]["new"], "persisting": recon["run"]["persisting"], "resolved": recon["run"]["resolved"],
            "cases_opened": recon["run"]["cases_opened"]},
        "settlement": settlement,
        "files": [{"file": p.name, "sm3": file_sm3(p)} for p in files],
        "audit_head": {"seq": seq, "entry_hash": head_hash},
    }
    path = cfg.out_dir / f"manifest-{d:%Y%m%d}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(canonical(doc) + b"\n")
    cfg.signer.sign_file(path)
    digest = file_sm3(path)
    conn.execute(manifests.delete().where(manifests.c.business_date == d))
    conn.execute(manifests.insert().values(business_date=d, path=str(path), manifest_sm3=digest,
                                           previous_sm3=previous, written_at=datetime.now(UTC)))
    append_audit(conn, cfg.actor, "eod.manifest", d.isoformat(), {"sm3": digest, "previous": previous})
    return path


async def write_manifest(engine: AsyncEngine, d: date, cfg: EodConfig, recon: dict[str, Any] | None,
                         settlement: dict[str, Any] | None, files: list[Path]) -> Path:
    async with write_transaction(engine) as conn:
        return await conn.run_sync(write_manifest_sync, d, cfg, recon, settlement, files)


async def run_eod(engine: AsyncEngine, d: date, cfg: EodConfig, bank_file: Path | None = None) -> dict[str, Any]:
    """The whole end of day for D (see module docstring); returns a summary document."""
    if bank_file is not None:  # reject a bad file before closing anything
        load_bank_file(bank_file, d)
    settlement = await close_and_settle(engine, d, cfg)
    recon = await reconcile(engine, d, bank_file, cfg) if bank_file is not None else None
    reports = await write_reports(engine, d, cfg)
    files = [Path(settlement["settlement_file"]), *reports]
    manifest = await write_manifest(engine, d, cfg, recon, settlement, files)
    return {
        "business_date": d.isoformat(),
        "settlement": settlement,
        "reconciliation": None if recon is None else {"counts": recon["counts"], **recon["run"]},
        "reports": [str(p) for p in reports],
        "manifest": str(manifest),
        "out_dir": str(cfg.out_dir),
    }


def verify_manifest_chain(paths: list[Path], trusted_key_hex: str | None = None) -> list[str]:
    """Check daily manifests in date order: each signed and intact, each naming its predecessor's SM3.

    Returns the problems found (empty = the chain holds). The first manifest's predecessor is not checked
    (it may lie before the files at hand) unless it is the genesis value.
    """
    from clearing.signing import verify_file

    problems: list[str] = []
    docs = []
    for p in paths:
        res = verify_file(p, trusted_key_hex)
        if not res.ok:
            problems.append(f"{p.name}: {res.reason}")
            continue
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
            docs.append((str(doc["business_date"]), p, str(doc["previous_manifest_sm3"])))
        except (ValueError, KeyError, TypeError):
            problems.append(f"{p.name}: not a manifest")
    docs.sort()
    for (_, prev_path, _), (_, path, prev_sm3) in itertools.pairwise(docs):
        if file_sm3(prev_path) != prev_sm3:
            problems.append(f"{path.name}: previous_manifest_sm3 does not match {prev_path.name}")
    return problems


def default_out_dir(data_dir: Path, d: date) -> Path:
    return data_dir / "reports" / d.isoformat()


def next_business_date(d: date) -> date:
    return d + timedelta(days=1)
