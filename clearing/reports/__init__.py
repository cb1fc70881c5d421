"""Reports for bank staff and auditors (报表): each as CSV and as one self-contained HTML page.

Kinds (``carepay report KIND --date D --format csv|html --out PATH``):

- ``daily``       reconciliation of the date: summary, classes with counts and amounts, every
                  discrepancy with its case, terminal batches, open cases by age (overdue flagged);
- ``settlement``  provider settlement statements (one line per provider, zero nets included);
- ``stats``       program statistics, month to date: by district, street, provider, program, month;
- ``journal``     every host transaction of the date, one row each (bank-file columns);
- ``access``      the data-access trail (使用痕迹): events on the date and accesses to the date's data.

Card numbers are masked in every report. Producing a report that carries cardholder
data records an access event (``export``). Every file written is signed (``PATH.sig.json``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import polars as pl
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup
from sqlalchemy import and_, or_, select
from sqlalchemy.engine import Connection

from clearing.audit import append_audit, record_access
from clearing.eod_schema import access_events, error_cases, provider_settlements, recon_breaks, recon_runs
from clearing.error_cases import aging_sync
from clearing.reconcile import mask_card_expr, reconcile_batches
from clearing.reports.charts import bar_chart
from clearing.schema import batch_settlements, cards, host_txns
from clearing.settlement import SETTLEMENT_COLUMNS, journal_frame_sync
from clearing.signing import file_sm3

KINDS = ("daily", "settlement", "stats", "journal", "access")
FORMATS = ("csv", "html")
MAX_HTML_ROWS = 2_000
TZ = "Asia/Shanghai"
JOURNAL_COLUMNS = ("rrn", "business_date", "provider_id", "terminal_id", "batch_no", "trace_no", "txn_type", "program",
                   "card_no_masked", "amount_fen", "fee_fen", "txn_time", "status", "orig_rrn", "response_code")
CARDHOLDER_KINDS = ("daily", "journal")
_TEMPLATES = Path(__file__).parent  # report.html.j2 sits in the package (shipped as package data)
_env = Environment(loader=FileSystemLoader(_TEMPLATES), autoescape=select_autoescape(["html", "j2"]))


class ReportError(Exception):
    """A report that cannot be produced (unknown kind or format, nothing to report on)."""


@dataclass
class Table:
    title: str
    frame: pl.DataFrame
    note: str = ""
    alert_col: str | None = None


@dataclass
class Report:
    kind: str
    title: str
    subtitle: str
    business_date: date
    csv: pl.DataFrame
    summary: list[tuple[str, Any]] = field(default_factory=list)
    charts: list[Markup] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    alerts: list[str] = field(default_factory=list)

    @property
    def cardholder_data(self) -> bool:
        return self.kind in CARDHOLDER_KINDS


def yuan(fen: int | None) -> str:
    """Display fen as yuan with two decimals (edge only)."""
    if fen is None:
        return ""
    sign = "-" if fen < 0 else ""
    return f"{sign}{abs(fen) // 100:,}.{abs(fen) % 100:02d}"


def _frame(rows: list[Any], schema: dict[str, Any]) -> pl.DataFrame:
    return pl.DataFrame([tuple(r) for r in rows], schema=schema, orient="row")


def _local_day(d: date) -> tuple[datetime, datetime]:
    start = datetime.combine(d, time(0), tzinfo=ZoneInfo(TZ)).astimezone(UTC)
    return start, start + timedelta(days=1)


# --- builders ----------------------------------------------------------------------------------------------


def build_daily(conn: Connection, d: date, now: datetime) -> Report:
    run = conn.execute(select(recon_runs).where(recon_runs.c.business_date == d)
                       .order_by(recon_runs.c.run_no.desc()).limit(1)).mappings().first()
    brk_cols = ["break_key", "class", "side", "rrn", "provider_id", "terminal_id", "txn_type", "card_no_masked",
                "txn_time", "host_amount_fen", "bank_amount_fen", "diff_fen", "in_grace", "lifecycle"]
    brows = conn.execute(select(*[recon_breaks.c[c] for c in brk_cols]).where(recon_breaks.c.business_date == d)
                         .order_by(recon_breaks.c.lifecycle, recon_breaks.c["class"], recon_breaks.c.rrn)).all()
    breaks = _frame(brows, {c: (pl.Int64 if c.endswith("_fen") else pl.Boolean if c == "in_grace" else pl.String)
                            for c in brk_cols})
    crow = conn.execute(select(error_cases.c.break_key, error_cases.c.case_no, error_cases.c.status,
                               error_cases.c.due_at).where(error_cases.c.business_date == d)).all()
    cases = _frame(crow, {"break_key": pl.String, "case_no": pl.String, "case_status": pl.String,
                          "due_at": pl.Datetime("us", "UTC")})
    breaks = breaks.join(cases, on="break_key", how="left").with_columns(
        overdue=(pl.col("case_status").is_not_null() & (pl.col("case_status") != "closed")
                 & (pl.col("due_at") < pl.lit(now))).fill_null(False),
        due_at=pl.col("due_at").dt.convert_time_zone(TZ).dt.to_string("%Y-%m-%d %H:%M"),
    )
    counts: dict[str, int] = json.loads(run["counts"]) if run else {}
    current = breaks.filter(pl.col("lifecycle") != "resolved")
    classes = (
        pl.DataFrame({"class": ["matched", "host_only", "bank_only", "amount_mismatch", "status_mismatch", "duplicate"]})
        .join(current.group_by("class").agg(
            host_amount_fen=pl.col("host_amount_fen").fill_null(0).sum(),
            bank_amount_fen=pl.col("bank_amount_fen").fill_null(0).sum(),
            diff_fen=pl.col("diff_fen").abs().sum()), on="class", how="left", maintain_order="left")
        .with_columns(count=pl.col("class").replace_strict(counts, default=0, return_dtype=pl.Int64))
        .fill_null(0).select("class", "count", "host_amount_fen", "bank_amount_fen", "diff_fen")
    )
    aging = aging_sync(conn, now)
    batches = batch_results_sync(conn, d)
    unbalanced = batches.filter(~pl.col("balanced")) if batches.height else batches
    alerts = []
    if aging.overdue:
        alerts.append(f"{aging.overdue} overdue error case(s)")
    if unbalanced.height:
        alerts.append(f"{unbalanced.select('terminal_id', 'batch_no').unique().height} terminal batch(es) out of balance")
    summary = [
        ("reconciliation run", run["run_no"] if run else "none"),
        ("bank file", Path(run["bank_file"]).name if run else ""),
        ("bank file SM3", (run["bank_file_sm3"][:16] + "…") if run else ""),
        ("rows matched", counts.get("matched", 0)),
        ("breaks (current)", current.height),
        ("breaks resolved on a later run", breaks.height - current.height),
        ("in grace (near the cut-off)", int(current["in_grace"].sum()) if current.height else 0),
        ("open error cases (all dates)", aging.open_total),
        ("overdue error cases", aging.overdue),
    ]
    charts = [
        bar_chart("Breaks by class (count)", classes["class"].to_list()[1:], classes["count"].to_list()[1:], color=1),
        bar_chart("Open error cases by age", list(aging.buckets), list(aging.buckets.values()), color=3),
    ]
    disc = breaks.select("class", "lifecycle", "rrn", "provider_id", "terminal_id", "txn_type", "card_no_masked",
                         "txn_time", "host_amount_fen", "bank_amount_fen", "diff_fen", "in_grace", "case_no",
                         "case_status", "due_at", "overdue")
    csv = pl.concat([
        classes.select(pl.lit("class").alias("section"), pl.col("class").alias("class"), pl.col("count").alias("count"),
                       "host_amount_fen", "bank_amount_fen", "diff_fen"),
        disc.select(pl.lit("break").alias("section"), "class", pl.lit(1, pl.Int64).alias("count"), "host_amount_fen",
                    "bank_amount_fen", "diff_fen", "lifecycle", "rrn", "provider_id", "terminal_id", "txn_type",
                    "card_no_masked", "txn_time", "in_grace", "case_no", "case_status", "due_at", "overdue"),
        pl.DataFrame({"section": ["aging"] * len(aging.buckets), "class": list(aging.buckets),
                      "count": [int(v) for v in aging.buckets.values()]}),
    ], how="diagonal_relaxed")
    return Report(
        "daily", "Daily reconciliation 每日对账报告", "host journal vs bank clearing file vs terminal batches", d, csv,
        summary=summary, charts=charts, alerts=alerts,
        tables=[
            Table("Classes 分类", classes),
            Table("Discrepancies 差错明细", disc, "every non-matched row; overdue cases highlighted", "overdue"),
            Table("Terminal batches 批结算核对", batches, "terminal settle totals vs the host's own, per type"),
            Table("Open cases by age 未结差错账龄", pl.DataFrame({"age": list(aging.buckets),
                                                             "open_cases": list(aging.buckets.values())})),
        ],
    )


def batch_results_sync(conn: Connection, d: date) -> pl.DataFrame:
    """Terminal batch settle totals vs the host's own for the date (empty frame when no batch settled)."""
    rows = conn.execute(select(batch_settlements.c.terminal_id, batch_settlements.c.batch_no,
                               batch_settlements.c.terminal_totals).where(batch_settlements.c.business_date == d)).all()
    empty = pl.DataFrame(schema={"terminal_id": pl.String, "batch_no": pl.String, "txn_type": pl.String,
                                 "terminal_count": pl.Int64, "terminal_amount_fen": pl.Int64, "host_count": pl.Int64,
                                 "host_amount_fen": pl.Int64, "balanced": pl.Boolean})
    if not rows:
        return empty
    return reconcile_batches(journal_frame_sync(conn, d), terminal_totals_frame(rows))


