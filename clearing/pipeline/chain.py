"""The chain runner (授权链): participants in order, the first decline stops the chain.

Each participant is a module with ``NAME`` and ``def check(ctx, snap) -> Decline | None``:
a plain function over the batch :class:`~clearing.pipeline.snapshot.Snapshot`, no I/O.
It may fill the context (``ctx.card``, ``ctx.counter`` …), never writes.

The group-commit writer (:mod:`clearing.ledger`) drives the chain for a whole batch in its
one driver call: de-duplicate first (a replay runs nothing), then :meth:`BatchAuthoriser.load`
reads the snapshot set-based, the static participants (registry data and the cryptogram)
run for every request, and the stateful ones (counter, balance, original) run in arrival
order while the writer applies the batch, so each sees the effect of the requests before it.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

from clearing.pipeline import (
    balance,
    card_status,
    counter,
    cryptogram,
    eligibility,
    original,
    program,
    provider,
    service_category,
    terminal,
)
from clearing.pipeline.context import AuthContext, Decline
from clearing.pipeline.snapshot import RegistryCache, Select, Snapshot, load_snapshot
from keys.issuer import IssuerKeySet

PURCHASE_STATIC: tuple[ModuleType, ...] = (
    terminal, card_status, eligibility, program, provider, service_category, cryptogram,
)
PURCHASE_STATEFUL: tuple[ModuleType, ...] = (counter, balance)
"""消费 and 离线通知: the full chain before posting (after de-duplication)."""
CORRECTION_STATIC: tuple[ModuleType, ...] = (terminal,)
CORRECTION_STATEFUL: tuple[ModuleType, ...] = (original,)
"""撤销 / 退货: the terminal's binding, the original; amounts are settled in the writer."""
REVERSAL_STATIC: tuple[ModuleType, ...] = (terminal,)
"""冲正: always answered; the writer finds (or remembers) the original."""

STATIC = {"PURCHASE": PURCHASE_STATIC, "ADVICE": PURCHASE_STATIC, "VOID": CORRECTION_STATIC,
          "REFUND": CORRECTION_STATIC, "REVERSAL": REVERSAL_STATIC}
STATEFUL: dict[str, tuple[ModuleType, ...]] = {"PURCHASE": PURCHASE_STATEFUL, "ADVICE": PURCHASE_STATEFUL,
                                               "VOID": CORRECTION_STATEFUL, "REFUND": CORRECTION_STATEFUL,
                                               "REVERSAL": ()}
CHAINS = {t: STATIC[t] + STATEFUL[t] for t in STATIC}
"""The whole chain per transaction type, in order (de-duplication precedes it in the writer)."""


def run_chain(ctx: AuthContext, snap: Snapshot, participants: Sequence[ModuleType] | None = None) -> Decline | None:
    """Run ``participants`` (default: the whole chain of ``ctx.txn_type``); the first decline stops it."""
    for p in participants if participants is not None else CHAINS[ctx.txn_type]:
        decline = p.check(ctx, snap)
        if decline is not None:
            return decline
    return None


class BatchAuthoriser:
    """The authorisation pipeline as the group-commit writer calls it, once per batch."""

    def __init__(self, keysets: dict[str, IssuerKeySet]):
        self.keysets = keysets

    def load(self, select: Select, ctxs: Sequence[AuthContext], cache: RegistryCache | None = None) -> Snapshot:
        """Everything the participants read for ``ctxs``: one query per table (rows ``cache`` holds: none)."""
        cards = [c.msg.card.card_no for c in ctxs if c.txn_type in ("PURCHASE", "ADVICE")]
        providers = [c.msg.provider_id for c in ctxs if c.txn_type in ("PURCHASE", "ADVICE")]
        return load_snapshot(select, cards, [c.msg.terminal_id for c in ctxs], providers, cache)

    def screen(self, ctx: AuthContext, snap: Snapshot) -> Decline | None:
        """The participants that read only registry data and the message (TAC verification included)."""
        return run_chain(ctx, snap, STATIC[ctx.txn_type])

    def settle(self, ctx: AuthContext, snap: Snapshot) -> Decline | None:
        """The participants that read the batch's running state, at this request's turn."""
        return run_chain(ctx, snap, STATEFUL[ctx.txn_type])
