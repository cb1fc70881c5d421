"""Service category (服务类别): the provider must offer it (else ``58``); the restricted account
(专用账户) pays only the designated categories (else ``57``)."""

from __future__ import annotations

from clearing.pipeline.context import AuthContext, Decline
from clearing.pipeline.snapshot import Snapshot
from clearing.registry import RESTRICTED_SERVICE_CATEGORIES

NAME = "service_category"


def check(ctx: AuthContext, snap: Snapshot) -> Decline | None:
    category = ctx.msg.service_category
    if ctx.msg.program == "restricted" and category not in RESTRICTED_SERVICE_CATEGORIES:
        return Decline("57", f"restricted account cannot pay for {category}")
    if category not in ctx.provider.service_categories:
        return Decline("58", f"provider not registered for {category}")
    return None
