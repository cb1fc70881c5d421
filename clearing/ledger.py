"""The group-commit ledger writer (批量提交记账): many host transactions per database transaction.

Requests (:class:`TxnRequest`, prepared by the authorisation pipeline) queue up; one
writer task takes what queued while the batch before was written, up to :data:`GROUP_COMMIT_MAX_BATCH`
and gathering for at most :data:`GROUP_COMMIT_WINDOW_MS` after the first (never waiting on a timer: see
:meth:`GroupCommitWriter._collect`), and in ONE write transaction:

1. loads what the batch needs set-based — existing journal rows for its keys
   (duplicates), originals of voids/refunds/reversals, reversal tombstones; then, for
   requests that carry an ``auth`` context, the authorisation pipeline's snapshot
   (cards, terminals, providers: one query each) and its static participants (registry
   checks, TAC verification) — see :class:`Authoriser`; then the card counters (the
   highest spent per card; the exact counter only when it is not above that), and the
   accounts (``FOR NO KEY UPDATE`` in id order on PostgreSQL, so several
   worker processes never double-spend; SQLite has one writer via ``BEGIN IMMEDIATE``);
2. resolves each posting's business date against the settlement windows;
3. applies the requests in arrival order in memory — de-duplication, the pipeline's
   stateful participants (card counter, balance, original of a void/refund), tombstones,
   card-counter replay, void/refund/reversal rules, and the balance check (a
   beneficiary account never goes below zero: the request is declined ``51``);
4. asserts the batch invariants (Σ debits = Σ credits; no beneficiary negative);
5. writes with one ``executemany`` per table — transfers, host journal rows (each carrying
   the card counter it spent: ``atc``, unique per card) — and one aggregated balance
   ``UPDATE`` per touched account; rows are built in the driver's types (dates and times
   as SQLite text once per distinct value).

On PostgreSQL a batch reads the journal (step 1) before its account locks, and under READ COMMITTED another
worker may commit in between; so, the locks held and before it commits, it rechecks the journal rows its
decisions rest on (a reversal of a purchase it posts, the original of a reversal it takes as a tombstone,
another correction of an original it corrects) and runs again when one appeared (:class:`JournalRaced`). A
reversal locks its provider's payable as the purchase does, so the one that commits second sees the other.

On SQLite the whole batch (BEGIN IMMEDIATE … COMMIT) runs on the raw ``sqlite3``
connection inside the aiosqlite thread — one thread hop per batch; on PostgreSQL it
runs through SQLAlchemy with asyncpg, loads as ``= ANY($1)`` and writes as one
``INSERT … SELECT FROM unnest(…)`` per table (columns constant over the batch bound once).

On PostgreSQL the writer pipelines purchase batches: the next batch is loaded and applied on the state the
batch before it leaves (:class:`_Prior`) while that one still writes and commits — its accounts read unlocked,
then, once the batch before committed, locked in id order and checked to be as assumed (a beneficiary balance
moved elsewhere, or a batch before that failed: rolled back and run again plainly). See
:meth:`GroupCommitWriter._run_pipelined`.

Every request ends with exactly one host journal row (``host_txns``), approved or
declined, except a duplicate (the stored answer is replayed) and an idempotency
conflict (same key, different body: :class:`IdempotencyConflict`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import operator
import secrets
import sqlite3
import time as _time
from array import array
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol

from sqlalchemy import bindparam, or_, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.util import await_

from clearing.accounts import ensure_accounts_sync, provider_payable, spec_for
from clearing.db import (
    WRITER_AUTOCHECKPOINT_PAGES,
    BulkWrite,
    WalCheckpointer,
    _sqlite_allocate,
    _sqlite_run,
    allocate_ids_sync,
    allocate_many_sync,
    apply_balance_deltas_sync,
    executemany_sync,
    render_in,
    select_multi_in_sync,
    sqlite_date,
    sqlite_datetime,
    write_transaction,
)
from clearing.pipeline import dedupe, metrics
from clearing.schema import FLAG_NO_OVERDRAFT, accounts, host_txns, transfers
from clearing.windows import MAX_CLOSED_DAYS_SKIPPED, Cutoff, resolve_business_dates_sync
from clearing.windows import OPEN as WINDOW_OPEN

if TYPE_CHECKING:
    from clearing.pipeline.snapshot import RegistryCache

log = logging.getLogger("carepay.clearing.ledger")

GROUP_COMMIT_WINDOW_MS = 5
"""Longest a batch keeps gathering requests after its first while every event-loop turn brings more (ms)."""
GROUP_COMMIT_MAX_BATCH = 1_000
"""Most requests in one database transaction."""
BATCH_RETRIES = 5
"""Attempts for a batch that hit a unique-key race or deadlock with another worker (PostgreSQL)."""
SQL_IN_CHUNK = 500
"""Keys per ``IN (…)`` list when loading."""
RAW_SQLITE_BATCH = True
"""On SQLite, run each whole batch on the raw connection inside the aiosqlite thread (one thread hop)."""
PG_PIPELINE = True
"""On PostgreSQL, prepare the next purchase batch while the one before it commits (see :class:`_Prior`)."""
PIPELINE_WAIT_S = 5.0
"""Longest a pipelined batch waits for the one before it to commit before it gives up and runs again plainly.
Batches take tens of milliseconds; the bound is for the rare wait no database can see: the batch before waits
on a lock held by another worker's batch, which waits on a key this batch wrote (a duplicate delivered to both)."""

PURCHASE, ADVICE, VOID, REFUND, REVERSAL = "PURCHASE", "ADVICE", "VOID", "REFUND", "REVERSAL"
SUCCESS, FAILED, REVERSED = "SUCCESS", "FAILED", "REVERSED"
DEBIT_TYPES = (PURCHASE, ADVICE)
_DEBIT_CODE = {PURCHASE: "purchase", ADVICE: "advice"}  # transfer code of a debit type
CORRECTION_TYPES = (VOID, REFUND, REVERSAL)

HOST_PLAIN_COLUMNS = (
    "rrn", "txn_key", "msg_key", "request_hash", "provider_id", "terminal_id", "batch_no", "trace_no", "txn_type",
    "program", "card_no", "amount_fen", "fee_fen", "status", "orig_rrn", "orig_key", "response_code", "msg_id",
    "auth_code", "service_category", "balance_after_fen", "transfer_id", "message", "review_reason", "atc", "atc_gap",
)
HOST_TIME_COLUMNS = ("business_date", "txn_time", "created_at")
HOST_COLUMNS = HOST_PLAIN_COLUMNS + HOST_TIME_COLUMNS
"""The journal row the writer inserts: values that go to the driver as they are, then the date and times
(converted to SQLite's text forms on SQLite, once per distinct value)."""
_BLANK_ROW = dict.fromkeys(HOST_COLUMNS)
_ROW_CONSTANTS = frozenset({"fee_fen", "status", "response_code", "created_at"})
TRANSFER_COLUMNS = (
    "id", "transfer_key", "debit_account_id", "credit_account_id", "amount_fen", "code", "business_date",
    "created_at", "terminal_id", "batch_no", "trace_no", "rrn", "corrects_transfer_id", "memo",
)


class LedgerError(Exception):
    """The writer could not post a batch (database failure after retries)."""


class IdempotencyConflict(Exception):
    """The same idempotency key arrived with a different request body (TigerBeetle ``exists_with_different_…``)."""

    def __init__(self, key: str, stored: dict[str, Any] | None = None):
        super().__init__(f"idempotency key {key!r} already used with a different request")
        self.key = key
        self.stored = stored


class InvariantViolation(AssertionError):
    """A batch broke a ledger invariant; nothing of it is committed."""


class JournalRaced(Exception):
    """PostgreSQL: another worker committed, between this batch's read of the journal and its account locks,
    a row the batch's decisions depend on (a reversal of a purchase it posts, the original of a reversal it
    takes as a tombstone, a correction of an original it corrects): rolled back and run again on what committed."""


class PipelineConflict(Exception):
    """A pipelined batch's assumptions did not hold at its commit point — a balance it decided on had moved, or
    the batch it was built on did not commit: it is rolled back and run again the plain way (locks first)."""


@dataclass
class TxnRequest:
    """One host transaction for the writer, as the pipeline prepared it.

    ``row`` holds the journal fields known before posting: provider_id, terminal_id,
    batch_no, trace_no, program, card_no, amount_fen, txn_time, msg_id,
    service_category, orig_rrn. ``decline`` is ``(rc, message)`` when a pipeline
    participant already declined (the journal row is still written, no money moves).
    """

    txn_type: str
    txn_key: str
    msg_key: str
    request_hash: str
    received_at: datetime
    row: dict[str, Any]
    decline: tuple[str, str] | None = None
    review_reason: str | None = None
    debit: str | None = None  # PURCHASE/ADVICE: card account code
    credit: str | None = None  # PURCHASE/ADVICE: provider payable code
    counter: tuple[str, int] | None = None  # (card_no, atc) the card's TAC used
    orig_key: str | None = None  # REVERSAL: txn_key of the purchase it undoes
    auth: Any = None  # clearing.pipeline.context.AuthContext: run the participants in the batch (see Authoriser)
    future: asyncio.Future[TxnOutcome] | None = field(default=None, repr=False)


@dataclass
class TxnOutcome:
    """The journal row written (or found) for a request, and whether it was a replay."""

    row: dict[str, Any]
    duplicate: bool = False

    @property
    def approved(self) -> bool:
        return self.row["response_code"] == "00"


@dataclass(slots=True)
class _Acct:
    id: int
    code: str
    flags: int
    debits: int
    credits: int

    @property
    def balance(self) -> int:
        return self.credits - self.debits


@dataclass
class WriterStats:
    batches: int = 0
    requests: int = 0
    postings: int = 0
    retries: int = 0
    max_batch: int = 0
    seconds_in_db: float = 0.0
    pipelined: int = 0  # PostgreSQL: batches committed on the state of the batch before them
    redone: int = 0  # PostgreSQL: pipelined batches whose assumptions did not hold, run again plainly


