"""Eligibility date (优待有效期): a card past its valid-until date on the transaction date is declined ``54``."""

from __future__ import annotations

from datetime import datetime

from clearing.pipeline.context import AuthContext, Decline

NAME = "eligibility"


async def prepare(ctx: AuthContext) -> Decline | None:
    txn_date = datetime.strptime(ctx.msg.card.txn_date, "%Y%m%d").date()
    if txn_date > ctx.card.valid_until:
        return Decline("54", "eligibility expired")
    return None
