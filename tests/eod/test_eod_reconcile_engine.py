"""The columnar reconciliation engine on in-memory frames: every class, fallback keys, grace, lifecycle."""

from __future__ import annotations

from datetime import date, time

import polars as pl
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clearing.reconcile import (
    RECON_CLASSES,
    classify,
    diff_lifecycle,
    flag_grace,
    mask_card_expr,
    reconcile_batches,
)
from simulator.bank_file import INJECTED_CLASSES, generate, synthetic_journal

D = date(2026, 11, 27)


def _pairs(frame: pl.DataFrame) -> list[tuple[str, str]]:
    return sorted(frame.select("class", "rrn").iter_rows())


def test_each_class_on_a_hand_made_pair() -> None:
    host = synthetic_journal(8, D)
    bank = host.clone()
    rrn = host["rrn"].to_list()
    bank = bank.filter(pl.col("rrn") != rrn[0])  # host_only
    bank = bank.with_columns(
        amount_fen=pl.when(pl.col("rrn") == rrn[1]).then(pl.col("amount_fen") + 5).otherwise(pl.col("amount_fen")),
        status=pl.when(pl.col("rrn") == rrn[2]).then(pl.lit("REVERSED")).otherwise(pl.col("status")),
    )
    extra = bank.filter(pl.col("rrn") == rrn[3])
    fake = bank.filter(pl.col("rrn") == rrn[4]).with_columns(rrn=pl.lit("X00000000001"))
    bank = pl.concat([bank, extra, fake])
    res = classify(host, bank)
    assert _pairs(res.breaks) == sorted([
        ("host_only", rrn[0]), ("amount_mismatch", rrn[1]), ("status_mismatch", rrn[2]),
        ("duplicate", rrn[3]), ("bank_only", "X00000000001")])
    assert res.counts == {"matched": 5, "host_only": 1, "bank_only": 1, "amount_mismatch": 1,
                          "status_mismatch": 1, "duplicate": 1}
    mism = res.breaks.filter(pl.col("class") == "amount_mismatch").row(0, named=True)
    assert mism["bank_amount_fen"] - mism["host_amount_fen"] == 5 == mism["diff_fen"]
    totals = res.class_totals()
    assert totals["class"].to_list() == list(RECON_CLASSES)
    assert int(totals.filter(pl.col("class") == "amount_mismatch")["diff_fen"][0]) == 5


def test_blank_rrn_matches_by_terminal_batch_trace() -> None:
    host = synthetic_journal(50, D)
    bank = host.with_columns(rrn=pl.when(pl.int_range(pl.len()) % 7 == 0).then(pl.lit("")).otherwise(pl.col("rrn")))
    res = classify(host, bank)
    assert res.counts["matched"] == 50 and res.breaks.height == 0


def test_blank_rrn_without_host_counterpart_is_bank_only_with_synthetic_key() -> None:
    host = synthetic_journal(5, D)
    ghost = host.head(1).with_columns(rrn=pl.lit(""), trace_no=pl.lit("999999"))
    res = classify(host, pl.concat([host, ghost]))
    b = res.breaks.row(0, named=True)
    assert (b["class"], b["rrn"]) == ("bank_only", "") and b["key"].startswith("~")


def test_card_numbers_masked_in_breaks() -> None:
    host = synthetic_journal(20, D)
    res = classify(host, host.head(10))
    assert res.breaks.height == 10
    for card in res.breaks["card_no_masked"]:
        assert len(card) == 19 and card[6:15] == "*" * 9
    masked = pl.DataFrame({"c": ["6217000000000000012", "621700*********0012", "123"]}).select(mask_card_expr("c"))
    assert masked["c"].to_list() == ["621700*********0012", "621700*********0012", "123"]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n=st.integers(min_value=10, max_value=400), rate=st.floats(min_value=0.0, max_value=0.5),
       seed=st.integers(min_value=0, max_value=2**31))
