"""De-duplicate (去重): the same terminal+batch+trace+type, or the same message id, answers the original.

A hit with the same body hash is a replay (the stored answer goes back, nothing posts);
with a different body it is an idempotency conflict (answered ``94``).
"""

from __future__ import annotations

from sqlalchemy import or_, select

from clearing.pipeline.context import AuthContext, Decline
from clearing.schema import host_txns

NAME = "dedupe"


async def prepare(ctx: AuthContext) -> Decline | None:
    q = select(host_txns).where(or_(host_txns.c.txn_key == ctx.txn_key, host_txns.c.msg_key == ctx.msg_key))
    row = (await ctx.conn.execute(q)).first()
    if row is None:
        return None
    stored = dict(row._mapping)
    if stored["request_hash"] != ctx.request_hash:
        return Decline("94", "duplicate key with a different request")
    ctx.replay = stored
    return None