def _chunks(items: list[Any], n: int = SQL_IN_CHUNK) -> Iterable[list[Any]]:
    for i in range(0, len(items), n):
        yield items[i:i + n]


_U32 = "I" if array("I").itemsize == 4 else "L"


def _auth_codes(n: int) -> list[str]:
    """``n`` unpredictable 6-digit authorisation codes (授权码) from one read of the OS random source
    (each from 32 random bits, as unsigned 32-bit words: the same distribution as ``int.from_bytes``)."""
    words = array(_U32, secrets.token_bytes(4 * n))
    return [f"{w % 1_000_000:06d}" for w in words]


class Authoriser(Protocol):
    """The authorisation pipeline as the writer drives it (:class:`clearing.pipeline.chain.BatchAuthoriser`).

    For the requests of a batch that carry ``auth`` (an ``AuthContext``) and are not duplicates:
    ``load`` reads what the participants need set-based (``select`` is the batch store's
    multi-``IN`` query), ``screen`` runs the participants over registry data and the message,
    ``settle`` the ones over the batch's running state (at the request's turn, in arrival order).
    """

    def load(self, select: Any, ctxs: list[Any], cache: Any = None) -> Any: ...

    def screen(self, ctx: Any, snap: Any) -> tuple[str, str] | None: ...

    def settle(self, ctx: Any, snap: Any) -> tuple[str, str] | None: ...


_UNKNOWN: Any = object()
KNOWN_STATE_MAX = 200_000
"""Most accounts (and, separately, cards) :class:`_KnownState` keeps; beyond it the state starts again empty."""


class _KnownState:
    """What the writer knows of the committed database between its batches (SQLite): the account rows and
    each card's highest spent counter as they were after the writer's last commit.

    Valid only while nothing else wrote: :meth:`check` runs inside ``BEGIN IMMEDIATE`` (the write lock is
    held, so nothing can commit until this batch does) and keeps the state only when it is the same
    connection, ``PRAGMA data_version`` has not moved (no other connection, in this process or another,
    committed), ``total_changes`` has not moved (no one else wrote through this connection) and the schema
    has not changed. A batch that fails — at any point, commit included — drops it (its rows were updated
    in memory as the batch applied); :meth:`keep` takes the batch's final values after its COMMIT.
    """

    def __init__(self) -> None:
        self.raw: Any = None  # the sqlite3 connection the state belongs to (identity; it takes no weak references)
        self.version: tuple[int, int, int] | None = None  # (data_version, schema_version, total_changes)
        self.accts: dict[str, _Acct] = {}
        self.accts_by_id: dict[int, _Acct] = {}
        self.max_atc: dict[str, int | None] = {}  # card -> highest counter spent (None: none yet)
        from clearing.pipeline.snapshot import RegistryCache  # (the registries import the ledger)

        self.registry = RegistryCache()  # cards, terminals, providers read by earlier batches (see registry_for)
        self._dv = self._sv = -1

    def registry_for(self, raw: Any) -> RegistryCache | None:
        """Before the batch's write transaction (its screen reads the registry first): the registry rows of
        earlier batches when nobody has committed since this writer's last commit (``data_version``,
        ``schema_version``, ``total_changes`` as :meth:`check`), else emptied and ``None``. A commit by another
        connection after this point is caught by :meth:`check` inside the transaction, which drops them."""
        if self.version is None or raw is not self.raw or self.version != self._version_of(raw):
            self.registry.clear()
            return None
        if len(self.registry) > KNOWN_STATE_MAX:
            self.registry.clear()
        return self.registry

    @staticmethod
    def _version_of(raw: Any) -> tuple[int, int, int]:
        """``(data_version, schema_version, total_changes)`` of the connection now."""
        return (raw.execute("PRAGMA data_version").fetchone()[0], raw.execute("PRAGMA schema_version").fetchone()[0],
                raw.total_changes)

    def check(self, raw: Any) -> _KnownState | None:
        """Inside the batch's write transaction: the state when still valid (else emptied and ``None``)."""
        now = self._version_of(raw)
        valid = raw is self.raw and self.version == now
        if not valid:
            self.drop()
            self.raw = raw
        self._dv, self._sv = now[0], now[1]
        return self if valid else None

    def keep(self, raw: Any, batch: _Batch) -> None:
        """After the batch committed: remember its accounts and counters (``data_version`` as read inside the
        transaction — our own commit does not move it, and a later commit of another connection must)."""
        if max(len(self.accts) + len(batch.accts), len(self.max_atc) + len(batch.max_atc)) > KNOWN_STATE_MAX:
            self.drop()
        self.accts.update(batch.accts)
        self.accts_by_id.update(batch.accts_by_id)
        known, top = self.max_atc, batch.max_atc
        for card in batch.atc_loaded:
            known[card] = top.get(card)
        for card in top.keys() - batch.atc_loaded:  # a counter whose card was not loaded: do not trust it
            known.pop(card, None)
        self.raw = raw
        self.version = (self._dv, self._sv, raw.total_changes)

    def drop(self) -> None:
        self.raw = self.version = None
        self.accts, self.accts_by_id, self.max_atc = {}, {}, {}
        self.registry.clear()


class _Prior:
    """What a PostgreSQL batch still in flight will have committed, as it applied it — its accounts' totals, its
    cards' highest and spent counters, its journal rows by key — for the next purchase batch to decide on before
    this one commits (the writer's pipeline, :meth:`GroupCommitWriter._run_pipelined`). Linked to the state of
    the batch it was itself built on until that one has ended (:meth:`chain`).

    ``inserted`` is set once its rows are written (or it ended): the next batch writes its own rows only then, so
    it never holds a key this one is about to insert (this one would wait on it while it waits on this one).
    ``outcome`` becomes True once it committed, False once it failed."""

    def __init__(self, batch: _Batch, before: _Prior | None, loop: asyncio.AbstractEventLoop):
        self.before = before
        # not the accounts this batch created: the next batch cannot refer to a row not yet committed (the reference
        # check would fail it); it finds them missing, and its own insert of them waits for this batch's commit
        # (the batch no longer changes its accounts, counters or rows once it applied; the next batch copies them)
        self.accts = {a.code: a for a in batch.accts_by_id.values() if a.code not in batch.created}
        self.accts_by_id = {a.id: a for a in self.accts.values()}
        self.max_atc = batch.max_atc
        self.used = batch.used_counters
        self.by_key = {row["txn_key"]: row for row in batch.new_rows}
        self.by_msg = {row["msg_key"]: row for row in batch.new_rows}
        self.inserted = asyncio.Event()
        self.outcome: asyncio.Future[bool] = loop.create_future()

    def chain(self) -> list[_Prior]:
        """This state and those it was built on, newest first, as far as they have not committed — taken
        before the batch building on them reads the database (what committed since is there to read)."""
        out: list[_Prior] = []
        p: _Prior | None = self
        while p is not None and not p.committed:
            out.append(p)
            p = p.before
        return out

    @property
    def committed(self) -> bool:
        return self.outcome.done() and self.outcome.result()

    @property
    def failed(self) -> bool:
        return self.outcome.done() and not self.outcome.result()

    @property
    def doomed(self) -> bool:
        """It failed, or a state it was built on failed — then it fails too, at its commit point."""
        return any(p.failed for p in self.chain())

    def end(self, committed: bool) -> None:
        self.inserted.set()
        self.before = None  # ended after the batch it was built on: nothing to carry any more
        if not self.outcome.done():
            self.outcome.set_result(committed)

    async def wait_committed(self) -> None:
        """Return once it committed; :class:`PipelineConflict` when it failed or took too long."""
        try:
            ok = await asyncio.wait_for(asyncio.shield(self.outcome), PIPELINE_WAIT_S)
        except TimeoutError:
            raise PipelineConflict("the batch before did not commit in time") from None
        if not ok:
            raise PipelineConflict("the batch before did not commit")


class _Flight:
    """One batch of the PostgreSQL writer's pipeline and its place after the batch before it."""

    def __init__(self, reqs: list[TxnRequest], before: _Flight | None):
        self.reqs = reqs
        self.before = before
        self.purchases = all(r.txn_type in DEBIT_TYPES for r in reqs)
        self.applied = asyncio.Event()  # its state is published (``prior``) or it ended: the next batch may start
        self.ended = asyncio.Event()  # committed or failed for good
        self.prior: _Prior | None = None

    def builds_on(self) -> _Prior | None:
        """The state to build on: the batch before, when it is still in flight and both are purchases and
        advices only (voids, refunds and reversals read originals and tombstones — they run plainly), and
        nothing it stands on has failed. A batch built on a failed state fails too; building the next one on
        it would doom that one as well, and under steady traffic every batch after the first conflict."""
        b = self.before
        if b is None or b.ended.is_set() or not (self.purchases and b.purchases):
            return None
        p = b.prior
        return None if p is None or p.doomed else p


class _Pipe:
    """One attempt of a :class:`_Flight` as its batch sees it: the state it builds on (``prior``) and its own."""

    def __init__(self, flight: _Flight, prior: _Prior | None, loop: asyncio.AbstractEventLoop):
        self.flight = flight
        self.prior = prior
        self.loop = loop
        self.mine: _Prior | None = None

    def publish(self, batch: _Batch) -> None:
        """After the batch applied and its invariants held: the next batch may start from here (once per flight —
        a retried attempt does not publish again: the next batch already took the first state, or started plainly)."""
        if not self.flight.applied.is_set():
            self.mine = self.flight.prior = _Prior(batch, self.prior, self.loop)
            self.flight.applied.set()

    def inserted(self) -> None:
        if self.mine is not None:
            self.mine.inserted.set()

    def end(self, committed: bool) -> None:
        if self.mine is not None:
            self.mine.end(committed)


