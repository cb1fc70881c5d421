"""The original of a void or refund (原交易): found by RRN, same card and provider (else ``25`` / ``12``).

The original is read from the snapshot (stored, or posted earlier in the same batch).
Whether it is still voidable/refundable (same batch and day, full amount, cumulative
refunds) is decided by the writer in the same batch transaction, where it cannot race.
"""

from __future__ import annotations

from clearing.pipeline.context import AuthContext, Decline
from clearing.pipeline.snapshot import Snapshot

NAME = "original"


def check(ctx: AuthContext, snap: Snapshot) -> Decline | None:
    orig = snap.original(ctx.msg.orig_rrn)
    if orig is None:
        return Decline("25", "original not found")
    if orig["txn_type"] not in ("PURCHASE", "ADVICE"):
        return Decline("12", "original is not a purchase")
    if orig["card_no"] != ctx.msg.card_no or orig["provider_id"] != ctx.msg.provider_id:
        return Decline("12", "card or provider differs from the original")
    ctx.original = orig
    return None
