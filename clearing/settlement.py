"""Provider settlement (服务商清算) of one closed business date, and the end-of-day postings.

Per provider, from the host journal of the date (successful rows only):

- ``purchase`` = PURCHASE + ADVICE (offline advices are purchases made offline);
- ``void`` = VOID, ``refund`` = REFUND; a reversed purchase has status REVERSED and
  is not counted (the reversal undid it);
- ``net_fen = purchase_fen − void_fen − refund_fen`` — what the provider is paid, in full;
- ``fee_fen`` = processing fee borne by the issuing bank: ``round_half_up(max(net, 0) × rate_ppm / 10⁶)``
  in integer arithmetic (``(net × ppm + 500_000) // 1_000_000``), one rounding per provider per day.

Postings (idempotent by transfer key, never edited):

- fee:   ``bank:fee_expense`` → ``bank:settlement``  (key ``eod:fee:{date}:{provider}``)
- payout: ``provider:{id}:payable`` → ``bank:settlement`` for a positive net (reverse direction for a
  negative one), key ``eod:settle:{date}:{provider}``; a zero net posts nothing and is recorded
  explicitly (``zero_net``; Mojaloop's SETTLEMENT_NET_ZERO).

:func:`post_transfers_sync` is how end-of-day code posts: through the ledger's public
``post_transfers_sync`` (balance columns kept, invariants asserted), idempotent by key.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Any

import polars as pl
from sqlalchemy import select
from sqlalchemy.engine import Connection

from clearing.accounts import BANK_FEE_EXPENSE, BANK_SETTLEMENT, provider_payable
from clearing.schema import host_txns, providers, transfers

PPM = 1_000_000
FEE_ROUNDING = "half-up per provider per day"
SQL_IN_CHUNK = 500
MAX_MEMO_CHARS = 200
SETTLEMENT_COLUMNS = (
    "business_date", "provider_id", "provider_name", "settle_account", "purchase_count", "purchase_fen",
    "void_count", "void_fen", "refund_count", "refund_fen", "net_fen", "fee_fen",
)


def fee_for(net_fen: int, rate_ppm: int) -> int:
    """Processing fee in fen for a net amount, rounded half up; no fee on a zero or negative net.

    >>> fee_for(10_000, 6_000), fee_for(83, 6_000), fee_for(84, 6_000), fee_for(-500, 6_000)
    (60, 0, 1, 0)
    """
    if rate_ppm < 0:
        raise ValueError("fee rate must not be negative")
    return (max(net_fen, 0) * rate_ppm + PPM // 2) // PPM


@dataclass(frozen=True)
class Posting:
    """One end-of-day transfer to post: accounts by code, positive amount, idempotency key."""

    transfer_key: str
    debit: str
    credit: str
    amount_fen: int
    code: str
    business_date: date
    rrn: str | None = None
    terminal_id: str | None = None
    corrects_key: str | None = None
    memo: str = ""


def post_transfers_sync(conn: Connection, postings: list[Posting], check_existing: bool = True) -> dict[str, int]:
    """Post inside the caller's write transaction through the ledger (``clearing.ledger.post_transfers_sync``).

    Idempotent: keys already posted are skipped (``check_existing=False`` when the caller knows they are
    fresh, e.g. named after case numbers allocated in this transaction). ``corrects_key`` is resolved to the id of the
    transfer it corrects. The ledger dates the transfers on the current open business date (a closed
    date never receives postings). Returns ``{transfer_key: id}``.
    """
    from clearing.ledger import TransferSpec
    from clearing.ledger import post_transfers_sync as ledger_post

    if not postings:
        return {}
    for p in postings:
        if p.amount_fen <= 0 or p.debit == p.credit:
            raise ValueError(f"posting {p.transfer_key}: amount must be positive between two accounts")
    keys = [p.transfer_key for p in postings]
    wanted = (keys if check_existing else []) + [p.corrects_key for p in postings if p.corrects_key]
    existing: dict[str, int] = {}
    for i in range(0, len(wanted), SQL_IN_CHUNK):
        chunk = wanted[i : i + SQL_IN_CHUNK]
        existing.update(conn.execute(select(transfers.c.transfer_key, transfers.c.id)
                                     .where(transfers.c.transfer_key.in_(chunk))).all())
    todo = [p for p in postings if p.transfer_key not in existing]
    out = {k: existing[k] for k in keys if k in existing}
    if not todo:
        return out
    specs = [TransferSpec(p.debit, p.credit, p.amount_fen, p.code, p.transfer_key, p.memo[:MAX_MEMO_CHARS] or None,
                          existing.get(p.corrects_key or "")) for p in todo]
    ids = ledger_post(conn, specs)
    out.update({p.transfer_key: tid for p, tid in zip(todo, ids, strict=True)})
    return out


def journal_frame_sync(conn: Connection, business_date: date) -> pl.DataFrame:
    """The host journal of one business date as a polars frame (full card numbers: mask before showing).

    A row without a program (a reversal) takes its original's program when the original is of the same date.
    """
    cols = [host_txns.c[c] for c in ("rrn", "business_date", "provider_id", "terminal_id", "batch_no", "trace_no",
                                     "txn_type", "program", "card_no", "amount_fen", "fee_fen", "txn_time",
                                     "status", "orig_rrn", "response_code")]
    res = conn.execute(select(*cols).where(host_txns.c.business_date == business_date).order_by(host_txns.c.id))
    schema = {
        "rrn": pl.String, "business_date": pl.Date, "provider_id": pl.String, "terminal_id": pl.String,
        "batch_no": pl.String, "trace_no": pl.String, "txn_type": pl.String, "program": pl.String,
        "card_no": pl.String, "amount_fen": pl.Int64, "fee_fen": pl.Int64, "txn_time": pl.Datetime("us", "UTC"),
        "status": pl.String, "orig_rrn": pl.String, "response_code": pl.String,
    }
    frame = pl.DataFrame([tuple(r) for r in res], schema=schema, orient="row")
    # a reversal row carries no program of its own: it is the original's
    orig = frame.select(pl.col("rrn").alias("orig_rrn"), pl.col("program").alias("_orig_program"))
    return (frame.join(orig, on="orig_rrn", how="left", maintain_order="left")
            .with_columns(program=pl.coalesce("program", "_orig_program")).drop("_orig_program"))


def compute_settlement(journal: pl.DataFrame, provider_info: pl.DataFrame, business_date: date,
                       rate_ppm: int) -> pl.DataFrame:
    """Per-provider settlement rows (columns :data:`SETTLEMENT_COLUMNS` + ``zero_net``), sorted by provider.

    ``provider_info``: provider_id, name, settle_account. Every registered provider appears, and every
    provider in the journal: one without (successful) business that day gets an explicit zero-net row.
    """
    ok = journal.filter(pl.col("status") == "SUCCESS")

    def part(types: list[str], prefix: str) -> list[pl.Expr]:
        sel = pl.col("txn_type").is_in(types)
        return [sel.sum().cast(pl.Int64).alias(f"{prefix}_count"),
                pl.when(sel).then(pl.col("amount_fen")).otherwise(0).sum().cast(pl.Int64).alias(f"{prefix}_fen")]

    agg = ok.group_by("provider_id").agg(*part(["PURCHASE", "ADVICE"], "purchase"), *part(["VOID"], "void"),
                                         *part(["REFUND"], "refund"))
    everyone = pl.concat([journal.select("provider_id"), provider_info.select("provider_id")]).unique()
    out = (
        everyone.join(agg, on="provider_id", how="left")
        .fill_null(0)
        .join(provider_info.select("provider_id", pl.col("name").alias("provider_name"), "settle_account"),
              on="provider_id", how="left")
        .with_columns(pl.col("provider_name", "settle_account").fill_null(""),
                      net_fen=pl.col("purchase_fen") - pl.col("void_fen") - pl.col("refund_fen"))
    )
    fee = ((pl.max_horizontal(pl.col("net_fen"), pl.lit(0)) * rate_ppm + PPM // 2) // PPM).cast(pl.Int64)
    return (
        out.with_columns(business_date=pl.lit(business_date), fee_fen=fee, zero_net=pl.col("net_fen") == 0)
        .select(*SETTLEMENT_COLUMNS, "zero_net")
        .sort("provider_id")
    )


def provider_frame_sync(conn: Connection) -> pl.DataFrame:
    rows = conn.execute(select(providers.c.provider_id, providers.c.name, providers.c.settle_account)).all()
    return pl.DataFrame(list(rows), schema={"provider_id": pl.String, "name": pl.String, "settle_account": pl.String},
                        orient="row")


def settlement_postings(rows: pl.DataFrame, business_date: date) -> list[Posting]:
    """The fee and payout transfers for a settlement (zero amounts post nothing)."""
    out: list[Posting] = []
    d = business_date.isoformat()
    for r in rows.iter_rows(named=True):
        pid, net, fee = r["provider_id"], int(r["net_fen"]), int(r["fee_fen"])
        if fee > 0:
            out.append(Posting(f"eod:fee:{d}:{pid}", BANK_FEE_EXPENSE, BANK_SETTLEMENT, fee, "fee", business_date,
                               memo=f"processing fee {d} provider {pid}"))
        if net > 0:
            out.append(Posting(f"eod:settle:{d}:{pid}", provider_payable(pid), BANK_SETTLEMENT, net, "settle",
                               business_date, memo=f"settlement {d} provider {pid}"))
        elif net < 0:
            out.append(Posting(f"eod:settle:{d}:{pid}", BANK_SETTLEMENT, provider_payable(pid), -net, "settle",
                               business_date, memo=f"settlement {d} provider {pid} (net negative)"))
    return out


def write_settlement_csv(rows: pl.DataFrame, path: Any) -> None:
    """The provider settlement file (DESIGN.md): header row, one line per provider, amounts in fen."""
    rows.select(SETTLEMENT_COLUMNS).with_columns(pl.col("business_date").dt.to_string("%Y-%m-%d")).write_csv(path)
