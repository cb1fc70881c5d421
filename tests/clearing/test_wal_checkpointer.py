"""The SQLite ledger writer copies its WAL back beside its commits (clearing.db.WalCheckpointer), raises its own
automatic-checkpoint threshold, still keeps the WAL bounded, and stops the thread with the writer."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest

from clearing import ledger
from clearing.db import WalCheckpointer, init_db, make_engine
from clearing.invariants import check_invariants
from clearing.ledger import GroupCommitWriter
from tests.clearing.test_ledger import fund, req


def _checkpoint_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "carepay-wal-checkpoint"]


async def test_writer_checkpoints_beside_its_commits_and_keeps_the_wal_bounded(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ledger, "WRITER_AUTOCHECKPOINT_PAGES", 64)  # small, so the bound is crossed many times
    path = tmp_path / "w.db"
    engine = make_engine(f"sqlite+aiosqlite:///{path}")
    await init_db(engine)
    try:
        await fund(engine, 10_000_000)
        async with GroupCommitWriter(engine, max_batch=20) as w:
            assert (await w.submit(req(1, 10))).approved
            assert w._checkpointer is not None and w._checkpointer.running and len(_checkpoint_threads()) == 1
            _, driver = w._conn  # type: ignore[misc]
            threshold = await driver._execute(lambda: driver._conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0])
            assert threshold == 64
            wal_sizes = []
            for round_ in range(10):
                outs = await asyncio.gather(*(w.submit(req(2 + round_ * 100 + i, 10)) for i in range(100)))
                assert all(o.approved for o in outs)
                wal_sizes.append(os.path.getsize(f"{path}-wal"))
            deadline = time.monotonic() + 5
            while w._checkpointer.checkpoints == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert w._checkpointer.checkpoints > 0
        # 1,001 postings (~50 batches of a few pages each) with a 64-page threshold: the WAL restarted from its
        # start instead of growing with every batch (4 KiB pages plus a frame header each)
        assert max(wal_sizes) < 400 * 4_120, wal_sizes
        assert _checkpoint_threads() == []  # stopped with the writer
        assert await check_invariants(engine) == []
    finally:
        await engine.dispose()


def test_checkpointer_survives_a_database_it_cannot_open(tmp_path: Path) -> None:
    ck = WalCheckpointer(str(tmp_path / "missing-dir" / "x.db"), interval_s=0.01)
    ck.start()
    time.sleep(0.1)
    ck.stop()
    assert ck.checkpoints == 0 and not ck.running
