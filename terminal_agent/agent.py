"""The terminal agent (终端程序): sign-on, purchase, void, refund, settle — with the journal first.

Rules it keeps (DESIGN.md "Terminal ↔ clearing protocol"):

- every message is written to the journal BEFORE it is sent and the answer right after;
- answers are trusted only with a good MAC (TAK, or the previous TAK just after a re-sign-on);
  an answer that cannot be verified counts as no answer;
- a purchase without a (trusted) answer within the timeout is reversed (冲正) automatically; the
  reversal is retried until the host acknowledges it; a card step that fails after approval
  reverses the purchase too;
- a purchase answered ``96`` (system error) is an UNKNOWN outcome, not a decline: the host may have
  posted it (e.g. two clearing workers racing on a duplicate delivery), so it is reversed like a
  timeout and the operator is told the charge was not completed;
- a torn card transaction (撕卡) whose cryptogram the card no longer holds (``recovery_unavailable``)
  is resolved from the journal — the record of everything that could have reached the host — and
  the card's pending record is cleared so the card can be used again;
- when the host cannot be reached at all (the message never left), purchases under the floor
  limit — and under the per-card offline count — are approved offline with the card's
  cryptogram and uploaded as offline advices (离线通知) when the link returns; above it they are
  declined with a clear message;
- batch settle (批结算) sends counts and totals; if the host disagrees, the batch details follow
  (批上送) and the differences come back.

Metrics: the agent sets the backlog and offline gauges itself; transaction counts and round trips
(``carepay_terminal_transactions`` / ``carepay_terminal_round_trip_seconds``) are observed ONCE per outcome
by the process running the agent (``ops.metrics.observe_terminal_outcome``: ``carepay terminal run``,
the demo), never here as well, so they are not counted twice.

Card work (APDUs, synchronous) runs in a worker thread unless ``card_in_thread`` is off (the
load generator multiplexes many simulated terminals on one loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from keys.diversify import kcv
from keys.sm2 import SM2KeyPair
from keys.suite import SM4, decrypt_ecb
from protocol.ids import mask_card_no
from protocol.messages import (
    RC,
    BatchItem,
    BatchSettle,
    BatchSettleResult,
    BatchTotals,
    BatchUpload,
    BatchUploadResult,
    CardProof,
    Heartbeat,
    Message,
    OfflineAdvice,
    Purchase,
    Refund,
    Reversal,
    SignOn,
    SignOnChallenge,
    SignOnOk,
    TxnResult,
    Void,
    now_utc,
)
from terminal_agent import metrics
from terminal_agent.card_session import (
    CardSession,
    CardSessionError,
    CardTransaction,
    PendingCryptogram,
    Reason,
)
from terminal_agent.host_client import HostClient, HostTimeout, HostUnavailable
from terminal_agent.journal import Journal, JournalRow
from terminal_agent.receipt import ReceiptData, render_receipt

log = logging.getLogger("carepay.terminal")

SOFTWARE_VERSION = "carepay-terminal/0.1"
SIGN_ON_TIMEOUT_S = 10.0
REVERSAL_SEND_NOW_TIMEOUT_S = 3.0
"""How long a purchase waits for its own reversal's answer before leaving it to the background retry."""
MAX_FLUSH_ITEMS = 500
"""Queued reversals / advices / retransmissions handled per flush (the rest wait for the next one)."""
REVERSAL_DONE_CODES = frozenset({RC.APPROVED, RC.ORIGINAL_NOT_FOUND, RC.DUPLICATE})
"""A reversal answered with these needs no retry: undone, never posted, or already reversed."""
RETRY_CODES = frozenset({RC.SYSTEM_ERROR, RC.MAC_ERROR})
UNKNOWN_OUTCOME_CODES = frozenset({RC.SYSTEM_ERROR})
"""A purchase answered with these may or may not have been posted: it is reversed, never taken as a decline."""
NOT_COMPLETED = "charge not completed (扣款未完成)"
DEFAULT_SERVICE_CATEGORY = "home_care"

T = TypeVar("T")


class AgentError(RuntimeError):
    """The terminal cannot do what was asked (not signed on, settlement blocked, unknown original)."""


class SignOnFailed(AgentError):
    """The host refused the sign-on or its keys failed their check values."""


@dataclass(frozen=True)
class TerminalIdentity:
    """Who the terminal is: ids, its TMK and SM2 key pair (never in a repr)."""

    terminal_id: str
    provider_id: str
    tmk: bytes = field(repr=False)
    sm2: SM2KeyPair = field(repr=False)
    provider_name: str = ""


@dataclass(frozen=True)
class AgentSettings:
    answer_timeout_s: float = 10.0
    reversal_retry_s: float = 2.0
    offline_floor_limit_fen: int = 5_000
    offline_max_per_card: int = 3
    heartbeat_s: float = 60.0
    software_version: str = SOFTWARE_VERSION
    card_in_thread: bool = True


