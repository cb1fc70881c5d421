"""Reconciliation (对账): host journal vs the bank's clearing file, and terminal batches vs the host.

The engine is columnar (polars): a keyed full outer join of slim frames plus
vectorised classification; no Python loop touches a row (the few RRN-less rows
are handled column-wise by scatter), so it scales linearly to millions of rows
(figures: ``bench/reconcile.py``).

Keys: the retrieval reference number (参考号, RRN). A bank row whose RRN is
empty is matched by terminal/batch/trace/type instead (终端号/批次号/流水号); a
row whose fallback finds nothing keeps a synthetic key ``~terminal|batch|trace|type``.

Every output row ends in exactly one class:

- ``matched``          both sides, same amount and status;
- ``host_only``        the host has it, the bank does not (短款 / 单边账);
- ``bank_only``        the bank has it, the host does not (长款 / 单边账);
- ``amount_mismatch``  both sides, amounts differ (金额不一致);
- ``status_mismatch``  both sides, statuses differ (状态不一致; checked before amounts);
- ``duplicate``        a second (third, …) row with a key already seen on the same side (重复).

Grace (日期错位): a ``host_only`` or ``bank_only`` row whose transaction time lies
within :data:`GRACE_WINDOW_MIN` minutes of either cut-off bounding the business
date is flagged ``in_grace``: it is still reported, but no error case opens
until a later run still finds it (the bank may have booked it on the other day).

Break lifecycle across runs of the same date (:func:`diff_lifecycle`; persisted by
``clearing.eod``): a break first seen is ``new``, seen again ``persisting``, gone ``resolved``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import polars as pl

RECON_CLASSES = ("matched", "host_only", "bank_only", "amount_mismatch", "status_mismatch", "duplicate")
BREAK_CLASSES = RECON_CLASSES[1:]
GRACE_WINDOW_MIN = 10  # minutes either side of a cut-off in which a one-sided row is not yet a break
FALLBACK_KEY_PREFIX = "~"

# The columns both sides are normalised to (the bank file's detail fields, DESIGN.md).
RECON_COLUMNS = (
    "rrn",
    "provider_id",
    "terminal_id",
    "batch_no",
    "trace_no",
    "txn_type",
    "program",
    "card_no_masked",
    "amount_fen",
    "fee_fen",
    "txn_time",
    "status",
    "orig_rrn",
)
_FALLBACK_COLS = ("terminal_id", "batch_no", "trace_no", "txn_type")
_CARRY = ("provider_id", "terminal_id", "batch_no", "trace_no", "txn_type", "program", "card_no_masked", "txn_time")


BREAK_SCHEMA = {
    "class": pl.String,
    "key": pl.String,
    "rrn": pl.String,
    "side": pl.String,
    "provider_id": pl.String,
    "terminal_id": pl.String,
    "batch_no": pl.String,
    "trace_no": pl.String,
    "txn_type": pl.String,
    "program": pl.String,
    "card_no_masked": pl.String,
    "txn_time": pl.String,
    "host_amount_fen": pl.Int64,
    "bank_amount_fen": pl.Int64,
    "host_status": pl.String,
    "bank_status": pl.String,
    "diff_fen": pl.Int64,
}


def mask_card_expr(col: str = "card_no") -> pl.Expr:
    """Mask a card number column: first 6, last 4, the rest ``*`` (already-masked values pass through)."""
    c = pl.col(col).cast(pl.String).fill_null("")
    n = c.str.len_chars()
    return pl.when(n >= 11).then(c.str.slice(0, 6) + pl.lit("*" * 32).str.slice(0, n - 10) + c.str.slice(-4)).otherwise(c)


def normalize(frame: pl.DataFrame | pl.LazyFrame) -> pl.LazyFrame:
    """Bring a host journal or bank file frame to :data:`RECON_COLUMNS` (strings, Int64 amounts).

    A host frame's full ``card_no`` goes into ``card_no_masked`` and is masked (first 6, last 4) when the
    break rows are built: no row :func:`classify` returns carries a full card number.
    ``txn_time`` stays as given (ISO 8601 text or a datetime); breaks carry it as text.
    """
    lf = frame.lazy()
    names = lf.collect_schema()
    exprs: list[pl.Expr] = []
    for c in RECON_COLUMNS:
        if c == "card_no_masked" and c not in names and "card_no" in names:
            exprs.append(pl.col("card_no").cast(pl.String).fill_null("").alias(c))  # masked when breaks are built
        elif c not in names:
            exprs.append(pl.lit(0 if c in ("amount_fen", "fee_fen") else "").alias(c))
        elif c in ("amount_fen", "fee_fen"):
            exprs.append(pl.col(c).cast(pl.Int64).fill_null(0))
        elif c == "txn_time" and isinstance(names[c], pl.Datetime):
            exprs.append(pl.col(c))  # rendered as text only for breaks (see _text_time)
        else:
            exprs.append(pl.col(c).cast(pl.String).fill_null(""))
    return lf.select(exprs)


@dataclass
class ReconResult:
    """Output of one classification: the matched pairs (slim), every break (with details), counts per class."""

    matched: pl.DataFrame  # key, amounts, statuses of matched pairs
    breaks: pl.DataFrame  # one row per non-matched row, columns BREAK_SCHEMA, sorted (class, key, side)
    counts: dict[str, int] = field(default_factory=dict)

    def class_totals(self) -> pl.DataFrame:
        """Per class: count, host amount, bank amount, absolute difference (fen)."""
        cols = ["class", "host_amount_fen", "bank_amount_fen", "diff_fen"]
        both = pl.concat([self.matched.select(pl.lit("matched").alias("class"), *cols[1:]), self.breaks.select(cols)])
        agg = both.group_by("class").agg(
            count=pl.len().cast(pl.Int64),
            host_amount_fen=pl.col("host_amount_fen").fill_null(0).sum(),
            bank_amount_fen=pl.col("bank_amount_fen").fill_null(0).sum(),
            diff_fen=pl.col("diff_fen").abs().sum(),
        )
        base = pl.DataFrame({"class": list(RECON_CLASSES)})
        return base.join(agg, on="class", how="left", maintain_order="left").fill_null(0)


def _key_series(frame: pl.DataFrame) -> pl.Series:
    """The match key per row: the RRN, or ``~terminal|batch|trace|type`` for the few rows without one.

    Column-wise: the fallback string is built only for the RRN-less rows and scattered in.
    """
    key = frame["rrn"].clone().alias("key")
    idx = (key == "").arg_true()
    if idx.len():
        fb = frame[idx].select(
            (pl.lit(FALLBACK_KEY_PREFIX) + pl.concat_str([pl.col(c) for c in _FALLBACK_COLS], separator="|")).alias("k"))
        key = key.scatter(idx, fb["k"])
    return key


def _fill_bank_rrn_columns(bank: pl.DataFrame, host: pl.DataFrame) -> pl.DataFrame:
    """Give RRN-less bank rows the RRN of the host row with the same terminal/batch/trace/type (scattered in)."""
    idx = (bank["rrn"] == "").arg_true()
    if not idx.len():
        return bank
    blank = bank[idx].select(_FALLBACK_COLS)
    # narrow the journal by one selective column first (trace numbers), then match on all four
    lookup = (
        host.lazy().filter(pl.col("trace_no").is_in(blank["trace_no"].unique().implode()) & (pl.col("rrn") != ""))
        .select([*_FALLBACK_COLS, pl.col("rrn").alias("_host_rrn")])
        .join(blank.lazy().unique(), on=list(_FALLBACK_COLS), how="semi")
        .unique(subset=list(_FALLBACK_COLS), keep="first", maintain_order=True)
        .collect()
    )
    filled = blank.join(lookup, on=list(_FALLBACK_COLS), how="left", maintain_order="left")["_host_rrn"].fill_null("")
    return bank.with_columns(bank["rrn"].clone().scatter(idx, filled))


def _text_time(lf: pl.LazyFrame) -> pl.LazyFrame:
    if isinstance(lf.collect_schema()["txn_time"], pl.Datetime):
        return lf.with_columns(pl.col("txn_time").dt.to_string("%Y-%m-%dT%H:%M:%S%.6f%:z").fill_null(""))
    return lf


def classify(host: pl.DataFrame | pl.LazyFrame, bank: pl.DataFrame | pl.LazyFrame,
             host_rrn_unique: bool = False) -> ReconResult:
    """Classify host vs bank rows (see module docstring). Both inputs any frame :func:`normalize` accepts.

    The join runs on slim frames (key, amount, status); detail columns are joined back for breaks only.
    ``host_rrn_unique=True`` says the host side has unique, non-empty RRNs (``host_txns.rrn`` is UNIQUE
    NOT NULL), which skips a uniqueness pass over the journal; otherwise it is checked.
    """
    hn = normalize(host).collect()
    bn = _fill_bank_rrn_columns(normalize(bank).collect(), hn)
    h = hn.with_columns(key=pl.col("rrn") if host_rrn_unique else _key_series(hn))
    b = bn.with_columns(key=_key_series(bn))
    # a host journal has unique RRNs (the usual case): skip the per-row first-occurrence pass
    unique = host_rrn_unique or h["key"].n_unique() == h.height
    h = h.with_columns(_first=pl.lit(True) if unique else pl.col("key").is_first_distinct())
    b = b.with_columns(_first=pl.col("key").is_first_distinct())
    # slim frames for the join: three columns each, filtered before anything wide is touched
    h0 = h.select("key", pl.col("amount_fen").alias("host_amount_fen"), pl.col("status").alias("host_status"),
                  "_first").filter("_first").drop("_first").lazy()
    b0 = b.select("key", pl.col("amount_fen").alias("bank_amount_fen"), pl.col("status").alias("bank_status"),
                  "_first").filter("_first").drop("_first").lazy()
    h, b = h.lazy(), b.lazy()
    joined = h0.join(b0, on="key", how="full", coalesce=True)
    has_h = pl.col("host_amount_fen").is_not_null()
    has_b = pl.col("bank_amount_fen").is_not_null()
    cls = (
        pl.when(has_h & ~has_b)
        .then(pl.lit("host_only"))
        .when(~has_h & has_b)
        .then(pl.lit("bank_only"))
        .when(pl.col("host_status") != pl.col("bank_status"))
        .then(pl.lit("status_mismatch"))
        .when(pl.col("host_amount_fen") != pl.col("bank_amount_fen"))
        .then(pl.lit("amount_mismatch"))
        .otherwise(pl.lit("matched"))
    )
    pairs = joined.select(
        cls.alias("class"),
        "key",
        pl.when(has_h & has_b).then(pl.lit("both")).when(has_h).then(pl.lit("host")).otherwise(pl.lit("bank")).alias("side"),
        "host_amount_fen",
        "bank_amount_fen",
        "host_status",
        "bank_status",
        (pl.col("bank_amount_fen").fill_null(0) - pl.col("host_amount_fen").fill_null(0)).alias("diff_fen"),
    ).collect()

    matched = pairs.filter(pl.col("class") == "matched")
    pair_breaks = pairs.filter(pl.col("class") != "matched")
    keys = pair_breaks["key"].implode()
    detail_cols = ["rrn", *_CARRY]
    hd = _text_time(h.filter(pl.col("_first") & pl.col("key").is_in(keys)).select("key", *detail_cols))
    bd = _text_time(b.filter(pl.col("_first") & pl.col("key").is_in(keys)).select("key", *detail_cols))
    enriched = (
        pair_breaks.lazy()
        .join(hd, on="key", how="left")
        .join(bd, on="key", how="left", suffix="_b")
        .with_columns(*[pl.coalesce(c, f"{c}_b").alias(c) for c in detail_cols])
        .drop([f"{c}_b" for c in detail_cols])
    )

    def dups(side_frame: pl.LazyFrame, side: str) -> pl.LazyFrame:
        amount = pl.col("amount_fen")
        null_i = pl.lit(None, dtype=pl.Int64)
        null_s = pl.lit(None, dtype=pl.String)
        return _text_time(side_frame.filter(~pl.col("_first"))).select(
            pl.lit("duplicate").alias("class"),
            "key",
            pl.lit(side).alias("side"),
            (amount if side == "host" else null_i).alias("host_amount_fen"),
            (amount if side == "bank" else null_i).alias("bank_amount_fen"),
            (pl.col("status") if side == "host" else null_s).alias("host_status"),
            (pl.col("status") if side == "bank" else null_s).alias("bank_status"),
            (-amount if side == "host" else amount).alias("diff_fen"),
            *detail_cols,
        )

    breaks = pl.concat([enriched, dups(h, "host"), dups(b, "bank")], how="vertical").collect()
    breaks = breaks.select(list(BREAK_SCHEMA)).with_columns(mask_card_expr("card_no_masked")).sort(["class", "key", "side"])
    counts = dict.fromkeys(RECON_CLASSES, 0)
    counts["matched"] = matched.height
    for cls_name, n in breaks.group_by("class").len().iter_rows():
        counts[cls_name] = int(n)
    return ReconResult(matched=matched, breaks=breaks, counts=counts)


def cutoff_instant(business_date: date, cutoff_local_time: time, tz: str = "Asia/Shanghai") -> datetime:
    """The instant (UTC) at which ``business_date`` closes (日切): that local date at the cut-off time."""
    local = datetime.combine(business_date, cutoff_local_time, tzinfo=ZoneInfo(tz))
    return local.astimezone(ZoneInfo("UTC"))


def business_date_of(instant: datetime, cutoff_local_time: time, tz: str = "Asia/Shanghai") -> date:
    """The business date an instant belongs to: after the local cut-off it is the next day's."""
    local = instant.astimezone(ZoneInfo(tz))
    return local.date() + timedelta(days=1) if local.time() >= cutoff_local_time else local.date()


