"""The bank side's clearing file (银行清算对账文件) for a business date, with injected discrepancies.

Built from the host's own journal (a polars frame of host transactions), so a
reconciliation of the result against the same journal must find exactly the
injected breaks, which are listed in a truth file beside the bank file
(``FILE.truth.json``). Injected, on disjoint rows chosen by a seeded shuffle:

- ``host_only``        a host row left out of the bank file;
- ``bank_only``        a row the host never saw (a fresh RRN);
- ``amount_mismatch``  the bank's amount differs by 1..100 fen (lower, or higher for tiny amounts);
- ``status_mismatch``  the bank's status differs (SUCCESS → REVERSED, else → SUCCESS);
- ``duplicate``        a row the bank lists twice;
- ``blank_rrn``        not a break: a row whose RRN the bank left empty, matched by terminal/batch/trace.

Everything is columnar; ten million rows generate in seconds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import polars as pl

from protocol.files.bank_file import DETAIL_FIELDS

DEFAULT_DISCREPANCY_RATE = 0.01
MAX_DISCREPANCY_RATE = 0.5
INJECTED_CLASSES = ("host_only", "bank_only", "amount_mismatch", "status_mismatch", "duplicate")
BANK_DETAIL_FIELDS = DETAIL_FIELDS
_FALLBACK = ("terminal_id", "batch_no", "trace_no", "txn_type")


@dataclass(frozen=True)
class BankFileResult:
    """What :func:`generate` made: the detail rows (bank order) and the injected breaks."""

    rows: pl.DataFrame
    truth: pl.DataFrame  # class, rrn, host_amount_fen, bank_amount_fen
    blank_rrn: list[str]


def _to_bank_columns(host: pl.DataFrame) -> pl.DataFrame:
    cols = host.columns
    exprs: list[pl.Expr] = []
    for c in BANK_DETAIL_FIELDS:
        if c == "card_no_masked" and c not in cols:
            card = pl.col("card_no").cast(pl.String).fill_null("")
            exprs.append(
                pl.when(card.str.len_chars() >= 11)
                .then(card.str.slice(0, 6) + pl.lit("*").repeat_by(card.str.len_chars() - 10).list.join("") + card.str.slice(-4))
                .otherwise(card)
                .alias(c)
            )
        elif c in ("amount_fen", "fee_fen"):
            exprs.append(pl.col(c).cast(pl.Int64).fill_null(0) if c in cols else pl.lit(0, pl.Int64).alias(c))
        elif c == "txn_time" and c in cols and isinstance(host.schema[c], pl.Datetime):
            exprs.append(pl.col(c).dt.to_string("%Y-%m-%dT%H:%M:%S%.6f%:z").fill_null(""))
        elif c in cols:
            exprs.append(pl.col(c).cast(pl.String).fill_null(""))
        else:
            exprs.append(pl.lit("").alias(c))
    return host.select(exprs)


def _split_counts(n_rows: int, rate: float) -> dict[str, int]:
    """How many rows each injected class gets: ``rate`` of the journal, spread evenly, at least 1 each."""
    total = max(len(INJECTED_CLASSES), round(n_rows * rate)) if rate > 0 and n_rows >= 2 * len(INJECTED_CLASSES) else 0
    per, extra = divmod(total, len(INJECTED_CLASSES))
    return {c: per + (1 if i < extra else 0) for i, c in enumerate(INJECTED_CLASSES)}


def generate(host: pl.DataFrame, rate: float = DEFAULT_DISCREPANCY_RATE, seed: int = 0) -> BankFileResult:
    """The bank's detail rows for the host journal ``host``, with about ``rate`` of them perturbed."""
    if not 0 <= rate <= MAX_DISCREPANCY_RATE:
        raise ValueError(f"discrepancy rate must be within 0..{MAX_DISCREPANCY_RATE}, got {rate}")
    base = _to_bank_columns(host).with_row_index("_i")
    n = base.height
    k = _split_counts(n, rate)
    n_blank = k["duplicate"]  # as many RRN-less rows as duplicates: enough to exercise the fallback
    # one seeded permutation; consecutive slices are disjoint row sets
    perm = pl.Series("_i", range(n), dtype=pl.UInt32).shuffle(seed=seed) if n else pl.Series("_i", [], pl.UInt32)
    cursor = 0
    picks: dict[str, pl.Series] = {}
    for cls in ("host_only", "amount_mismatch", "status_mismatch", "duplicate", "bank_only"):
        picks[cls] = perm.slice(cursor, k[cls])
        cursor += k[cls]
    # RRN-less rows: only where terminal/batch/trace/type is unique in the host journal (a fair fallback);
    # candidates are checked against the journal with a semi-join, not a uniqueness pass over every row
    cands = base.filter(pl.col("_i").is_in(perm.slice(cursor, 4 * n_blank).implode()) & (pl.col("rrn") != ""))
    counts = (base.select(_FALLBACK).join(cands.select(_FALLBACK).unique(), on=list(_FALLBACK), how="semi")
              .group_by(list(_FALLBACK)).len())
    unique_fb = cands.join(counts.filter(pl.col("len") == 1), on=list(_FALLBACK), how="semi")["_i"]
    rest = perm.slice(cursor, 4 * n_blank)
    picks["blank_rrn"] = rest.filter(rest.is_in(unique_fb.implode())).head(n_blank)

    def rows_of(name: str) -> pl.DataFrame:
        return base.filter(pl.col("_i").is_in(picks[name].implode()))

    host_only = rows_of("host_only")
    amount = rows_of("amount_mismatch")
    status = rows_of("status_mismatch")
    dup = rows_of("duplicate")
    blank = rows_of("blank_rrn")
    templ = rows_of("bank_only")

    delta = 1 + (pl.col("_i") % 100).cast(pl.Int64)
    new_amount = pl.when(pl.col("amount_fen") > delta).then(pl.col("amount_fen") - delta).otherwise(pl.col("amount_fen") + delta)
    amount_changed = amount.with_columns(new_amount.alias("amount_fen"))
    status_changed = status.with_columns(
        pl.when(pl.col("status") == "SUCCESS").then(pl.lit("REVERSED")).otherwise(pl.lit("SUCCESS")).alias("status")
    )
    fabricated = templ.with_columns(
        pl.format("X{}", (pl.col("_i").cast(pl.Int64) + 10**10).cast(pl.String).str.zfill(11)).alias("rrn"),
        (pl.col("trace_no").cast(pl.String)).alias("trace_no"),
    )
    fabricated = fabricated.join(base.select("rrn"), on="rrn", how="anti")
    blanked = blank.with_columns(pl.lit("").alias("rrn"))

    changed = pl.concat([amount_changed, status_changed, blanked])
    drop_ids = pl.concat([host_only["_i"], changed["_i"]])
    kept = base.filter(~pl.col("_i").is_in(drop_ids.implode()))
    rows = pl.concat([kept, changed, dup, fabricated]).drop("_i")  # the bank's own order: changed rows last

    nul = pl.lit(None, dtype=pl.Int64)
    truth = pl.concat(
        [
            host_only.select(pl.lit("host_only").alias("class"), "rrn", pl.col("amount_fen").alias("host_amount_fen"), nul.alias("bank_amount_fen")),
            fabricated.select(pl.lit("bank_only").alias("class"), "rrn", nul.alias("host_amount_fen"), pl.col("amount_fen").alias("bank_amount_fen")),
            amount.select(
                pl.lit("amount_mismatch").alias("class"),
                "rrn",
                pl.col("amount_fen").alias("host_amount_fen"),
                new_amount.alias("bank_amount_fen"),
            ),
            status.select(
                pl.lit("status_mismatch").alias("class"),
                "rrn",
                pl.col("amount_fen").alias("host_amount_fen"),
                pl.col("amount_fen").alias("bank_amount_fen"),
            ),
            dup.select(pl.lit("duplicate").alias("class"), "rrn", nul.alias("host_amount_fen"), pl.col("amount_fen").alias("bank_amount_fen")),
        ]
    ).sort(["class", "rrn"])
    return BankFileResult(rows=rows, truth=truth, blank_rrn=sorted(blank["rrn"].to_list()))


