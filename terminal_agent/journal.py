"""The terminal's local journal (终端流水): every transaction, the reversal queue, the offline advices.

A row is written BEFORE its message is sent and updated after every answer, in
SQLite with ``synchronous=FULL``, so a crash at any point loses nothing: on restart
:meth:`Journal.recover` turns every purchase still ``pending`` (sent, no answer
recorded) into a queued reversal, and the queues are retransmitted.

States of a row (``state``):

- ``pending``      written, sent (or about to be), no answer yet;
- ``approved``     the host approved (``response_code`` 00);
- ``declined``     the host declined (any other code);
- ``reversing``    a purchase whose answer was lost or whose card step failed; its
                   reversal row is in the queue;
- ``reversed``     the reversal was acknowledged by the host;
- ``offline``      approved locally under the floor limit, advice not yet accepted;
- ``advised``      the host accepted the offline advice (``advice_rc`` 00);
- ``advice_declined`` the host refused the advice (the money is the provider's risk);
- ``cancelled``    ended on the terminal, nothing charged: an offline approval whose card step
                   failed, or a torn card transaction that never reached the host and whose
                   cryptogram the card no longer holds (failed, no charge).

Reversal rows (``kind='reversal'``) are ``queued`` until the host answers, then ``acked``.
The signed request is kept (``request_json``). A retransmission (reversal retry, offline advice,
void/refund retry) is a fresh message — new ``msg_id`` and ``sent_at`` so it passes the host's
freshness window — with the same batch and trace number, which the host de-duplicates on
(``terminal:batch:trace:type``) and answers with its first answer.

``meta.pending_card`` holds the card's pending cryptogram record while the cryptogram command is
on its way (torn-transaction recovery on the next card insertion).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

MAX_TRACE_NO = 999_999
MAX_BATCH_NO = 999_999
JOURNAL_SCHEMA_VERSION = 1

KINDS = ("purchase", "void", "refund", "reversal", "offline_purchase")
FINAL_STATES = frozenset({"approved", "declined", "reversed", "advised", "advice_declined", "acked", "cancelled"})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS txns (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    msg_id TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    batch_no TEXT NOT NULL,
    trace_no TEXT NOT NULL,
    program TEXT,
    amount_fen INTEGER NOT NULL,
    card_no TEXT,
    orig_trace_no TEXT,
    orig_rrn TEXT,
    orig_msg_id TEXT,
    response_code TEXT,
    rrn TEXT,
    auth_code TEXT,
    balance_after_fen INTEGER,
    business_date TEXT,
    message TEXT NOT NULL DEFAULT '',
    attempts INTEGER NOT NULL DEFAULT 0,
    request_json TEXT NOT NULL,
    answer_json TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    UNIQUE (batch_no, trace_no)
);
CREATE INDEX IF NOT EXISTS ix_txns_state ON txns (state);
CREATE INDEX IF NOT EXISTS ix_txns_card ON txns (card_no, state);
"""


class JournalError(RuntimeError):
    """The journal cannot record what the terminal did (disk full, corrupt file): stop transacting."""


@dataclass(frozen=True)
class JournalRow:
    """One journal row (a transaction or a reversal)."""

    id: int
    msg_id: str
    kind: str
    state: str
    batch_no: str
    trace_no: str
    program: str | None
    amount_fen: int
    card_no: str | None
    orig_trace_no: str | None
    orig_rrn: str | None
    orig_msg_id: str | None
    response_code: str | None
    rrn: str | None
    auth_code: str | None
    balance_after_fen: int | None
    business_date: str | None
    message: str
    attempts: int
    request_json: str
    answer_json: str | None
    created_at: str
    updated_at: str

    @property
    def final(self) -> bool:
        return self.state in FINAL_STATES


def _now() -> str:
    return datetime.now(UTC).isoformat()


