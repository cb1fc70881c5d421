"""Balance (余额): the card's program account must cover the amount (else ``51``).

An early, read-only check; the writer re-checks in memory inside the batch transaction,
which is what guarantees no beneficiary account goes below zero.
"""

from __future__ import annotations

from clearing.accounts import balance as account_balance
from clearing.accounts import card_account
from clearing.pipeline.context import AuthContext, Decline

NAME = "balance"


async def prepare(ctx: AuthContext) -> Decline | None:
    b = await account_balance(ctx.conn, card_account(ctx.msg.card.card_no, ctx.msg.program))
    if (b or 0) < ctx.msg.amount_fen:
        return Decline("51", "insufficient balance")
    return None