class _Batch:
    """The in-memory state machine for one batch (runs in the sync greenlet of the write transaction)."""

    def __init__(self, store: _SaStore | _RawSqliteStore, reqs: list[TxnRequest], cutoff: Cutoff,
                 authoriser: Authoriser | None = None, known: _KnownState | None = None, pipe: _Pipe | None = None):
        self.store = store
        self.known = known  # set (by the caller) only once validated inside the write transaction
        self.pipe = pipe  # PostgreSQL writer: its place in the pipeline
        self.prior = pipe.prior if pipe is not None else None  # built on a batch still in flight: accounts unlocked
        self.priors: list[_Prior] = []  # the prior and those it was built on, not committed when this one loaded
        self.created: set[str] = set()  # account codes missing when loaded, created here (or found made meanwhile)
        self.reqs = reqs
        self.cutoff = cutoff
        self.authoriser = authoriser
        # per-attempt decisions (a retried batch starts again from the requests as submitted)
        self.decl: list[tuple[str, str] | None] = [r.decline for r in reqs]
        self.ctr: list[tuple[str, int] | None] = [r.counter for r in reqs]
        self.snap: Any = None
        self.registry: RegistryCache | None = None  # SQLite writer: registry rows still valid from earlier batches
        self.screened: set[int] = set()
        self.prescreened = False
        self.now = datetime.now(UTC)
        self.sqlite = store.dialect.name == "sqlite"
        self.now_db = sqlite_datetime(self.now) if self.sqlite else self.now  # created_at as the driver takes it
        self.date_db: dict[date, Any] = {}  # business date -> as the driver takes it
        self.by_key: dict[str, dict[str, Any]] = {}  # txn_key -> journal row (stored or new in this batch)
        self.by_msg: dict[str, dict[str, Any]] = {}
        self.by_rrn: dict[str, dict[str, Any]] = {}
        self.tombstones: set[str] = set()
        self.made_tombstones: list[str] = []  # orig_key of reversals that found no original (here, now)
        self.orig_rrns: list[str] = []  # the originals loaded (voids, refunds, reversals) ...
        self.corrections_seen: set[str] = set()  # ... and the txn_key of every correction stored against them
        self.used_counters: set[str] = set()
        self.max_atc: dict[str, int] = {}
        self.atc_loaded: set[str] = set()  # cards whose highest stored counter was loaded (or known)
        self.consumed: dict[str, dict[str, int]] = defaultdict(lambda: {VOID: 0, REFUND: 0})
        self.transfer_accounts: dict[int, tuple[int, int]] = {}
        self.accts: dict[str, _Acct] = {}
        self.accts_by_id: dict[int, _Acct] = {}
        self.new_rows: list[dict[str, Any]] = []
        self.new_transfers: list[tuple[Any, ...]] = []
        self.status_updates: dict[int, str] = {}  # host_txns.id -> new status (originals reversed)
        self.base: dict[int, tuple[int, int]] = {}  # account id -> (debits, credits) as loaded (committed)
        self.deltas: dict[int, list[int]] | None = None  # id -> [debit fen, credit fen] added (check_invariants)

    # --- loading -------------------------------------------------------------------------------------

    def load(self) -> None:
        st = self.store
        keys = list({r.txn_key for r in self.reqs} | {r.orig_key for r in self.reqs if r.orig_key})
        msgs = list({r.msg_key for r in self.reqs})
        orrns = list({r.row.get("orig_rrn") for r in self.reqs if r.row.get("orig_rrn")})
        debit_keys = list({r.txn_key for r in self.reqs if r.txn_type in DEBIT_TYPES})
        hit: set[int] = set()
        priors = self.priors = self.prior.chain() if self.prior is not None else []
        for p in reversed(priors):  # the rows of the batches in flight before this one are duplicates here too
            self.by_key.update(p.by_key)
            self.by_msg.update(p.by_msg)
        # one round trip: duplicates, originals, reversal tombstones — one index probe per (distinct) key
        lists = [(keys, "text"), (msgs, "text"), (orrns, "text"), (debit_keys, "text")]
        for tag, rid, okey in st.select(_SQLITE_LOAD_KEYS if self.sqlite else _PG_LOAD_KEYS, lists):
            if tag == "id":
                hit.add(int(rid))
            else:
                self.tombstones.add(okey)
        if hit:  # rare: duplicates and originals — full, typed rows
            for row in st.host_rows(sorted(hit)):
                self._remember(row)
            # originals: what has been voided/refunded against them, and their transfers' accounts
            wanted = set(orrns) | {self.by_key[r.orig_key]["rrn"] for r in self.reqs
                                   if r.orig_key and r.orig_key in self.by_key}
            orig_rrns = self.orig_rrns = [rrn for rrn, row in self.by_rrn.items()
                                          if rrn in wanted and row["txn_type"] in DEBIT_TYPES]
            for rrn, typ, amount, status, key in st.select(
                    "SELECT orig_rrn, txn_type, amount_fen, status, txn_key FROM host_txns WHERE orig_rrn {IN}",
                    [(orig_rrns, "text")]):
                self.corrections_seen.add(key)
                if status == SUCCESS and typ in (VOID, REFUND):
                    self.consumed[rrn][typ] += int(amount)
            tids = list({row["transfer_id"] for row in self.by_rrn.values() if row.get("transfer_id")})
            for tid, dr, cr in st.select(
                    "SELECT id, debit_account_id, credit_account_id FROM transfers WHERE id {IN}", [(tids, "bigint")]):
                self.transfer_accounts[int(tid)] = (int(dr), int(cr))
        if not self.prescreened:
            self._screen(lambda r: dedupe.find(self.by_key, self.by_msg, r.txn_key, r.msg_key) is not None)
        # card counters: the highest spent per card (gaps; one index probe per card), then — only for
        # counters not above it (replays, late arrivals) — whether that exact counter was spent
        pairs = {c for c in self.ctr if c}
        if pairs:
            top = self.max_atc
            cards = {c for c, _ in pairs}
            self.atc_loaded = cards
            ask = list(cards)
            if self.known is not None:
                known, ask = self.known.max_atc, []
                for card in cards:
                    v = known.get(card, _UNKNOWN)
                    if v is _UNKNOWN:
                        ask.append(card)
                    elif v is not None:
                        top[card] = v
            if ask:
                for card, atc in st.max_atc(ask):
                    if atc is not None:
                        top[card] = int(atc)
            if priors:  # and their counters are spent
                self.used_counters = set().union(*(p.used for p in priors))
                for p in priors:
                    for card in cards:
                        v = p.max_atc.get(card)
                        if v is not None and v > top.get(card, -1):
                            top[card] = v
            below = [(c, a) for c, a in pairs if c in top and a <= top[c]]
            if below:
                self.used_counters.update(f"{c}:{a}" for c, a in st.used_atc(below))
        # accounts, locked in id order (PostgreSQL) so concurrent workers serialise on shared accounts
        live = [r for r, d in zip(self.reqs, self.decl, strict=True) if d is None]  # declined: no money, no accounts
        codes = {r.debit for r in live if r.debit} | {r.credit for r in live if r.credit}
        # PostgreSQL: a reversal locks its provider's payable as the purchase it undoes does, so the two serialise
        # there and the later one's recheck sees the other's row (a tombstone against a purchase: _recheck_journal)
        guards = set() if self.sqlite else {provider_payable(r.row["provider_id"]) for r in live
                                           if r.txn_type == REVERSAL and r.row.get("provider_id")}
        codes |= guards
        ids = sorted({a for pair in self.transfer_accounts.values() for a in pair})
        self._lock_accounts(codes, ids)
        # a card account the pipeline checks is never created here: missing, the balance participant declines 51
        optional = {r.debit for r in live if r.auth is not None} | guards
        missing = [code for code in codes if code not in self.accts and code not in optional]
        if missing:
            st.ensure_accounts(missing)
            self.created.update(missing)
            self._lock_accounts(set(missing), [])

    def prescreen(self) -> None:
        """The screen before the write lock is taken (SQLite: before ``BEGIN IMMEDIATE``), so another worker
        process is not kept waiting while this one verifies cryptograms; stored duplicates are found first
        (one query) and skipped. ``load`` then re-checks duplicates authoritatively inside the transaction."""
        if self.authoriser is None or not any(r.auth is not None and d is None
                                              for r, d in zip(self.reqs, self.decl, strict=True)):
            return
        keys, msgs = list({r.txn_key for r in self.reqs}), list({r.msg_key for r in self.reqs})
        stored_keys: set[str] = set()
        stored_msgs: set[str] = set()
        for k, m in self.store.select("SELECT h.txn_key, h.msg_key FROM {ROWS1} JOIN host_txns AS h "
                                      "ON h.txn_key = r1.v UNION ALL SELECT h.txn_key, h.msg_key FROM {ROWS2} "
                                      "JOIN host_txns AS h ON h.msg_key = r2.v", [(keys, "text"), (msgs, "text")]):
            stored_keys.add(k)
            stored_msgs.add(m)
        self._screen(lambda r: r.txn_key in stored_keys or r.msg_key in stored_msgs)
        self.prescreened = True

    def _screen(self, stored_dup: Callable[[TxnRequest], bool]) -> None:
        """De-duplicate, load the snapshot and run the static participants for the requests that carry ``auth``."""
        if self.authoriser is None:
            return
        todo: list[int] = []
        seen_keys: set[str] = set()
        seen_msgs: set[str] = set()
        for i, r in enumerate(self.reqs):
            dup = r.txn_key in seen_keys or r.msg_key in seen_msgs or stored_dup(r)
            seen_keys.add(r.txn_key)
            seen_msgs.add(r.msg_key)
            if r.auth is not None and self.decl[i] is None and not dup:
                todo.append(i)
        if not todo:
            return
        self.snap = self.authoriser.load(self.store.select, [self.reqs[i].auth for i in todo], self.registry)
        self.snap.batch = self
        for i in todo:
            ctx = self.reqs[i].auth
            ctx.counter = None
            decline = self.authoriser.screen(ctx, self.snap)
            if decline is not None:
                self.decl[i] = (decline[0], decline[1])
            if self.reqs[i].txn_type in DEBIT_TYPES:
                self.ctr[i] = ctx.counter  # set once the cryptogram verified, declined later or not
            self.screened.add(i)

    def _lock_accounts(self, codes: set[str], ids: list[int]) -> None:
        if self.known is not None:  # SQLite: rows unchanged since this writer's last commit need no query
            codes, ids = self._take_known(codes, ids, self.known.accts, self.known.accts_by_id, copy=False)
        if self.priors:  # accounts the batches in flight before this one change: as the newest left them
            by_code: dict[str, _Acct] = {}
            by_id: dict[int, _Acct] = {}
            for p in reversed(self.priors):
                by_code.update(p.accts)
                by_id.update(p.accts_by_id)
            codes, ids = self._take_known(codes, ids, by_code, by_id, copy=True)
        if not codes and not ids:
            return
        accts, by_id = self.accts, self.accts_by_id
        # PostgreSQL: rows locked in id order (workers never deadlock). SQLite: the batch already holds the one
        # write lock (BEGIN IMMEDIATE) — no sort, one probe per code straight from the list (a row named both
        # by code and by id comes twice: skipped below); purchases only name codes.
        if self.sqlite:
            sql = _SQLITE_ACCOUNTS_BY_CODE + (_SQLITE_ACCOUNTS_BY_ID if ids else "")
            lists = [(list(codes), "text")] + ([(ids, "bigint")] if ids else [])
        else:
            where = "code {IN1} OR id {IN2}" if ids else "code {IN1}"
            # built on a batch in flight: read now, locked (and checked) at the end — see _verify_prior
            lock = "" if self.prior is not None else "{FOR_NO_KEY_UPDATE}"
            sql = f"SELECT id, code, flags, debits_posted, credits_posted FROM accounts WHERE {where} ORDER BY id {lock}"
            lists = [(sorted(codes), "text")] + ([(ids, "bigint")] if ids else [])
        for aid, code, flags, dr, cr in self.store.select(sql, lists):
            if aid in self.base:  # already loaded (and maybe changed) in this batch
                continue
            a = _Acct(int(aid), code, int(flags), int(dr), int(cr))
            accts[code] = by_id[a.id] = a
            self.base[a.id] = (a.debits, a.credits)

    def _take_known(self, codes: set[str], ids: list[int], known: dict[str, _Acct], known_by_id: dict[int, _Acct],
                    copy: bool) -> tuple[set[str], list[int]]:
        """The accounts among ``codes``/``ids`` already known (``known``/``known_by_id``) join the batch without a
        query — ``copy``: as objects of its own (they belong to a batch still in flight) —; returns what is left."""
        accts, by_id, base = self.accts, self.accts_by_id, self.base
        rest: set[str] = set()
        rest_ids: list[int] = []
        for code in codes:
            found = known.get(code)
            if found is None:
                rest.add(code)
            elif found.id not in base:
                a = _Acct(found.id, found.code, found.flags, found.debits, found.credits) if copy else found
                accts[a.code] = by_id[a.id] = a
                base[a.id] = (a.debits, a.credits)
        for i in ids:
            found = known_by_id.get(i)
            if found is None:
                rest_ids.append(i)
            elif i not in base:
                a = _Acct(found.id, found.code, found.flags, found.debits, found.credits) if copy else found
                accts[a.code] = by_id[i] = a
                base[i] = (a.debits, a.credits)
        return rest, rest_ids

    def _remember(self, row: dict[str, Any]) -> None:
        self.by_key[row["txn_key"]] = row
        self.by_msg[row["msg_key"]] = row
        self.by_rrn[row["rrn"]] = row

    # --- applying ------------------------------------------------------------------------------------

    def apply(self) -> list[TxnOutcome | BaseException]:
        memo: dict[datetime, date] = {}
        nominal = [memo.get(r.received_at) or memo.setdefault(r.received_at, self.cutoff.business_date(r.received_at))
                   for r in self.reqs]
        effective = self.store.resolve_dates(nominal)
        n_posting = sum(1 for d in self.decl if d is None)
        ids = self.store.allocate({"rrn": len(self.reqs), "transfer_id": n_posting})
        rrns = iter(ids.get("rrn", []))
        tids = iter(ids.get("transfer_id", []))
        codes = _auth_codes(len(self.reqs))
        if self.sqlite:
            self.date_db = {d: sqlite_date(d) for d in effective.values()}
        else:
            self.date_db = {d: d for d in effective.values()}
        by_key, by_msg, by_rrn, new_rows = self.by_key, self.by_msg, self.by_rrn, self.new_rows
        bdates = [effective[d] for d in nominal]
        new_row, decide, outcome = self._new_row, self._decide, TxnOutcome
        template = {**_BLANK_ROW, "fee_fen": 0, "status": SUCCESS, "response_code": "00", "created_at": self.now}
        out: list[TxnOutcome | BaseException] = []
        for i, (req, decline, counter, bdate, auth_code) in enumerate(zip(self.reqs, self.decl, self.ctr, bdates,
                                                                          codes, strict=True)):
            txn_key, msg_key = req.txn_key, req.msg_key
            dup = dedupe.find(by_key, by_msg, txn_key, msg_key) if txn_key in by_key or msg_key in by_msg else None
            if dup is not None:
                if dup["request_hash"] != req.request_hash:
                    out.append(IdempotencyConflict(txn_key, dup))
                else:
                    out.append(TxnOutcome(dup, duplicate=True))
                continue
            row = new_row(template, req, f"{next(rrns):012d}", bdate, auth_code)
            if decline is None and req.auth is not None and self.authoriser is not None:
                if i not in self.screened:  # cannot happen: a non-duplicate with ``auth`` is always screened
                    decline = ("96", "not authorised")
                else:
                    d = self.authoriser.settle(req.auth, self.snap)
                    decline = None if d is None else (d[0], d[1])
                    if req.txn_type in DEBIT_TYPES:
                        counter = req.auth.counter
            if decline is None:
                decide(req, row, tids, counter)
            else:
                row["response_code"], row["message"] = decline
                if counter and row["response_code"] != "59":  # the card's TAC verified: its counter is spent
                    self._counter_ok(counter, row)
                    row["response_code"], row["message"] = decline
            if row["response_code"] != "00":
                row["status"] = row["status"] if row["status"] == REVERSED else FAILED
                row["auth_code"] = None
                if req.txn_type == ADVICE and row["status"] == FAILED:
                    row["review_reason"] = row["review_reason"] or f"advice_declined_{row['response_code']}"
            by_key[txn_key] = by_msg[msg_key] = by_rrn[row["rrn"]] = row  # _remember
            new_rows.append(row)
            out.append(outcome(row))
        return out

    @staticmethod
    def _new_row(template: dict[str, Any], req: TxnRequest, rrn: str, bdate: date, auth_code: str) -> dict[str, Any]:
        """The journal row: ``template`` (every column, with the batch's constants: no fee, ``SUCCESS``, ``00``,
        created now) overlaid with the request's fields, then those the writer sets."""
        r = req.row
        row = {**template, **r, "rrn": rrn, "txn_key": req.txn_key, "msg_key": req.msg_key,
               "request_hash": req.request_hash, "business_date": bdate, "txn_type": req.txn_type,
               "orig_key": req.orig_key, "auth_code": auth_code, "message": r.get("message") or "",
               "review_reason": req.review_reason}
        if not _ROW_CONSTANTS.isdisjoint(r):  # the request's row never sets these: the batch's values win, as before
            row.update((k, template[k]) for k in _ROW_CONSTANTS)
        return row

    def _counter_ok(self, counter: tuple[str, int] | None, row: dict[str, Any]) -> bool:
        if not counter:
            return True
        card_no, atc = counter
        key = f"{card_no}:{atc}"
        if key in self.used_counters:
            row["response_code"], row["message"] = "59", "card counter replayed"
            return False
        last = self.max_atc.get(card_no)
        gap = 0 if last is None or atc <= last else atc - last - 1
        self.used_counters.add(key)
        self.max_atc[card_no] = atc if last is None else max(last, atc)
        row["atc"], row["atc_gap"] = atc, gap
        return True

    def _decide(self, req: TxnRequest, row: dict[str, Any], tids: Iterator[int],
                counter: tuple[str, int] | None) -> None:
        code = _DEBIT_CODE.get(req.txn_type)
        if code is not None:  # PURCHASE, ADVICE
            if counter and not self._counter_ok(counter, row):
                return
            if req.txn_key in self.tombstones:
                row["status"], row["response_code"], row["message"] = REVERSED, "12", "reversed before it arrived"
                return
            assert req.debit and req.credit
            self._post(row, self.accts[req.debit], self.accts[req.credit], code, None, tids)
            return
        if req.txn_type == REVERSAL:
            self._reversal(req, row, tids)
            return
        self._void_or_refund(req, row, tids)

    def _post(self, row: dict[str, Any], debit: _Acct, credit: _Acct, code: str, corrects: int | None,
              tids: Iterator[int]) -> bool:
        """Move ``amount_fen`` in memory (the balance ``UPDATE`` per account is derived at write time from
        the accounts' values against those loaded: :meth:`check_invariants`)."""
        amount = int(row["amount_fen"])
        if debit.flags & FLAG_NO_OVERDRAFT and debit.credits - debit.debits < amount:
            row["response_code"], row["message"] = "51", "insufficient balance"
            row["balance_after_fen"] = debit.credits - debit.debits
            return False
        tid = next(tids)
        debit.debits += amount
        credit.credits += amount
        self.new_transfers.append((  # TRANSFER_COLUMNS, in the driver's types
            tid, f"{code}:{row['txn_key']}", debit.id, credit.id, amount, code, self.date_db[row["business_date"]],
            self.now_db, row["terminal_id"], row["batch_no"], row["trace_no"], row["rrn"], corrects, None,
        ))
        self.transfer_accounts[tid] = (debit.id, credit.id)
        row["transfer_id"] = tid
        card = debit if debit.code.startswith("card:") else credit
        row["balance_after_fen"] = card.credits - card.debits
        return True

    def _original_accounts(self, orig: dict[str, Any]) -> tuple[_Acct, _Acct] | None:
        pair = self.transfer_accounts.get(orig.get("transfer_id") or -1)
        if pair is None:
            return None
        card, provider = self.accts_by_id.get(pair[0]), self.accts_by_id.get(pair[1])
        return None if card is None or provider is None else (card, provider)

    def _reversal(self, req: TxnRequest, row: dict[str, Any], tids: Iterator[int]) -> None:
        assert req.orig_key
        orig = self.by_key.get(req.orig_key)
        if orig is None:
            self.tombstones.add(req.orig_key)
            self.made_tombstones.append(req.orig_key)
            row["message"] = "original not received; a late original will not be posted"
            return
        row["orig_rrn"] = orig["rrn"]
        row["program"] = row.get("program") or orig.get("program")
        if orig["card_no"] != row["card_no"]:
            row["response_code"], row["message"] = "12", "card differs from the original"
            return
        if orig["status"] == REVERSED or orig["status"] == FAILED:
            row["message"] = "original already reversed" if orig["status"] == REVERSED else "original was declined"
            return
        if int(orig["amount_fen"]) != int(row["amount_fen"]):
            row["response_code"], row["message"] = "13", "amount differs from the original"
            return
        used = self.consumed[orig["rrn"]]
        if used[VOID] or used[REFUND]:
            row["response_code"], row["message"] = "12", "original already voided or refunded"
            return
        pair = self._original_accounts(orig)
        if pair is None:
            row["response_code"], row["message"] = "96", "original transfer not found"
            return
        card, provider = pair
        if self._post(row, provider, card, "reversal", orig["transfer_id"], tids):
            orig["status"] = REVERSED
            if orig.get("id") is not None:
                self.status_updates[orig["id"]] = REVERSED

    def _void_or_refund(self, req: TxnRequest, row: dict[str, Any], tids: Iterator[int]) -> None:
        orig = self.by_rrn.get(row.get("orig_rrn") or "")
        if orig is None or orig["txn_type"] not in DEBIT_TYPES:
            row["response_code"], row["message"] = "25", "original not found"
            return
        if orig["status"] != SUCCESS:
            row["response_code"], row["message"] = "12", f"original is {orig['status'].lower()}"
            return
        if orig["card_no"] != row["card_no"] or orig["provider_id"] != row["provider_id"]:
            row["response_code"], row["message"] = "12", "card or provider differs from the original"
            return
        used = self.consumed[orig["rrn"]]
        amount, orig_amount = int(row["amount_fen"]), int(orig["amount_fen"])
        if req.txn_type == VOID:
            if orig["terminal_id"] != row["terminal_id"] or orig["batch_no"] != row["batch_no"]:
                row["response_code"], row["message"] = "12", "void must be in the batch of the original"
                return
            if orig["business_date"] != row["business_date"]:
                row["response_code"], row["message"] = "12", "void must be on the business day of the original"
                return
            if used[VOID] or used[REFUND]:
                row["response_code"], row["message"] = "12", "original already voided or refunded"
                return
            if amount != orig_amount:
                row["response_code"], row["message"] = "13", "void must be for the full amount"
                return
        else:
            if used[VOID]:
                row["response_code"], row["message"] = "12", "original already voided"
                return
            if used[REFUND] + amount > orig_amount:
                row["response_code"], row["message"] = "13", (
                    f"refunds would exceed the original ({used[REFUND] + amount} > {orig_amount} fen)")
                return
        pair = self._original_accounts(orig)
        if pair is None:
            row["response_code"], row["message"] = "96", "original transfer not found"
            return
        card, provider = pair
        row["program"] = row.get("program") or orig.get("program")
        if self._post(row, provider, card, req.txn_type.lower(), orig["transfer_id"], tids):
            used[req.txn_type] += amount

    # --- writing -------------------------------------------------------------------------------------

    def check_invariants(self) -> None:
        """The balance changes to write (each touched account's values against those loaded) and the batch
        invariants: Σ debits = Σ credits = Σ of the new transfers; no beneficiary account below zero."""
        deltas: dict[int, list[int]] = {}
        base = self.base
        for a in self.accts_by_id.values():
            d0, c0 = base[a.id]
            if a.debits != d0 or a.credits != c0:
                deltas[a.id] = [a.debits - d0, a.credits - c0]
                if a.flags & FLAG_NO_OVERDRAFT and a.credits < a.debits:
                    raise InvariantViolation(f"beneficiary account {a.id} would be negative")
        self.deltas = deltas
        debit_total = sum(d[0] for d in deltas.values())
        credit_total = sum(d[1] for d in deltas.values())
        moved = sum(t[4] for t in self.new_transfers)
        if not debit_total == credit_total == moved:
            raise InvariantViolation(f"batch debits {debit_total} != credits {credit_total} (transfers {moved})")

    def write(self) -> None:
        if self.deltas is None:  # the balance changes come out of the invariant check: never one without it
            self.check_invariants()
        assert self.deltas is not None
        if not self.sqlite and self.prior is None:  # the locks were taken at load (a pipelined batch: at its end)
            self._recheck_journal()
        bw = BulkWrite(self.store.dialect)
        bw.insert(transfers, TRANSFER_COLUMNS, self.new_transfers, converted=True)
        if self.pipe is None:
            bw.balance_deltas(self.deltas)
        pick = operator.itemgetter(*HOST_PLAIN_COLUMNS)
        dates, now_db = self.date_db, self.now_db
        if self.sqlite:  # txn_time: usually a handful of distinct values per batch
            times: dict[datetime, Any] = {}
            for r in self.new_rows:
                t = r["txn_time"]
                if t not in times:
                    times[t] = sqlite_datetime(t)
        else:
            times = {r["txn_time"]: r["txn_time"] for r in self.new_rows}
        bw.insert(host_txns, HOST_COLUMNS, [(*pick(r), dates[r["business_date"]], times[r["txn_time"]], now_db)
                                            for r in self.new_rows], converted=True)
        if self.pipe is None:
            self.store.bulk(bw)
        else:  # the PostgreSQL writer's pipeline: rows after those of the batch before, balances once it committed
            prior = self.prior
            if prior is not None:
                await_(prior.inserted.wait())
            self.store.bulk(bw)
            self.pipe.inserted()
            if prior is not None:
                await_(prior.wait_committed())
                self._verify_prior()
                self._recheck_journal()  # now that its locks are held
            balances = BulkWrite(self.store.dialect)
            balances.balance_deltas(self.deltas)
            self.store.bulk(balances)
        if self.status_updates:
            self.store.set_status(sorted(self.status_updates.items()))

    def _verify_prior(self) -> None:
        """A batch built on the one before it, now that one committed: lock every account it read (id order, as a
        plain batch does at load) and check that each beneficiary account is as the batch assumed — the balance
        its decisions rest on. Accounts without that rule (provider payables, funds) take their changes as
        deltas and need no check. Anything else moved it (another worker, a card replaced): :class:`PipelineConflict`."""
        ids = sorted(self.accts_by_id)
        rows = self.store.select("SELECT id, debits_posted, credits_posted FROM accounts WHERE id {IN1} "
                                 "ORDER BY id {FOR_NO_KEY_UPDATE}", [(ids, "bigint")])
        if len(rows) != len(ids):
            raise PipelineConflict("an account the batch read is gone")
        base, by_id = self.base, self.accts_by_id
        for aid, dr, cr in rows:
            if by_id[aid].flags & FLAG_NO_OVERDRAFT and base[aid] != (dr, cr):
                raise PipelineConflict(f"account {aid} moved since the batch read it")

    def _recheck_journal(self) -> None:
        """PostgreSQL, the batch's account locks held: the journal rows its decisions rest on are still as it read
        them. Its reads came before its locks (READ COMMITTED), so another worker may have committed since —
        a reversal of a purchase this batch posts (the terminal was told "reversed", the purchase would stand), the
        original of a reversal this batch takes as a tombstone, another correction of an original it corrects.
        Each of those holds a lock this batch now holds too (the card's or the provider's account), so it either
        committed before this check, and is seen here, or waits for this batch's commit and sees it in its own
        check. Seen: :class:`JournalRaced` — the batch is rolled back and run again on what committed.
        SQLite needs none of it: its batch reads inside the one write lock."""
        posted = [r["txn_key"] for r in self.new_rows if r["txn_type"] in DEBIT_TYPES and r.get("transfer_id")]
        if not (posted or self.made_tombstones or self.orig_rrns):
            return
        found = self.store.select(_PG_RECHECK, [(posted, "text"), (self.made_tombstones, "text"),
                                                (self.orig_rrns, "text")])
        if not found:
            return
        mine = {r["txn_key"] for r in self.new_rows}  # its own rows (a pipelined batch checks after writing them)
        for kind, key in found:
            if key in mine or (kind == "c" and key in self.corrections_seen):
                continue
            raise JournalRaced({"r": "a reversal of a purchase in the batch", "t": "the original of a tombstone",
                                "c": "a correction of an original"}[kind] + " committed meanwhile")


