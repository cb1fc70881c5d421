"""Program allowed for the provider (服务商): active, and registered for the program (else ``58``).

A voucher provider (养老券服务商) cannot take nursing-subsidy money and the reverse;
suspended and withdrawn (清退) providers are declined. Restricted money is voucher money.
"""

from __future__ import annotations

from clearing.pipeline.context import AuthContext, Decline
from clearing.registry import get_provider

NAME = "provider"


async def prepare(ctx: AuthContext) -> Decline | None:
    p = await get_provider(ctx.conn, ctx.msg.provider_id)
    if p is None:
        return Decline("58", "provider not registered")
    ctx.provider = p
    if p.status != "active":
        return Decline("58", f"provider {p.status}")
    needed = "voucher" if ctx.msg.program == "restricted" else ctx.msg.program
    if needed not in p.programs:
        return Decline("58", f"provider not permitted for {ctx.msg.program}")
    return None
