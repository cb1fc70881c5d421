"""Benchmark: read a bank clearing file of N detail lines (columnar and record paths).

.venv/bin/python bench/bank_file_parse.py --rows 1000000
.venv/bin/python bench/bank_file_parse.py --quick        # 100k rows, a second or two
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from protocol.files.bank_file import parse_bank_file, read_bank_file_polars

TYPES = ("PURCHASE", "PURCHASE", "PURCHASE", "VOID", "REFUND", "ADVICE")


def generate(path: Path, rows: int) -> None:
    total = 0
    with path.open("w", encoding="utf-8") as out:
        out.write(f"H|20260115|BOB|{rows}|TOTAL\n")
        chunk = []
        for i in range(rows):
            amount = 500 + (i * 7919) % 20000
            total += amount
            t = TYPES[i % len(TYPES)]
            orig = f"{i - 1:012d}" if t in ("VOID", "REFUND") else ""
            chunk.append(
                f"D|{i:012d}|{110105000000000 + i % 5000:015d}|T{i % 100000:07d}|{i % 999 + 1:06d}|"
                f"{i % 999999 + 1:06d}|{t}|{'voucher' if i % 3 else 'nursing'}|621700*********{i % 10000:04d}|"
                f"{amount}|{amount // 200}|2026-01-15T{(i // 3600) % 24:02d}:{(i // 60) % 60:02d}:{i % 60:02d}+08:00|"
                f"SUCCESS|{orig}\n"
            )
            if len(chunk) == 100_000:
                out.writelines(chunk)
                chunk.clear()
        out.writelines(chunk)
        out.write(f"T|{rows}|{total}\n")
    # header total written last: patch the placeholder in place
    text = path.read_text(encoding="utf-8")
    path.write_text(text.replace("|TOTAL\n", f"|{total}\n", 1), encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--quick", action="store_true", help="100k rows")
    ap.add_argument("--record-path-rows", type=int, default=100_000, help="rows for the slower record path")
    args = ap.parse_args()
    rows = 100_000 if args.quick else args.rows
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bank.txt"
        t0 = time.perf_counter()
        generate(path, rows)
        size_mb = path.stat().st_size / 1e6
        print(f"generated {rows:,} rows ({size_mb:.0f} MB) in {time.perf_counter() - t0:.2f} s")
        t0 = time.perf_counter()
        frame = read_bank_file_polars(path)
        dt = time.perf_counter() - t0
        print(f"read_bank_file_polars: {frame.height:,} rows in {dt:.2f} s ({frame.height / dt:,.0f} rows/s)")
        small = min(rows, args.record_path_rows)
        if small:
            generate(path, small)
            t0 = time.perf_counter()
            bank = parse_bank_file(path)
            dt = time.perf_counter() - t0
            print(
                f"parse_bank_file:       {len(bank.details):,} rows in {dt:.2f} s ({len(bank.details) / dt:,.0f} rows/s)"
            )


if __name__ == "__main__":
    main()