class _SaStore:
    """The batch's database access through a SQLAlchemy connection (PostgreSQL, or any backend)."""

    def __init__(self, conn: Connection):
        self.conn = conn
        self.dialect = conn.dialect
        self.pg = conn.dialect.name == "postgresql" and hasattr(conn.connection.driver_connection, "fetch")
        self._driver: Any = None

    def _fetch(self, sql: str, params: tuple[Any, ...] | list[Any]) -> list[Any]:
        """PostgreSQL: the query on asyncpg itself, inside the adapter's transaction — its rows as asyncpg
        records (no SQLAlchemy result processing per row: the writer reads thousands a batch), the statement
        prepared once per connection (asyncpg's statement cache)."""
        if self._driver is None:
            adapter = self.conn.connection.dbapi_connection
            if getattr(adapter, "_transaction", None) is None:  # the adapter BEGINs lazily: begin it first
                if hasattr(adapter, "_start_transaction"):
                    await_(adapter._start_transaction())  # the BEGIN alone (no extra statement)
                else:
                    self.conn.exec_driver_sql("SELECT 1")  # as BulkWrite.run does
            self._driver = self.conn.connection.driver_connection
        return await_(self._driver.fetch(sql, *params))

    def select(self, sql: str, lists: list[tuple[Any, str]]) -> list[tuple[Any, ...]]:
        if not any(values for values, _ in lists):
            return []
        if self.pg:
            return self._fetch(*render_in(sql, lists, False))
        return select_multi_in_sync(self.conn, sql, lists)

    def max_atc(self, cards: list[str]) -> list[tuple[Any, ...]]:
        if self.pg:
            return self._fetch(_PG_MAX_ATC, (cards,))
        return [tuple(r) for r in self.conn.exec_driver_sql(_PG_MAX_ATC if self.dialect.name == "postgresql"
                                                            else _SQLITE_MAX_ATC, _atc_params(self.dialect, cards))]

    def used_atc(self, pairs: list[tuple[str, int]]) -> list[tuple[Any, ...]]:
        sql, params = _used_atc_query(self.dialect.name == "postgresql", pairs)
        if self.pg:
            return self._fetch(sql, params)
        return [tuple(r) for r in self.conn.exec_driver_sql(sql, params)]

    def host_rows(self, ids: list[int]) -> list[dict[str, Any]]:
        out = []
        for chunk in _chunks(ids):
            out += [dict(r._mapping) for r in self.conn.execute(select(host_txns).where(host_txns.c.id.in_(chunk)))]
        return out

    def resolve_dates(self, nominal: list[date]) -> dict[date, date]:
        if self.pg:  # the usual case in one asyncpg round trip: every window there and open (held FOR SHARE)
            wanted = sorted(set(nominal))
            status = dict(self._fetch("SELECT business_date, status FROM settlement_windows "
                                      "WHERE business_date = ANY($1::date[]) FOR SHARE", (wanted,)))
            if len(status) == len(wanted) and all(v == WINDOW_OPEN for v in status.values()):
                return {d: d for d in wanted}
        return resolve_business_dates_sync(self.conn, nominal)

    def allocate(self, wanted: dict[str, int]) -> dict[str, list[int]]:
        if self.pg and set(wanted) <= set(_PG_SEQUENCES):  # one row of arrays, not one row per value
            names = [k for k, n in wanted.items() if n > 0]
            if not names:
                return {}
            sql = "SELECT " + ", ".join(f"array(SELECT nextval('{_PG_SEQUENCES[k]}') FROM generate_series(1, ${i}))"
                                        for i, k in enumerate(names, start=1))
            row = self._fetch(sql, [int(wanted[k]) for k in names])[0]
            return {k: list(row[i]) for i, k in enumerate(names)}
        return allocate_many_sync(self.conn, wanted)

    def ensure_accounts(self, codes: list[str]) -> None:
        ensure_accounts_sync(self.conn, codes)

    def bulk(self, bw: BulkWrite) -> None:
        bw.run(self.conn)

    def set_status(self, updates: list[tuple[int, str]]) -> None:
        stmt = update(host_txns).where(host_txns.c.id == bindparam("_id")).values(status=bindparam("_status"))
        self.conn.execute(stmt, [{"_id": k, "_status": v} for k, v in updates])


