"""Balance (余额): the card's program account must cover the amount (else ``51``).

Reads the balance as of this point of the batch (earlier postings of the batch included);
the writer's posting re-checks it, which is what guarantees no beneficiary account goes
below zero.
"""

from __future__ import annotations

from clearing.accounts import card_account
from clearing.pipeline.context import AuthContext, Decline
from clearing.pipeline.snapshot import Snapshot

NAME = "balance"


def check(ctx: AuthContext, snap: Snapshot) -> Decline | None:
    b = snap.balance(card_account(ctx.msg.card.card_no, ctx.msg.program))
    if (b or 0) < ctx.msg.amount_fen:
        return Decline("51", "insufficient balance")
    return None
