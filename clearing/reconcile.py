"""Reconciliation (对账): host journal vs the bank's clearing file, and terminal batches vs the host.

The engine is columnar (polars); no Python loop touches a row, so it scales to
millions of rows (figures: ``bench/reconcile.py``):

- match keys are Int64, not strings: an all-digit 12-character RRN is its own
  number (exact), every other key (RRN with letters, fallback key) gets a dense
  id above 10**12 shared by both sides;
- only slim columns (key, amount, status, row number) take part; detail columns
  are gathered for the break rows alone;
- when the host keys are strictly increasing (a journal read in RRN order) each
  bank key is found by binary search (``search_sorted``) and duplicates are
  checked only among the rows that share a host row; otherwise the first rows of
  each side meet in one hash full join. Both give the same result.

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

from collections.abc import Callable
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

import polars as pl

from protocol.files.bank_file import DETAIL_FIELDS

RECON_CLASSES = ("matched", "host_only", "bank_only", "amount_mismatch", "status_mismatch", "duplicate")
BREAK_CLASSES = RECON_CLASSES[1:]
GRACE_WINDOW_MIN = 10  # minutes either side of a cut-off in which a one-sided row is not yet a break
FALLBACK_KEY_PREFIX = "~"
RRN_CHARS = 12  # a retrieval reference number is 12 characters (ISO 8583 field 37)
_OTHER_KEY_BASE = 10**RRN_CHARS  # ids of non-numeric keys start above every 12-digit RRN

# The columns both sides are normalised to (the bank file's detail fields, DESIGN.md).
RECON_COLUMNS = DETAIL_FIELDS
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


class ReconResult:
    """Output of one classification: the matched pairs (slim), every break (with details), counts per class.

    ``matched`` (key, amounts, statuses of matched pairs) is built on first access only: at millions of
    rows nothing downstream of :func:`classify` but :meth:`class_totals` reads it.
    """

    def __init__(self, matched: pl.DataFrame | Callable[[], pl.DataFrame], breaks: pl.DataFrame,
                 counts: dict[str, int] | None = None) -> None:
        self._matched = matched
        self.breaks = breaks  # one row per non-matched row, columns BREAK_SCHEMA, sorted (class, key, side)
        self.counts = counts if counts is not None else {}

    @property
    def matched(self) -> pl.DataFrame:
        if not isinstance(self._matched, pl.DataFrame):
            self._matched = self._matched()
        return self._matched

    def __repr__(self) -> str:
        return f"ReconResult(counts={self.counts!r}, breaks={self.breaks.height} rows)"

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


def _key_text() -> pl.Expr:
    """The textual match key of a normalised row: its RRN, or ``~terminal|batch|trace|type`` without one."""
    fb = pl.lit(FALLBACK_KEY_PREFIX) + pl.concat_str([pl.col(c) for c in _FALLBACK_COLS], separator="|")
    return pl.when(pl.col("rrn") == "").then(fb).otherwise(pl.col("rrn"))


def _rrn_number(rrn: pl.Series) -> pl.Series:
    """An all-digit 12-character RRN as its integer (exact: distinct such RRNs give distinct numbers); else null.

    Joining and deduplicating on these Int64 keys is several times cheaper than on strings.
    """
    num = rrn.str.to_integer(base=10, strict=False)
    exact = (rrn.str.len_bytes() == RRN_CHARS) & ~rrn.str.starts_with("+") & ~rrn.str.starts_with("-")
    return pl.select(pl.when(exact).then(num).otherwise(None).alias("k")).to_series() if len(rrn) else num


def _fallback_hash() -> pl.Expr:
    """A 64-bit hash of terminal and trace number, the selective half of the fallback key (a pre-filter
    only: the candidates are then matched exactly on all four columns)."""
    return (pl.col("terminal_id").hash(seed=1) ^ pl.col("trace_no").hash(seed=2)).alias("_fh")


def _fill_bank_rrn(bank_rrn: pl.Series, bank: pl.LazyFrame, host: pl.LazyFrame) -> pl.Series:
    """Give RRN-less bank rows the RRN of the host row with the same terminal/batch/trace/type (scattered in)."""
    idx = (bank_rrn == "").arg_true()
    if not idx.len():
        return bank_rrn
    blank = bank.select(_FALLBACK_COLS).collect()[idx]
    # narrow the journal by a 64-bit hash first (an integer lookup; equal values hash equal, so no
    # candidate is lost), then match exactly on all four columns
    wanted = blank.select(_fallback_hash())["_fh"].unique().implode()
    lookup = (
        host.filter(_fallback_hash().is_in(wanted) & (pl.col("rrn") != ""))
        .select([*_FALLBACK_COLS, pl.col("rrn").alias("_host_rrn")])
        .join(blank.lazy().unique(), on=list(_FALLBACK_COLS), how="semi")
        .unique(subset=list(_FALLBACK_COLS), keep="first", maintain_order=True)
        .collect()
    )
    filled = blank.join(lookup, on=list(_FALLBACK_COLS), how="left", maintain_order="left")["_host_rrn"].fill_null("")
    return bank_rrn.clone().scatter(idx, filled)


def _text_time(lf: pl.LazyFrame) -> pl.LazyFrame:
    if isinstance(lf.collect_schema()["txn_time"], pl.Datetime):
        return lf.with_columns(pl.col("txn_time").dt.to_string("%Y-%m-%dT%H:%M:%S%.6f%:z").fill_null(""))
    return lf


def _other_keys(frame: pl.LazyFrame, rrn: pl.Series, num: pl.Series) -> tuple[pl.Series, pl.Series]:
    """(row indices, textual keys) of the rows whose RRN is not an all-digit 12-character one."""
    idx = num.is_null().arg_true()
    if not idx.len():
        return idx, pl.Series("key", [], dtype=pl.String)
    rows = frame.select(_FALLBACK_COLS).collect()[idx].with_columns(rrn=rrn.gather(idx))
    return idx, rows.select(_key_text().alias("key"))["key"]


def _int_keys(h_lf: pl.LazyFrame, h_rrn: pl.Series, b_lf: pl.LazyFrame, b_rrn: pl.Series,
              host_rrn_unique: bool) -> tuple[pl.Series, pl.Series]:
    """Int64 match keys for both sides: the RRN's number when all digits, else a dense id (>= 10**12)
    shared by equal textual keys on either side (fallback ``~…`` keys, RRNs with letters)."""
    hk, bk = _rrn_number(h_rrn), _rrn_number(b_rrn)
    if host_rrn_unique:
        hi = hk.is_null().arg_true()
        ht = h_rrn.gather(hi).alias("key")
    else:
        hi, ht = _other_keys(h_lf, h_rrn, hk)
    bi, bt = _other_keys(b_lf, b_rrn, bk)
    if hi.len() or bi.len():
        ids = pl.concat([ht, bt]).unique().to_frame("key").with_columns(
            id=pl.int_range(pl.len(), dtype=pl.Int64) + _OTHER_KEY_BASE)
        if hi.len():
            hk = hk.scatter(hi, ht.to_frame().join(ids, on="key", how="left", maintain_order="left")["id"])
        if bi.len():
            bk = bk.scatter(bi, bt.to_frame().join(ids, on="key", how="left", maintain_order="left")["id"])
    return hk, bk


def _firsts(keys: pl.Series) -> pl.Series | None:
    """Per row: is it the first with its key (later ones are duplicates)? None when every key is unique."""
    first = keys.is_first_distinct()
    return None if first.all() else first


def _details(frame: pl.DataFrame | pl.LazyFrame, idx: pl.Series, rrn: pl.Series | None = None) -> pl.LazyFrame:
    """Normalised detail columns (with ``key`` text) of the given rows only."""
    rows = frame[idx] if isinstance(frame, pl.DataFrame) else frame.collect()[idx]
    lf = normalize(rows)
    if rrn is not None:
        lf = lf.with_columns(rrn=pl.lit(rrn.gather(idx)))
    return _text_time(lf).with_columns(key=_key_text())


def classify(host: pl.DataFrame | pl.LazyFrame, bank: pl.DataFrame | pl.LazyFrame,
             host_rrn_unique: bool = False) -> ReconResult:
    """Classify host vs bank rows (see module docstring). Both inputs any frame :func:`normalize` accepts.

    Match and classification run on slim frames (an Int64 key, the amount, the status, the row number);
    detail columns are gathered for break rows only. ``host_rrn_unique=True`` says the host side has
    unique, non-empty RRNs (``host_txns.rrn`` is UNIQUE NOT NULL), which skips a uniqueness pass over the
    journal; otherwise it is checked.
    """
    host = host.collect() if isinstance(host, pl.LazyFrame) else host
    bank = bank.collect() if isinstance(bank, pl.LazyFrame) else bank
    h_lf, b_lf = normalize(host), normalize(bank)
    hs = h_lf.select("rrn", "amount_fen", "status").collect()
    bs = b_lf.select("rrn", "amount_fen", "status").collect()
    b_rrn = _fill_bank_rrn(bs["rrn"], b_lf, h_lf)
    hk, bk = _int_keys(h_lf, hs["rrn"], b_lf, b_rrn, host_rrn_unique)
    if _strictly_increasing(hk):  # the usual journal: sorted by RRN, so a binary search replaces the hash join
        h_first = None
        pair_breaks, b_first, n_matched, matched_pairs = _pairs_sorted(hk, bk, hs, bs)
    else:
        h_first = None if host_rrn_unique else _firsts(hk)
        pair_breaks, b_first, n_matched, matched_pairs = _pairs_hashed(hk, bk, hs, bs, h_first)
    has_h = pl.col("_hi").is_not_null()
    has_b = pl.col("_bi").is_not_null()
    cls = (
        pl.when(has_h & ~has_b)
        .then(pl.lit("host_only"))
        .when(~has_h & has_b)
        .then(pl.lit("bank_only"))
        .when(pl.col("host_status") != pl.col("bank_status"))
        .then(pl.lit("status_mismatch"))
        .otherwise(pl.lit("amount_mismatch"))
    )
    side = pl.when(has_h & has_b).then(pl.lit("both")).when(has_h).then(pl.lit("host")).otherwise(pl.lit("bank"))
    diff = (pl.col("bank_amount_fen").fill_null(0) - pl.col("host_amount_fen").fill_null(0)).alias("diff_fen")
    pair_breaks = pair_breaks.with_columns(cls.alias("class"), side.alias("side"), diff)

    detail_cols = ["key", "rrn", *_CARRY]
    with_h = pair_breaks.filter(has_h)
    only_b = pair_breaks.filter(~has_h)
    enriched = pl.concat([
        pl.concat([with_h.lazy(), _details(host, with_h["_hi"]).select(detail_cols)], how="horizontal"),
        pl.concat([only_b.lazy(), _details(bank, only_b["_bi"], b_rrn).select(detail_cols)], how="horizontal"),
    ])

    def dups(first: pl.Series | None, side_frame: pl.DataFrame, side: str, rrn: pl.Series | None) -> pl.LazyFrame | None:
        if first is None:
            return None
        idx = (~first).arg_true()
        amount = pl.col("amount_fen")
        null_i = pl.lit(None, dtype=pl.Int64)
        null_s = pl.lit(None, dtype=pl.String)
        return _details(side_frame, idx, rrn).select(
            pl.lit("duplicate").alias("class"),
            "key",
            pl.lit(side).alias("side"),
            (amount if side == "host" else null_i).alias("host_amount_fen"),
            (amount if side == "bank" else null_i).alias("bank_amount_fen"),
            (pl.col("status") if side == "host" else null_s).alias("host_status"),
            (pl.col("status") if side == "bank" else null_s).alias("bank_status"),
            (-amount if side == "host" else amount).alias("diff_fen"),
            *detail_cols[1:],
        )

    parts = [enriched.select(list(BREAK_SCHEMA))]
    parts += [d.select(list(BREAK_SCHEMA)) for d in (dups(h_first, host, "host", None), dups(b_first, bank, "bank", b_rrn))
              if d is not None]
    breaks = pl.concat(parts, how="vertical").with_columns(mask_card_expr("card_no_masked")).collect()
    breaks = breaks.cast(BREAK_SCHEMA).sort(["class", "key", "side"])
    counts = dict.fromkeys(RECON_CLASSES, 0)
    counts["matched"] = n_matched
    for cls_name, n in breaks.group_by("class").len().iter_rows():
        counts[cls_name] = int(n)
    return ReconResult(matched=lambda: _matched_frame(matched_pairs(), host), breaks=breaks, counts=counts)


_PAIR_COLS = ("k", "_hi", "host_amount_fen", "host_status", "_bi", "bank_amount_fen", "bank_status")


def _strictly_increasing(keys: pl.Series) -> bool:
    return (len(keys) > 0 and keys.null_count() == 0 and keys.is_sorted()
            and (len(keys) == 1 or bool((keys.diff().slice(1) > 0).all())))


def _pairs_hashed(hk: pl.Series, bk: pl.Series, hs: pl.DataFrame, bs: pl.DataFrame, h_first: pl.Series | None
                  ) -> tuple[pl.DataFrame, pl.Series | None, int, Callable[[], pl.LazyFrame]]:
    """First rows of each side joined on the Int64 key (full join): (pair breaks, bank firsts, matched, matched pairs)."""
    h = pl.DataFrame([hk.alias("k"), hs["amount_fen"].alias("host_amount_fen"), hs["status"].alias("host_status")])
    b = pl.DataFrame([bk.alias("k"), bs["amount_fen"].alias("bank_amount_fen"), bs["status"].alias("bank_status")])
    h = h.with_row_index("_hi")
    b = b.with_row_index("_bi")
    b_first = _firsts(bk)
    h1 = h if h_first is None else h.filter(h_first)
    b1 = b if b_first is None else b.filter(b_first)
    joined = h1.lazy().join(b1.lazy(), on="k", how="full", coalesce=True)
    is_break = (pl.col("_hi").is_null() | pl.col("_bi").is_null() | (pl.col("host_status") != pl.col("bank_status"))
                | (pl.col("host_amount_fen") != pl.col("bank_amount_fen")))
    joined = joined.with_columns(_brk=is_break).collect()
    pair_breaks = joined.filter("_brk").select(_PAIR_COLS)
    return (pair_breaks, b_first, joined.height - pair_breaks.height,
            lambda: joined.lazy().filter(~pl.col("_brk")).select(_PAIR_COLS))


def _pairs_sorted(hk: pl.Series, bk: pl.Series, hs: pl.DataFrame, bs: pl.DataFrame
                  ) -> tuple[pl.DataFrame, pl.Series | None, int, Callable[[], pl.LazyFrame]]:
    """As :func:`_pairs_hashed` when the host keys are strictly increasing: each bank key is looked up by
    binary search (``search_sorted``), duplicates are found among the few rows that share a host row."""
    n, m = len(hk), len(bk)
    pos = hk.search_sorted(bk, side="left").cast(pl.UInt32)
    found = (pos < n) & (hk.gather(pos.clip(upper_bound=n - 1)) == bk)
    fi = found.arg_true().cast(pl.UInt32)  # bank rows whose key the host has
    fh = pos.gather(fi)  # ... and their host rows
    first = pl.Series("first", [True], dtype=pl.Boolean).extend_constant(True, m - 1) if m else found
    # one bank row per hit host row survives the scatter (which one does not matter): the others share a
    # host row with it, so only the host rows they name need the exact first-in-file-order test
    winner = pl.Series("w", [None], dtype=pl.UInt32).extend_constant(None, n - 1).scatter(fh, fi)
    lost = winner.gather(fh) != fi
    if lost.any():
        dup_host = pl.Series("d", [False]).extend_constant(False, n - 1).scatter(fh.filter(lost), True)
        involved = fi.filter(dup_host.gather(fh))
        first = first.scatter(involved.filter(~pos.gather(involved).is_first_distinct()), False)
    nf = (~found).arg_true()
    if nf.len():
        first = first.scatter(nf.filter(~bk.gather(nf).is_first_distinct()), False)
    b_first = None if bool(first.all()) else first

    # bank first rows in the host: compare amount and status
    b1 = fi if b_first is None else fi.filter(first.gather(fi))
    h1 = pos.gather(b1)
    h_amt, b_amt = hs["amount_fen"].gather(h1), bs["amount_fen"].gather(b1)
    h_st, b_st = hs["status"].gather(h1), bs["status"].gather(b1)
    brk = (h_amt != b_amt) | (h_st != b_st)
    hit = pl.Series("hit", [False]).extend_constant(False, n - 1).scatter(h1, True)
    host_only = (~hit).arg_true().cast(pl.UInt32)
    bank_only = nf if b_first is None else nf.filter(first.gather(nf))
    null_u = pl.lit(None, dtype=pl.UInt32)
    null_i = pl.lit(None, dtype=pl.Int64)
    null_s = pl.lit(None, dtype=pl.String)
    both = pl.DataFrame({"_hi": h1.filter(brk), "_bi": b1.filter(brk)})
    parts = [
        both.select(pl.lit(hk).gather("_hi").alias("k"), "_hi", pl.lit(hs["amount_fen"]).gather("_hi").alias("host_amount_fen"),
                    pl.lit(hs["status"]).gather("_hi").alias("host_status"), "_bi",
                    pl.lit(bs["amount_fen"]).gather("_bi").alias("bank_amount_fen"),
                    pl.lit(bs["status"]).gather("_bi").alias("bank_status")),
        pl.DataFrame({"_hi": host_only}).select(pl.lit(hk).gather("_hi").alias("k"), "_hi",
                                                pl.lit(hs["amount_fen"]).gather("_hi").alias("host_amount_fen"),
                                                pl.lit(hs["status"]).gather("_hi").alias("host_status"),
                                                null_u.alias("_bi"), null_i.alias("bank_amount_fen"),
                                                null_s.alias("bank_status")),
        pl.DataFrame({"_bi": bank_only}).select(pl.lit(bk).gather("_bi").alias("k"), null_u.alias("_hi"),
                                                null_i.alias("host_amount_fen"), null_s.alias("host_status"), "_bi",
                                                pl.lit(bs["amount_fen"]).gather("_bi").alias("bank_amount_fen"),
                                                pl.lit(bs["status"]).gather("_bi").alias("bank_status")),
    ]
    pair_breaks = pl.concat(parts, how="vertical")
    n_matched = len(b1) - int(brk.sum())

    def matched_pairs() -> pl.LazyFrame:
        ok = ~brk
        return pl.DataFrame({"_hi": h1.filter(ok), "host_amount_fen": h_amt.filter(ok), "host_status": h_st.filter(ok),
                             "_bi": b1.filter(ok), "bank_amount_fen": b_amt.filter(ok),
                             "bank_status": b_st.filter(ok)}).lazy()

    return pair_breaks, b_first, n_matched, matched_pairs


def _matched_frame(m: pl.LazyFrame, host: pl.DataFrame) -> pl.DataFrame:
    """The matched pairs (key text, amounts, statuses): built only when someone reads them."""
    h_lf = normalize(host).with_row_index("_hi")
    return m.join(h_lf.select("_hi", _key_text().alias("key")), on="_hi", how="left").select(
        pl.lit("matched").alias("class"), "key", pl.lit("both").alias("side"),
        "host_amount_fen", "bank_amount_fen", "host_status", "bank_status",
        (pl.col("bank_amount_fen") - pl.col("host_amount_fen")).alias("diff_fen")).collect()


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
