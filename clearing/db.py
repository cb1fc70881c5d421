"""Database engine, transactions and set-based write helpers (SQLite via aiosqlite, PostgreSQL via asyncpg).

- :func:`make_engine` — an ``AsyncEngine``; SQLite files get WAL, ``synchronous=FULL``
  (durable commits) and a busy timeout on every connection, and we issue ``BEGIN``
  ourselves so a writer can take the lock up front (``BEGIN IMMEDIATE``).
- :func:`write_transaction` — the transaction every ledger write runs in: on SQLite
  ``BEGIN IMMEDIATE`` (one writer across processes, reads inside it are current),
  on PostgreSQL an ordinary transaction (rows are locked ``FOR UPDATE`` by the writer).
- :func:`init_db` — applies the versioned migrations (``clearing/migrations``) and
  creates every table registered on :data:`clearing.schema.metadata`.
- :func:`executemany` / :func:`allocate_ids` — the hot path: one driver-level
  ``executemany`` per table per batch, ids and RRNs allocated per batch, never one
  awaited statement per row.
"""

from __future__ import annotations

import importlib
import json
import logging
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC
from typing import Any

from sqlalchemy import Date, Table, event, text
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.util import await_

log = logging.getLogger("carepay.clearing.db")

SQLITE_BUSY_TIMEOUT_MS = 30_000
SQLITE_SYNCHRONOUS = "FULL"  # durable commits; NORMAL loses the last commits on power failure in WAL mode
PG_POOL_SIZE = 5
IMMEDIATE = "carepay_immediate"  # execution option: BEGIN IMMEDIATE on SQLite

OPTIONAL_SCHEMA_MODULES = ("clearing.eod_schema",)
"""Modules of other clearing parts that register tables on our metadata; imported when present."""


class DatabaseError(Exception):
    """A database URL or schema problem the operator can act on."""


def is_sqlite(target: AsyncEngine | AsyncConnection | Connection | Dialect) -> bool:
    dialect = target if isinstance(target, Dialect) else target.dialect
    return dialect.name == "sqlite"


def make_engine(url: str, *, synchronous: str = SQLITE_SYNCHRONOUS, pg_schema: str | None = None,
                echo: bool = False) -> AsyncEngine:
    """An async engine for ``sqlite+aiosqlite:///FILE`` or ``postgresql+asyncpg://…``.

    ``pg_schema`` puts every table in that PostgreSQL schema (``search_path``) — tests use a
    fresh one per run. ``synchronous`` is the SQLite pragma (FULL by default: durable commits).
    """
    if url.startswith("sqlite:///"):
        url = "sqlite+aiosqlite:///" + url[len("sqlite:///"):]
    if url.startswith(("postgresql://", "postgres://")):
        url = "postgresql+asyncpg://" + url.split("://", 1)[1]
    if url.startswith("sqlite+aiosqlite"):
        if synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
            raise DatabaseError(f"bad SQLite synchronous mode {synchronous!r}")
        engine = create_async_engine(url, echo=echo)
        _install_sqlite_hooks(engine, synchronous.upper())
        return engine
    if url.startswith("postgresql+asyncpg"):
        connect_args: dict[str, Any] = {}
        if pg_schema:
            if not pg_schema.replace("_", "").isalnum():
                raise DatabaseError(f"bad PostgreSQL schema name {pg_schema!r}")
            connect_args["server_settings"] = {"search_path": pg_schema}
        return create_async_engine(url, echo=echo, pool_size=PG_POOL_SIZE, connect_args=connect_args)
    raise DatabaseError(f"unsupported database URL {url.split('://', 1)[0]!r}: use sqlite+aiosqlite or postgresql+asyncpg")


