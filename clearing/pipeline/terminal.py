"""Terminal binding (终端): the terminal is registered, active, and belongs to the message's provider (else ``58``)."""

from __future__ import annotations

from clearing.pipeline.context import AuthContext, Decline
from clearing.pipeline.snapshot import Snapshot

NAME = "terminal"


def check(ctx: AuthContext, snap: Snapshot) -> Decline | None:
    t = snap.terminals.get(ctx.msg.terminal_id)
    if t is None:
        return Decline("58", "terminal not registered")
    if t.status != "active":
        return Decline("58", f"terminal {t.status}")
    if t.provider_id != ctx.msg.provider_id:
        return Decline("58", "terminal not bound to this provider")
    ctx.terminal = t
    return None
