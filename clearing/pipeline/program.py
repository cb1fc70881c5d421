"""Program allowed for the card (补贴项目): the card's entitlement must include it (else ``57``).

``restricted`` (专用账户) money comes from rolled-over vouchers: a voucher card may spend it.
"""

from __future__ import annotations

from clearing.pipeline.context import AuthContext, Decline
from clearing.pipeline.snapshot import Snapshot

NAME = "program"


def check(ctx: AuthContext, snap: Snapshot) -> Decline | None:
    program = ctx.msg.program
    needed = "voucher" if program == "restricted" else program
    if needed not in ctx.card.programs:
        return Decline("57", f"card not entitled to {program}")
    return None