def test_generated_bank_file_breaks_found_exactly(n: int, rate: float, seed: int) -> None:
    host = synthetic_journal(n, D, seed=seed % 1000)
    result = generate(host, rate, seed)
    res = classify(host, result.rows)
    assert _pairs(res.breaks) == sorted(result.truth.select("class", "rrn").iter_rows())
    # every row classified exactly once: matched + non-duplicate host rows = host rows
    assert sum(res.counts.values()) == res.counts["matched"] + res.breaks.height
    assert res.counts["matched"] + res.counts["host_only"] + res.counts["amount_mismatch"] + \
        res.counts["status_mismatch"] == n
    if rate * n >= len(INJECTED_CLASSES):
        assert all(res.counts[c] >= 1 for c in INJECTED_CLASSES)


def test_grace_flags_one_sided_rows_near_the_cutoff() -> None:
    host = pl.DataFrame({
        "rrn": ["A00000000001", "A00000000002", "A00000000003"],
        "terminal_id": ["T0000001"] * 3, "batch_no": ["000001"] * 3, "trace_no": ["000001", "000002", "000003"],
        "txn_type": ["PURCHASE"] * 3, "amount_fen": [100, 200, 300], "status": ["SUCCESS"] * 3,
        "card_no": ["6217000000000000012"] * 3,
        # 22:55 local (near the 23:00 cut-off), 12:00, and 23:05 the evening before (near the opening cut-off)
        "txn_time": ["2026-11-27T22:55:00+08:00", "2026-11-27T12:00:00+08:00", "2026-11-26T23:05:00+08:00"],
    })
    res = classify(host, host.head(0))
    flagged = flag_grace(res.breaks, D, time(23, 0))
    grace = dict(flagged.select("rrn", "in_grace").iter_rows())
    assert grace == {"A00000000001": True, "A00000000002": False, "A00000000003": True}


def test_lifecycle_new_persisting_resolved() -> None:
    prev = pl.DataFrame({"class": ["host_only", "bank_only"], "key": ["K1", "K2"], "side": ["host", "bank"]})
    cur = pl.DataFrame({"class": ["host_only", "duplicate"], "key": ["K1", "K3"], "side": ["host", "bank"]})
    now, resolved = diff_lifecycle(cur, prev)
    assert dict(now.select("key", "lifecycle").iter_rows()) == {"K1": "persisting", "K3": "new"}
    assert resolved["key"].to_list() == ["K2"]


def test_terminal_batches_balanced_and_not() -> None:
    host = synthetic_journal(30, D, n_providers=1)
    ok = host.filter(pl.col("status") == "SUCCESS")
    theirs = (ok.group_by("terminal_id", "batch_no", "txn_type").agg(count=pl.len(), amount_fen=pl.col("amount_fen").sum()))
    first = theirs.row(0, named=True)
    theirs = theirs.with_columns(
        amount_fen=pl.when((pl.col("terminal_id") == first["terminal_id"]) & (pl.col("txn_type") == first["txn_type"]))
        .then(pl.col("amount_fen") + 1).otherwise(pl.col("amount_fen")))
    out = reconcile_batches(host, theirs)
    bad = out.filter(~pl.col("balanced"))
    assert bad.height == 1 and bad["terminal_id"][0] == first["terminal_id"]
    assert bad["terminal_amount_fen"][0] - bad["host_amount_fen"][0] == 1


@settings(max_examples=15, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(min_value=1, max_value=400), st.integers(min_value=0, max_value=10_000),
       st.sampled_from([0.0, 0.05, 0.3]))
def test_host_order_does_not_change_the_result(n: int, seed: int, rate: float) -> None:
    """The engine takes a sorted-keys path when the journal is in RRN order and a join path otherwise:
    both must classify every row the same way."""
    host = synthetic_journal(n, D)
    bank = generate(host, rate, seed).rows
    in_order = classify(host, bank)
    shuffled = classify(host.sample(fraction=1.0, shuffle=True, seed=seed), bank)
    assert shuffled.counts == in_order.counts
    assert _pairs(shuffled.breaks) == _pairs(in_order.breaks)
