"""Eligibility date (优待有效期): a card past its valid-until date on the transaction date is declined ``54``."""

from __future__ import annotations

from clearing.pipeline.context import AuthContext, Decline, parse_card_time
from clearing.pipeline.snapshot import Snapshot

NAME = "eligibility"


def check(ctx: AuthContext, snap: Snapshot) -> Decline | None:
    txn_date = parse_card_time(ctx.msg.card.txn_date).date()
    if txn_date > ctx.card.valid_until:
        return Decline("54", "eligibility expired")
    return None