def terminal_totals_frame(rows: list[Any]) -> pl.DataFrame:
    """Explode stored ``batch_settle`` totals (JSON BatchTotals) into one row per (terminal, batch, type)."""
    out = []
    for terminal_id, batch_no, totals_json in rows:
        t = json.loads(totals_json) if isinstance(totals_json, str) else dict(totals_json)
        for typ in ("purchase", "void", "refund", "advice"):
            out.append((terminal_id, batch_no, typ.upper(), int(t.get(f"{typ}_count", 0)), int(t.get(f"{typ}_fen", 0))))
    return _frame(out, {"terminal_id": pl.String, "batch_no": pl.String, "txn_type": pl.String, "count": pl.Int64,
                        "amount_fen": pl.Int64})


def build_settlement(conn: Connection, d: date, now: datetime) -> Report:
    rows = conn.execute(select(*[provider_settlements.c[c] for c in SETTLEMENT_COLUMNS], provider_settlements.c.zero_net)
                        .where(provider_settlements.c.business_date == d).order_by(provider_settlements.c.provider_id)).all()
    schema: dict[str, Any] = {c: (pl.Int64 if c.endswith(("_fen", "_count")) else pl.String) for c in SETTLEMENT_COLUMNS}
    schema["business_date"] = pl.Date
    schema["zero_net"] = pl.Boolean
    frame = _frame(rows, schema)
    csv = frame.drop("zero_net").with_columns(pl.col("business_date").dt.to_string("%Y-%m-%d"))
    total_net = int(frame["net_fen"].sum()) if frame.height else 0
    total_fee = int(frame["fee_fen"].sum()) if frame.height else 0
    top = frame.sort("net_fen", descending=True).head(20)
    return Report(
        "settlement", "Provider settlement statements 服务商清算单", "purchases − voids − refunds; fee borne by the bank",
        d, csv,
        summary=[("providers", frame.height), ("zero-net providers", int(frame["zero_net"].sum()) if frame.height else 0),
                 ("net paid to providers (元)", yuan(total_net)), ("processing fee borne by the bank (元)", yuan(total_fee))],
        charts=[bar_chart("Net per provider (fen, top 20)", top["provider_name"].to_list() or [],
                          top["net_fen"].to_list() or [])],
        tables=[Table("Statements", frame)],
        alerts=[] if frame.height else ["no settlement recorded for this date (run carepay eod run first)"],
    )


