"""Card counter (卡交易序号 ATC): each counter value of a card is used once (a replayed TAC is
declined ``59``); gaps are recorded by the writer (``card_counters.gap``)."""

from __future__ import annotations

from sqlalchemy import select

from clearing.pipeline import metrics
from clearing.pipeline.context import AuthContext, Decline
from clearing.schema import card_counters

NAME = "counter"


async def prepare(ctx: AuthContext) -> Decline | None:
    card_no, atc = ctx.counter or (ctx.msg.card.card_no, ctx.msg.card.atc)
    q = select(card_counters.c.id).where(card_counters.c.counter_key == f"{card_no}:{atc}")
    if (await ctx.conn.execute(q)).first() is not None:
        metrics.SUSPECTED_FORGERY.labels(reason="counter_replay").inc()
        return Decline("59", "card counter replayed")
    ctx.counter = (card_no, atc)
    return None