_HOST_ALL = [c.name for c in host_txns.columns]
_PG_SEQUENCES = {"rrn": "rrn_seq", "transfer_id": "transfer_id_seq"}

# The batch's keyed reads as joins from the key lists (``{ROWSn}``: one index probe per key, see render_in).
_SQLITE_LOAD_KEYS = ("SELECT 'id', h.id, NULL FROM {ROWS1} JOIN host_txns AS h ON h.txn_key = r1.v "
              "UNION ALL SELECT 'id', h.id, NULL FROM {ROWS2} JOIN host_txns AS h ON h.msg_key = r2.v "
              "UNION ALL SELECT 'id', h.id, NULL FROM {ROWS3} JOIN host_txns AS h ON h.rrn = r3.v "
              "UNION ALL SELECT 'tomb', NULL, h.orig_key FROM {ROWS4} JOIN host_txns AS h ON h.orig_key = r4.v "
              "WHERE h.txn_type = 'REVERSAL'")
# PostgreSQL: ``= ANY(array)`` index scans (its planner may hash-join an ``unnest`` against the whole table)
_PG_LOAD_KEYS = ("SELECT 'id', id, NULL FROM host_txns WHERE txn_key {IN1} "
                 "UNION ALL SELECT 'id', id, NULL FROM host_txns WHERE msg_key {IN2} "
                 "UNION ALL SELECT 'id', id, NULL FROM host_txns WHERE rrn {IN3} "
                 "UNION ALL SELECT 'tomb', NULL, orig_key FROM host_txns WHERE orig_key {IN4} AND txn_type = 'REVERSAL'")
