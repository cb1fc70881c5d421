"""De-duplicate (去重): the same terminal+batch+trace+type, or the same message id, answers the original.

A hit with the same body hash is a replay (the stored answer goes back, nothing posts);
with a different body it is an idempotency conflict (answered ``94``). The lookup runs in
the group-commit writer over the batch's journal rows (stored, and new earlier in the same
batch), before any other participant: a replay never runs the chain again.
"""

from __future__ import annotations

from typing import Any

NAME = "dedupe"


def find(by_key: dict[str, dict[str, Any]], by_msg: dict[str, dict[str, Any]], txn_key: str,
         msg_key: str) -> dict[str, Any] | None:
    """The journal row this request duplicates (same transaction key, else same message id), or None."""
    return by_key.get(txn_key) or by_msg.get(msg_key)
