"""Key diversification (密钥分散) and key check values (密钥校验值)."""

from __future__ import annotations

from collections.abc import Sequence

from keys.suite import DES3, SM4, CryptoError, Suite, encrypt_ecb

FACTOR_BYTES = 8
KCV_BYTES = 3


def _not(data: bytes) -> bytes:
    """Every bit inverted (~D)."""
    n = len(data)
    return (int.from_bytes(data, "big") ^ ((1 << (8 * n)) - 1)).to_bytes(n, "big")


def diversify(master_key: bytes, factor: bytes, suite: Suite = SM4) -> bytes:
    """One level of PBOC diversification with an 8-byte factor D.

    ``sm4``: DK = SM4(MK, D ‖ ~D). ``3des``: DK = 3DES(MK, D) ‖ 3DES(MK, ~D), no parity adjustment.
    A longer factor uses its rightmost 8 bytes (PBOC practice).

    >>> diversify(bytes.fromhex("0123456789ABCDEFFEDCBA9876543210"), bytes.fromhex("1234567890ABCDEF")).hex().upper()
    'E86BCB4726B27D2760B62C4731E4F570'
    >>> diversify(bytes.fromhex("0123456789ABCDEFFEDCBA9876543210"), bytes.fromhex("1234567890ABCDEF"),
    ...           DES3).hex().upper()
    '479EF7C1ECFE64AC9BB75999A2E5CD53'
    """
    if len(factor) < FACTOR_BYTES:
        raise CryptoError(f"diversification factor must be at least {FACTOR_BYTES} bytes, got {len(factor)}")
    d = factor[-FACTOR_BYTES:]
    if suite is SM4:
        return encrypt_ecb(master_key, d + _not(d), SM4)
    return encrypt_ecb(master_key, d, DES3) + encrypt_ecb(master_key, _not(d), DES3)


def diversify_path(master_key: bytes, factors: Sequence[bytes], suite: Suite = SM4) -> bytes:
    """Multi-level diversification: apply the factors in the order given (highest level first)."""
    key = master_key
    for factor in factors:
        key = diversify(key, factor, suite)
    return key


def kcv(key: bytes, suite: Suite = SM4) -> bytes:
    """Key check value: the first 3 bytes of the suite cipher over a zero block."""
    return encrypt_ecb(key, bytes(suite.block_bytes), suite)[:KCV_BYTES]
