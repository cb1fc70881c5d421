"""Money: integer fen (分) everywhere, yuan (元) text only at the edge. No floats, no Decimal.

>>> format_fen(123456)
'1,234.56'
>>> format_fen(-5)
'-0.05'
>>> parse_yuan("1,234.56")
123456
"""

from __future__ import annotations

import re

FEN_PER_YUAN = 100
MAX_AMOUNT_FEN = 10_000_000  # one transaction or recharge line: 100,000.00 yuan
MAX_CARD_AMOUNT_FEN = 0xFFFF_FFFF  # 4-byte amount/balance field on the card
MAX_TOTAL_FEN = 2**63 - 1  # a sum of amounts (file totals, ledger balances): SQL BIGINT
MAX_YUAN_TEXT_CHARS = 32


class MoneyError(ValueError):
    """An amount that is not an exact, in-range number of fen."""


_YUAN = re.compile(r"(?P<sign>[-+]?)(?P<int>\d{1,3}(?:,\d{3})+|\d+)(?:\.(?P<frac>\d{1,2}))?")


def format_fen(amount_fen: int, *, thousands: bool = True) -> str:
    """Yuan with two decimals and (by default) thousands separators: ``-1,234.56``."""
    if not isinstance(amount_fen, int) or isinstance(amount_fen, bool):
        raise MoneyError(f"amount must be an int number of fen, got {type(amount_fen).__name__}")
    sign = "-" if amount_fen < 0 else ""
    yuan, fen = divmod(abs(amount_fen), FEN_PER_YUAN)
    body = f"{yuan:,}" if thousands else str(yuan)
    return f"{sign}{body}.{fen:02d}"


def parse_yuan(text: str) -> int:
    """Exact fen from yuan text (``"12"``, ``"12.5"``, ``"-1,234.56"``); MoneyError otherwise.

    More than two decimals is an error, never rounded. Thousands separators must group by three.
    """
    if not isinstance(text, str):
        raise MoneyError(f"yuan amount must be text, got {type(text).__name__}")
    s = text.strip()
    if len(s) > MAX_YUAN_TEXT_CHARS:
        raise MoneyError(f"yuan amount longer than {MAX_YUAN_TEXT_CHARS} characters")
    m = _YUAN.fullmatch(s)
    if m is None or not s.isascii():
        raise MoneyError(f"not a yuan amount with at most 2 decimals: {s[:MAX_YUAN_TEXT_CHARS]!r}")
    fen = int(m["int"].replace(",", "")) * FEN_PER_YUAN + int((m["frac"] or "0").ljust(2, "0"))
    fen = -fen if m["sign"] == "-" else fen
    if abs(fen) > MAX_TOTAL_FEN:
        raise MoneyError("yuan amount out of range")
    return fen


def check_amount_fen(amount_fen: int, *, allow_zero: bool = False, limit_fen: int = MAX_AMOUNT_FEN) -> int:
    """Return ``amount_fen`` when it is an int in (0 or 1)..limit_fen; else MoneyError."""
    if not isinstance(amount_fen, int) or isinstance(amount_fen, bool):
        raise MoneyError(f"amount must be an int number of fen, got {type(amount_fen).__name__}")
    low = 0 if allow_zero else 1
    if not low <= amount_fen <= limit_fen:
        raise MoneyError(f"amount {amount_fen} fen outside {low}..{limit_fen}")
    return amount_fen


def parse_fen(text: str, *, allow_zero: bool = False, limit_fen: int = MAX_AMOUNT_FEN) -> int:
    """An amount field written as an integer count of fen (``"10000"``), range-checked; MoneyError otherwise."""
    if not isinstance(text, str) or not text.isascii() or not text.isdigit() or len(text) > 19:
        raise MoneyError("amount_fen must be a non-negative integer of fen")
    return check_amount_fen(int(text), allow_zero=allow_zero, limit_fen=limit_fen)
