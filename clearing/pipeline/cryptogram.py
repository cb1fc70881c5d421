"""Card cryptogram (交易验证码 TAC): re-derive the card's TAC key and verify the proof.

The key is the issuer master ``tac`` key of the card's key version diversified by its
application serial (``IssuerKeySet.card_key``); the data is
:func:`keys.cryptogram.cryptogram_data` — exactly what the card computed. A proof that
does not verify (or names another serial, key version or suite than the card was issued
with) is declined ``59`` and raised as suspected forgery: a metric and a logged event.
"""

from __future__ import annotations

import logging

from clearing.pipeline import metrics
from clearing.pipeline.context import AuthContext, Decline
from clearing.pipeline.snapshot import Snapshot
from keys.cryptogram import cryptogram_data, verify_tac
from keys.suite import CryptoError
from protocol.ids import mask_card_no

NAME = "cryptogram"
log = logging.getLogger("carepay.clearing.forgery")


def _forgery(ctx: AuthContext, why: str) -> Decline:
    metrics.SUSPECTED_FORGERY.labels(reason=why).inc()
    log.warning("suspected forgery: %s card=%s terminal=%s trace=%s", why, mask_card_no(ctx.msg.card.card_no),
                ctx.msg.terminal_id, ctx.msg.trace_no)
    return Decline("59", "cryptogram invalid (suspected forgery)")


def check(ctx: AuthContext, snap: Snapshot) -> Decline | None:
    proof, card = ctx.msg.card, ctx.card
    if proof.app_serial != card.app_serial:
        return _forgery(ctx, "serial_mismatch")
    if proof.key_version != card.key_version or proof.suite != card.suite:
        return _forgery(ctx, "key_mismatch")
    keyset = ctx.keysets.get(card.suite)
    if keyset is None or not keyset.has("tac", card.key_version):
        return Decline("96", "no issuer key for this card")
    try:
        key = keyset.card_key("tac", card.key_version, bytes.fromhex(card.app_serial))
        data = cryptogram_data(ctx.msg.amount_fen, ctx.msg.program, ctx.msg.terminal_id, proof.ttn, proof.txn_date,
                               proof.txn_time, proof.atc)
    except CryptoError:
        return _forgery(ctx, "bad_data")
    if not verify_tac(key, data, bytes.fromhex(proof.tac), keyset.suite):
        return _forgery(ctx, "bad_tac")
    ctx.counter = (card.card_no, proof.atc)
    return None
