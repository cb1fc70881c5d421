"""The chain runner (授权链): participants in order, the first decline stops the chain.

Each participant is a module with ``NAME`` and ``async def prepare(ctx) -> Decline | None``;
``prepare`` may read the database (``ctx.conn``) and fill the context, never writes.
The writer (:mod:`clearing.ledger`) re-checks what races could change (duplicates, counters,
balances, originals) inside the batch transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType

from clearing.pipeline import (
    balance,
    card_status,
    counter,
    cryptogram,
    dedupe,
    eligibility,
    original,
    program,
    provider,
    service_category,
    terminal,
)
from clearing.pipeline.context import AuthContext, Decline

PURCHASE_CHAIN: tuple[ModuleType, ...] = (
    dedupe, terminal, card_status, eligibility, program, provider, service_category, cryptogram, counter, balance,
)
"""消费 and 离线通知: the full chain before posting."""
CORRECTION_CHAIN: tuple[ModuleType, ...] = (dedupe, terminal, original)
"""撤销 / 退货: de-duplicate, the terminal's binding, the original; amounts are settled in the writer."""
REVERSAL_CHAIN: tuple[ModuleType, ...] = (dedupe, terminal)
"""冲正: always answered; the writer finds (or remembers) the original."""

CHAINS = {"PURCHASE": PURCHASE_CHAIN, "ADVICE": PURCHASE_CHAIN, "VOID": CORRECTION_CHAIN,
          "REFUND": CORRECTION_CHAIN, "REVERSAL": REVERSAL_CHAIN}


async def run_chain(ctx: AuthContext, participants: Sequence[ModuleType] | None = None) -> Decline | None:
    """Run the participants for ``ctx.txn_type``; the first decline (or a replay found by dedupe) stops it."""
    for p in participants if participants is not None else CHAINS[ctx.txn_type]:
        decline = await p.prepare(ctx)
        if decline is not None or ctx.replay is not None:
            return decline
    return None
