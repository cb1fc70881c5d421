"""What the authorisation participants share for one message (授权上下文); the data they read is in the
batch snapshot (:mod:`clearing.pipeline.snapshot`)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any, NamedTuple

from keys.issuer import IssuerKeySet
from protocol.messages import Message, canonical_json

TXN_TYPE_OF = {"purchase": "PURCHASE", "offline_advice": "ADVICE", "void": "VOID", "refund": "REFUND",
               "reversal": "REVERSAL"}
HASH_EXCLUDE = {"msg_id", "sent_at", "mac"}


class Decline(NamedTuple):
    """A participant's refusal: ISO 8583 response code and a short reason (no card numbers)."""

    rc: str
    message: str


def txn_key(terminal_id: str, batch_no: str, trace_no: str, txn_type: str) -> str:
    """The de-duplication key of a terminal transaction: terminal, batch, trace and type."""
    return f"{terminal_id}:{batch_no}:{trace_no}:{txn_type}"


@lru_cache(maxsize=4096)  # a pure function of two short strings; the same second recurs across a busy host's cards
def parse_card_time(ymd: str, hms: str = "000000") -> datetime:
    """The card's local ``YYYYMMDD`` + ``HHMMSS`` as a naive datetime; ``ValueError`` when it is not a real instant.

    The same result as ``datetime.strptime(ymd + hms, "%Y%m%d%H%M%S")``, without its regex machinery
    for the usual 14 ASCII digits (that costs ~20 µs a message on the hot path).
    """
    s = ymd + hms
    if len(s) == 14 and s.isascii() and s.isdigit():
        try:
            return datetime(int(s[0:4]), int(s[4:6]), int(s[6:8]), int(s[8:10]), int(s[10:12]), int(s[12:14]))
        except ValueError:
            pass
    return datetime.strptime(s, "%Y%m%d%H%M%S")


def body_hash(msg: Message) -> str:
    """SHA-256 of the message body without ``msg_id``, ``sent_at`` and ``mac``: a retry hashes the same.

    The hashed bytes are ``json.dumps(body, sort_keys=True, separators=(",", ":"))`` (ASCII) — stored with
    every journal row, so they never change form.
    """
    body = msg.model_dump(mode="json", exclude=HASH_EXCLUDE)
    return hashlib.sha256(canonical_json(body, ensure_ascii=True)).hexdigest()


@dataclass
class AuthContext:
    msg: Any  # Purchase | OfflineAdvice | Void | Refund | Reversal
    txn_type: str
    received_at: datetime
    keysets: dict[str, IssuerKeySet]
    txn_key: str
    msg_key: str
    request_hash: str
    txn_time: datetime
    card: Any = None  # clearing.lifecycle.Card
    provider: Any = None  # clearing.registry.Provider
    terminal: Any = None  # clearing.registry.Terminal
    original: dict[str, Any] | None = None
    replay: dict[str, Any] | None = None
    counter: tuple[str, int] | None = None
    notes: list[str] = field(default_factory=list)
