"""The SM3-chained audit log: appends inside transactions, and verify catches edits, inserts, removals."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path

import pytest
from sqlalchemy import delete, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from clearing.audit import (
    GENESIS_HASH,
    AuditEntry,
    append_audit,
    append_audit_async,
    append_audit_batch,
    entry_hash,
    head,
    record_access,
    verify_chain,
)
from clearing.db import write_transaction
from clearing.eod_schema import access_events, audit_log
from tests.eod.conftest import db, pg_schema  # noqa: F401
from tests.ops.cli_helpers import invoke


async def _fill(engine: AsyncEngine, n: int = 6) -> None:
    async with write_transaction(engine) as conn:
        await conn.run_sync(append_audit, "alice", "card.lost", "621888*********0015", {"reason": "报失"})
        await append_audit_async(conn, "bob", "keys.rotate", "issuer", {"version": 2})
        await conn.run_sync(append_audit_batch, [AuditEntry("ledger", "post.batch", f"batch-{i}", {"n": i})
                                                 for i in range(n - 2)])


async def test_chain_links_and_verifies(db: AsyncEngine) -> None:  # noqa: F811
    await _fill(db)
    report = await verify_chain(db)
    assert report.intact and report.entries == 6
    async with db.connect() as conn:
        rows = (await conn.execute(select(audit_log).order_by(audit_log.c.seq))).mappings().all()
    assert rows[0]["prev_hash"] == GENESIS_HASH
    for a, b in itertools.pairwise(rows):
        assert b["prev_hash"] == a["entry_hash"]
    r = rows[3]
    assert entry_hash(r["prev_hash"], r["seq"], r["ts"], r["actor"], r["action"], r["subject"], r["details"]) == r["entry_hash"]
    assert (await head(db)) == (6, rows[-1]["entry_hash"])


async def test_append_rolls_back_with_its_transaction(db: AsyncEngine) -> None:  # noqa: F811
    await _fill(db, 3)
    with pytest.raises(RuntimeError):
        async with write_transaction(db) as conn:
            await conn.run_sync(append_audit, "mallory", "x", "y", {})
            raise RuntimeError("caller failed")
    assert (await verify_chain(db)).entries == 3


@pytest.mark.parametrize("tamper", ["edit_actor", "edit_details", "delete_middle", "insert_forged", "swap"])
async def test_verify_catches_tampering(db: AsyncEngine, tamper: str) -> None:  # noqa: F811
    await _fill(db)
    async with db.begin() as conn:
        if tamper == "edit_actor":
            await conn.execute(update(audit_log).where(audit_log.c.seq == 3).values(actor="nobody"))
        elif tamper == "edit_details":
            await conn.execute(update(audit_log).where(audit_log.c.seq == 2).values(details='{"version":3}'))
        elif tamper == "delete_middle":
            await conn.execute(delete(audit_log).where(audit_log.c.seq == 4))
        elif tamper == "insert_forged":  # a well-formed entry at the end whose link does not fit
            await conn.execute(audit_log.insert().values(seq=7, prev_hash="1" * 64, entry_hash="2" * 64,
                                                         ts="2026-01-01T00:00:00+00:00", actor="m", action="a",
                                                         subject="s", details="{}"))
        else:  # swap the contents of two entries
            a = (await conn.execute(select(audit_log).where(audit_log.c.seq == 2))).mappings().one()
            b = (await conn.execute(select(audit_log).where(audit_log.c.seq == 3))).mappings().one()
            await conn.execute(update(audit_log).where(audit_log.c.seq == 2).values(actor=b["actor"], action=b["action"]))
            await conn.execute(update(audit_log).where(audit_log.c.seq == 3).values(actor=a["actor"], action=a["action"]))
    report = await verify_chain(db)
    assert not report.intact and report.problem
    assert report.first_bad_seq in {2, 3, 4, 7}


async def test_cut_tail_caught_against_a_recorded_head(db: AsyncEngine) -> None:  # noqa: F811
    await _fill(db)
    recorded = await head(db)
    async with db.begin() as conn:
        await conn.execute(delete(audit_log).where(audit_log.c.seq >= 5))
    assert (await verify_chain(db)).intact  # a chain alone cannot see its lost tail…
    report = await verify_chain(db, recorded)  # …the head a signed manifest recorded does
    assert not report.intact and "removed" in report.problem


async def test_prev_hash_unique_forbids_forks(db: AsyncEngine) -> None:  # noqa: F811
    await _fill(db, 3)
    async with db.connect() as conn:
        last = (await conn.execute(select(audit_log).where(audit_log.c.seq == 3))).mappings().one()
    with pytest.raises(Exception):  # noqa: B017 — driver-specific IntegrityError
        async with db.begin() as conn:
            await conn.execute(audit_log.insert().values(seq=99, prev_hash=last["prev_hash"], entry_hash="f" * 64,
                                                         ts=last["ts"], actor="x", action="x", subject="x", details="{}"))


async def test_record_access_writes_trail_and_audit(db: AsyncEngine) -> None:  # noqa: F811
    async with write_transaction(db) as conn:
        await conn.run_sync(record_access, "carol", "export", "report journal-20260310.csv", 42, None, "audit")
    async with db.connect() as conn:
        ev = (await conn.execute(select(access_events))).mappings().one()
        entry = (await conn.execute(select(audit_log))).mappings().one()
    assert (ev["actor"], ev["action"], ev["record_count"]) == ("carol", "export", 42)
    assert entry["action"] == "access.export"


def test_cli_audit_verify_exit_codes(tmp_path: Path) -> None:
    from clearing.db import init_db, make_engine

    url = f"sqlite+aiosqlite:///{tmp_path / 'a.db'}"

    async def setup() -> None:
        engine = make_engine(url)
        await init_db(engine)
        await _fill(engine)
        await engine.dispose()

    asyncio.run(setup())
    ok = invoke("audit", "verify", "--db", url, "--json")
    assert ok.exit_code == 0 and '"intact": true' in ok.stdout

    async def tamper() -> None:
        engine = make_engine(url)
        async with engine.begin() as conn:
            await conn.execute(text("UPDATE audit_log SET subject = 'changed' WHERE seq = 2"))
        await engine.dispose()

    asyncio.run(tamper())
    bad = invoke("audit", "verify", "--db", url)
    assert bad.exit_code == 1 and "BROKEN" in bad.stdout
