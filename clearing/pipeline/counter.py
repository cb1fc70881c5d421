"""Card counter (卡交易序号 ATC): each counter value of a card is used once (a replayed TAC is
declined ``59``); the writer stores the counter on the journal row that spends it
(``host_txns.atc``, UNIQUE per card) and records gaps (``host_txns.atc_gap``).

Reads the counters used so far — stored, and earlier in the same batch — from the snapshot.
"""

from __future__ import annotations

from clearing.pipeline import metrics
from clearing.pipeline.context import AuthContext, Decline
from clearing.pipeline.snapshot import Snapshot

NAME = "counter"


def check(ctx: AuthContext, snap: Snapshot) -> Decline | None:
    card_no, atc = ctx.counter or (ctx.msg.card.card_no, ctx.msg.card.atc)
    if snap.counter_used(card_no, atc):
        metrics.SUSPECTED_FORGERY.labels(reason="counter_replay").inc()
        return Decline("59", "card counter replayed")
    ctx.counter = (card_no, atc)
    return None