def build_stats(conn: Connection, d: date, now: datetime) -> Report:
    month_start = d.replace(day=1)
    q = (select(host_txns.c.business_date, host_txns.c.provider_id, host_txns.c.program, host_txns.c.txn_type,
                host_txns.c.amount_fen, cards.c.district, cards.c.street, host_txns.c.card_no)
         .select_from(host_txns.outerjoin(cards, cards.c.card_no == host_txns.c.card_no))
         .where(host_txns.c.business_date >= month_start, host_txns.c.business_date <= d,
                host_txns.c.status == "SUCCESS"))
    frame = _frame(conn.execute(q).all(), {"business_date": pl.Date, "provider_id": pl.String, "program": pl.String,
                                           "txn_type": pl.String, "amount_fen": pl.Int64, "district": pl.String,
                                           "street": pl.String, "card_no": pl.String})
    signed = pl.when(pl.col("txn_type").is_in(["VOID", "REFUND"])).then(-pl.col("amount_fen")).otherwise(pl.col("amount_fen"))
    frame = frame.filter(pl.col("txn_type") != "REVERSAL").with_columns(
        month=pl.col("business_date").dt.to_string("%Y-%m"), net_fen=signed,
        district=pl.col("district").fill_null(""), street=pl.col("street").fill_null(""),
        program=pl.col("program").fill_null(""))
    dims = ["month", "district", "street", "provider_id", "program"]
    detail = frame.group_by(dims).agg(
        purchases=pl.col("txn_type").is_in(["PURCHASE", "ADVICE"]).sum().cast(pl.Int64),
        net_fen=pl.col("net_fen").sum(), cardholders=pl.col("card_no").n_unique().cast(pl.Int64)).sort(dims)

    def by(col: str) -> pl.DataFrame:
        return frame.group_by(col).agg(net_fen=pl.col("net_fen").sum(), txns=pl.len().cast(pl.Int64),
                                        cardholders=pl.col("card_no").n_unique().cast(pl.Int64)).sort("net_fen", descending=True)

    tables = [Table(f"By {c}", by(c)) for c in ("program", "district", "street", "provider_id", "month")]
    tables.append(Table("Detail (month × district × street × provider × program)", detail))
    charts = [bar_chart(f"Net by {t.frame.columns[0]} (fen)", t.frame[t.frame.columns[0]].to_list(),
                        t.frame["net_fen"].to_list(), color=i) for i, t in enumerate((tables[0], tables[1], tables[3]))]
    return Report(
        "stats", "Program statistics 补贴项目统计", f"month to date {month_start} … {d}", d, detail, charts=charts,
        summary=[("transactions", frame.height), ("net spent (元)", yuan(int(frame["net_fen"].sum()) if frame.height else 0)),
                 ("cardholders", frame["card_no"].n_unique() if frame.height else 0)],
        tables=tables,
    )


