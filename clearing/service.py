"""The clearing service (清算服务): the entry point the MQTT worker calls for every up-message.

    svc = ClearingService(engine, IssuerKeySet.demo(), ClearingConfig())
    async with svc:                       # starts / stops the group-commit writer
        answer = await svc.handle(msg)    # Purchase, OfflineAdvice, Void, Refund, Reversal, BatchSettle, BatchUpload

The MQTT side verifies the MAC and handles sign-on and heartbeats before calling
``handle``, and signs the answer (``answer.signed(tak)``). ``handle`` is safe to call
from many coroutines at once: the group-commit writer authorises and posts their messages
per batch (:class:`clearing.pipeline.chain.BatchAuthoriser`: one set-based snapshot load and
the participants as plain functions, inside the batch's one driver call). It never raises
for a bad or refused message — every outcome is an answer with a response code.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, time
from functools import lru_cache
from typing import Any
from zoneinfo import ZoneInfo

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from clearing.accounts import card_account, provider_payable
from clearing.db import write_transaction
from clearing.ledger import (
    GROUP_COMMIT_MAX_BATCH,
    GROUP_COMMIT_WINDOW_MS,
    GroupCommitWriter,
    IdempotencyConflict,
    LedgerError,
    TxnOutcome,
    TxnRequest,
)
from clearing.pipeline import metrics
from clearing.pipeline.chain import BatchAuthoriser
from clearing.pipeline.context import TXN_TYPE_OF, AuthContext, Decline, body_hash, parse_card_time, txn_key
from clearing.schema import batch_settlements, host_txns
from clearing.windows import Cutoff, resolve_business_dates_sync
from keys.issuer import IssuerKeySet
from protocol.messages import (
    RC,
    RESULT_TYPE,
    Answered,
    BatchSettle,
    BatchSettleResult,
    BatchTotals,
    BatchUpload,
    BatchUploadResult,
    Message,
    TxnResult,
    txn_result_canonical,
)

log = logging.getLogger("carepay.clearing.service")

HANDLED_TYPES = frozenset({"purchase", "offline_advice", "void", "refund", "reversal", "batch_settle", "batch_upload"})


@dataclass(frozen=True)
class ClearingConfig:
    """Plain settings (``ops.config.ClearingSettings`` maps onto these; clearing does not import ops)."""

    cutoff_local_time: time = time(23, 0)
    timezone: str = "Asia/Shanghai"
    group_commit_window_ms: float = GROUP_COMMIT_WINDOW_MS
    group_commit_max_batch: int = GROUP_COMMIT_MAX_BATCH

    @classmethod
    def from_settings(cls, s: Any) -> ClearingConfig:
        """From any object with the same attribute names (e.g. ``ops.config.ClearingSettings``)."""
        return cls(cutoff_local_time=s.cutoff_local_time, timezone=s.timezone,
                   group_commit_window_ms=s.group_commit_window_ms, group_commit_max_batch=s.group_commit_max_batch)

    @property
    def cutoff(self) -> Cutoff:
        return Cutoff(self.cutoff_local_time, self.timezone)


def _new_msg_id() -> str:
    """32 random hex digits (the form of ``uuid4().hex``) for an answer's own id: unique, not a secret, so from
    the ``random`` module (reseeded in every forked worker) rather than a ``getrandom`` system call per answer."""
    return f"{random.getrandbits(128):032x}"


class ClearingService:
    """Authorise and post terminal messages; see the module docstring."""

    def __init__(self, engine: AsyncEngine, issuer_keys: IssuerKeySet | list[IssuerKeySet],
                 settings: ClearingConfig | Any | None = None, *, clock: Callable[[], datetime] | None = None):
        cfg = settings if isinstance(settings, ClearingConfig) else (
            ClearingConfig.from_settings(settings) if settings is not None else ClearingConfig())
        self.engine = engine
        self.config = cfg
        sets = issuer_keys if isinstance(issuer_keys, list) else [issuer_keys]
        self.keysets = {ks.suite.value: ks for ks in sets}
        self.clock = clock or (lambda: datetime.now(UTC))
        self.writer = GroupCommitWriter(engine, cfg.cutoff, window_ms=cfg.group_commit_window_ms,
                                        max_batch=cfg.group_commit_max_batch, authoriser=BatchAuthoriser(self.keysets))
        self._tz = ZoneInfo(cfg.timezone)
        self._decisions: dict[tuple[str, str], Any] = {}  # metric children per (type, code): no label lookup per answer

    async def start(self) -> None:
        await self.writer.start()

    async def stop(self) -> None:
        await self.writer.stop()

    async def __aenter__(self) -> ClearingService:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def handle(self, msg: Message) -> Message:
        """The answer to one up-message (never raises for a refused or malformed business case)."""
        return await self._handle(msg, False)  # type: ignore[return-value]

    async def handle_answered(self, msg: Message) -> Message | Answered:
        """:meth:`handle`, with a transaction's answer made straight as the canonical bytes the worker sends and
        keeps (:class:`protocol.messages.Answered`) — no model built and dumped again; other answers as models."""
        return await self._handle(msg, True)

    async def _handle(self, msg: Message, wire: bool) -> Message | Answered:
        if msg.type not in HANDLED_TYPES:
            raise ValueError(f"message type {msg.type!r} is not handled by clearing (sign-on/heartbeat are MQTT's)")
        try:
            if msg.type in TXN_TYPE_OF:
                answer: Message | Answered = await self._txn(msg, wire)
            elif isinstance(msg, BatchSettle):
                answer = await self._batch_settle(msg)
            else:
                assert isinstance(msg, BatchUpload)
                answer = await self._batch_upload(msg)
        except Exception as exc:  # system error: answered 96, never a crash of the worker
            log.exception("clearing failed on %s %s: %s", msg.type, msg.msg_id, type(exc).__name__)
            answer = self._system_error(msg)
        code = getattr(answer, "response_code", "00")
        counted = self._decisions.get((msg.type, code))
        if counted is None:
            counted = self._decisions[(msg.type, code)] = metrics.DECISIONS.labels(type=msg.type, code=code)
        counted.inc()
        return answer

    # --- terminal transactions -------------------------------------------------------------------------

    def _txn_time(self, msg: Any, received: datetime) -> datetime:
        card = msg.__dict__.get("card")
        if msg.type == "offline_advice":
            return msg.approved_at.astimezone(UTC)
        if card is not None:
            try:
                return _card_time_utc(card.txn_date, card.txn_time, self._tz)
            except ValueError:
                return received
        return msg.sent_at.astimezone(UTC)

    async def _txn(self, msg: Any, wire: bool = False) -> TxnResult | Answered:
        # Optional fields are read from the model's field dict: ``getattr(msg, name, None)`` on a pydantic model
        # that lacks the field goes through BaseModel.__getattr__ and builds an AttributeError (~10 µs each).
        fields: dict[str, Any] = msg.__dict__
        txn_type = TXN_TYPE_OF[msg.type]
        received = self.clock()
        key = txn_key(msg.terminal_id, msg.batch_no, msg.trace_no, txn_type)
        card = fields.get("card")
        card_no = card.card_no if card is not None else msg.card_no
        ctx = AuthContext(msg=msg, txn_type=txn_type, received_at=received, keysets=self.keysets,
                          txn_key=key, msg_key=f"{msg.terminal_id}:{msg.msg_id}", request_hash=body_hash(msg),
                          txn_time=self._txn_time(msg, received))
        decline: Decline | None = None
        if txn_type in ("PURCHASE", "ADVICE") and not _valid_card_time(msg):
            decline = Decline("12", "bad transaction date or time")
        row = {"provider_id": msg.provider_id, "terminal_id": msg.terminal_id, "batch_no": msg.batch_no,
               "trace_no": msg.trace_no, "program": fields.get("program"), "card_no": card_no,
               "amount_fen": msg.amount_fen, "txn_time": ctx.txn_time, "msg_id": msg.msg_id,
               "service_category": fields.get("service_category"), "orig_rrn": fields.get("orig_rrn")}
        req = TxnRequest(txn_type=txn_type, txn_key=key, msg_key=ctx.msg_key, request_hash=ctx.request_hash,
                         received_at=received, row=row, decline=tuple(decline) if decline else None,
                         auth=ctx)  # the writer runs the participants for its whole batch (BatchAuthoriser)
        if txn_type in ("PURCHASE", "ADVICE") and decline is None:
            req.debit = card_account(card_no, msg.program)
            req.credit = provider_payable(msg.provider_id)
        if txn_type == "REVERSAL":
            req.orig_key = txn_key(msg.terminal_id, msg.batch_no, msg.orig_trace_no, "PURCHASE")
        try:
            outcome: TxnOutcome = await self.writer.submit(req)
        except IdempotencyConflict:
            return self._conflict(msg)
        except LedgerError:
            return self._system_error(msg)
        fields = self._answer_fields(msg, outcome.row)
        if wire:
            return Answered(msg.terminal_id, fields["type"], fields["response_code"], txn_result_canonical(**fields))
        return TxnResult(**fields)

    def _answer_fields(self, msg: Any, row: dict[str, Any]) -> dict[str, Any]:
        """The answer to ``msg`` from its journal row, as :class:`TxnResult` fields."""
        bdate = row.get("business_date")
        return {"type": RESULT_TYPE[msg.type], "terminal_id": msg.terminal_id, "msg_id": _new_msg_id(),
                "sent_at": self.clock(), "orig_msg_id": msg.msg_id, "batch_no": row["batch_no"],
                "trace_no": row["trace_no"], "response_code": row["response_code"], "rrn": row["rrn"],
                "auth_code": row.get("auth_code") if row["response_code"] == RC.APPROVED else None,
                "balance_after_fen": row.get("balance_after_fen"),
                "business_date": bdate.isoformat() if bdate else None, "message": (row.get("message") or "")[:200]}

    def _conflict(self, msg: Any) -> TxnResult:
        return TxnResult(type=RESULT_TYPE[msg.type], terminal_id=msg.terminal_id, msg_id=_new_msg_id(),
                         sent_at=self.clock(), orig_msg_id=msg.msg_id, batch_no=msg.batch_no, trace_no=msg.trace_no,
                         response_code=RC.DUPLICATE, message="duplicate key with a different request")

    def _system_error(self, msg: Any) -> Message:
        if msg.type in RESULT_TYPE:
            return TxnResult(type=RESULT_TYPE[msg.type], terminal_id=msg.terminal_id, msg_id=_new_msg_id(),
                             sent_at=self.clock(), orig_msg_id=msg.msg_id, batch_no=msg.batch_no,
                             trace_no=msg.trace_no, response_code=RC.SYSTEM_ERROR, message="system error; retry")
        if isinstance(msg, BatchSettle):
            return BatchSettleResult(terminal_id=msg.terminal_id, msg_id=_new_msg_id(), sent_at=self.clock(),
                                     orig_msg_id=msg.msg_id, batch_no=msg.batch_no, response_code=RC.SYSTEM_ERROR,
                                     balanced=False, host_totals=BatchTotals())
        return BatchUploadResult(terminal_id=msg.terminal_id, msg_id=_new_msg_id(), sent_at=self.clock(),
                                 orig_msg_id=msg.msg_id, batch_no=msg.batch_no, response_code=RC.SYSTEM_ERROR)

    # --- batches ---------------------------------------------------------------------------------------

    async def host_totals(self, terminal_id: str, batch_no: str) -> BatchTotals:
        """The host's own totals of a terminal batch (approved rows; reversed purchases excluded)."""
        async with self.engine.connect() as conn:
            return await _host_totals(conn, terminal_id, batch_no)

    async def _batch_settle(self, msg: BatchSettle) -> BatchSettleResult:
        msg_key = f"{msg.terminal_id}:{msg.msg_id}"
        received = self.clock()
        async with write_transaction(self.engine) as conn:
            stored = (await conn.execute(select(batch_settlements).where(batch_settlements.c.msg_key == msg_key))).first()
            if stored is not None:
                host = BatchTotals.model_validate_json(stored.host_totals)
                balanced = bool(stored.balanced)
            else:
                host = await _host_totals(conn, msg.terminal_id, msg.batch_no)
                balanced = host == msg.totals
                nominal = self.config.cutoff.business_date(received)
                bdate = (await conn.run_sync(resolve_business_dates_sync, [nominal]))[nominal]
                await conn.execute(batch_settlements.insert().values(
                    msg_key=msg_key, terminal_id=msg.terminal_id, provider_id=msg.provider_id, batch_no=msg.batch_no,
                    business_date=bdate, balanced=balanced, terminal_totals=msg.totals.model_dump_json(),
                    host_totals=host.model_dump_json(), received_at=received))
        return BatchSettleResult(terminal_id=msg.terminal_id, msg_id=_new_msg_id(), sent_at=self.clock(),
                                 orig_msg_id=msg.msg_id, batch_no=msg.batch_no, response_code=RC.APPROVED,
                                 balanced=balanced, host_totals=host)

    async def _batch_upload(self, msg: BatchUpload) -> BatchUploadResult:
        async with self.engine.connect() as conn:
            rows = await _batch_rows(conn, msg.terminal_id, msg.batch_no)
        host = {(r["trace_no"], r["txn_type"]): int(r["amount_fen"]) for r in rows}
        term = {(i.trace_no, i.txn_type): i.amount_fen for i in msg.items}
        missing_on_host = sorted({k[0] for k in term.keys() - host.keys()})
        missing_on_terminal = sorted({k[0] for k in host.keys() - term.keys()})
        differs = sorted({k[0] for k in term.keys() & host.keys() if term[k] != host[k]})
        return BatchUploadResult(terminal_id=msg.terminal_id, msg_id=_new_msg_id(), sent_at=self.clock(),
                                 orig_msg_id=msg.msg_id, batch_no=msg.batch_no, response_code=RC.APPROVED,
                                 missing_on_host=missing_on_host, missing_on_terminal=missing_on_terminal,
                                 amount_differs=differs)