def flag_grace(
    breaks: pl.DataFrame,
    business_date: date,
    cutoff_local_time: time,
    tz: str = "Asia/Shanghai",
    grace_min: int = GRACE_WINDOW_MIN,
) -> pl.DataFrame:
    """Add ``in_grace``: one-sided breaks within ``grace_min`` of either cut-off bounding the date."""
    close = cutoff_instant(business_date, cutoff_local_time, tz)
    open_ = cutoff_instant(business_date - timedelta(days=1), cutoff_local_time, tz)
    window = timedelta(minutes=grace_min)
    ts = pl.col("txn_time").str.to_datetime(time_zone="UTC", strict=False)
    near = ((ts - pl.lit(close)).abs() <= window) | ((ts - pl.lit(open_)).abs() <= window)
    one_sided = pl.col("class").is_in(["host_only", "bank_only"])
    return breaks.with_columns(in_grace=(one_sided & near.fill_null(False)))


def diff_lifecycle(current: pl.DataFrame, previous: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Compare this run's breaks with the stored open ones of the same date, by (``class``, ``key``, ``side``).

    Returns (current with ``lifecycle`` in new/persisting, previous breaks now ``resolved``).
    ``previous`` needs at least the columns class, key, side.
    """
    ids = ["class", "key", "side"]
    prev_ids = previous.select(ids).unique().with_columns(_seen=pl.lit(True))
    cur = current.join(prev_ids, on=ids, how="left").with_columns(
        lifecycle=pl.when(pl.col("_seen")).then(pl.lit("persisting")).otherwise(pl.lit("new"))
    )
    resolved = previous.join(current.select(ids).unique(), on=ids, how="anti")
    return cur.drop("_seen"), resolved


# --- terminal batches (批结算) vs the host --------------------------------------------------------------------

BATCH_TYPES = ("PURCHASE", "VOID", "REFUND", "ADVICE")


def host_batch_totals(host: pl.DataFrame | pl.LazyFrame) -> pl.DataFrame:
    """The host's own counts and totals per terminal batch and type (successful transactions only)."""
    lf = normalize(host).filter((pl.col("status") == "SUCCESS") & pl.col("txn_type").is_in(list(BATCH_TYPES)))
    return (
        lf.group_by(["terminal_id", "batch_no", "txn_type"])
        .agg(host_count=pl.len().cast(pl.Int64), host_amount_fen=pl.col("amount_fen").sum())
        .collect()
    )


def reconcile_batches(host: pl.DataFrame | pl.LazyFrame, terminal_totals: pl.DataFrame) -> pl.DataFrame:
    """Compare each terminal batch's settle totals with the host's, per type.

    ``terminal_totals`` columns: terminal_id, batch_no, txn_type, count, amount_fen (one row per type the
    terminal reported). Returns one row per (terminal, batch, type) with both sides and ``balanced``.
    Batches the terminal never settled are not judged (the terminal may still be open).
    """
    mine = host_batch_totals(host)
    theirs = terminal_totals.select(
        pl.col("terminal_id").cast(pl.String),
        pl.col("batch_no").cast(pl.String),
        pl.col("txn_type").cast(pl.String),
        pl.col("count").cast(pl.Int64).alias("terminal_count"),
        pl.col("amount_fen").cast(pl.Int64).alias("terminal_amount_fen"),
    )
    settled = theirs.select("terminal_id", "batch_no").unique()
    mine = mine.join(settled, on=["terminal_id", "batch_no"], how="semi")
    out = theirs.join(mine, on=["terminal_id", "batch_no", "txn_type"], how="full", coalesce=True)
    out = out.with_columns(pl.col(pl.Int64).fill_null(0))
    return out.with_columns(
        balanced=(pl.col("terminal_count") == pl.col("host_count"))
        & (pl.col("terminal_amount_fen") == pl.col("host_amount_fen"))
    ).sort(["terminal_id", "batch_no", "txn_type"])