def build_journal(conn: Connection, d: date, now: datetime) -> Report:
    j = journal_frame_sync(conn, d)
    frame = j.with_columns(
        card_no_masked=mask_card_expr("card_no"),
        business_date=pl.col("business_date").dt.to_string("%Y-%m-%d"),
        txn_time=pl.col("txn_time").dt.to_string("%Y-%m-%dT%H:%M:%S%.6f%:z"),
        program=pl.col("program").fill_null(""), orig_rrn=pl.col("orig_rrn").fill_null(""),
    ).select(JOURNAL_COLUMNS)
    by_type = frame.group_by("txn_type").agg(n=pl.len().cast(pl.Int64)).sort("txn_type")
    return Report(
        "journal", "Host journal export 主机流水", "every host transaction of the date, one row each", d, frame,
        summary=[("transactions", frame.height), ("successful", int((frame["status"] == "SUCCESS").sum()) if frame.height else 0)],
        charts=[bar_chart("Transactions by type", by_type["txn_type"].to_list(), by_type["n"].to_list())],
        tables=[Table("Journal", frame)],
    )


def build_access(conn: Connection, d: date, now: datetime) -> Report:
    start, end = _local_day(d)
    rows = conn.execute(select(access_events.c.at, access_events.c.actor, access_events.c.action, access_events.c.subject,
                               access_events.c.record_count, access_events.c.purpose)
                        .where(or_(and_(access_events.c.at >= start, access_events.c.at < end),
                                   access_events.c.business_date == d)).order_by(access_events.c.id)).all()
    frame = _frame(rows, {"at": pl.Datetime("us", "UTC"), "actor": pl.String, "action": pl.String, "subject": pl.String,
                          "record_count": pl.Int64, "purpose": pl.String})
    frame = frame.with_columns(at=pl.col("at").dt.convert_time_zone(TZ).dt.to_string("%Y-%m-%d %H:%M:%S"))
    by_actor = frame.group_by("actor").agg(n=pl.len().cast(pl.Int64)).sort("n", descending=True)
    return Report(
        "access", "Data-access trail 使用痕迹",
        "who viewed, exported, copied or deleted cardholder data: events of the day and accesses to the day's data",
        d, frame,
        summary=[("events", frame.height), ("people", by_actor.height)],
        charts=[bar_chart("Events by person", by_actor["actor"].to_list(), by_actor["n"].to_list(), color=4)],
        tables=[Table("Events", frame)],
    )