async def _batch_rows(conn: Any, terminal_id: str, batch_no: str) -> list[dict[str, Any]]:
    q = select(host_txns.c.trace_no, host_txns.c.txn_type, host_txns.c.amount_fen).where(
        host_txns.c.terminal_id == terminal_id, host_txns.c.batch_no == batch_no, host_txns.c.status == "SUCCESS",
        host_txns.c.txn_type.in_(("PURCHASE", "VOID", "REFUND", "ADVICE")))
    return [dict(r._mapping) for r in await conn.execute(q)]


async def _host_totals(conn: Any, terminal_id: str, batch_no: str) -> BatchTotals:
    counts: dict[str, list[int]] = {"PURCHASE": [0, 0], "VOID": [0, 0], "REFUND": [0, 0], "ADVICE": [0, 0]}
    for r in await _batch_rows(conn, terminal_id, batch_no):
        counts[r["txn_type"]][0] += 1
        counts[r["txn_type"]][1] += int(r["amount_fen"])
    return BatchTotals(purchase_count=counts["PURCHASE"][0], purchase_fen=counts["PURCHASE"][1],
                       void_count=counts["VOID"][0], void_fen=counts["VOID"][1], refund_count=counts["REFUND"][0],
                       refund_fen=counts["REFUND"][1], advice_count=counts["ADVICE"][0],
                       advice_fen=counts["ADVICE"][1])


@lru_cache(maxsize=4096)
def _card_time_utc(ymd: str, hms: str, tz: ZoneInfo) -> datetime:
    """The card's local date and time (``tz``) as an aware UTC instant; ``ValueError`` when it is not one."""
    return parse_card_time(ymd, hms).replace(tzinfo=tz).astimezone(UTC)


def _valid_card_time(msg: Any) -> bool:
    try:
        parse_card_time(msg.card.txn_date, msg.card.txn_time)
    except ValueError:
        return False
    return True