# _Batch._recheck_journal: what another worker may have committed since the batch read the journal
_PG_RECHECK = ("SELECT 'r', txn_key FROM host_txns WHERE orig_key {IN1} AND txn_type = 'REVERSAL' "
               "UNION ALL SELECT 't', txn_key FROM host_txns WHERE txn_key {IN2} "
               "UNION ALL SELECT 'c', txn_key FROM host_txns WHERE orig_rrn {IN3}")
_SQLITE_ACCOUNTS_BY_CODE = ("SELECT a.id, a.code, a.flags, a.debits_posted, a.credits_posted FROM {ROWS1} "
                            "JOIN accounts AS a ON a.code = r1.v")
_SQLITE_ACCOUNTS_BY_ID = (" UNION ALL SELECT a.id, a.code, a.flags, a.debits_posted, a.credits_posted FROM {ROWS2} "
                          "JOIN accounts AS a ON a.id = r2.v")

# The highest counter spent per card: a correlated max() is one index probe per card (uq_host_txns_card_atc).
_SQLITE_MAX_ATC = ("SELECT j.value, (SELECT max(h.atc) FROM host_txns AS h WHERE h.card_no = j.value "
                   "AND h.atc IS NOT NULL) FROM json_each(?) AS j")
_PG_MAX_ATC = ("SELECT j.c, (SELECT max(h.atc) FROM host_txns AS h WHERE h.card_no = j.c AND h.atc IS NOT NULL) "
               "FROM unnest($1::text[]) AS j(c)")


def _atc_params(dialect: Any, cards: list[str]) -> tuple[Any, ...]:
    return (cards,) if dialect.name == "postgresql" else (json.dumps(cards),)


def _used_atc_query(pg: bool, pairs: list[tuple[str, int]]) -> tuple[str, tuple[Any, ...]]:
    """Which of the (card, counter) pairs a journal row has spent: one probe each."""
    if pg:
        return ("SELECT h.card_no, h.atc FROM unnest($1::text[], $2::int[]) AS j(c, a) JOIN host_txns AS h "
                "ON h.card_no = j.c AND h.atc = j.a WHERE h.atc IS NOT NULL",
                ([c for c, _ in pairs], [a for _, a in pairs]))
    return ("SELECT h.card_no, h.atc FROM json_each(?) AS j CROSS JOIN host_txns AS h "
            "ON h.card_no = j.value ->> 0 AND h.atc = j.value ->> 1 WHERE h.atc IS NOT NULL",
            (json.dumps(pairs),))


def _sqlite_dt(v: Any) -> Any:
    if v is None or isinstance(v, datetime):
        return v
    return datetime.fromisoformat(v).replace(tzinfo=UTC)


class _RawSqliteStore:
    """The same access on the raw ``sqlite3`` connection, run wholly inside the aiosqlite thread: one hop
    per batch instead of one per statement (the writer's SQLite hot path)."""

    def __init__(self, raw: Any, dialect: Any):
        self.raw = raw
        self.dialect = dialect

    def select(self, sql: str, lists: list[tuple[Any, str]]) -> list[tuple[Any, ...]]:
        if not any(values for values, _ in lists):
            return []
        q, params = render_in(sql, lists, True)
        return self.raw.execute(q, params).fetchall()

    def max_atc(self, cards: list[str]) -> list[tuple[Any, ...]]:
        return self.raw.execute(_SQLITE_MAX_ATC, (json.dumps(cards),)).fetchall()

    def used_atc(self, pairs: list[tuple[str, int]]) -> list[tuple[Any, ...]]:
        return self.raw.execute(*_used_atc_query(False, pairs)).fetchall()

    def host_rows(self, ids: list[int]) -> list[dict[str, Any]]:
        q, params = render_in(f"SELECT {', '.join(_HOST_ALL)} FROM host_txns WHERE id {{IN}}", [(ids, "bigint")], True)
        out = []
        for values in self.raw.execute(q, params).fetchall():
            row = dict(zip(_HOST_ALL, values, strict=True))
            row["business_date"] = date.fromisoformat(row["business_date"])
            row["txn_time"] = _sqlite_dt(row["txn_time"])
            row["created_at"] = _sqlite_dt(row["created_at"])
            out.append(row)
        return out

    def resolve_dates(self, nominal: list[date]) -> dict[date, date]:
        result: dict[date, date] = {}
        pending = {d: d for d in set(nominal)}
        for _ in range(MAX_CLOSED_DAYS_SKIPPED):
            if not pending:
                return result
            probe = sorted({d.isoformat() for d in pending.values()})
            q, params = render_in("SELECT business_date, status FROM settlement_windows WHERE business_date {IN}",
                                  [(probe, "text")], True)
            status = dict(self.raw.execute(q, params).fetchall())
            missing = [d for d in probe if d not in status]
            if missing:
                self.raw.executemany("INSERT INTO settlement_windows (business_date, status) VALUES (?, 'open') "
                                     "ON CONFLICT (business_date) DO NOTHING", [(d,) for d in missing])
                status.update(dict(self.raw.execute(q, params).fetchall()))
            nxt = {}
            for orig, cand in pending.items():
                if status.get(cand.isoformat(), "open") == "open":
                    result[orig] = cand
                else:
                    nxt[orig] = cand + timedelta(days=1)
            pending = nxt
        raise LedgerError("no open settlement window within a year")

    def allocate(self, wanted: dict[str, int]) -> dict[str, list[int]]:
        wanted = {k: n for k, n in wanted.items() if n > 0}
        return _sqlite_allocate(wanted, lambda q: self.raw.execute(q).fetchall()) if wanted else {}

    def ensure_accounts(self, codes: list[str]) -> None:
        now = sqlite_datetime(datetime.now(UTC))
        specs = [spec_for(c) for c in sorted(set(codes))]
        self.raw.executemany("INSERT INTO accounts (code, kind, program, owner, flags, debits_posted, credits_posted, "
                             "created_at) VALUES (?, ?, ?, ?, ?, 0, 0, ?) ON CONFLICT (code) DO NOTHING",
                             [(sp.code, sp.kind, sp.program, sp.owner, sp.flags, now) for sp in specs])

    def bulk(self, bw: BulkWrite) -> None:
        _sqlite_run(self.raw, bw.statements)

    def set_status(self, updates: list[tuple[int, str]]) -> None:
        self.raw.executemany("UPDATE host_txns SET status = ? WHERE id = ?", [(v, k) for k, v in updates])


