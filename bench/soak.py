"""Seeded fault soak at scale: ≥ 100,000 transactions through terminals, mosquitto and clearing worker processes.

Phases (each injecting one fault while traffic flows, then checking everything at rest): warmup,
duplicates, lost_answers, broker_restart, worker_kill, torn_cards, clock_skew — see
``tests/soak/scenario.py``. Prints a table per phase, the totals (transactions, faults injected,
invariant checks, violations) and, as the last line, one JSON object. A failing seed is printed with
the violations and the exit code is 1: put the seed into ``tests/soak/test_soak.py`` REGRESSION_SEEDS.

    .venv/bin/python bench/soak.py                 # 100,002 transactions, seed 1, SQLite, 2 workers
    .venv/bin/python bench/soak.py --quick         # 2,100 transactions
    .venv/bin/python bench/soak.py --seeds 1,2,3 --txns 30000
    .venv/bin/python bench/soak.py --pg postgresql+asyncpg://postgres@127.0.0.1:5432/test
    .venv/bin/python bench/soak.py --ledger-process --txns 20000   # workers as clearing serve --ledger-process
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.soak.scenario import PHASES, SoakConfig, run_soak  # noqa: E402

FULL_TXNS = 100_000
QUICK_TXNS = 2_100


def _row(cells: list[str], widths: list[int]) -> str:
    return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True)))


async def main(args: argparse.Namespace) -> int:
    total_txns = QUICK_TXNS if args.quick else args.txns
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    per_seed = math.ceil(total_txns / len(seeds))
    per_phase = math.ceil(per_seed / len(PHASES))
    terminals = args.terminals or (12 if args.quick else 48)
    reports = []
    failing: list[int] = []
    started = time.perf_counter()
    for seed in seeds:
        with tempfile.TemporaryDirectory(prefix=f"carepay-soak-{seed}-") as tmp:
            cfg = SoakConfig(seed=seed, workdir=Path(tmp), terminals=terminals, cards=terminals * 10,
                             txns_per_phase=per_phase, workers=args.workers, links=max(1, terminals // 12),
                             answer_timeout_s=args.answer_timeout_s, card_mode=args.card_mode,
                             mid_phase_check_s=args.mid_check_s, pg_url=args.pg, verbose=args.verbose,
                             ledger_process=args.ledger_process)
            report = await run_soak(cfg)
        reports.append(report)
        widths = [16, 8, 9, 9, 60]
        print(f"\nseed {seed}: {terminals} terminals, {cfg.cards} cards, {cfg.workers} clearing worker processes"
              f"{' (each with a ledger process)' if cfg.ledger_process else ''}, "
              f"{'PostgreSQL' if args.pg else 'SQLite'}, card path {cfg.card_mode}")
        print(_row(["phase", "txns", "seconds", "txn/s", "faults / violations"], widths))
        for p in report.phases:
            faults = ", ".join(f"{k}={v}" for k, v in p.faults.items()) or "-"
            note = faults if not p.violations else f"{len(p.violations)} VIOLATIONS: {p.violations[0]}"
            print(_row([p.name, f"{p.txns:,}", f"{p.seconds:.1f}", f"{p.txns / p.seconds:.0f}", note[:200]], widths))
        if report.violations:
            failing.append(seed)
            print(f"FAILING SEED: {seed} — add it to REGRESSION_SEEDS in tests/soak/test_soak.py", file=sys.stderr)
            for v in report.violations[:20]:
                print(f"  {v}", file=sys.stderr)
    elapsed = time.perf_counter() - started
    txns = sum(r.transactions for r in reports)
    faults: dict[str, int] = {}
    for r in reports:
        for k, v in r.faults.items():
            faults[k] = faults.get(k, 0) + v
    injected = sum(v for k, v in faults.items() if k in ("duplicated", "reordered", "answers_lost", "broker_restarts",
                                                          "workers_killed", "torn_cards", "clock_skew_terminals"))
    checks = sum(r.checks for r in reports)
    violations = sum(len(r.violations) for r in reports)
    print(f"\ntransactions: {txns:,}")
    print(f"faults injected: {injected:,} ({', '.join(f'{k}={v}' for k, v in sorted(faults.items()))})")
    print(f"invariant checks: {checks:,}")
    print(f"violations = {violations}")
    print(f"elapsed: {elapsed:.1f} s ({txns / elapsed:.0f} transactions/s including setup and checks)")
    if failing:
        print(f"failing seeds: {','.join(map(str, failing))}")
    print(json.dumps({"transactions": txns, "faults_injected": injected, "faults": faults,
                      "invariant_checks": checks, "violations": violations, "seeds": seeds,
                      "failing_seeds": failing, "elapsed_s": round(elapsed, 1), "terminals": terminals,
                      "workers": args.workers, "db": "postgresql" if args.pg else "sqlite",
                      "card_mode": args.card_mode, "ledger_process": args.ledger_process}))
    return 1 if failing else 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"{QUICK_TXNS:,} transactions instead of {FULL_TXNS:,}")
    p.add_argument("--txns", type=int, default=FULL_TXNS, help="transactions in total (spread over seeds and phases)")
    p.add_argument("--seeds", default="1", help="comma-separated seeds")
    p.add_argument("--terminals", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="clearing worker processes (shared subscription)")
    p.add_argument("--answer-timeout-s", type=float, default=2.0)
    p.add_argument("--card-mode", choices=("fast", "full"), default="fast",
                   help="fast: TAC computed with the card's key (no APDUs); full: every purchase through the card")
    p.add_argument("--mid-check-s", type=float, default=5.0, help="ledger invariant checks while traffic flows")
    p.add_argument("--pg", default=None, help="PostgreSQL URL (a fresh schema) instead of SQLite")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--ledger-process", action="store_true",
                   help="each worker's clearing service in a child process (clearing serve --ledger-process)")
    sys.exit(asyncio.run(main(p.parse_args())))
