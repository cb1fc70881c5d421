"""Program allowed for the provider (服务商): active, and registered for the program (else ``58``).

A voucher provider (养老券服务商) cannot take nursing-subsidy money and the reverse;
suspended and withdrawn (清退) providers are declined. Restricted money is voucher money.
"""

from __future__ import annotations

from clearing.pipeline.context import AuthContext, Decline
from clearing.pipeline.snapshot import Snapshot

NAME = "provider"


def check(ctx: AuthContext, snap: Snapshot) -> Decline | None:
    p = snap.providers.get(ctx.msg.provider_id)
    if p is None:
        return Decline("58", "provider not registered")
    ctx.provider = p
    if p.status != "active":
        return Decline("58", f"provider {p.status}")
    needed = "voucher" if ctx.msg.program == "restricted" else ctx.msg.program
    if needed not in p.programs:
        return Decline("58", f"provider not permitted for {ctx.msg.program}")
    return None
