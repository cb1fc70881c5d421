"""The original of a void or refund (原交易): found by RRN, same card and provider (else ``25`` / ``12``).

Whether it is still voidable/refundable (same batch and day, full amount, cumulative
refunds) is decided by the writer inside the batch transaction, where it cannot race.
"""

from __future__ import annotations

from sqlalchemy import select

from clearing.pipeline.context import AuthContext, Decline
from clearing.schema import host_txns

NAME = "original"


async def prepare(ctx: AuthContext) -> Decline | None:
    row = (await ctx.conn.execute(select(host_txns).where(host_txns.c.rrn == ctx.msg.orig_rrn))).first()
    if row is None:
        return Decline("25", "original not found")
    orig = dict(row._mapping)
    if orig["txn_type"] not in ("PURCHASE", "ADVICE"):
        return Decline("12", "original is not a purchase")
    if orig["card_no"] != ctx.msg.card_no or orig["provider_id"] != ctx.msg.provider_id:
        return Decline("12", "card or provider differs from the original")
    ctx.original = orig
    return None
