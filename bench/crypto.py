"""Crypto benchmark: keys.* (OpenSSL / GmSSL backends) against the pure-Python ``gmssl`` baseline, same run.

Measures operations per second for SM4 one block, the PBOC SM4 MAC over 64 bytes, SM3 over 64 B and
1 MiB, SM2 sign and verify. Targets: SM4 and SM3 at least 20× the baseline, SM2 verify at least
1,000/s. Every pair is first checked to compute the same result, so the baseline is a real one.

    .venv/bin/python bench/crypto.py            # about a minute
    .venv/bin/python bench/crypto.py --quick    # under 15 s

The last line printed is one JSON object with the figures. ``--strict`` exits 1 when a target fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gmssl import func as gm_func
from gmssl import sm3 as gm_sm3
from gmssl.sm2 import CryptSM2
from gmssl.sm4 import SM4_ENCRYPT, CryptSM4

from keys import sm2, sm2_openssl
from keys.mac import pad80, pboc_mac
from keys.sm3 import sm3
from keys.suite import SM4, encrypt_ecb

FULL_BUDGET_S = 1.5
QUICK_BUDGET_S = 0.25
MIB = 1024 * 1024
QUICK_BASELINE_SM3_BYTES = 64 * 1024  # quick mode times gmssl SM3 on 64 KiB and scales to 1 MiB
GMSSL_RAW_ECB = 2  # gmssl's CryptSM4 does raw ECB only with an unknown padding_mode
TARGET_RATIO = 20.0
TARGET_SM2_VERIFY_OPS_S = 1000.0


def ops_per_s(fn: Callable[[], object], budget_s: float, warm_up: bool = True) -> float:
    """Call ``fn`` in growing batches until ``budget_s`` has passed; return calls per second."""
    if warm_up:
        fn()  # cipher contexts, caches
    calls, batch = 0, 1
    start = time.perf_counter()
    while True:
        for _ in range(batch):
            fn()
        calls += batch
        elapsed = time.perf_counter() - start
        if elapsed >= budget_s:
            return calls / elapsed
        batch = min(batch * 2, max(1, int(calls / elapsed * (budget_s - elapsed)) + 1))


def _gmssl_safe_pair() -> sm2.SM2KeyPair:
    """gmssl's CryptSM2 strips every leading '0'/'4' of a key starting with '04': avoid such keys."""
    while True:
        kp = sm2.SM2KeyPair.generate()
        if not kp.public_key.hex().startswith("04"):
            return kp