@dataclass(frozen=True)
class TxnOutcome:
    """What happened to one transaction, for the operator and the receipt."""

    kind: str
    approved: bool
    state: str
    batch_no: str
    trace_no: str
    amount_fen: int
    program: str
    card_no: str
    response_code: str | None = None
    message: str = ""
    rrn: str | None = None
    auth_code: str | None = None
    balance_after_fen: int | None = None
    offline: bool = False
    when: datetime = field(default_factory=now_utc)

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["card_no"] = mask_card_no(self.card_no) if self.card_no else ""
        d["when"] = self.when.isoformat()
        return d


@dataclass(frozen=True)
class SettleOutcome:
    batch_no: str
    balanced: bool
    response_code: str
    terminal_totals: BatchTotals
    host_totals: BatchTotals
    missing_on_host: list[str] = field(default_factory=list)
    missing_on_terminal: list[str] = field(default_factory=list)
    amount_differs: list[str] = field(default_factory=list)
    next_batch_no: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"batch_no": self.batch_no, "balanced": self.balanced, "response_code": self.response_code,
                "terminal_totals": self.terminal_totals.model_dump(), "host_totals": self.host_totals.model_dump(),
                "missing_on_host": self.missing_on_host, "missing_on_terminal": self.missing_on_terminal,
                "amount_differs": self.amount_differs, "next_batch_no": self.next_batch_no}


def _msg_id() -> str:
    return uuid.uuid4().hex


def _local_auth_code() -> str:
    return os.urandom(3).hex().upper()