def _run_raw_sqlite(raw: Any, dialect: Any, reqs: list[TxnRequest], cutoff: Cutoff,
                    authoriser: Authoriser | None = None,
                    known: _KnownState | None = None) -> list[TxnOutcome | BaseException]:
    """One whole batch in the aiosqlite thread: BEGIN IMMEDIATE … COMMIT on the raw connection.

    ``known``: the writer's :class:`_KnownState` (accounts and card counters from its previous batches),
    used only when it proves still valid inside the write transaction; a failed batch drops it."""
    batch = _Batch(_RawSqliteStore(raw, dialect), reqs, cutoff, authoriser)
    if known is not None:
        batch.registry = known.registry_for(raw)
    batch.prescreen()  # autocommit reads: registry snapshot and cryptograms before the write lock
    try:
        raw.execute("BEGIN IMMEDIATE")
        if known is not None:
            batch.known = known.check(raw)
        out = _finish_batch(batch)
        raw.execute("COMMIT")
    except BaseException:
        if known is not None:
            known.drop()
        if raw.in_transaction:
            raw.execute("ROLLBACK")
        raise
    if known is not None:
        known.keep(raw, batch)
    return out


def _finish_batch(batch: _Batch) -> list[TxnOutcome | BaseException]:
    batch.load()
    out = batch.apply()
    batch.check_invariants()
    if batch.pipe is not None:
        batch.pipe.publish(batch)
    batch.write()
    return out


def run_batch_sync(conn: Connection, reqs: list[TxnRequest], cutoff: Cutoff, authoriser: Authoriser | None = None,
                   pipe: _Pipe | None = None) -> list[TxnOutcome | BaseException]:
    """Authorise, apply and write one batch inside the caller's write transaction (the writer's unit of work)."""
    return _finish_batch(_Batch(_SaStore(conn), reqs, cutoff, authoriser, pipe=pipe))


class GroupCommitWriter:
    """One writer task per process: queue, batch, post, resolve each request's future."""

    def __init__(self, engine: AsyncEngine, cutoff: Cutoff | None = None, *,
                 window_ms: float = GROUP_COMMIT_WINDOW_MS, max_batch: int = GROUP_COMMIT_MAX_BATCH,
                 authoriser: Authoriser | None = None, pipeline: bool | None = None):
        self.engine = engine
        # PostgreSQL: the next purchase batch is prepared while the one before it commits (see _run_pipelined)
        self.pipeline = (PG_PIPELINE if pipeline is None else pipeline) and engine.dialect.name == "postgresql"
        self._flights: set[asyncio.Task[None]] = set()
        self._last_flight: _Flight | None = None  # the newest batch of the pipeline (tests wait on its steps)
        self.authoriser = authoriser
        self.cutoff = cutoff or Cutoff()
        self.window_s = window_ms / 1000.0
        self.max_batch = max_batch
        self.stats = WriterStats()
        # the queue: a deque and two events (asyncio.Queue's per-item bookkeeping costs more than the batch does)
        self._pending: deque[TxnRequest] = deque()
        self._arrived = asyncio.Event()  # set when a request was queued since the writer last looked
        self._unanswered = 0  # queued or in a batch, future not yet resolved
        self._drained = asyncio.Event()  # set while nothing is unanswered (stop() waits for it)
        self._drained.set()
        self._task: asyncio.Task[None] | None = None
        self._ahead_ok = engine.dialect.name == "sqlite" and RAW_SQLITE_BATCH
        self._handed = asyncio.Event()  # set once the batch being started ahead reached the database
        self._known = _KnownState()  # SQLite: accounts and card counters as of this writer's last commit
        self._checkpointer: WalCheckpointer | None = None  # SQLite file: see clearing.db.WalCheckpointer
        # asyncpg's errors only on PostgreSQL: on SQLite its import (~0.3 s) would land in the first batch
        self._retryable = _retryable_errors(engine.dialect.name == "postgresql")
        self._conn: tuple[AsyncConnection, Any] | None = None  # SQLite: see _sqlite_connection

    async def start(self) -> None:
        if self._task is None:
            run = self._run_pipelined() if self.pipeline else self._run()
            self._task = asyncio.create_task(run, name="carepay-group-commit")

    async def stop(self) -> None:
        """Finish what is queued, then stop."""
        if self._task is None:
            return
        await self._drained.wait()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        self._task = None
        if self._flights:  # answered already (drained): let them finish their last steps
            await asyncio.gather(*self._flights, return_exceptions=True)
        await self._release()
        if self._checkpointer is not None:
            await asyncio.to_thread(self._checkpointer.stop)
            self._checkpointer = None

    async def __aenter__(self) -> GroupCommitWriter:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def submit(self, req: TxnRequest) -> TxnOutcome:
        """Queue one request and wait for its batch to commit. Raises :class:`IdempotencyConflict`."""
        if self._task is None:
            raise LedgerError("the ledger writer is not started")
        fut = req.future = asyncio.get_running_loop().create_future()
        self._pending.append(req)
        if self._unanswered == 0:
            self._drained.clear()
        self._unanswered += 1
        self._arrived.set()
        return await fut

    async def _collect(self) -> list[TxnRequest]:
        """The next batch: what is queued, and what each further event-loop turn brings — until a turn brings
        nothing, the batch is full, or the window since its first request is over. No timed wait: what queues
        while a batch is written makes the next one (natural batching), so a lone request is written at once
        and the batches of a busy writer grow with the load; submitters already runnable (a read of many
        messages) still join the batch being gathered."""
        pending, arrived = self._pending, self._arrived
        while not pending:
            arrived.clear()
            await arrived.wait()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.window_s
        batch: list[TxnRequest] = []
        while True:
            take = min(self.max_batch - len(batch), len(pending))
            batch.extend([pending.popleft() for _ in range(take)])
            if len(batch) >= self.max_batch or loop.time() >= deadline:
                break
            arrived.clear()
            await asyncio.sleep(0)
            if not arrived.is_set():
                break
        return batch

    async def _run(self) -> None:
        ahead: tuple[list[TxnRequest], asyncio.Task[list[TxnOutcome | BaseException]]] | None = None
        done: tuple[list[TxnRequest], list[TxnOutcome | BaseException]] | None = None  # results not yet answered
        try:
            while True:
                if ahead is None:
                    batch = await self._collect()
                    results = await self._write_all(batch)
                else:
                    (batch, task), ahead = ahead, None
                    results = await task
                done = (batch, results)
                if self._ahead_ok and len(self._pending) >= self.max_batch:
                    # SQLite: a full batch already waits (collecting would not wait either): hand it to the
                    # database thread first, then answer this one while it runs — the thread is not left idle
                    # meanwhile. Batches still post one after the other: the next starts once this one committed.
                    # (Not on PostgreSQL: there the batch runs on this event loop too; measured slower.)
                    nxt = [self._pending.popleft() for _ in range(self.max_batch)]
                    self._handed.clear()
                    ahead = (nxt, asyncio.create_task(self._write_all(nxt)))
                    await self._handed.wait()  # it reached the database (or ended): now the answers
                done = None
                self._answer(batch, results)
        finally:
            if done is not None:  # cancelled while handing the next batch over: still answer this one
                self._answer(*done)
            if ahead is not None:  # cancelled with a batch in flight: it still completes and answers
                ahead[1].add_done_callback(lambda t, b=ahead[0]: self._answer(
                    b, t.result() if not t.cancelled() else [LedgerError("ledger writer stopped")] * len(b)))

    async def _run_pipelined(self) -> None:
        """PostgreSQL: a batch starts as soon as the one before it has applied — while that one still writes
        and commits — building on its results (:class:`_Prior`): the client prepares the next batch while the
        server works on this one. The next batch's rows are written once this one's are, its balances are
        locked and checked only once this one committed (:meth:`_Batch._verify_prior`); when its assumptions
        fail it is rolled back and run again plainly. Batches holding voids, refunds or reversals run plainly
        (after the batch before has ended)."""
        before: _Flight | None = None
        while True:
            if before is not None:
                await before.applied.wait()
            flight = self._last_flight = _Flight(await self._collect(), before)
            task = asyncio.create_task(self._fly(flight), name="carepay-group-commit-batch")
            self._flights.add(task)
            task.add_done_callback(self._flights.discard)
            before = flight

    async def _fly(self, flight: _Flight) -> None:
        try:
            results = await self._write_all(flight.reqs, flight)
        finally:
            flight.applied.set()
            flight.ended.set()
            flight.before = None  # ended after the batch before it: drop the link (no chain of past batches)
        self._answer(flight.reqs, results)

    async def _write_all(self, batch: list[TxnRequest], flight: _Flight | None = None) -> list[TxnOutcome | BaseException]:
        """The batch's results; a failure after retries becomes every request's :class:`LedgerError`."""
        try:
            return await self._write(batch, flight)
        except Exception as exc:  # every request of the batch learns of the failure
            log.exception("ledger batch of %d failed: %s", len(batch), type(exc).__name__)
            return [LedgerError(f"ledger batch failed: {type(exc).__name__}")] * len(batch)
        finally:
            self._handed.set()

    def _answer(self, batch: list[TxnRequest], results: list[TxnOutcome | BaseException]) -> None:
        for req, res in zip(batch, results, strict=True):
            fut = req.future
            if fut is not None and not fut.done():
                if isinstance(res, BaseException):
                    fut.set_exception(res)
                else:
                    fut.set_result(res)
        self._unanswered -= len(batch)
        if self._unanswered == 0:
            self._drained.set()

    async def _sqlite_connection(self) -> tuple[AsyncConnection, Any] | None:
        """SQLite: the writer's own pooled connection and its aiosqlite driver, kept from batch to batch (no
        checkout, reset and thread hop per batch; what :class:`_KnownState` knows belongs to it) until a batch
        fails or the writer stops; ``None`` when the driver cannot run a whole batch in its thread."""
        if self._conn is None:
            conn = await self.engine.connect()
            driver = (await conn.get_raw_connection()).driver_connection
            if not (hasattr(driver, "_execute") and hasattr(driver, "_conn")):
                await conn.close()
                return None
            self._conn = (conn, driver)
            path = self.engine.url.database
            if path and path != ":memory:" and not path.startswith("file:"):
                await driver._execute(driver._conn.execute, f"PRAGMA wal_autocheckpoint={WRITER_AUTOCHECKPOINT_PAGES}")
                if self._checkpointer is None:  # copies the WAL back beside the writer, not in its COMMITs
                    self._checkpointer = WalCheckpointer(path)
                    self._checkpointer.start()
        return self._conn

    async def _release(self) -> None:
        held, self._conn = self._conn, None
        self._known.drop()
        if held is not None:
            with contextlib.suppress(Exception):
                await held[0].close()

    async def _write_once(self, batch: list[TxnRequest]) -> list[TxnOutcome | BaseException]:
        if self.engine.dialect.name == "sqlite" and RAW_SQLITE_BATCH:
            held = await self._sqlite_connection()
            if held is not None:
                conn, driver = held
                self._handed.set()  # the call below queues the batch on the connection's thread at once
                try:
                    return await driver._execute(_run_raw_sqlite, driver._conn, conn.dialect, batch, self.cutoff,
                                                 self.authoriser, self._known)
                except Exception:
                    await self._release()  # the next attempt starts on a fresh connection
                    raise
        async with write_transaction(self.engine) as conn:
            self._handed.set()  # run_sync sends the batch's first statement before it first waits
            return await conn.run_sync(run_batch_sync, batch, self.cutoff, self.authoriser)

    async def _write_flight(self, flight: _Flight, attempt: int) -> list[TxnOutcome | BaseException]:
        """One attempt of a pipelined batch (PostgreSQL): built on the batch before while that one is in flight
        (first attempt only), else plainly once that one has ended."""
        prior = flight.builds_on() if attempt == 0 else None
        if prior is None and flight.before is not None:
            await flight.before.ended.wait()
        pipe = _Pipe(flight, prior, asyncio.get_running_loop())
        committed = False
        try:
            async with write_transaction(self.engine) as conn:
                results = await conn.run_sync(run_batch_sync, flight.reqs, self.cutoff, self.authoriser, pipe)
            committed = True
        finally:
            pipe.end(committed)
        if prior is not None:
            self.stats.pipelined += 1
        return results

    async def _write(self, batch: list[TxnRequest], flight: _Flight | None = None) -> list[TxnOutcome | BaseException]:
        retryable = self._retryable
        for attempt in range(BATCH_RETRIES):
            t0 = _time.perf_counter()
            try:
                if flight is not None:
                    results = await self._write_flight(flight, attempt)
                else:
                    results = await self._write_once(batch)
            except PipelineConflict as exc:  # built on assumptions that did not hold: again, plainly
                self.stats.redone += 1
                metrics.PIPELINE_REDONE.inc()
                log.info("pipelined ledger batch of %d run again plainly: %s", len(batch), exc)
                continue
            except (*retryable, JournalRaced) as exc:  # unique race/deadlock/busy/journal moved: reload, retry
                self.stats.retries += 1
                reason = _retry_reason(exc)
                metrics.BATCH_RETRIES.labels(reason=reason).inc()
                if attempt == BATCH_RETRIES - 1:
                    raise
                log.info("ledger batch retry %d after %s", attempt + 1, reason)
                await asyncio.sleep(0.001 * (attempt + 1))
                continue
            self.stats.seconds_in_db += _time.perf_counter() - t0
            metrics.BATCH_SIZE.observe(len(batch))
            self.stats.batches += 1
            self.stats.requests += len(batch)
            self.stats.max_batch = max(self.stats.max_batch, len(batch))
            self.stats.postings += sum(1 for r in results if isinstance(r, TxnOutcome) and not r.duplicate
                                       and r.row.get("transfer_id"))
            return results
        raise LedgerError("unreachable")


