"""Card status (卡状态): unknown or closed/cancelled ``14``, lost (挂失) ``62``, not yet activated ``14``."""

from __future__ import annotations

from clearing.pipeline.context import AuthContext, Decline
from clearing.pipeline.snapshot import Snapshot

NAME = "card_status"


def check(ctx: AuthContext, snap: Snapshot) -> Decline | None:
    card = snap.cards.get(ctx.msg.card.card_no)
    if card is None:
        return Decline("14", "unknown card")
    ctx.card = card
    if card.status == "lost":
        return Decline("62", "card reported lost")
    if card.status in ("closed", "cancelled"):
        return Decline("14", f"card {card.status}")
    if card.status != "active":
        return Decline("14", "card not activated")
    return None