class TerminalAgent:
    """One terminal. ``await agent.start()`` (recover, sign on), then the flows; ``await agent.stop()``."""

    def __init__(self, identity: TerminalIdentity, host: HostClient, journal: Journal,
                 settings: AgentSettings | None = None) -> None:
        self.identity = identity
        self.host = host
        self.journal = journal
        self.settings = settings or AgentSettings()
        self._tak: bytes | None = None
        self._prev_tak: bytes | None = None
        self._tek: bytes | None = None
        self.key_version = 0
        self._background: asyncio.Task[None] | None = None
        self._flush_lock = asyncio.Lock()
        self.untrusted_answers = 0

    def __repr__(self) -> str:
        return f"TerminalAgent(terminal_id={self.identity.terminal_id}, signed_on={self.signed_on})"

    @property
    def terminal_id(self) -> str:
        return self.identity.terminal_id

    @property
    def signed_on(self) -> bool:
        return self._tak is not None

    # --- lifecycle ---------------------------------------------------------------------------------

    async def start(self, *, sign_on: bool = True, background: bool = False) -> None:
        """Recover the journal after a restart, sign on (when the host is reachable), flush the queues."""
        self.recover()
        if sign_on:
            with contextlib.suppress(HostUnavailable, HostTimeout, SignOnFailed):
                await self.sign_on()
        if self.signed_on:
            await self.flush()
        if background:
            self._background = asyncio.create_task(self._background_loop(), name=f"agent-{self.terminal_id}")

    async def stop(self) -> None:
        if self._background is not None:
            self._background.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._background
            self._background = None

    def recover(self) -> list[JournalRow]:
        """Purchases whose answer is unknown (crash, power loss) get a queued reversal."""
        stuck = self.journal.recover()
        reversed_for = {r.orig_msg_id for r in self.journal.rows(kind="reversal")}
        for row in self.journal.rows(state="reversing", kind="purchase"):
            if row.msg_id not in reversed_for:
                self._queue_reversal(row, "timeout")
        return stuck

    async def _background_loop(self) -> None:
        last_beat = 0.0
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.settings.reversal_retry_s)
            try:
                if not self.signed_on:
                    await self.sign_on()
                await self.flush()
                if loop.time() - last_beat >= self.settings.heartbeat_s:
                    await self.heartbeat()
                    last_beat = loop.time()
            except (HostUnavailable, HostTimeout, SignOnFailed) as exc:
                log.debug("background: host not reachable (%s)", exc)
            except Exception:
                log.exception("background flush failed")

    # --- keys ----------------------------------------------------------------------------------------

    def _sign(self, msg: Message) -> Message:
        if self._tak is None:
            raise AgentError("not signed on: no working key")
        return msg.signed(self._tak)

    def _trusted(self, answer: Message) -> bool:
        for key in (self._tak, self._prev_tak):
            if key is not None and answer.mac_ok(key):
                return True
        self.untrusted_answers += 1
        return False

    async def sign_on(self) -> int:
        """签到: SM2 proof over the host nonce; TAK/TEK arrive under the TMK and must match their KCVs."""
        ident = self.identity
        first = SignOn(terminal_id=ident.terminal_id, msg_id=_msg_id(), sent_at=now_utc(),
                       software_version=self.settings.software_version).signed(ident.tmk)
        challenge = await self.host.request(first, SIGN_ON_TIMEOUT_S)
        if not isinstance(challenge, SignOnChallenge) or not challenge.mac_ok(ident.tmk):
            raise SignOnFailed("sign-on challenge missing or not MAC'd under this terminal's TMK")
        unsigned = SignOn(terminal_id=ident.terminal_id, msg_id=_msg_id(), sent_at=now_utc(),
                          host_nonce=challenge.host_nonce, software_version=self.settings.software_version)
        signature = ident.sm2.sign(unsigned.signed_bytes()).hex().upper()
        second = unsigned.model_copy(update={"signature": signature}).signed(ident.tmk)
        ok = await self.host.request(second, SIGN_ON_TIMEOUT_S)
        if not isinstance(ok, SignOnOk) or not ok.mac_ok(ident.tmk):
            raise SignOnFailed("sign-on answer missing or not MAC'd under this terminal's TMK")
        if ok.response_code != RC.APPROVED:
            raise SignOnFailed(f"host refused the sign-on: {ok.response_code} {ok.message or RC.describe(ok.response_code)}")
        try:
            tak = decrypt_ecb(ident.tmk, bytes.fromhex(ok.tak_under_tmk), SM4)
            tek = decrypt_ecb(ident.tmk, bytes.fromhex(ok.tek_under_tmk), SM4)
        except Exception:
            raise SignOnFailed("working keys malformed") from None
        if len(tak) != 16 or len(tek) != 16:
            raise SignOnFailed("working keys of the wrong length")
        if kcv(tak, SM4).hex().upper() != ok.tak_kcv or kcv(tek, SM4).hex().upper() != ok.tek_kcv:
            raise SignOnFailed("working key check values do not match: keys refused")
        self._prev_tak, self._tak, self._tek = self._tak, tak, tek
        self.key_version = ok.key_version
        if ok.provider_id and ok.provider_id != ident.provider_id:
            log.warning("the host binds terminal %s to provider %s, not %s as configured",
                        ident.terminal_id, ok.provider_id, ident.provider_id)
        elif ok.provider_name and not ident.provider_name:  # the registry's name for receipts
            self.identity = dataclasses.replace(ident, provider_name=ok.provider_name)
        return ok.key_version

    # --- card plumbing ---------------------------------------------------------------------------------

    async def _card(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self.settings.card_in_thread:
            return await asyncio.to_thread(fn, *args, **kwargs)
        return fn(*args, **kwargs)

    # --- purchase ---------------------------------------------------------------------------------------

    async def purchase(self, session: CardSession, program: str, amount_fen: int, *,
                       service_category: str = DEFAULT_SERVICE_CATEGORY, pin: str | None = None,
                       card_started: bool = False) -> TxnOutcome:
        """消费 with the card in ``session``: card proof, host authorisation, card completion."""
        batch = self.journal.batch_no
        try:
            if not card_started:
                await self._card(session.start, purchase=True)
            txn, note = await self._recover_torn(session)
            recovered = txn is not None
            if txn is None:
                txn = await self._card(session.authorize, amount_fen, program, pin=pin,
                                       on_pending=lambda p: self.journal.set_pending_card(p.to_dict()))
        except CardSessionError as exc:
            card_no = session.info.card_no if session.info else ""
            return TxnOutcome("purchase", False, "card_declined", batch, "", amount_fen, program, card_no,
                              exc.response_code, str(exc))
        outcome = await self.authorise(txn, service_category=service_category, session=session)
        if recovered:
            outcome = TxnOutcome(**{**outcome.__dict__,
                                    "message": ("recovered an interrupted transaction: " + outcome.message).strip()})
        elif note:
            outcome = TxnOutcome(**{**outcome.__dict__, "message": f"{note}; {outcome.message}".strip("; ")})
        return outcome

    async def _recover_torn(self, session: CardSession) -> tuple[CardTransaction | None, str]:
        """The interrupted transaction of the card in ``session``, if the card still holds its cryptogram.

        Returns ``(txn, "")`` to send ``txn`` to the host, ``(None, note)`` when there is nothing to
        send (``note`` says how the interrupted transaction ended, empty when there was none).
        """
        pending = self.journal.pending_card()
        if not pending or session.info is None or pending.get("app_serial") != session.info.app_serial:
            return None, ""
        record = PendingCryptogram.from_dict(pending)
        try:
            txn = await self._card(session.recover, record)
        except CardSessionError as exc:
            if exc.reason is not Reason.RECOVERY_UNAVAILABLE:
                raise
            note = await self._resolve_unrecoverable(record, session)
            self.journal.set_pending_card(None)
            return None, note
        self.journal.set_pending_card(None)
        return txn, ""

    async def _resolve_unrecoverable(self, record: PendingCryptogram, session: CardSession) -> str:
        """The card counted a cryptogram it no longer holds: settle it by what could have reached the host.

        The journal is written before any message leaves, so a purchase the host can have is in it:
        approved (or offline/advised) → kept, the card's log completed; waiting for its reversal →
        the reversal queue decides; declined/reversed → nothing charged. Not in the journal at all →
        it never left the terminal: recorded as ``cancelled`` (failed, no charge).
        """
        row = self.journal.find_card_txn(record.card_no, ttn=record.ttn, atc=record.expected_atc)
        if row is None:
            trace, msg_id = self.journal.next_trace_no(), _msg_id()
            text = (f"interrupted transaction (card counter {record.expected_atc}) could not be recovered from the "
                    f"card and never reached the host: failed, no charge")
            self.journal.record(msg_id=msg_id, kind="purchase", state="cancelled", batch_no=self.journal.batch_no,
                                trace_no=trace, amount_fen=record.amount_fen, program=record.program,
                                card_no=record.card_no, request_json=json.dumps({"interrupted": record.to_dict()}))
            self.journal.set_state(msg_id, "cancelled", text)
            log.warning("torn transaction unrecoverable on the card, not in the journal: cancelled (trace %s)", trace)
            return text
        if row.state in ("approved", "offline", "advised"):
            req = Purchase.model_validate_json(row.request_json)
            c = req.card
            txn = CardTransaction(c.card_no, c.app_serial, c.key_version, c.suite, req.program, req.amount_fen, c.atc,
                                  c.ttn, record.terminal_id, c.txn_date, c.txn_time, c.tac, record.pin_verified, True)
            try:
                await self._card(session.complete, txn, resume=True)
            except CardSessionError as exc:
                return (f"interrupted transaction trace {row.trace_no} stands (host record kept); the card's log "
                        f"could not be written ({exc.reason.value})")
            return f"interrupted transaction trace {row.trace_no} stands (host record kept)"
        if row.state in ("pending", "reversing"):
            if row.state == "pending":  # sent, answer never recorded: unknown outcome, reverse it
                self._queue_reversal(row, "timeout")
            return f"interrupted transaction trace {row.trace_no}: {NOT_COMPLETED}, it is being reversed"
        return f"interrupted transaction trace {row.trace_no} ended {row.state}: no charge"

    def _purchase_message(self, txn: CardTransaction, trace_no: str, service_category: str) -> Purchase:
        proof = CardProof(card_no=txn.card_no, app_serial=txn.app_serial, key_version=txn.key_version,
                          suite=txn.suite, atc=txn.atc, ttn=txn.ttn, txn_date=txn.txn_date, txn_time=txn.txn_time,
                          tac=txn.tac)  # type: ignore[arg-type]
        return Purchase(terminal_id=self.terminal_id, msg_id=_msg_id(), sent_at=now_utc(),
                        provider_id=self.identity.provider_id, batch_no=self.journal.batch_no, trace_no=trace_no,
                        program=txn.program, service_category=service_category, amount_fen=txn.amount_fen,
                        card=proof)  # type: ignore[arg-type]

    async def authorise(self, txn: CardTransaction, *, service_category: str = DEFAULT_SERVICE_CATEGORY,
                        session: CardSession | None = None) -> TxnOutcome:
        """Send the card's transaction to the host (journal first); complete the card on approval."""
        if self._tak is None and self.host.connected:
            with contextlib.suppress(HostUnavailable, HostTimeout, SignOnFailed):
                await self.sign_on()
        trace = self.journal.next_trace_no()
        unsigned = self._purchase_message(txn, trace, service_category)
        msg = unsigned.signed(self._tak) if self._tak is not None else unsigned
        self.journal.record(msg_id=msg.msg_id, kind="purchase", state="pending", batch_no=msg.batch_no, trace_no=trace,
                            amount_fen=txn.amount_fen, request_json=msg.to_json().decode(), program=txn.program,
                            card_no=txn.card_no)
        self.journal.set_pending_card(None)
        base = {"kind": "purchase", "batch_no": msg.batch_no, "trace_no": trace, "amount_fen": txn.amount_fen,
                "program": txn.program, "card_no": txn.card_no}

        answer: Message | None = None
        try:
            if self._tak is None:
                raise HostUnavailable("not signed on")
            answer = await self.host.request(msg, self.settings.answer_timeout_s)
            metrics.TERMINAL_OFFLINE.set(0)
        except HostUnavailable as exc:
            metrics.TERMINAL_OFFLINE.set(1)
            return await self._offline(msg, txn, session, base, str(exc))
        except HostTimeout:
            answer = None
        if answer is not None and not (isinstance(answer, TxnResult) and answer.type == "purchase_result"
                                       and self._trusted(answer)):
            if getattr(answer, "response_code", None) == RC.MAC_ERROR:
                self._tak = None  # the host no longer knows our key: sign on again before the next message
            answer = None
        if answer is None:
            await self._reverse(msg, "timeout")
            return TxnOutcome(**base, approved=False, state="reversing", response_code=None,
                              message=f"{NOT_COMPLETED}: no (verifiable) answer from the host in time; the "
                                      f"purchase is being reversed")
        assert isinstance(answer, TxnResult)
        if answer.response_code in UNKNOWN_OUTCOME_CODES:
            # the host may have posted it all the same: an unknown outcome, reversed like a lost answer
            self.journal.answer(msg.msg_id, state="reversing", response_code=answer.response_code,
                                answer_json=answer.to_json().decode(),
                                message=f"host answered {answer.response_code}: outcome unknown, reversing")
            await self._reverse(msg, "timeout")
            return TxnOutcome(**base, approved=False, state="reversing", response_code=answer.response_code,
                              message=f"{NOT_COMPLETED}: host system error ({answer.response_code}); the "
                                      f"purchase is being reversed")
        if not answer.approved:
            self.journal.answer(msg.msg_id, state="declined", response_code=answer.response_code,
                                answer_json=answer.to_json().decode(), message=answer.message)
            if answer.response_code == RC.MAC_ERROR:
                self._tak = None
            return TxnOutcome(**base, approved=False, state="declined", response_code=answer.response_code,
                              message=answer.message or RC.describe(answer.response_code))
        self.journal.answer(msg.msg_id, state="approved", response_code=answer.response_code,
                            answer_json=answer.to_json().decode(), rrn=answer.rrn, auth_code=answer.auth_code,
                            balance_after_fen=answer.balance_after_fen, business_date=answer.business_date,
                            message=answer.message)
        if session is not None:
            try:
                await self._card(session.complete, txn)
            except CardSessionError as exc:
                await self._reverse(msg, "card_failed")
                return TxnOutcome(**base, approved=False, state="reversing", response_code=answer.response_code,
                                  message=f"card step failed after approval ({exc}): the purchase is being reversed",
                                  rrn=answer.rrn)
        return TxnOutcome(**base, approved=True, state="approved", response_code=answer.response_code,
                          message=answer.message, rrn=answer.rrn, auth_code=answer.auth_code,
                          balance_after_fen=answer.balance_after_fen)

    async def _offline(self, msg: Purchase, txn: CardTransaction, session: CardSession | None,
                       base: dict[str, Any], why: str) -> TxnOutcome:
        """The purchase never left: approve it offline under the floor limit, else decline."""
        s = self.settings
        if txn.amount_fen > s.offline_floor_limit_fen:
            text = (f"host unreachable ({why}); {txn.amount_fen} fen is above the offline floor limit of "
                    f"{s.offline_floor_limit_fen} fen: declined, try again when the link is back")
            self.journal.answer(msg.msg_id, state="declined", response_code=None, message=text)
            return TxnOutcome(**base, approved=False, state="declined", message=text)
        if self.journal.offline_count(txn.card_no) >= s.offline_max_per_card:
            text = (f"host unreachable ({why}); this card already has {s.offline_max_per_card} offline purchases "
                    "waiting for upload: declined")
            self.journal.answer(msg.msg_id, state="declined", response_code=None, message=text)
            return TxnOutcome(**base, approved=False, state="declined", message=text)
        auth = _local_auth_code()
        self.journal.to_offline(msg.msg_id, auth)
        if session is not None:
            try:
                await self._card(session.complete, txn)
            except CardSessionError as exc:
                text = f"card step failed ({exc}): offline approval cancelled"
                self.journal.set_state(msg.msg_id, "cancelled", text)
                return TxnOutcome(**{**base, "kind": "offline_purchase"}, approved=False, state="cancelled",
                                  message=text)
        return TxnOutcome(**{**base, "kind": "offline_purchase"}, approved=True, state="offline",
                          response_code=RC.APPROVED, message="approved offline; advice uploaded when the link returns",
                          auth_code=auth, offline=True)

    # --- reversal -------------------------------------------------------------------------------------

    def _queue_reversal(self, orig: JournalRow | Purchase, reason: str) -> JournalRow:
        if isinstance(orig, JournalRow):
            req = self.journal.request(orig.msg_id)
            orig_msg_id, orig_trace, amount, card_no = orig.msg_id, orig.trace_no, orig.amount_fen, orig.card_no
            batch = orig.batch_no
        else:
            req = {}
            orig_msg_id, orig_trace, amount, card_no = orig.msg_id, orig.trace_no, orig.amount_fen, orig.card.card_no
            batch = orig.batch_no
        card_no = card_no or req.get("card", {}).get("card_no", "")
        trace = self.journal.next_trace_no()
        rev = Reversal(terminal_id=self.terminal_id, msg_id=_msg_id(), sent_at=now_utc(),
                       provider_id=self.identity.provider_id, batch_no=batch, trace_no=trace,
                       orig_trace_no=orig_trace, orig_msg_id=orig_msg_id, card_no=card_no, amount_fen=amount,
                       reason=reason)  # type: ignore[arg-type]
        self.journal.set_state(orig_msg_id, "reversing", f"reversal queued ({reason})")
        self.journal.record(msg_id=rev.msg_id, kind="reversal", state="queued", batch_no=batch, trace_no=trace,
                            amount_fen=amount, request_json=rev.to_json().decode(), card_no=card_no,
                            orig_trace_no=orig_trace, orig_msg_id=orig_msg_id)
        row = self.journal.get(rev.msg_id)
        assert row is not None
        return row

    async def _reverse(self, purchase: Purchase, reason: str) -> None:
        row = self._queue_reversal(purchase, reason)
        with contextlib.suppress(HostUnavailable, HostTimeout, AgentError):
            await self._send_reversal(row, min(REVERSAL_SEND_NOW_TIMEOUT_S, self.settings.answer_timeout_s))

    async def _send_reversal(self, row: JournalRow, timeout_s: float) -> bool:
        """One attempt; True when the host acknowledged (the purchase is then ``reversed``)."""
        fresh = Reversal.model_validate_json(row.request_json).model_copy(
            update={"msg_id": _msg_id(), "sent_at": now_utc(), "mac": ""})
        self.journal.bump_attempts(row.msg_id)
        answer = await self.host.request(self._sign(fresh), timeout_s)
        if not (isinstance(answer, TxnResult) and answer.type == "reversal_result" and self._trusted(answer)):
            if getattr(answer, "response_code", None) == RC.MAC_ERROR:
                self._tak = None
            return False
        if answer.response_code not in REVERSAL_DONE_CODES:
            if answer.response_code == RC.MAC_ERROR:
                self._tak = None
            return False
        self.journal.answer(row.msg_id, state="acked", response_code=answer.response_code,
                            answer_json=answer.to_json().decode(), rrn=answer.rrn, message=answer.message)
        if row.orig_msg_id:
            self.journal.set_state(row.orig_msg_id, "reversed", f"reversed ({answer.response_code})")
        return True

    # --- background queues ------------------------------------------------------------------------------

    async def flush(self) -> dict[str, int]:
        """Send queued reversals, offline advices and unanswered voids/refunds once; counts what was cleared."""
        done = {"reversals": 0, "advices": 0, "retransmitted": 0}
        if not self.signed_on:
            return done
        async with self._flush_lock:
            metrics.TERMINAL_BACKLOG.labels(queue="reversal").set(len(self.journal.reversal_queue()))
            metrics.TERMINAL_BACKLOG.labels(queue="offline_advice").set(len(self.journal.offline_queue()))
            work = ([("reversals", self._send_reversal_once, r) for r in self.journal.reversal_queue()]
                    + [("advices", self._send_advice, r) for r in self.journal.offline_queue()]
                    + [("retransmitted", self._retransmit, r) for kind in ("void", "refund")
                       for r in self.journal.rows(state="pending", kind=kind)])
            for what, send, row in work[:MAX_FLUSH_ITEMS]:
                try:
                    if await send(row):
                        done[what] += 1
                except HostTimeout:
                    continue  # stays queued; the next flush tries again
                except HostUnavailable:
                    break  # the link is down: nothing else will get through now
        return done

    async def _send_reversal_once(self, row: JournalRow) -> bool:
        return await self._send_reversal(row, self.settings.answer_timeout_s)

    async def _send_advice(self, row: JournalRow) -> bool:
        req = Purchase.model_validate_json(row.request_json)
        approved_at = datetime.fromisoformat(row.created_at)
        advice = OfflineAdvice(terminal_id=self.terminal_id, msg_id=_msg_id(), sent_at=now_utc(),
                               provider_id=req.provider_id, batch_no=req.batch_no, trace_no=req.trace_no,
                               program=req.program, service_category=req.service_category,
                               amount_fen=req.amount_fen, card=req.card, offline_auth_code=row.auth_code or "000000",
                               approved_at=approved_at)
        self.journal.bump_attempts(row.msg_id)
        answer = await self.host.request(self._sign(advice), self.settings.answer_timeout_s)
        if not (isinstance(answer, TxnResult) and answer.type == "advice_result" and self._trusted(answer)):
            return False
        if answer.response_code in RETRY_CODES:
            if answer.response_code == RC.MAC_ERROR:
                self._tak = None
            return False
        state = "advised" if answer.approved else "advice_declined"
        self.journal.answer(row.msg_id, state=state, response_code=answer.response_code,
                            answer_json=answer.to_json().decode(), rrn=answer.rrn,
                            balance_after_fen=answer.balance_after_fen, business_date=answer.business_date,
                            message=answer.message)
        return True

    async def _retransmit(self, row: JournalRow) -> bool:
        model = Void if row.kind == "void" else Refund
        fresh = model.model_validate_json(row.request_json).model_copy(
            update={"msg_id": _msg_id(), "sent_at": now_utc(), "mac": ""})
        self.journal.bump_attempts(row.msg_id)
        answer = await self.host.request(self._sign(fresh), self.settings.answer_timeout_s)
        if not (isinstance(answer, TxnResult) and self._trusted(answer)) or answer.response_code in RETRY_CODES:
            return False
        self._record_answer(row.msg_id, answer)
        return True

    def _record_answer(self, msg_id: str, answer: TxnResult) -> None:
        self.journal.answer(msg_id, state="approved" if answer.approved else "declined",
                            response_code=answer.response_code, answer_json=answer.to_json().decode(),
                            rrn=answer.rrn, auth_code=answer.auth_code, balance_after_fen=answer.balance_after_fen,
                            business_date=answer.business_date, message=answer.message)

    # --- void and refund --------------------------------------------------------------------------------

    async def _simple(self, kind: str, msg: Void | Refund, program: str | None) -> TxnOutcome:
        signed = self._sign(msg)
        self.journal.record(msg_id=signed.msg_id, kind=kind, state="pending", batch_no=msg.batch_no,
                            trace_no=msg.trace_no, amount_fen=msg.amount_fen, request_json=signed.to_json().decode(),
                            program=program, card_no=msg.card_no, orig_rrn=msg.orig_rrn,
                            orig_trace_no=getattr(msg, "orig_trace_no", None))
        base = {"kind": kind, "batch_no": msg.batch_no, "trace_no": msg.trace_no, "amount_fen": msg.amount_fen,
                "program": program or "", "card_no": msg.card_no}
        try:
            answer = await self.host.request(signed, self.settings.answer_timeout_s)
        except (HostTimeout, HostUnavailable) as exc:
            return TxnOutcome(**base, approved=False, state="pending",
                              message=f"no answer from the host ({exc}); it will be retried automatically")
        if not (isinstance(answer, TxnResult) and self._trusted(answer)):
            return TxnOutcome(**base, approved=False, state="pending",
                              message="the host's answer could not be verified; it will be retried")
        if answer.response_code in RETRY_CODES:
            # 96: the host may have posted it (outcome unknown); A0: it did not check. Either way the row
            # stays pending and the same trace is retransmitted; the host answers a retransmission with
            # its first recorded answer, so the journal ends up agreeing with the host.
            if answer.response_code == RC.MAC_ERROR:
                self._tak = None
            self.journal.answer(signed.msg_id, state="pending", response_code=answer.response_code,
                                answer_json=answer.to_json().decode(),
                                message=f"host answered {answer.response_code}: will be retried")
            return TxnOutcome(**base, approved=False, state="pending", response_code=answer.response_code,
                              message=f"host answered {answer.response_code} ({RC.describe(answer.response_code)}):"
                                      f" not completed yet; it will be retried automatically")
        self._record_answer(signed.msg_id, answer)
        return TxnOutcome(**base, approved=answer.approved, state="approved" if answer.approved else "declined",
                          response_code=answer.response_code,
                          message=answer.message or RC.describe(answer.response_code), rrn=answer.rrn,
                          auth_code=answer.auth_code, balance_after_fen=answer.balance_after_fen)

    async def void(self, orig_trace_no: str) -> TxnOutcome:
        """撤销 a purchase of the current batch by its trace number (full amount)."""
        batch = self.journal.batch_no
        orig = self.journal.find(batch_no=batch, trace_no=orig_trace_no, kind="purchase")
        if orig is None or orig.state != "approved" or not orig.rrn or not orig.card_no:
            raise AgentError(f"no approved purchase with trace {orig_trace_no} in batch {batch}")
        msg = Void(terminal_id=self.terminal_id, msg_id=_msg_id(), sent_at=now_utc(),
                   provider_id=self.identity.provider_id, batch_no=batch, trace_no=self.journal.next_trace_no(),
                   orig_rrn=orig.rrn, orig_trace_no=orig.trace_no, card_no=orig.card_no, amount_fen=orig.amount_fen)
        return await self._simple("void", msg, orig.program)

    async def refund(self, orig_rrn: str, amount_fen: int, *, card_no: str | None = None) -> TxnOutcome:
        """退货 all or part of an earlier purchase (any day) by its RRN."""
        orig = self.journal.find(rrn=orig_rrn, kind="purchase") or self.journal.find(rrn=orig_rrn)
        card = card_no or (orig.card_no if orig else None)
        if not card:
            raise AgentError(f"purchase {orig_rrn} is not in this terminal's journal: give the card number")
        msg = Refund(terminal_id=self.terminal_id, msg_id=_msg_id(), sent_at=now_utc(),
                     provider_id=self.identity.provider_id, batch_no=self.journal.batch_no,
                     trace_no=self.journal.next_trace_no(), orig_rrn=orig_rrn, card_no=card, amount_fen=amount_fen)
        return await self._simple("refund", msg, orig.program if orig else None)

    # --- heartbeat and settlement -------------------------------------------------------------------------

    async def heartbeat(self) -> None:
        hb = Heartbeat(terminal_id=self.terminal_id, msg_id=_msg_id(), sent_at=now_utc(),
                       software_version=self.settings.software_version, journal_backlog=self.journal.backlog(),
                       offline_pending=len(self.journal.offline_queue()))
        await self.host.send(self._sign(hb))

    def batch_items(self, batch_no: str) -> list[BatchItem]:
        """The batch as the terminal sees it: approved purchases, voids, refunds and accepted advices."""
        kinds = {"purchase": "PURCHASE", "void": "VOID", "refund": "REFUND", "offline_purchase": "ADVICE"}
        items = []
        for row in self.journal.rows(batch_no=batch_no):
            counted = (row.kind in ("purchase", "void", "refund") and row.state == "approved") or (
                row.kind == "offline_purchase" and row.state == "advised")
            if counted and row.card_no:
                items.append(BatchItem(trace_no=row.trace_no, txn_type=kinds[row.kind], amount_fen=row.amount_fen,
                                       card_no=row.card_no, program=row.program or "voucher", rrn=row.rrn))  # type: ignore[arg-type]
        return items

    def batch_totals(self, batch_no: str) -> BatchTotals:
        t = {"purchase_count": 0, "purchase_fen": 0, "void_count": 0, "void_fen": 0, "refund_count": 0,
             "refund_fen": 0, "advice_count": 0, "advice_fen": 0}
        for item in self.batch_items(batch_no):
            key = item.txn_type.lower()
            t[f"{key}_count"] += 1
            t[f"{key}_fen"] += item.amount_fen
        return BatchTotals(**t)

    async def settle(self, *, totals: BatchTotals | None = None) -> SettleOutcome:
        """批结算: flush the queues, send the totals; upload the details when the host disagrees; next batch.

        ``totals`` overrides the computed totals (tests and drills of an unbalanced batch).
        """
        await self.flush()
        waiting = self.journal.backlog()
        if waiting:
            raise AgentError(f"cannot settle: {waiting} transaction(s) still waiting for the host")
        batch = self.journal.batch_no
        mine = totals or self.batch_totals(batch)
        msg = self._sign(BatchSettle(terminal_id=self.terminal_id, msg_id=_msg_id(), sent_at=now_utc(),
                                     provider_id=self.identity.provider_id, batch_no=batch, totals=mine))
        answer = await self.host.request(msg, self.settings.answer_timeout_s)
        if not (isinstance(answer, BatchSettleResult) and self._trusted(answer)):
            raise AgentError("batch settle: no trusted answer from the host")
        if answer.response_code != RC.APPROVED:
            raise AgentError(f"batch settle refused: {answer.response_code} {RC.describe(answer.response_code)}")
        outcome = SettleOutcome(batch, answer.balanced, answer.response_code, mine, answer.host_totals)
        if not answer.balanced:
            upload = self._sign(BatchUpload(terminal_id=self.terminal_id, msg_id=_msg_id(), sent_at=now_utc(),
                                            provider_id=self.identity.provider_id, batch_no=batch,
                                            items=self.batch_items(batch)))
            res = await self.host.request(upload, self.settings.answer_timeout_s)
            if not (isinstance(res, BatchUploadResult) and self._trusted(res)):
                raise AgentError("batch upload: no trusted answer from the host")
            outcome = SettleOutcome(batch, False, res.response_code, mine, answer.host_totals,
                                    list(res.missing_on_host), list(res.missing_on_terminal), list(res.amount_differs))
        nxt = self.journal.close_batch()
        return SettleOutcome(**{**outcome.__dict__, "next_batch_no": nxt})

    # --- receipts ------------------------------------------------------------------------------------------

    def receipt(self, outcome: TxnOutcome) -> str:
        return render_receipt(ReceiptData(
            provider_id=self.identity.provider_id, provider_name=self.identity.provider_name,
            terminal_id=self.terminal_id, card_no=outcome.card_no, program=outcome.program, txn_type=outcome.kind,
            amount_fen=outcome.amount_fen, batch_no=outcome.batch_no, trace_no=outcome.trace_no, when=outcome.when,
            approved=outcome.approved, response_code=outcome.response_code, message=outcome.message,
            balance_after_fen=outcome.balance_after_fen, rrn=outcome.rrn, auth_code=outcome.auth_code))

