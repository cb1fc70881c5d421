"""Database backup and restore (数据库备份与恢复).

SQLite: the online backup API (``sqlite3.Connection.backup``) copies a live
database page by page while the clearing service keeps writing; the copy is a
consistent snapshot and is checked with ``PRAGMA integrity_check`` before it is
reported good. PostgreSQL: the documented way is ``pg_dump`` in custom format
(``pg_restore`` to restore); :func:`pg_dump_command` builds that command and
:func:`backup_postgres` runs it when ``pg_dump`` is installed.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from ops.errors import BadInput, CarepayError

BACKUP_PAGES_PER_STEP = 256
"""Pages copied per step of the SQLite online backup (a step holds the read lock only briefly)."""
BACKUP_STEP_SLEEP_S = 0.0
"""Pause between steps, letting writers in on a busy database."""
PG_DUMP_TIMEOUT_S = 3_600

ProgressFn = Callable[[int, int], None]
"""``progress(done_pages, total_pages)``."""


@dataclass(frozen=True)
class BackupResult:
    kind: str  # "sqlite" | "postgresql"
    source: str
    out: str
    bytes: int
    pages: int
    integrity: str
    tables: dict[str, int]


def sqlite_path(url: str) -> Path:
    """The file behind an SQLite URL (``sqlite:///rel.db``, ``sqlite+aiosqlite:////abs.db``) or a bare path."""
    if "://" not in url:
        return Path(url)
    parts = urlsplit(url)
    if not parts.scheme.startswith("sqlite"):
        raise BadInput(f"not an SQLite URL: {parts.scheme}://…")
    path = unquote(url.split("://", 1)[1])
    if path.startswith("/"):
        path = path[1:]  # sqlite:///rel → rel ; sqlite:////abs → /abs
    path = path.split("?", 1)[0]
    if not path or path == ":memory:":
        raise BadInput("an in-memory SQLite database cannot be backed up")
    return Path(path)


def is_postgres(url: str) -> bool:
    return url.split("://", 1)[0].split("+", 1)[0] in ("postgresql", "postgres")


def _table_counts(conn: sqlite3.Connection) -> dict[str, int]:
    names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
    return {n: int(conn.execute(f'SELECT COUNT(*) FROM "{n}"').fetchone()[0]) for n in names}


def _copy(src: sqlite3.Connection, dst: sqlite3.Connection, progress: ProgressFn | None) -> int:
    total = 0

    def _cb(_status: int, remaining: int, pages: int) -> None:
        nonlocal total
        total = pages
        if progress is not None:
            progress(pages - remaining, pages)

    src.backup(dst, pages=BACKUP_PAGES_PER_STEP, progress=_cb, sleep=BACKUP_STEP_SLEEP_S)
    return total


def backup_sqlite(url: str, out: Path, progress: ProgressFn | None = None, *, overwrite: bool = False) -> BackupResult:
    """Online-backup the SQLite database at ``url`` into ``out`` and check the copy's integrity."""
    src_path = sqlite_path(url)
    if not src_path.is_file():
        raise BadInput(f"database file not found: {src_path}")
    if out.exists() and not overwrite:
        raise BadInput(f"{out} exists; choose another --out or pass --force")
    if out.resolve() == src_path.resolve():
        raise BadInput("--out must differ from the database file")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    tmp.unlink(missing_ok=True)
    src = sqlite3.connect(f"file:{src_path}?mode=ro", uri=True, timeout=30)
    try:
        dst = sqlite3.connect(tmp)
        try:
            pages = _copy(src, dst, progress)
            dst.execute("PRAGMA journal_mode=DELETE")  # a self-contained file: no -wal beside it
            integrity = str(dst.execute("PRAGMA integrity_check").fetchone()[0])
            tables = _table_counts(dst)
        finally:
            dst.close()
    except sqlite3.Error as exc:
        tmp.unlink(missing_ok=True)
        raise CarepayError(f"backup of {src_path} failed: {exc}") from None
    finally:
        src.close()
    if integrity != "ok":
        tmp.unlink(missing_ok=True)
        raise CarepayError(f"backup copy failed its integrity check: {integrity}")
    os.replace(tmp, out)
    return BackupResult("sqlite", str(src_path), str(out), out.stat().st_size, pages, integrity, tables)


def restore_sqlite(backup: Path, url: str, progress: ProgressFn | None = None, *, force: bool = False) -> BackupResult:
    """Copy the backup file ``backup`` into the database at ``url`` (refuses to overwrite without ``force``)."""
    if not backup.is_file():
        raise BadInput(f"backup file not found: {backup}")
    dst_path = sqlite_path(url)
    if dst_path.exists() and dst_path.stat().st_size > 0 and not force:
        raise BadInput(f"{dst_path} exists; restoring would replace it (pass --force)")
    src = sqlite3.connect(f"file:{backup}?mode=ro", uri=True)
    try:
        integrity = str(src.execute("PRAGMA integrity_check").fetchone()[0])
        if integrity != "ok":
            raise CarepayError(f"backup file failed its integrity check: {integrity}")
        dst_path.parent.mkdir(parents=True, exist_ok=True)
        dst = sqlite3.connect(dst_path, timeout=30)
        try:
            pages = _copy(src, dst, progress)
            tables = _table_counts(dst)
        finally:
            dst.close()
    except sqlite3.Error as exc:
        raise CarepayError(f"restore into {dst_path} failed: {exc}") from None
    finally:
        src.close()
    return BackupResult("sqlite", str(backup), str(dst_path), dst_path.stat().st_size, pages, integrity, tables)


def _libpq_url(url: str) -> str:
    """``postgresql+asyncpg://…`` → ``postgresql://…`` (what pg_dump understands)."""
    scheme, rest = url.split("://", 1)
    return f"postgresql://{rest}" if scheme.startswith("postgres") else url


def _schema_args(schema: str | None) -> list[str]:
    if schema is None:
        return []
    if not schema.replace("_", "").isalnum():
        raise BadInput(f"bad PostgreSQL schema name {schema!r}")
    return [f"--schema={schema}"]


def pg_dump_command(url: str, out: Path, schema: str | None = None) -> list[str]:
    """The documented PostgreSQL backup: ``pg_dump --format=custom --file OUT --dbname URL [--schema S]``."""
    return ["pg_dump", "--format=custom", "--no-owner", *_schema_args(schema), f"--file={out}",
            f"--dbname={_libpq_url(url)}"]


def pg_restore_command(backup: Path, url: str, schema: str | None = None) -> list[str]:
    """The matching restore: ``pg_restore --clean --if-exists --no-owner [--schema S] --dbname URL FILE``."""
    return ["pg_restore", "--clean", "--if-exists", "--no-owner", *_schema_args(schema), f"--dbname={_libpq_url(url)}",
            str(backup)]


def _run_pg(cmd: list[str]) -> None:
    if shutil.which(cmd[0]) is None:
        raise CarepayError(f"{cmd[0]} not installed; run: {' '.join(cmd)}")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PG_DUMP_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise CarepayError(f"{cmd[0]} did not finish within {PG_DUMP_TIMEOUT_S} s") from None
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no message"])[-1]
        raise CarepayError(f"{cmd[0]} failed (exit {proc.returncode}): {last}")


def backup_postgres(url: str, out: Path, schema: str | None = None) -> BackupResult:
    """Run ``pg_dump`` (custom format) into ``out``; only ``schema`` when given."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _run_pg(pg_dump_command(url, out, schema))
    return BackupResult("postgresql", url, str(out), out.stat().st_size, 0, "pg_dump ok", {})


def restore_postgres(backup: Path, url: str, schema: str | None = None) -> BackupResult:
    """Run ``pg_restore --clean`` from ``backup`` into the database at ``url`` (only ``schema`` when given)."""
    if not backup.is_file():
        raise BadInput(f"backup file not found: {backup}")
    _run_pg(pg_restore_command(backup, url, schema))
    return BackupResult("postgresql", str(backup), url, backup.stat().st_size, 0, "pg_restore ok", {})