def _retry_reason(exc: BaseException) -> str:
    """The metric label of a batch retry: ``journal_raced`` or the database error's class (a bounded set:
    ``UniqueViolationError``, ``DeadlockDetectedError``, ``OperationalError`` …)."""
    if isinstance(exc, JournalRaced):
        return "journal_raced"
    return type(getattr(exc, "orig", None) or exc).__name__


def _retryable_errors(postgresql: bool = True) -> tuple[type[BaseException], ...]:
    """Errors after which a batch is reloaded and retried: a unique-key race between workers, a deadlock,
    a serialisation failure or a busy database. The PostgreSQL batch path calls asyncpg directly, so its
    errors arrive as ``asyncpg.PostgresError`` rather than SQLAlchemy's ``DBAPIError``."""
    errors: tuple[type[BaseException], ...] = (DBAPIError, sqlite3.OperationalError)
    if not postgresql:
        return errors
    try:
        import asyncpg
    except ImportError:  # the 'pg' extra is optional
        return errors
    return (*errors, asyncpg.PostgresError)


# --- direct postings for bulk work (recharge, card lifecycle, expiry, rollover, migration) ------------


@dataclass(frozen=True)
class TransferSpec:
    """One transfer for :func:`post_transfers_sync`: account codes, amount, code and an idempotency key."""

    debit: str
    credit: str
    amount_fen: int
    code: str
    transfer_key: str
    memo: str | None = None
    corrects_transfer_id: int | None = None


def post_transfers_sync(conn: Connection, specs: list[TransferSpec], at: datetime | None = None,
                        cutoff: Cutoff | None = None) -> list[int]:
    """Post ``specs`` all-or-nothing inside the caller's write transaction; returns the transfer ids.

    Accounts are created when missing and locked ``FOR UPDATE`` in id order; a beneficiary
    account that would go below zero raises :class:`InsufficientFunds` (nothing is written
    when the caller's transaction rolls back). Writes are set-based, like the writer's.
    """
    if not specs:
        return []
    for s in specs:
        if s.amount_fen <= 0:
            raise ValueError(f"transfer {s.transfer_key}: amount must be positive")
    now = at or datetime.now(UTC)
    cut = cutoff or Cutoff()
    nominal = cut.business_date(now)
    bdate = resolve_business_dates_sync(conn, [nominal])[nominal]
    codes = sorted({s.debit for s in specs} | {s.credit for s in specs})
    ensure_accounts_sync(conn, codes)
    q = (select(accounts.c.id, accounts.c.code, accounts.c.flags, accounts.c.debits_posted, accounts.c.credits_posted)
         .where(or_(*[accounts.c.code.in_(ch) for ch in _chunks(codes)])).order_by(accounts.c.id).with_for_update())
    accts = {code: _Acct(int(i), code, int(f), int(d), int(c)) for i, code, f, d, c in conn.execute(q)}
    ids = allocate_ids_sync(conn, "transfer_id", len(specs))
    deltas: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    rows = []
    for tid, s in zip(ids, specs, strict=True):
        dr, cr = accts[s.debit], accts[s.credit]
        dr.debits += s.amount_fen
        cr.credits += s.amount_fen
        deltas[dr.id][0] += s.amount_fen
        deltas[cr.id][1] += s.amount_fen
        rows.append((tid, s.transfer_key, dr.id, cr.id, s.amount_fen, s.code, bdate, now, None, None, None, None,
                     s.corrects_transfer_id, s.memo))
    for a in accts.values():
        if a.flags & FLAG_NO_OVERDRAFT and a.balance < 0:
            raise InsufficientFunds(a.code, a.balance)
    if sum(d[0] for d in deltas.values()) != sum(d[1] for d in deltas.values()):
        raise InvariantViolation("debits != credits")
    executemany_sync(conn, transfers, TRANSFER_COLUMNS, rows)
    apply_balance_deltas_sync(conn, deltas)
    return ids


class InsufficientFunds(Exception):
    """A direct posting would take a beneficiary account below zero."""

    def __init__(self, code: str, balance_after: int):
        super().__init__(f"account {code.split(':')[0]} would go to {balance_after} fen")
        self.code = code
