"""ISO 7816-4 status words (状态字) as PBOC / FMCOS cards and PSAMs use them.

The table is the union of ISO 7816-4 and PBOC/FMCOS usage (reference card-and-crypto.md §3.2).
Three families carry a value in their low bits: ``61xx`` (xx bytes available, fetch with GET
RESPONSE), ``6Cxx`` (wrong Le, xx is the right one) and ``63Cx`` (verification failed, x tries
left).

>>> describe(0x6A82)
'6A82 file not found'
>>> describe(verify_failed(2))
'63C2 verification failed, 2 tries left'
"""

from __future__ import annotations

SW_OK = 0x9000
SW_DATA_CORRUPTED = 0x6281
SW_FILE_INVALIDATED = 0x6283
SW_VERIFY_FAILED = 0x6300
SW_STATE_UNCHANGED = 0x6400
SW_EEPROM_WRITE_FAILED = 0x6581
SW_WRONG_LENGTH = 0x6700
SW_CLA_SM_MISMATCH = 0x6900
SW_INVALID_STATE = 0x6901
SW_FILE_STRUCTURE_INCOMPATIBLE = 0x6981
SW_SECURITY_NOT_SATISFIED = 0x6982
SW_AUTH_BLOCKED = 0x6983
SW_CONDITIONS_NOT_SATISFIED = 0x6985
SW_SM_DATA_MISSING = 0x6987
SW_SM_DATA_INCORRECT = 0x6988
SW_WRONG_DATA = 0x6A80
SW_FUNCTION_NOT_SUPPORTED = 0x6A81
SW_FILE_NOT_FOUND = 0x6A82
SW_RECORD_NOT_FOUND = 0x6A83
SW_NOT_ENOUGH_SPACE = 0x6A84
SW_INCORRECT_P1P2 = 0x6A86
SW_REFERENCED_DATA_NOT_FOUND = 0x6A88
SW_OFFSET_BEYOND_EOF = 0x6B00
SW_INS_NOT_SUPPORTED = 0x6D00
SW_CLA_NOT_SUPPORTED = 0x6E00
SW_UNKNOWN_ERROR = 0x6F00
SW_MAC_INVALID = 0x9302
SW_APPLICATION_LOCKED = 0x9303
SW_INSUFFICIENT_BALANCE = 0x9401
SW_KEY_NOT_FOUND = 0x9403
SW_MAC_UNAVAILABLE = 0x9406

SW1_BYTES_AVAILABLE = 0x61
SW1_WRONG_LE = 0x6C
SW_VERIFY_FAILED_BASE = 0x63C0
MAX_VERIFY_TRIES = 15  # the low nibble of 63Cx

DESCRIPTIONS: dict[int, str] = {
    SW_OK: "success",
    SW_DATA_CORRUPTED: "returned data may be corrupted",
    SW_FILE_INVALIDATED: "selected file invalidated / key checksum error",
    SW_VERIFY_FAILED: "verification failed",
    SW_STATE_UNCHANGED: "state unchanged",
    SW_EEPROM_WRITE_FAILED: "EEPROM write failure",
    SW_WRONG_LENGTH: "wrong length",
    SW_CLA_SM_MISMATCH: "CLA does not match the line-protection requirement",
    SW_INVALID_STATE: "invalid state",
    SW_FILE_STRUCTURE_INCOMPATIBLE: "command incompatible with file structure",
    SW_SECURITY_NOT_SATISFIED: "security status not satisfied",
    SW_AUTH_BLOCKED: "authentication method blocked",
    SW_CONDITIONS_NOT_SATISFIED: "conditions of use not satisfied",
    SW_SM_DATA_MISSING: "secure messaging data objects missing",
    SW_SM_DATA_INCORRECT: "secure messaging data objects incorrect",
    SW_WRONG_DATA: "incorrect data field",
    SW_FUNCTION_NOT_SUPPORTED: "function not supported",
    SW_FILE_NOT_FOUND: "file not found",
    SW_RECORD_NOT_FOUND: "record not found",
    SW_NOT_ENOUGH_SPACE: "not enough space in file",
    SW_INCORRECT_P1P2: "incorrect P1/P2",
    SW_REFERENCED_DATA_NOT_FOUND: "key or referenced data not found",
    SW_OFFSET_BEYOND_EOF: "offset beyond end of file",
    SW_INS_NOT_SUPPORTED: "INS not supported",
    SW_CLA_NOT_SUPPORTED: "CLA not supported",
    SW_UNKNOWN_ERROR: "data invalid / unknown error",
    SW_MAC_INVALID: "MAC invalid",
    SW_APPLICATION_LOCKED: "application permanently locked",
    SW_INSUFFICIENT_BALANCE: "insufficient balance",
    SW_KEY_NOT_FOUND: "key index not supported / key not found",
    SW_MAC_UNAVAILABLE: "required MAC unavailable",
}


