"""``carepay db backup`` / ``db restore``: the restore drill on a live SQLite database, and pg_dump."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from ops.backup import pg_dump_command, sqlite_path
from tests.ops.cli_helpers import invoke


def _make_db(path: Path, rows: int) -> None:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE transfer (id INTEGER PRIMARY KEY, debit TEXT, credit TEXT, amount_fen INTEGER)")
    conn.executemany("INSERT INTO transfer (debit, credit, amount_fen) VALUES (?, ?, ?)",
                     [(f"card:{i % 97}", f"provider:{i % 7}", 100 + i) for i in range(rows)])
    conn.commit()
    conn.close()


def _dump(path: Path) -> list[tuple]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT id, debit, credit, amount_fen FROM transfer ORDER BY id").fetchall()
    finally:
        conn.close()


def test_sqlite_path_forms(tmp_path: Path) -> None:
    assert sqlite_path("sqlite+aiosqlite:////abs/x.db") == Path("/abs/x.db")
    assert sqlite_path("sqlite:///rel/x.db") == Path("rel/x.db")
    assert sqlite_path(str(tmp_path / "a.db")) == tmp_path / "a.db"


def test_backup_restore_drill_on_live_database(tmp_path: Path) -> None:
    db = tmp_path / "live.db"
    _make_db(db, 20_000)
    stop = threading.Event()
    written = []

    def writer() -> None:  # the clearing service keeps posting while the backup runs
        conn = sqlite3.connect(db, timeout=30)
        i = 0
        while not stop.is_set() and i < 2_000:
            conn.execute("INSERT INTO transfer (debit, credit, amount_fen) VALUES ('w', 'w', ?)", (i,))
            conn.commit()
            written.append(i)
            i += 1
            time.sleep(0.001)
        conn.close()

    t = threading.Thread(target=writer)
    t.start()
    try:
        out = tmp_path / "backup" / "carepay.db"
        result = invoke("db", "backup", "--db", f"sqlite+aiosqlite:///{db}", "--out", str(out), "--json")
    finally:
        stop.set()
        t.join()
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["integrity"] == "ok" and doc["tables"]["transfer"] >= 20_000
    assert not (out.parent / "carepay.db-wal").exists()
    backed = _dump(out)
    live = _dump(db)
    assert backed == live[: len(backed)]  # a consistent prefix: the snapshot at the moment it finished

    restored = tmp_path / "restored.db"
    result = invoke("db", "restore", "--from", str(out), "--db", f"sqlite:///{restored}", "--json")
    assert result.exit_code == 0, result.output
    assert _dump(restored) == backed

    # refusing to overwrite without --force, for both verbs
    again = invoke("db", "restore", "--from", str(out), "--db", f"sqlite:///{restored}")
    assert again.exit_code == 2 and "--force" in again.output
    again = invoke("db", "backup", "--db", str(db), "--out", str(out))
    assert again.exit_code == 2
    forced = invoke("db", "restore", "--from", str(out), "--db", f"sqlite:///{restored}", "--force")
    assert forced.exit_code == 0


def test_backup_missing_database_is_bad_input(tmp_path: Path) -> None:
    result = invoke("db", "backup", "--db", f"sqlite:///{tmp_path}/nope.db", "--out", str(tmp_path / "x.db"))
    assert result.exit_code == 2


def test_corrupt_backup_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"SQLite format 3\x00" + b"\xff" * 4000)
    result = invoke("db", "restore", "--from", str(bad), "--db", f"sqlite:///{tmp_path}/r.db")
    assert result.exit_code != 0


def test_pg_dump_command_documented() -> None:
    cmd = pg_dump_command("postgresql+asyncpg://postgres@127.0.0.1:5432/test", Path("b.dump"))
    assert cmd[0] == "pg_dump" and "--format=custom" in cmd
    assert "--dbname=postgresql://postgres@127.0.0.1:5432/test" in cmd
    printed = invoke("db", "backup", "--db", "postgresql+asyncpg://u:pw@h/db", "--out", "x.dump", "--print-command")
    assert printed.exit_code == 0 and printed.stdout.startswith("pg_dump ")


@pytest.mark.pg
def test_pg_backup_restore_drill(pg_url: str, tmp_path: Path) -> None:
    import shutil
    import subprocess

    if shutil.which("pg_dump") is None:
        pytest.skip("pg_dump not installed")
    libpq = "postgresql://" + pg_url.split("://", 1)[1]
    schema = f"ops_backup_{int(time.time() * 1000) % 10**9}"  # only this schema: the database is shared
    psql = ["psql", "-q", "-v", "ON_ERROR_STOP=1", libpq, "-c"]
    subprocess.run([*psql, f"CREATE SCHEMA {schema}; CREATE TABLE {schema}.t (id int primary key, v bigint);"
                    f"INSERT INTO {schema}.t SELECT g, g * 7 FROM generate_series(1, 500) g;"], check=True)
    try:
        out = tmp_path / "pg.dump"
        result = invoke("db", "backup", "--db", pg_url, "--out", str(out), "--schema", schema)
        assert result.exit_code == 0, result.output
        assert out.stat().st_size > 0
        subprocess.run([*psql, f"DELETE FROM {schema}.t WHERE id > 100"], check=True)
        result = invoke("db", "restore", "--from", str(out), "--db", pg_url, "--schema", schema)
        assert result.exit_code == 0, result.output
        got = subprocess.run(["psql", "-tA", libpq, "-c", f"SELECT count(*), sum(v) FROM {schema}.t"],
                             check=True, capture_output=True, text=True).stdout.strip()
        assert got == f"500|{7 * 500 * 501 // 2}"
    finally:
        subprocess.run([*psql, f"DROP SCHEMA IF EXISTS {schema} CASCADE"], check=False)