class Journal:
    """SQLite journal of one terminal. ``path`` ``":memory:"`` serves load tests that measure the host."""

    def __init__(self, path: str | Path, durable: bool = True) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            self._db.row_factory = sqlite3.Row
            if self.path != ":memory:":
                self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'OFF'}")
            self._db.executescript(_SCHEMA)
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (str(JOURNAL_SCHEMA_VERSION),))
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('batch_no', '000001')")
            self._db.execute("INSERT OR IGNORE INTO meta VALUES ('trace_no', '000000')")
        except sqlite3.Error as exc:
            raise JournalError(f"cannot open the terminal journal {self.path}: {exc}") from None

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _exec(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        try:
            with self._lock:
                return self._db.execute(sql, params)
        except sqlite3.IntegrityError:
            raise
        except sqlite3.Error as exc:
            raise JournalError(f"terminal journal write failed: {exc}") from None

    # --- batch and trace numbers -------------------------------------------------------------------

    def _meta(self, key: str) -> str:
        return self._exec("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0]

    @property
    def batch_no(self) -> str:
        return self._meta("batch_no")

    def next_trace_no(self) -> str:
        """The next POS trace number (流水号), 000001..999999 then wrapping; durable before use."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                cur = int(self._db.execute("SELECT value FROM meta WHERE key='trace_no'").fetchone()[0])
                nxt = cur % MAX_TRACE_NO + 1
                self._db.execute("UPDATE meta SET value = ? WHERE key='trace_no'", (f"{nxt:06d}",))
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._db.execute("ROLLBACK")
                raise JournalError(f"terminal journal write failed: {exc}") from None
        return f"{nxt:06d}"

    def close_batch(self) -> str:
        """Start the next batch (after a settled batch); returns the new batch number."""
        nxt = int(self.batch_no) % MAX_BATCH_NO + 1
        self._exec("UPDATE meta SET value = ? WHERE key='batch_no'", (f"{nxt:06d}",))
        return f"{nxt:06d}"

    # --- rows ----------------------------------------------------------------------------------------

    def record(self, *, msg_id: str, kind: str, state: str, batch_no: str, trace_no: str, amount_fen: int,
               request_json: str, program: str | None = None, card_no: str | None = None,
               orig_trace_no: str | None = None, orig_rrn: str | None = None, orig_msg_id: str | None = None,
               auth_code: str | None = None) -> int:
        """Write a new row (before the message leaves the terminal); returns its id."""
        if kind not in KINDS:
            raise ValueError(f"unknown journal kind {kind!r}")
        now = _now()
        cur = self._exec(
            "INSERT INTO txns (msg_id, kind, state, batch_no, trace_no, program, amount_fen, card_no, orig_trace_no,"
            " orig_rrn, orig_msg_id, auth_code, request_json, created_at, updated_at)"
            " VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (msg_id, kind, state, batch_no, trace_no, program, amount_fen, card_no, orig_trace_no, orig_rrn,
             orig_msg_id, auth_code, request_json, now, now),
        )
        return int(cur.lastrowid or 0)

    def answer(self, msg_id: str, *, state: str, response_code: str | None, answer_json: str | None = None,
               rrn: str | None = None, auth_code: str | None = None, balance_after_fen: int | None = None,
               business_date: str | None = None, message: str = "") -> None:
        """Record the host's answer to the row sent as ``msg_id``."""
        self._exec(
            "UPDATE txns SET state=?, response_code=?, answer_json=?, rrn=COALESCE(?, rrn),"
            " auth_code=COALESCE(?, auth_code), balance_after_fen=COALESCE(?, balance_after_fen),"
            " business_date=COALESCE(?, business_date), message=?, updated_at=? WHERE msg_id=?",
            (state, response_code, answer_json, rrn, auth_code, balance_after_fen, business_date, message[:200],
             _now(), msg_id),
        )

    def set_state(self, msg_id: str, state: str, message: str = "") -> None:
        self._exec("UPDATE txns SET state=?, message=?, updated_at=? WHERE msg_id=?",
                   (state, message[:200], _now(), msg_id))

    def bump_attempts(self, msg_id: str) -> None:
        self._exec("UPDATE txns SET attempts = attempts + 1, updated_at=? WHERE msg_id=?", (_now(), msg_id))

    def get(self, msg_id: str) -> JournalRow | None:
        row = self._exec("SELECT * FROM txns WHERE msg_id = ?", (msg_id,)).fetchone()
        return JournalRow(**dict(row)) if row else None

    def find(self, *, batch_no: str | None = None, trace_no: str | None = None, rrn: str | None = None,
             kind: str | None = None) -> JournalRow | None:
        where, params = [], []
        for col, val in (("batch_no", batch_no), ("trace_no", trace_no), ("rrn", rrn), ("kind", kind)):
            if val is not None:
                where.append(f"{col} = ?")
                params.append(val)
        sql = "SELECT * FROM txns" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id DESC LIMIT 1"
        row = self._exec(sql, tuple(params)).fetchone()
        return JournalRow(**dict(row)) if row else None

    def rows(self, *, state: str | None = None, kind: str | None = None, batch_no: str | None = None) -> list[JournalRow]:
        where, params = [], []
        for col, val in (("state", state), ("kind", kind), ("batch_no", batch_no)):
            if val is not None:
                where.append(f"{col} = ?")
                params.append(val)
        sql = "SELECT * FROM txns" + (" WHERE " + " AND ".join(where) if where else "") + " ORDER BY id"
        return [JournalRow(**dict(r)) for r in self._exec(sql, tuple(params)).fetchall()]

    def find_card_txn(self, card_no: str, *, ttn: int, atc: int) -> JournalRow | None:
        """The purchase (online or offline) made with the card's cryptogram of ``atc`` at PSAM trace ``ttn``."""
        rows = self._exec("SELECT * FROM txns WHERE card_no = ? AND kind IN ('purchase', 'offline_purchase')"
                          " ORDER BY id DESC", (card_no,)).fetchall()
        for r in rows:
            try:
                card = json.loads(r["request_json"]).get("card") or {}
            except (ValueError, AttributeError):
                continue
            if card.get("ttn") == ttn and card.get("atc") == atc:
                return JournalRow(**dict(r))
        return None

    def to_offline(self, msg_id: str, auth_code: str) -> None:
        """A purchase that never left (link down) becomes an offline approval, advice to upload later."""
        self._exec("UPDATE txns SET kind='offline_purchase', state='offline', auth_code=?, response_code='00',"
                   " message='approved offline', updated_at=? WHERE msg_id=?", (auth_code, _now(), msg_id))

    def set_pending_card(self, record: dict[str, Any] | None) -> None:
        """Persist (or clear) the card's pending cryptogram record before the cryptogram command leaves."""
        if record is None:
            self._exec("DELETE FROM meta WHERE key='pending_card'")
        else:
            self._exec("INSERT OR REPLACE INTO meta VALUES ('pending_card', ?)", (json.dumps(record),))

    def pending_card(self) -> dict[str, Any] | None:
        row = self._exec("SELECT value FROM meta WHERE key='pending_card'").fetchone()
        return json.loads(row[0]) if row else None

    # --- queues --------------------------------------------------------------------------------------

    def reversal_queue(self) -> list[JournalRow]:
        """Reversals not yet acknowledged by the host, oldest first (冲正队列)."""
        return self.rows(state="queued", kind="reversal")

    def offline_queue(self) -> list[JournalRow]:
        """Purchases approved offline whose advice the host has not accepted yet, oldest first."""
        return self.rows(state="offline", kind="offline_purchase")

    def offline_count(self, card_no: str) -> int:
        """Offline approvals of ``card_no`` not yet accepted by the host (the per-card offline limit counts these)."""
        return int(self._exec("SELECT COUNT(*) FROM txns WHERE card_no=? AND state='offline'", (card_no,)).fetchone()[0])

    def backlog(self) -> int:
        """Rows still waiting for the host (pending, queued reversals, offline advices)."""
        return int(self._exec("SELECT COUNT(*) FROM txns WHERE state IN ('pending','queued','offline','reversing')")
                   .fetchone()[0])

    def recover(self) -> list[JournalRow]:
        """After a restart: purchases left ``pending`` (answer unknown) become ``reversing``; returns them.

        The caller queues a reversal for each (the host may or may not have approved it). Voids and
        refunds left pending are simply retransmitted (they are idempotent on the host).
        """
        stuck = self.rows(state="pending", kind="purchase")
        for row in stuck:
            self.set_state(row.msg_id, "reversing", "answer unknown after restart")
        return stuck

    def dump(self) -> list[dict[str, Any]]:
        """Every row as a dict (tests and the `terminal journal` view)."""
        out = []
        for r in self.rows():
            d = dict(r.__dict__)
            d.pop("request_json")
            d.pop("answer_json")
            out.append(d)
        return out

    def request(self, msg_id: str) -> dict[str, Any]:
        row = self.get(msg_id)
        if row is None:
            raise KeyError(msg_id)
        return json.loads(row.request_json)