class StatusWordError(Exception):
    """A card answered with a status word other than 9000 where success was required."""

    def __init__(self, sw: int, context: str = "") -> None:
        self.sw = sw
        prefix = f"{context}: " if context else ""
        super().__init__(f"{prefix}card answered {describe(sw)}")


def _check_sw(sw: int) -> None:
    if not 0 <= sw <= 0xFFFF:
        raise ValueError(f"status word out of range: {sw!r}")


def sw_hex(sw: int) -> str:
    """Four upper-case hex digits: ``sw_hex(0x9000) == '9000'``."""
    _check_sw(sw)
    return f"{sw:04X}"


def describe(sw: int) -> str:
    """The status word in hex followed by its meaning; unknown words say so."""
    _check_sw(sw)
    head = sw_hex(sw)
    if sw in DESCRIPTIONS:
        return f"{head} {DESCRIPTIONS[sw]}"
    sw1, sw2 = sw >> 8, sw & 0xFF
    if sw1 == SW1_BYTES_AVAILABLE:
        return f"{head} {sw2 or 256} response bytes available (GET RESPONSE)"
    if sw1 == SW1_WRONG_LE:
        return f"{head} wrong Le, correct Le is {sw2 or 256}"
    if sw & 0xFFF0 == SW_VERIFY_FAILED_BASE:
        n = sw & 0x0F
        return f"{head} verification failed, {n} {'try' if n == 1 else 'tries'} left"
    return f"{head} unknown status"


def verify_failed(tries_left: int) -> int:
    """The 63Cx status word for a failed verification with ``tries_left`` attempts remaining."""
    if not 0 <= tries_left <= MAX_VERIFY_TRIES:
        raise ValueError(f"tries_left must be 0..{MAX_VERIFY_TRIES}, got {tries_left}")
    return SW_VERIFY_FAILED_BASE | tries_left


def tries_left(sw: int) -> int | None:
    """The retry counter carried by a 63Cx status word, else None."""
    _check_sw(sw)
    return sw & 0x0F if sw & 0xFFF0 == SW_VERIFY_FAILED_BASE else None


def bytes_available(sw: int) -> int | None:
    """The byte count announced by 61xx (00 means 256), else None."""
    _check_sw(sw)
    return ((sw & 0xFF) or 256) if sw >> 8 == SW1_BYTES_AVAILABLE else None


def correct_le(sw: int) -> int | None:
    """The Le a 6Cxx status word asks for (00 means 256), else None."""
    _check_sw(sw)
    return ((sw & 0xFF) or 256) if sw >> 8 == SW1_WRONG_LE else None


def bytes_available_sw(n: int) -> int:
    """The 61xx status word announcing ``n`` bytes (1..256) ready for GET RESPONSE."""
    if not 1 <= n <= 256:
        raise ValueError(f"61xx announces 1..256 bytes, got {n}")
    return (SW1_BYTES_AVAILABLE << 8) | (n & 0xFF)


def wrong_le_sw(n: int) -> int:
    """The 6Cxx status word telling the terminal to resend with Le = ``n`` (1..256)."""
    if not 1 <= n <= 256:
        raise ValueError(f"6Cxx carries an Le of 1..256, got {n}")
    return (SW1_WRONG_LE << 8) | (n & 0xFF)
