"""Benchmark: card sessions per second in process, and the serial path's overhead over pure link time.

1. In-process: ``simulator.channel.SimReader`` → full session (select, internal auth via PSAM, SM read of
   the cardholder EF, entitlement, TTN, cryptogram, external auth, log append with PSAM MAC), one core.
   Target ≥ 500 swipes/s.
2. Serial: the real serial driver against ``carepay sim reader --pty --baud 115200`` in a subprocess
   (independent commands go as one APDU batch per exchange; the driver's hybrid wait and the
   reader's busy polling keep OS wake-ups off the critical path; the same run repeats it with
   ``--no-apdu-batch`` — one APDU per exchange — and with blocking waits on both sides, as baselines);
   per session, overhead = session time − pure link time of the bytes that session actually put on the
   line in both directions (bytes × 10 / baud, 8N1). Target ≤ 5 ms/session for the median; p90 and mean
   are printed beside it (on a shared machine a few wake-ups are descheduled for tens of ms). The
   reader's own timing counters (``status`` control line: emulated line time, time slept, wake-up
   lateness before credit) are reported too, so an emulation error cannot hide in the figure.

Prints APDU count and bytes per session. ``--quick`` keeps it short. The last line is one JSON object.

    .venv/bin/python bench/card_session.py --quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from keys.issuer import IssuerKeySet  # noqa: E402
from ops.config import DEFAULT_AID_HEX  # noqa: E402
from simulator.cardfile import CardDeck  # noqa: E402
from simulator.channel import SimReader  # noqa: E402
from simulator.personalise import issue_cards  # noqa: E402
from simulator.psam import VirtualPsam  # noqa: E402
from terminal_agent.card_session import CardSession  # noqa: E402
from terminal_agent.psam_session import PsamSession  # noqa: E402
from terminal_agent.serial_driver import SerialReader  # noqa: E402

AID = bytes.fromhex(DEFAULT_AID_HEX)
BAUD = 115_200
BITS_PER_BYTE = 10


def one_swipe(session: CardSession, amount_fen: int = 1_000) -> None:
    session.start(purchase=True)  # as the terminal agent's purchase flow does
    txn = session.authorize(amount_fen, "voucher")
    session.complete(txn)


def bench_in_process(suite: str, seconds: float) -> dict:
    card = issue_cards(1, aid=AID, suite=suite)[0]
    rd = SimReader(card, VirtualPsam(IssuerKeySet.demo("carepay-demo", suite)))
    psam = PsamSession(rd.psam)
    psam.open()
    session = CardSession(rd.card, psam, AID)
    one_swipe(session)  # warm caches
    c0, p0 = rd.card.apdus, rd.psam.apdus
    b0 = rd.card.bytes_in + rd.card.bytes_out + rd.psam.bytes_in + rd.psam.bytes_out
    n, t0 = 0, time.perf_counter()
    cpu0 = time.process_time()
    while time.perf_counter() - t0 < seconds:
        one_swipe(session)
        n += 1
    wall = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    apdus = (rd.card.apdus - c0 + rd.psam.apdus - p0) / n
    nbytes = (rd.card.bytes_in + rd.card.bytes_out + rd.psam.bytes_in + rd.psam.bytes_out - b0) / n
    return {"suite": suite, "sessions": n, "swipes_per_s": round(n / wall, 1), "swipes_per_cpu_s": round(n / cpu, 1),
            "apdus_per_session": apdus, "card_apdus": (rd.card.apdus - c0) / n, "psam_apdus": (rd.psam.apdus - p0) / n,
            "apdu_bytes_per_session": round(nbytes, 1)}


def bench_serial(sessions: int, baud: int, apdu_batch: bool = True, blocking: bool = False) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        deck_path = Path(tmp) / "cards.json"
        deck = CardDeck(cards=issue_cards(1, aid=AID), issuer="demo:carepay-demo")
        deck.save(deck_path)
        cmd = [sys.executable, "-m", "ops.cli", "sim", "reader", "--pty", "--cards", str(deck_path),
               "--volatile", "--baud", str(baud), "--apdu-batch" if apdu_batch else "--no-apdu-batch"]
        if blocking:  # the reader blocks between frames, as the driver does for every answer
            cmd += ["--poll-ms", "0"]
        proc = subprocess.Popen(cmd, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        try:
            assert proc.stdout is not None
            path = proc.stdout.readline().strip()
            with SerialReader(path, baud=baud or BAUD, timeout_ms=2_000, hybrid_wait=not blocking) as rd:
                psam = PsamSession(rd.psam)
                psam.open()
                session = CardSession(rd.card, psam, AID)
                one_swipe(session)
                b0 = rd.bytes_sent + rd.bytes_received
                a0, x0 = session.apdus, rd.exchanges
                times, overheads, nbytes = [], [], []
                link0 = _reader_status(proc)
                cpu0, rcpu0 = time.process_time(), _proc_cpu_s(proc.pid)
                for _ in range(sessions):
                    s0 = rd.bytes_sent + rd.bytes_received
                    t0 = time.perf_counter()
                    one_swipe(session)
                    t = time.perf_counter() - t0
                    n = rd.bytes_sent + rd.bytes_received - s0  # both directions, as counted by the driver
                    times.append(t)
                    nbytes.append(n)
                    overheads.append(t - (n * BITS_PER_BYTE / baud if baud else 0.0))
                cpu = time.process_time() - cpu0 + _proc_cpu_s(proc.pid) - rcpu0
                link1 = _reader_status(proc)
                line_bytes = (rd.bytes_sent + rd.bytes_received - b0) / sessions
                card_apdus = (session.apdus - a0) / sessions
                exchanges = (rd.exchanges - x0) / sessions
        finally:
            proc.terminate()
            proc.wait(timeout=5)
    link_s = line_bytes * BITS_PER_BYTE / baud if baud else 0.0
    reader_link = {k: round((link1.get(k, 0.0) - link0.get(k, 0.0)) / sessions, 3)
                   for k in ("waits", "line_ms", "slept_ms", "late_ms")} if baud else {}
    return {"baud": baud, "apdu_batch": apdu_batch, "blocking_waits": blocking, "sessions": sessions, "session_ms": round(statistics.median(times) * 1000, 2),
            "session_mean_ms": round(statistics.fmean(times) * 1000, 2), "link_ms": round(link_s * 1000, 2),
            "overhead_ms": round(statistics.median(overheads) * 1000, 2),
            "overhead_p90_ms": round(_p90(overheads) * 1000, 2),
            "overhead_mean_ms": round(statistics.fmean(overheads) * 1000, 2),
            "line_bytes_per_session": round(line_bytes, 1), "line_bytes_min_max": [min(nbytes), max(nbytes)],
            "card_apdus_per_session": card_apdus, "reader_exchanges_per_session": exchanges,
            "cpu_ms_per_session": round(cpu / sessions * 1000, 2),
            "reader_link_per_session": reader_link}


def _p90(xs: list[float]) -> float:
    return statistics.quantiles(xs, n=10, method="inclusive")[-1] if len(xs) > 1 else xs[0]


def _reader_status(proc: subprocess.Popen[str]) -> dict[str, float]:
    """The reader's ``link_*`` counters from its ``status`` control line."""
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("status\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    out: dict[str, float] = {}
    for word in line.split():
        key, _, value = word.partition("=")
        if key.startswith("link_"):
            out[key[5:]] = float(value)
    return out


def _proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of another process (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short run (CI)")
    ap.add_argument("--serial-sessions", type=int, default=0, help="serial sessions per run (default 20, quick 10)")
    ap.add_argument("--serial-only", action="store_true", help="skip the in-process figures")
    args = ap.parse_args()
    seconds = 1.0 if args.quick else 5.0
    serial_sessions = args.serial_sessions or (10 if args.quick else 50)
    result: dict = {"bench": "card_session", "quick": args.quick, "cpus": os.cpu_count(),
                    "loadavg_1m_at_start": round(os.getloadavg()[0], 2)}
    for suite in () if args.serial_only else ("sm4", "3des"):
        r = bench_in_process(suite, seconds)
        result[f"in_process_{suite}"] = r
        print(f"in-process {suite}: {r['swipes_per_s']} swipes/s ({r['swipes_per_cpu_s']} per CPU-second), "
              f"{r['apdus_per_session']:.0f} APDUs ({r['card_apdus']:.0f} card + {r['psam_apdus']:.0f} PSAM), "
              f"{r['apdu_bytes_per_session']:.0f} APDU bytes per session")
    r0 = bench_serial(serial_sessions, 0)
    r = bench_serial(serial_sessions, BAUD)
    rs = bench_serial(serial_sessions, BAUD, apdu_batch=False)  # the same run without the APDU batch: baseline
    rb = bench_serial(serial_sessions, BAUD, blocking=True)  # the same run with blocking waits on both sides
    result["serial_no_delay"] = r0
    result["serial_115200"] = r
    result["serial_115200_single_apdus"] = rs
    result["serial_115200_blocking_waits"] = rb
    print(f"serial, no link delay: median {r0['session_ms']} ms/session (driver + pty + reader + card work, no line "
          f"time); CPU of driver + reader {r0['cpu_ms_per_session']} ms/session; "
          f"{r0['line_bytes_per_session']:.0f} bytes on the line")
    print(f"serial @ {BAUD} baud: median {r['session_ms']} ms/session = {r['link_ms']} ms pure link time + "
          f"{r['overhead_ms']} ms overhead median, p90 {r['overhead_p90_ms']} ms, mean {r['overhead_mean_ms']} ms "
          f"({r['line_bytes_per_session']:.0f} bytes both directions, {r['card_apdus_per_session']:.0f} card APDUs and "
          f"{r['reader_exchanges_per_session']:.0f} reader exchanges per session)")
    print(f"  same link, reader without the APDU batch (one APDU per exchange): {rs['overhead_ms']} ms overhead median, "
          f"p90 {rs['overhead_p90_ms']} ms ({rs['reader_exchanges_per_session']:.0f} exchanges per session)")
    print(f"  same link, blocking waits (driver hybrid wait off, reader --poll-ms 0): {rb['overhead_ms']} ms overhead "
          f"median, p90 {rb['overhead_p90_ms']} ms")
    rl = r["reader_link_per_session"]
    if rl:
        print(f"  reader link emulation per session: {rl['waits']:.0f} waits, {rl['line_ms']} ms line time, "
              f"{rl['slept_ms']} ms slept, {rl['late_ms']} ms wake-up lateness before credit")
    result["targets"] = {"in_process_swipes_per_s_min": 500, "serial_overhead_ms_max": 5,
                         "met": (args.serial_only or min(result["in_process_sm4"]["swipes_per_cpu_s"],
                                                         result["in_process_3des"]["swipes_per_cpu_s"]) >= 500)
                         and r["overhead_ms"] <= 5}
    print(f"(load average at start {result['loadavg_1m_at_start']} on {result['cpus']} CPUs: timings on a shared "
          "machine include scheduler delays)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