def build_cases(quick: bool) -> list[dict]:
    key = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
    block = key
    data64 = os.urandom(64)
    mib = os.urandom(MIB)
    gm_ecb = CryptSM4(padding_mode=GMSSL_RAW_ECB)
    gm_ecb.set_key(key, SM4_ENCRYPT)
    gm_cbc = CryptSM4()
    gm_cbc.set_key(key, SM4_ENCRYPT)

    def gm_pboc_mac(data: bytes) -> bytes:
        # gmssl's CBC always appends a PKCS#7 block: the CBC-MAC of the 80-padded data is the block before it.
        return gm_cbc.crypt_cbc(bytes(16), pad80(data, 16))[-32:-16][:4]

    kp = _gmssl_safe_pair()
    ref = CryptSM2(private_key=kp.private_key.hex(), public_key=kp.public_key.hex())
    msg = b"carepay daily reconciliation report digest"
    our_sig = kp.sign(msg)
    gm_sig = ref.sign_with_sm3(msg)

    # correctness first: every pair agrees
    assert encrypt_ecb(key, block, SM4) == gm_ecb.crypt_ecb(block)
    assert pboc_mac(key, data64, suite=SM4) == gm_pboc_mac(data64)
    assert sm3(data64).hex() == gm_sm3.sm3_hash(gm_func.bytes_to_list(data64))
    assert ref.verify_with_sm3(our_sig.hex(), msg) and sm2.verify(kp.public_key, msg, bytes.fromhex(gm_sig))

    sm3_base_bytes = QUICK_BASELINE_SM3_BYTES if quick else MIB
    sm3_base_input = mib[:sm3_base_bytes]
    sm3_scale = sm3_base_bytes / MIB
    return [
        {"name": "sm4_block", "label": "SM4 one block", "ours": lambda: encrypt_ecb(key, block, SM4),
         "base": lambda: gm_ecb.crypt_ecb(block), "ratio_target": TARGET_RATIO},
        {"name": "pboc_sm4_mac_64", "label": "PBOC SM4 MAC, 64 B", "ours": lambda: pboc_mac(key, data64, None, SM4),
         "base": lambda: gm_pboc_mac(data64), "ratio_target": TARGET_RATIO},
        {"name": "sm3_64", "label": "SM3, 64 B", "ours": lambda: sm3(data64),
         "base": lambda: gm_sm3.sm3_hash(gm_func.bytes_to_list(data64)), "ratio_target": TARGET_RATIO},
        {"name": "sm3_1mib", "label": "SM3, 1 MiB" + (" (base from 64 KiB)" if quick else ""),
         "ours": lambda: sm3(mib), "base": lambda: gm_sm3.sm3_hash(gm_func.bytes_to_list(sm3_base_input)),
         "base_scale": sm3_scale, "ratio_target": TARGET_RATIO, "base_budget_s": 0.0},
        {"name": "sm2_sign", "label": "SM2 sign (ZA + e + sign, GmSSL)", "ours": lambda: kp.sign(msg),
         "base": lambda: ref.sign_with_sm3(msg)},
        {"name": "sm2_verify", "label": f"SM2 verify ({'OpenSSL 3' if sm2_openssl.available() else 'GmSSL'})", "ours": lambda: sm2.verify(kp.public_key, msg, our_sig),
         "base": lambda: ref.verify_with_sm3(gm_sig, msg), "ops_target": TARGET_SM2_VERIFY_OPS_S},
    ]


def run(quick: bool) -> dict:
    budget = QUICK_BUDGET_S if quick else FULL_BUDGET_S
    started = time.perf_counter()
    results: dict[str, dict] = {}
    for case in build_cases(quick):
        ours = ops_per_s(case["ours"], budget)
        base_budget = case.get("base_budget_s", budget)
        base = ops_per_s(case["base"], base_budget, warm_up=base_budget > 0) * case.get("base_scale", 1.0)
        row: dict = {"label": case["label"], "ours_ops_s": round(ours, 1), "baseline_ops_s": round(base, 2),
                     "ratio": round(ours / base, 1)}
        if "ratio_target" in case:
            row["target"] = f">= {case['ratio_target']:g}x baseline"
            row["pass"] = ours / base >= case["ratio_target"]
        elif "ops_target" in case:
            row["target"] = f">= {case['ops_target']:g} ops/s"
            row["pass"] = ours >= case["ops_target"]
        results[case["name"]] = row
    targets = [r["pass"] for r in results.values() if "pass" in r]
    return {"benchmark": "crypto", "quick": quick, "results": results, "all_targets_pass": all(targets),
            "sm2_verify_backend": "openssl" if sm2_openssl.available() else "gmssl",
            "elapsed_s": round(time.perf_counter() - started, 2)}


def print_table(report: dict) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain fallback
        for name, r in report["results"].items():
            print(name, r)
        return
    table = Table(title=f"carepay crypto benchmark ({'quick' if report['quick'] else 'full'}), ops/s")
    for col, justify in (("operation", "left"), ("keys.* (ours)", "right"), ("gmssl (pure Python)", "right"),
                         ("ratio", "right"), ("target", "left"), ("result", "left")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for r in report["results"].values():
        verdict = "" if "pass" not in r else ("PASS" if r["pass"] else "FAIL")
        table.add_row(r["label"], f"{r['ours_ops_s']:,.0f}", f"{r['baseline_ops_s']:,.2f}", f"{r['ratio']:,.1f}x",
                      r.get("target", ""), verdict)
    Console(width=120).print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short run (< 15 s)")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target fails")
    args = parser.parse_args(argv)
    report = run(args.quick)
    print_table(report)
    print(json.dumps(report, sort_keys=True))
    return 1 if args.strict and not report["all_targets_pass"] else 0


if __name__ == "__main__":
    sys.exit(main())
