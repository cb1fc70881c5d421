"""The civil-affairs transaction cryptogram (TAC, 交易验证码) the card computes and the host verifies.

TAC = PBOC MAC (suite) under the card's diversified ``tac`` key over::

    amount_fen(4) ‖ txn_type(1) ‖ program(1) ‖ terminal_id(8, ASCII) ‖ ttn(4) ‖ date(4, BCD) ‖ time(3, BCD) ‖ atc(2)

3DES cards fold the 16-byte TAC key (left XOR right) as PBOC does; SM4 cards MAC
with the 16-byte key directly (house convention A). Without proof from the card
no transaction posts: the host re-derives the key and compares.
"""

from __future__ import annotations

import hmac

from keys.purse import tac as purse_tac
from keys.suite import SM4, CryptoError, Suite

TXN_TYPE_PURCHASE = 0x06
PROGRAM_CODES = {"voucher": 0x01, "nursing": 0x02, "restricted": 0x03}
TAC_BYTES = 4
MAX_AMOUNT_FEN = 0xFFFFFFFF
MAX_ATC = 0xFFFF


def _bcd(digits: str, nbytes: int) -> bytes:
    if len(digits) != nbytes * 2 or not digits.isdigit():
        raise CryptoError(f"expected {nbytes * 2} decimal digits")
    return bytes.fromhex(digits)


def cryptogram_data(amount_fen: int, program: str, terminal_id: str, ttn: int, txn_date: str, txn_time: str,
                    atc: int, txn_type: int = TXN_TYPE_PURCHASE) -> bytes:
    """The bytes the TAC covers. ``txn_date`` is ``YYYYMMDD``, ``txn_time`` ``hhmmss``."""
    if not 0 < amount_fen <= MAX_AMOUNT_FEN:
        raise CryptoError("amount out of range")
    if program not in PROGRAM_CODES:
        raise CryptoError(f"unknown program {program!r}")
    tid = terminal_id.encode("ascii")
    if len(tid) != 8:
        raise CryptoError("terminal id must be 8 characters")
    if not 0 <= ttn <= 0xFFFFFFFF or not 0 <= atc <= MAX_ATC:
        raise CryptoError("counter out of range")
    return (amount_fen.to_bytes(4, "big") + bytes([txn_type, PROGRAM_CODES[program]]) + tid + ttn.to_bytes(4, "big")
            + _bcd(txn_date, 4) + _bcd(txn_time, 3) + atc.to_bytes(2, "big"))


def compute_tac(card_tac_key: bytes, data: bytes, suite: Suite = SM4) -> bytes:
    """The card's TAC over :func:`cryptogram_data` bytes."""
    return purse_tac(card_tac_key, data, suite)


def verify_tac(card_tac_key: bytes, data: bytes, tac: bytes, suite: Suite = SM4) -> bool:
    """Constant-time comparison of a presented TAC with the recomputed one."""
    return len(tac) == TAC_BYTES and hmac.compare_digest(compute_tac(card_tac_key, data, suite), tac)