BUILDERS = {"daily": build_daily, "settlement": build_settlement, "stats": build_stats, "journal": build_journal,
            "access": build_access}


def build(conn: Connection, kind: str, d: date, now: datetime | None = None) -> Report:
    if kind not in BUILDERS:
        raise ReportError(f"unknown report {kind!r}: one of {', '.join(KINDS)}")
    return BUILDERS[kind](conn, d, now or datetime.now(UTC))


# --- rendering ---------------------------------------------------------------------------------------------


def _cell(v: Any) -> Any:
    if isinstance(v, bool):
        return "yes" if v else ""
    return v


def render_html(report: Report) -> str:
    tables = []
    for t in report.tables:
        shown = t.frame.head(MAX_HTML_ROWS)
        alert_idx = shown.columns.index(t.alert_col) if t.alert_col and t.alert_col in shown.columns else None
        rows = [[_cell(v) if i != alert_idx else v for i, v in enumerate(r)] for r in shown.iter_rows()]
        tables.append({"title": t.title, "columns": shown.columns, "rows": rows, "note": t.note, "alert_col": alert_idx,
                       "total": t.frame.height, "truncated": t.frame.height > shown.height})
    return _env.get_template("report.html.j2").render(
        title=report.title, subtitle=report.subtitle, business_date=report.business_date.isoformat(),
        generated_at=datetime.now(UTC).isoformat(timespec="seconds"), summary=report.summary, charts=report.charts,
        tables=tables, alerts=report.alerts)


def write_report(report: Report, fmt: str, path: Path) -> Path:
    """Write the report as ``fmt`` to ``path`` (parents created)."""
    if fmt not in FORMATS:
        raise ReportError(f"format must be csv or html, not {fmt!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "csv":
        report.csv.write_csv(path)
    else:
        path.write_text(render_html(report), encoding="utf-8")
    return path


def produce_sync(conn: Connection, kind: str, d: date, fmt: str, path: Path, signer: Any, actor: str,
                 purpose: str = "report") -> Path:
    """Build, write and sign a report (audit entry ``report.write`` with its SM3); record an access event
    when it carries cardholder data."""
    report = build(conn, kind, d)
    write_report(report, fmt, path)
    signer.sign_file(path)
    append_audit(conn, actor, "report.write", path.name[:200], {"kind": kind, "format": fmt, "business_date": str(d),
                                                                "sm3": file_sm3(path), "rows": report.csv.height})
    if report.cardholder_data:
        record_access(conn, actor, "export", f"report {kind} {path.name}", report.csv.height, d, purpose)
    return path
