"""Benchmark: host journal vs bank clearing file reconciliation (对账) at 1M and 10M rows.

What is timed, per size N (host rows; the bank file has ~1 % injected breaks of every class):

- ``parse``  — read and check the bank file (``protocol.files.bank_file.read_bank_frame``: trailer,
  every field vectorised);
- ``engine`` — match + classify (``clearing.reconcile.classify``), grace flags, break keys, and the
  breaks and error cases written set-based into a fresh SQLite ledger (``clearing.eod.persist_recon_sync``:
  ``recon_breaks`` rows, ``error_cases`` rows, one suspense transfer per case through the ledger, the audit
  entries) — executemany, never one awaited statement per row;
- ``dict_join`` — the baseline: a plain-Python dict join + classification of the same rows (tuples
  prepared beforehand, not timed).

The result is checked: the breaks found equal the injected ones. Last line: one JSON object with
``engine_s_1m``, ``parse_s_1m``, ``dict_join_s_1m``, ``engine_s_10m`` (null with ``--quick``), plus the
classify-only part and the engine's process CPU time (``time.process_time``, all threads: on a shared machine
wall time varies with the load, CPU time much less).

    .venv/bin/python bench/reconcile.py            # 1M and 10M (10M needs ~8 GiB RAM and a few minutes)
    .venv/bin/python bench/reconcile.py --quick    # 1M only
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import tempfile
import time
from datetime import date
from datetime import time as dtime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import polars as pl

from clearing.calendar import BusinessCalendar
from clearing.db import init_db, make_engine, write_transaction
from clearing.eod import EodConfig, persist_recon_sync, with_break_keys
from clearing.reconcile import classify, flag_grace
from clearing.signing import ReportSigner
from keys.sm2 import SM2KeyPair
from protocol.files.bank_file import read_bank_frame
from simulator.bank_file import generate, synthetic_journal, write

BUSINESS_DATE = date(2026, 11, 27)
BREAK_RATE = 0.01
SEED = 20261127
CUTOFF = dtime(23, 0)


def dict_join(host_rows: list[tuple[str, int, str]], bank_rows: list[tuple[str, int, str]]) -> dict[str, int]:
    """Baseline: classify with Python dicts (rrn, amount, status tuples; RRN-less rows not handled)."""
    counts = dict.fromkeys(("matched", "host_only", "bank_only", "amount_mismatch", "status_mismatch", "duplicate"), 0)
    host: dict[str, tuple[int, str]] = {}
    for rrn, amount, status in host_rows:
        if rrn in host:
            counts["duplicate"] += 1
        else:
            host[rrn] = (amount, status)
    seen: set[str] = set()
    for rrn, amount, status in bank_rows:
        if rrn in seen:
            counts["duplicate"] += 1
            continue
        seen.add(rrn)
        h = host.get(rrn)
        if h is None:
            counts["bank_only"] += 1
        elif h[1] != status:
            counts["status_mismatch"] += 1
        elif h[0] != amount:
            counts["amount_mismatch"] += 1
        else:
            counts["matched"] += 1
    counts["host_only"] = sum(1 for rrn in host if rrn not in seen)
    return counts


async def prepare_db(db_path: Path) -> None:
    """The ledger database exists before end of day: schema creation is not part of the timing."""
    engine = make_engine(f"sqlite+aiosqlite:///{db_path}")
    await init_db(engine)
    await engine.dispose()


async def persist(db_path: Path, result: Any, breaks: pl.DataFrame, bank_file: Path) -> dict[str, Any]:
    engine = make_engine(f"sqlite+aiosqlite:///{db_path}")
    cfg = EodConfig(data_dir=db_path.parent, out_dir=db_path.parent, signer=ReportSigner(SM2KeyPair.generate()),
                    calendar=BusinessCalendar())
    try:
        async with write_transaction(engine) as conn:
            return await conn.run_sync(persist_recon_sync, BUSINESS_DATE, bank_file, "0" * 64, result, breaks, cfg)
    finally:
        await engine.dispose()


def run(n_rows: int, workdir: Path, with_baseline: bool) -> dict[str, float]:
    print(f"--- {n_rows:,} host rows", flush=True)
    t = time.perf_counter()
    host = synthetic_journal(n_rows, BUSINESS_DATE, seed=1, n_providers=2_000)
    gen = generate(host, BREAK_RATE, SEED)
    bank_file = workdir / f"bank-{n_rows}.txt"
    write(bank_file, gen.rows, BUSINESS_DATE, "BJBANK")
    print(f"generated and wrote {gen.rows.height:,} bank rows ({bank_file.stat().st_size / 2**20:.0f} MiB) "
          f"with {gen.truth.height:,} injected breaks in {time.perf_counter() - t:.1f} s", flush=True)
    want = sorted(gen.truth.select("class", "rrn").iter_rows())
    del gen
    gc.collect()

    t = time.perf_counter()
    bank = read_bank_frame(bank_file).details
    parse_s = time.perf_counter() - t
    print(f"parse: {parse_s:.3f} s ({bank.height / parse_s / 1e6:.2f} M rows/s)", flush=True)

    db_path = workdir / f"recon-{n_rows}.db"
    asyncio.run(prepare_db(db_path))
    gc.collect()
    t, c = time.perf_counter(), time.process_time()
    result = classify(host, bank, host_rrn_unique=True)  # a journal's RRNs are unique (DB constraint)
    classify_s, classify_cpu_s = time.perf_counter() - t, time.process_time() - c
    breaks = with_break_keys(flag_grace(result.breaks, BUSINESS_DATE, CUTOFF))
    run_doc = asyncio.run(persist(db_path, result, breaks, bank_file))
    engine_s, engine_cpu_s = time.perf_counter() - t, time.process_time() - c
    got = sorted(result.breaks.select("class", "rrn").iter_rows())
    assert got == want, "the engine did not find exactly the injected breaks"
    print(f"engine: {engine_s:.3f} s, CPU {engine_cpu_s:.3f} s (classify {classify_s:.3f} s, CPU {classify_cpu_s:.3f} s; "
          f"{run_doc['new']:,} breaks and "
          f"{run_doc['cases_opened']:,} cases written) counts={result.counts}", flush=True)

    out = {"engine_s": engine_s, "parse_s": parse_s, "classify_s": classify_s, "engine_cpu_s": engine_cpu_s,
           "classify_cpu_s": classify_cpu_s}
    if with_baseline:
        h_rows = list(host.select("rrn", "amount_fen", "status").iter_rows())
        b_rows = list(bank.select(pl.col("rrn").fill_null(""), "amount_fen", "status").iter_rows())
        t = time.perf_counter()
        counts = dict_join(h_rows, b_rows)
        out["dict_join_s"] = time.perf_counter() - t
        print(f"dict join baseline: {out['dict_join_s']:.3f} s counts={counts}", flush=True)
        del h_rows, b_rows
    del host, bank, result, breaks
    gc.collect()
    bank_file.unlink()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1M rows only (skip the 10M run)")
    ap.add_argument("--rows", type=int, default=1_000_000, help="rows of the first run (default 1,000,000)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="carepay-bench-recon-") as tmp:
        first = run(args.rows, Path(tmp), with_baseline=True)
        big = None if args.quick else run(10_000_000, Path(tmp), with_baseline=False)
    doc = {
        "engine_s_1m": round(first["engine_s"], 3),
        "parse_s_1m": round(first["parse_s"], 3),
        "dict_join_s_1m": round(first["dict_join_s"], 3),
        "engine_s_10m": None if big is None else round(big["engine_s"], 3),
        "parse_s_10m": None if big is None else round(big["parse_s"], 3),
        "classify_s_1m": round(first["classify_s"], 3),
        "classify_s_10m": None if big is None else round(big["classify_s"], 3),
        # process CPU time (all threads) of the engine part: the machine may be shared, wall time varies
        "engine_cpu_s_1m": round(first["engine_cpu_s"], 3),
        "engine_cpu_s_10m": None if big is None else round(big["engine_cpu_s"], 3),
    }
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
