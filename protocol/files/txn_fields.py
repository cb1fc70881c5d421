"""Field declarations shared by the bank clearing file's detail line and the journal export.

One place names the rule for each transaction column, so the bank layout and the journal (which
anyone must be able to compare line by line) cannot drift apart.
"""

from __future__ import annotations

from protocol.files.fields import Choice, DateTimeTz, Int, Pattern
from protocol.ids import (
    AUTH_CODE_CHARS,
    BATCH_NO_DIGITS,
    CARD_NO_DIGITS,
    MASK_KEEP_HEAD,
    MASK_KEEP_TAIL,
    PROVIDER_ID_CHARS,
    RRN_CHARS,
    TERMINAL_ID_CHARS,
    TRACE_NO_DIGITS,
)
from protocol.money import MAX_AMOUNT_FEN

TXN_TYPES = ("PURCHASE", "VOID", "REFUND", "REVERSAL", "ADVICE")
TXN_STATUSES = ("SUCCESS", "FAILED", "REVERSED")
PROGRAMS = ("voucher", "nursing", "restricted")

ALNUM = "[0-9A-Za-z]"
MASKED_CARD_REGEX = f"[0-9]{{{MASK_KEEP_HEAD}}}\\*{{{CARD_NO_DIGITS - MASK_KEEP_HEAD - MASK_KEEP_TAIL}}}[0-9]{{{MASK_KEEP_TAIL}}}"


def rrn(name: str = "rrn", optional: bool = False) -> Pattern:
    return Pattern(name, optional, regex=f"{ALNUM}{{{RRN_CHARS}}}", what=f"{RRN_CHARS} letters or digits")


PROVIDER_ID = Pattern(
    "provider_id", regex=f"{ALNUM}{{{PROVIDER_ID_CHARS}}}", what=f"{PROVIDER_ID_CHARS} letters or digits"
)
TERMINAL_ID = Pattern(
    "terminal_id", regex=f"{ALNUM}{{{TERMINAL_ID_CHARS}}}", what=f"{TERMINAL_ID_CHARS} letters or digits"
)
BATCH_NO = Pattern("batch_no", regex=f"[0-9]{{{BATCH_NO_DIGITS}}}", what=f"{BATCH_NO_DIGITS} digits")
TRACE_NO = Pattern("trace_no", regex=f"[0-9]{{{TRACE_NO_DIGITS}}}", what=f"{TRACE_NO_DIGITS} digits")
AUTH_CODE = Pattern(
    "auth_code", True, regex=f"{ALNUM}{{{AUTH_CODE_CHARS}}}", what=f"{AUTH_CODE_CHARS} letters or digits"
)
TXN_TYPE = Choice("txn_type", values=TXN_TYPES)
PROGRAM = Choice("program", values=PROGRAMS)
CARD_NO_MASKED = Pattern(
    "card_no_masked", regex=MASKED_CARD_REGEX, what="a masked card number (first 6, last 4)"
)
AMOUNT_FEN = Int("amount_fen", low=0, high=MAX_AMOUNT_FEN)
FEE_FEN = Int("fee_fen", low=0, high=MAX_AMOUNT_FEN)
TXN_TIME = DateTimeTz("txn_time")
STATUS = Choice("status", values=TXN_STATUSES)
ORIG_RRN = rrn("orig_rrn", optional=True)