def render_lines(rows: pl.DataFrame, business_date: date, bank_code: str) -> tuple[str, pl.Series, str]:
    """Header line, detail lines (a Series, vectorised) and trailer line of the bank file layout."""
    total = int(rows["amount_fen"].sum()) if rows.height else 0
    head = f"H|{business_date:%Y%m%d}|{bank_code}|{rows.height}|{total}"
    details = rows.select(
        pl.concat_str([pl.lit("D"), *[pl.col(c).cast(pl.String).fill_null("") for c in BANK_DETAIL_FIELDS]], separator="|").alias("line")
    )["line"]
    tail = f"T|{rows.height}|{total}"
    return head, details, tail


def write(path: Path, rows: pl.DataFrame, business_date: date, bank_code: str) -> None:
    """Write the bank file (UTF-8, ``|``-separated, header/detail/trailer)."""
    head, details, tail = render_lines(rows, business_date, bank_code)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        fh.write(head + "\n")
        # write_csv of a one-column frame without quoting: fast, and the lines hold no quotes or newlines
        pl.DataFrame({"line": details}).write_csv(fh, include_header=False, quote_style="never")
        fh.write(tail + "\n")


def write_truth(path: Path, result: BankFileResult, business_date: date, rate: float, seed: int) -> None:
    """The truth file: every injected break (class, rrn, amounts) and the RRN-less rows."""
    doc = {
        "business_date": business_date.isoformat(),
        "rate": rate,
        "seed": seed,
        "counts": {c: int((result.truth["class"] == c).sum()) for c in INJECTED_CLASSES},
        "breaks": result.truth.to_dicts(),
        "blank_rrn": result.blank_rrn,
    }
    path.write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def truth_path(bank_file: Path) -> Path:
    """Where the truth file of ``bank_file`` lives."""
    return bank_file.with_name(bank_file.name + ".truth.json")