def _install_sqlite_hooks(engine: AsyncEngine, synchronous: str) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (pysqlite's implicit BEGIN is deferred)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA synchronous={synchronous}")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get(IMMEDIATE, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


@asynccontextmanager
async def write_transaction(engine: AsyncEngine) -> AsyncIterator[AsyncConnection]:
    """A transaction for ledger writes: ``BEGIN IMMEDIATE`` on SQLite; commit on success, rollback on error."""
    async with engine.connect() as conn:
        conn = await conn.execution_options(**{IMMEDIATE: True})
        async with conn.begin():
            yield conn


async def init_db(engine: AsyncEngine) -> list[str]:
    """Apply pending migrations and create every registered table; returns the versions applied now."""
    from clearing.migrations import upgrade

    import_optional_schemas()
    return await upgrade(engine)


def import_optional_schemas() -> None:
    """Import other parts' schema modules (they add tables to our metadata) when they exist."""
    for name in OPTIONAL_SCHEMA_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise


# --- set-based hot path ------------------------------------------------------------------------------
#
# The writer's statements go to the driver directly: no SQL compilation per batch, no per-row
# type processing in SQLAlchemy. On SQLite all the batch's writes run in ONE hop into the
# aiosqlite thread (raw ``sqlite3`` executemany); on PostgreSQL asyncpg's prepared executemany.


def _placeholders(dialect: Dialect, n: int, start: int = 1) -> list[str]:
    style = dialect.paramstyle
    if style == "qmark":
        return ["?"] * n
    if style == "numeric_dollar":
        return [f"${i}" for i in range(start, start + n)]
    if style == "format":
        return ["%s"] * n
    raise DatabaseError(f"unsupported paramstyle {style}")


def sqlite_datetime(dt: Any) -> Any:
    """An aware datetime as SQLAlchemy's SQLite text form (naive UTC, microseconds)."""
    if dt is None or isinstance(dt, str):
        return dt
    u = dt if dt.tzinfo is UTC else dt.astimezone(UTC)
    text = str(u)[:-6]  # "YYYY-MM-DD HH:MM:SS[.ffffff]+00:00" without the offset (C-speed formatting)
    return text if u.microsecond else text + ".000000"


def sqlite_date(d: Any) -> Any:
    return d if d is None or isinstance(d, str) else d.isoformat()


def _sqlite_converters(table: Table, columns: Sequence[str]) -> list[Callable[[Any], Any] | None]:
    from clearing.schema import UtcDateTime

    out: list[Callable[[Any], Any] | None] = []
    for c in columns:
        t = table.c[c].type
        if isinstance(t, UtcDateTime):
            out.append(sqlite_datetime)
        elif isinstance(t, Date):
            out.append(sqlite_date)
        else:
            out.append(None)
    return out


_PLAN_CACHE: dict[tuple[str, str, tuple[str, ...]], tuple[str, list[Callable[[Any], Any] | None]]] = {}


def _insert_plan(dialect: Dialect, table: Table, columns: Sequence[str]) -> tuple[str, list[Callable[[Any], Any] | None]]:
    key = (dialect.name, table.name, tuple(columns))
    plan = _PLAN_CACHE.get(key)
    if plan is None:
        marks = ", ".join(_placeholders(dialect, len(columns)))
        sql = f"INSERT INTO {table.name} ({', '.join(columns)}) VALUES ({marks})"
        convs = _sqlite_converters(table, columns) if dialect.name == "sqlite" else [None] * len(columns)
        plan = (sql, convs)
        _PLAN_CACHE[key] = plan
    return plan


def _convert(rows: Sequence[Sequence[Any]], convs: list[Callable[[Any], Any] | None]) -> list[tuple[Any, ...]]:
    active = [(i, f) for i, f in enumerate(convs) if f is not None]
    if not active:
        return [tuple(r) for r in rows]
    out = []
    memo: dict[Any, Any] = {}  # the same timestamp object repeats across a batch (created_at)
    for r in rows:
        row = list(r)
        for i, f in active:
            v = row[i]
            got = memo.get(v, memo)
            if got is memo:
                got = memo[v] = f(v)
            row[i] = got
        out.append(tuple(row))
    return out


@dataclass
class BulkWrite:
    """Statements for one driver round: ``(sql, rows)`` pairs run with ``executemany`` in order."""

    dialect: Dialect
    statements: list[tuple[str, list[tuple[Any, ...]]]] = field(default_factory=list)

    arrays: list[tuple[str, list[list[Any]]]] = field(default_factory=list)  # PostgreSQL: one statement each

    def insert(self, table: Table, columns: Sequence[str], rows: Sequence[Sequence[Any]], *,
               converted: bool = False) -> None:
        """``rows`` as tuples in ``columns`` order; ``converted``: dates and times are already in the driver's
        form (SQLite text, see :func:`sqlite_date` / :func:`sqlite_datetime`), no per-value conversion."""
        if not rows:
            return
        if self.dialect.name == "postgresql":
            self.arrays.append(_pg_unnest_args(table, columns, rows))
            return
        sql, convs = _insert_plan(self.dialect, table, columns)
        self.statements.append((sql, rows if converted else _convert(rows, convs)))

    def balance_deltas(self, deltas: dict[int, list[int]]) -> None:
        """``UPDATE accounts`` once per touched account (ids ascending): ``{id: [debit_fen, credit_fen]}``."""
        if deltas and self.dialect.name == "postgresql":
            items = sorted(deltas.items())
            self.arrays.append((
                "UPDATE accounts SET debits_posted = accounts.debits_posted + d.dr, "
                "credits_posted = accounts.credits_posted + d.cr "
                "FROM unnest($1::bigint[], $2::bigint[], $3::bigint[]) AS d(id, dr, cr) WHERE accounts.id = d.id",
                [[a for a, _ in items], [d[0] for _, d in items], [d[1] for _, d in items]]))
            return
        if deltas:
            a, b, c = _placeholders(self.dialect, 3)
            sql = (f"UPDATE accounts SET debits_posted = debits_posted + {a}, "
                   f"credits_posted = credits_posted + {b} WHERE id = {c}")
            self.statements.append((sql, [(d[0], d[1], acc) for acc, d in sorted(deltas.items())]))

    def run(self, conn: Connection) -> None:
        """Execute on the connection's driver inside the current transaction (sync side of ``run_sync``)."""
        driver = conn.connection.driver_connection
        if conn.dialect.name == "postgresql" and getattr(conn.connection.dbapi_connection, "_transaction", None) is None:
            conn.exec_driver_sql("SELECT 1")  # make the adapter BEGIN first: raw driver calls must be inside it
        if self.arrays:
            for sql, cols in self.arrays:  # asyncpg: one set-based statement per table
                await_(driver.execute(sql, *cols))
        if not self.statements:
            return
        if conn.dialect.name == "sqlite" and hasattr(driver, "_execute") and hasattr(driver, "_conn"):
            await_(driver._execute(_sqlite_run, driver._conn, self.statements))
        elif conn.dialect.name == "postgresql" and hasattr(driver, "executemany"):
            for sql, rows in self.statements:
                await_(driver.executemany(sql, rows))
        else:  # any other driver: through SQLAlchemy, still one executemany per statement
            for sql, rows in self.statements:
                conn.exec_driver_sql(sql, rows)


_PG_TYPES = {"BIGINT": "bigint", "INTEGER": "integer", "DATE": "date", "BOOLEAN": "boolean", "TEXT": "text"}


_PG_TYPE_CACHE: dict[tuple[str, str], str] = {}


def _pg_type(col: Any) -> str:
    from clearing.schema import UtcDateTime

    key = (col.table.name, col.name)
    t = _PG_TYPE_CACHE.get(key)
    if t is None:
        if isinstance(col.type, UtcDateTime):
            t = "timestamptz"
        else:
            t = _PG_TYPES.get(col.type.compile(dialect=_pg_dialect()).split("(")[0].upper(), "text")
        _PG_TYPE_CACHE[key] = t
    return t


def _pg_dialect() -> Dialect:
    from sqlalchemy.dialects import postgresql

    return postgresql.dialect()


_UNNEST_CACHE: dict[tuple[str, tuple[str, ...], tuple[Any, ...]], str] = {}

_SEP, _NUL = "\x1f", "\x1e"
"""A text column sent as ONE string: values joined by the unit separator, NULL as the record separator
(``string_to_array($n, chr(31), chr(30))`` on the server) — asyncpg checks every element of an array
parameter against three abstract base classes before encoding it; one string skips that per value."""


def _pg_unnest_insert(table: Table, columns: Sequence[str], same: Sequence[Any] | None = None) -> str:
    """``INSERT … SELECT FROM unnest($n::type[], …)``; a column flagged in ``same`` (one value for every row)
    is bound once as a scalar instead of as an array of copies; one flagged ``"joined"`` (text) as one string
    (see :data:`_SEP`)."""
    flags = tuple(same) if same is not None else (False,) * len(columns)
    key = (table.name, tuple(columns), flags)
    sql = _UNNEST_CACHE.get(key)
    if sql is None:
        exprs, arrays, names = [], [], []
        for i, (c, one) in enumerate(zip(columns, flags, strict=True), start=1):
            t = _pg_type(table.c[c])
            if one is True:
                exprs.append(f"${i}::{t}")
                continue
            if one == "joined":
                arrays.append(f"string_to_array(${i}::text, chr(31), chr(30))")
            else:
                arrays.append(f"${i}::{t}[]")
            names.append(f"c{i}")
            exprs.append(f"u.c{i}")
        sql = (f"INSERT INTO {table.name} ({', '.join(columns)}) SELECT {', '.join(exprs)} "
               f"FROM unnest({', '.join(arrays)}) AS u({', '.join(names)})")
        _UNNEST_CACHE[key] = sql
    return sql


def _joined(col: list[Any]) -> str | None:
    """``col`` (text values or None, at least two) as one separated string; None when a value is not text or
    holds a separator (then it goes as an array, as before)."""
    nulls = col.count(None)
    try:
        joined = _SEP.join([_NUL if v is None else v for v in col] if nulls else col)
    except TypeError:  # not all text
        return None
    if joined.count(_SEP) != len(col) - 1 or joined.count(_NUL) != nulls:
        return None
    return joined


def _pg_unnest_args(table: Table, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> tuple[str, list[Any]]:
    """The statement and its parameters for :func:`_pg_unnest_insert` (columns constant over ``rows`` as scalars:
    a batch of purchases shares its business date, creation time, type, status, … — less to encode and send;
    text columns as one separated string each)."""
    cols = [list(col) for col in zip(*rows, strict=True)]
    n = len(rows)
    same: list[Any] = [n > 1 and col.count(col[0]) == n for col in cols]  # list.count: C-level ==, no hashing
    if all(same):  # unnest needs one array to give the row count
        same[0] = False
    params: list[Any] = []
    for i, (c, col) in enumerate(zip(columns, cols, strict=True)):
        if same[i]:
            params.append(col[0])
            continue
        joined = _joined(col) if n > 1 and _pg_type(table.c[c]) == "text" else None
        if joined is None:
            params.append(col)
        else:
            same[i] = "joined"
            params.append(joined)
    return _pg_unnest_insert(table, columns, same), params


def _sqlite_run(raw: Any, statements: list[tuple[str, list[tuple[Any, ...]]]]) -> None:
    cur = raw.cursor()
    try:
        for sql, rows in statements:
            cur.executemany(sql, rows)
    finally:
        cur.close()


def executemany_sync(conn: Connection, table: Table, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """INSERT ``rows`` (tuples in ``columns`` order) with one driver ``executemany``."""
    bw = BulkWrite(conn.dialect)
    bw.insert(table, columns, rows)
    bw.run(conn)


def apply_balance_deltas_sync(conn: Connection, deltas: dict[int, list[int]]) -> None:
    bw = BulkWrite(conn.dialect)
    bw.balance_deltas(deltas)
    bw.run(conn)


def select_in_sync(conn: Connection, sql: str, values: Sequence[Any], pg_type: str = "text") -> list[tuple[Any, ...]]:
    """Run ``sql`` whose ``{IN}`` marks ``<column> IN <values>`` with ONE bound parameter (no compile, no
    per-value binds): SQLite ``IN (SELECT value FROM json_each(?))``, PostgreSQL ``= ANY($1::type[])``."""
    if not values:
        return []
    return select_multi_in_sync(conn, sql, [(values, pg_type)])


def select_multi_in_sync(conn: Connection, sql: str, lists: Sequence[tuple[Sequence[Any], str]]) -> list[tuple[Any, ...]]:
    """Like :func:`select_in_sync` with several lists: ``{IN1}``, ``{IN2}``, … (``{IN}`` = ``{IN1}``), one round trip.

    ``{FOR_UPDATE}`` / ``{FOR_NO_KEY_UPDATE}`` / ``{FOR_SHARE}`` render as row locks on PostgreSQL and as nothing
    on SQLite.
    """
    q, params = render_in(sql, lists, conn.dialect.name == "sqlite")
    return [tuple(r) for r in conn.exec_driver_sql(q, params)]


def render_in(sql: str, lists: Sequence[tuple[Sequence[Any], str]], sqlite: bool) -> tuple[str, tuple[Any, ...]]:
    """The SQL and parameters of :func:`select_multi_in_sync` for SQLite (``?``) or asyncpg (``$n``).

    List ``i`` is used once, either as ``{INi}`` (``<column> {INi}``: membership) or as ``{ROWSi}``: a row
    source named ``ri`` with one column ``v`` (``FROM {ROWS1} JOIN t ON t.key = r1.v``). On SQLite the
    join probes the index once per value straight from ``json_each``, where ``IN (SELECT … json_each)``
    first builds and sorts a temporary index of the list — about half the cost for a thousand keys; the
    list must then hold distinct values (each one yields its own matches)."""
    q = sql.replace("{IN}", "{IN1}")
    params: list[Any] = []
    for i, (values, pg_type) in enumerate(lists, start=1):
        if sqlite:
            q = q.replace(f"{{IN{i}}}", "IN (SELECT value FROM json_each(?))").replace(
                f"{{ROWS{i}}}", f"(SELECT value AS v FROM json_each(?)) AS r{i}")
            params.append(json.dumps(list(values), default=str))
        else:
            q = q.replace(f"{{IN{i}}}", f"= ANY(${i}::{pg_type}[])").replace(
                f"{{ROWS{i}}}", f"unnest(${i}::{pg_type}[]) AS r{i}(v)")
            params.append(list(values))
    for token, lock in (("{FOR_UPDATE}", "FOR UPDATE"), ("{FOR_NO_KEY_UPDATE}", "FOR NO KEY UPDATE"),
                        ("{FOR_SHARE}", "FOR SHARE")):
        q = q.replace(token, "" if sqlite else lock)
    return q, tuple(params)


def _sqlite_allocate(wanted: dict[str, int], run: Callable[[str], Any]) -> dict[str, list[int]]:
    case = " ".join(f"WHEN '{k}' THEN {int(n)}" for k, n in wanted.items())
    names = ", ".join(f"'{k}'" for k in wanted)
    rows = run(f"UPDATE counters SET value = value + CASE name {case} END WHERE name IN ({names}) RETURNING name, value")
    return {name: list(range(end - wanted[name] + 1, end + 1)) for name, end in rows}


def allocate_many_sync(conn: Connection, wanted: dict[str, int]) -> dict[str, list[int]]:
    """Fresh values of several counters in one round trip: ``{"rrn": 3, "transfer_id": 2}`` → lists of ids."""
    wanted = {k: n for k, n in wanted.items() if n > 0}
    if not wanted:
        return {}
    if is_sqlite(conn):
        return _sqlite_allocate(wanted, lambda q: conn.exec_driver_sql(q).all())
    seqs = {"rrn": "rrn_seq", "transfer_id": "transfer_id_seq"}
    parts = " UNION ALL ".join(f"SELECT '{k}', nextval('{seqs[k]}') FROM generate_series(1, {int(n)})"
                               for k, n in wanted.items())
    out: dict[str, list[int]] = {k: [] for k in wanted}
    for name, value in conn.exec_driver_sql(parts):
        out[name].append(int(value))
    return out


def allocate_ids_sync(conn: Connection, name: str, n: int) -> list[int]:
    """``n`` fresh values of counter ``name`` (``rrn`` or ``transfer_id``) inside the caller's write transaction."""
    if n <= 0:
        return []
    if is_sqlite(conn):
        end = conn.execute(text("UPDATE counters SET value = value + :n WHERE name = :name RETURNING value"),
                           {"n": n, "name": name}).scalar_one()
        return list(range(end - n + 1, end + 1))
    seq = {"rrn": "rrn_seq", "transfer_id": "transfer_id_seq"}[name]
    return list(conn.execute(text(f"SELECT nextval('{seq}') FROM generate_series(1, :n)"), {"n": n}).scalars())


async def allocate_ids(conn: AsyncConnection, name: str, n: int) -> list[int]:
    return await conn.run_sync(allocate_ids_sync, name, n)


def url_for_display(url: str) -> str:
    """The URL without a password, for messages."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}@{host}"
    return url


# --- SQLite: WAL checkpoints beside the ledger writer, not inside its commits --------------------------------

WAL_CHECKPOINT_INTERVAL_S = 0.2
"""How often :class:`WalCheckpointer` copies committed WAL pages back into the database file."""
WRITER_AUTOCHECKPOINT_PAGES = 4_000
"""The ledger writer's own automatic-checkpoint threshold (pages; SQLite's default is 1,000)."""


class WalCheckpointer:
    """``PRAGMA wal_checkpoint(PASSIVE)`` every ``interval_s`` on its own connection and thread.

    SQLite's automatic checkpoint runs inside the COMMIT that takes the WAL past its threshold: that commit —
    and every request of the batch waiting on it — also copies the WAL back into the database file and syncs
    it. Measured at 1,000 requests/s: the batches slower than 8 ms spent 6–10 ms (once 91 ms) in BEGIN/COMMIT
    against 2–4 ms in all their own work. This thread does the copying beside the writer instead; a PASSIVE
    checkpoint never blocks a writer or a reader and waits for nothing (the thread spends its time in SQLite with
    the interpreter lock released). The writer keeps its own automatic checkpoint, at
    :data:`WRITER_AUTOCHECKPOINT_PAGES`: under continuous writes only a checkpoint by the writer itself can copy
    the WAL to its very end and let the next transaction start it from the beginning again, and by then this
    thread has copied nearly all of it. The WAL file therefore stays bounded (~16 MiB).
    """

    def __init__(self, path: str, interval_s: float = WAL_CHECKPOINT_INTERVAL_S) -> None:
        self.path = path
        self.interval_s = interval_s
        self.checkpoints = 0
        self.longest_s = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"WalCheckpointer(checkpoints={self.checkpoints}, longest_s={self.longest_s:.3f})"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="carepay-wal-checkpoint", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            thread.join(timeout=10)

    def _run(self) -> None:
        try:
            conn = sqlite3.connect(self.path, timeout=SQLITE_BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        except sqlite3.Error as exc:  # the writer's own automatic checkpoint still bounds the WAL
            log.warning("WAL checkpointer not started on %s: %s", self.path, exc)
            return
        try:
            while not self._stop.wait(self.interval_s):
                t0 = time.perf_counter()
                try:
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                except sqlite3.Error as exc:
                    log.warning("WAL checkpoint failed: %s", exc)
                    continue
                self.checkpoints += 1
                self.longest_s = max(self.longest_s, time.perf_counter() - t0)
        finally:
            conn.close()