def synthetic_journal(n_rows: int, business_date: date, seed: int = 0, n_providers: int = 200) -> pl.DataFrame:
    """A host-journal-shaped frame of ``n_rows`` unique transactions (benchmarks and tests; vectorised).

    Columns as the host journal: rrn, provider_id, terminal_id, batch_no, trace_no, txn_type, program,
    card_no, amount_fen, fee_fen, txn_time (ISO text, +08:00), status, orig_rrn.
    """
    i = pl.int_range(0, n_rows, dtype=pl.Int64)
    h = (i * 2654435761 + seed * 97) % 1_000_003
    day = f"{business_date:%Y-%m-%d}"
    return pl.select(
        rrn=pl.format("{}", (i + 10**11).cast(pl.String)),
        provider_id=pl.format("P11000{}", (h % n_providers).cast(pl.String).str.zfill(9)),
        terminal_id=pl.format("T{}", ((h % n_providers) * 10 + i % 10).cast(pl.String).str.zfill(7)),
        batch_no=pl.lit("000001"),
        trace_no=(i // (n_providers * 10) % 1_000_000).cast(pl.String).str.zfill(6),
        txn_type=pl.when(i % 50 == 7).then(pl.lit("REFUND")).when(i % 40 == 3).then(pl.lit("VOID")).otherwise(pl.lit("PURCHASE")),
        program=pl.when(h % 3 == 0).then(pl.lit("nursing")).otherwise(pl.lit("voucher")),
        card_no=pl.format("6217{}", (h * 7919 % 10**15).cast(pl.String).str.zfill(15)),
        amount_fen=(h % 20_000 + 100),
        fee_fen=((h % 20_000 + 100) * 6_000 + 500_000) // 1_000_000,
        txn_time=pl.format(
            "{}T{}:{}:{}+08:00",
            pl.lit(day),
            (i % 22).cast(pl.String).str.zfill(2),
            (h % 60).cast(pl.String).str.zfill(2),
            (i % 60).cast(pl.String).str.zfill(2),
        ),
        status=pl.when(i % 97 == 5).then(pl.lit("FAILED")).otherwise(pl.lit("SUCCESS")),
        orig_rrn=pl.lit(""),
    )
