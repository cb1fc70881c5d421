"""``carepay clearing serve`` as real processes: killed mid-run and restarted; two processes sharing the load."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.e2e.conftest import Harness
from tests.e2e.test_faults import _settle_queues, _traffic

pytestmark = pytest.mark.mqtt
ROOT = Path(__file__).resolve().parents[2]


def start_serve(harness: Harness, workers: int = 1) -> subprocess.Popen[str]:
    db_url = str(harness.engine.url)
    proc = subprocess.Popen(
        [sys.executable, "-m", "ops.cli", "clearing", "serve", "--db", db_url, "--mqtt", harness.broker.url,
         "--workers", str(workers), "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=ROOT, start_new_session=True,
        env={**os.environ, "CAREPAY_DATA_DIR": str(harness.tmp / "data")})
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, "clearing serve exited before it was ready"
    info = json.loads(line)
    assert info["ready"] and info["workers"] == workers and not info["embedded_broker"]
    return proc


def kill(proc: subprocess.Popen[str], sig: int = signal.SIGKILL) -> None:
    os.killpg(proc.pid, sig)  # the serve process and its worker children
    proc.wait(10)


async def test_worker_killed_and_restarted_mid_run(harness: Harness) -> None:
    proc = start_serve(harness)
    try:
        terms = [await harness.terminal(0), await harness.terminal(1)]
        assert all(t.agent.signed_on for t in terms)

        async def crash_and_restart() -> subprocess.Popen[str]:
            await asyncio.sleep(0.5)
            kill(proc)  # kill -9: requests in flight are lost with it
            await asyncio.sleep(0.3)
            return await asyncio.to_thread(start_serve, harness)

        outs, proc = await asyncio.gather(_traffic(harness, terms, 12), crash_and_restart())
        await _settle_queues(terms)
        assert all(t.agent.journal.backlog() == 0 for t in terms)
        assert sum(o.approved for o in outs) >= 6
        after = await _traffic(harness, terms, 2)
        assert all(o.approved for o in after)  # the restarted worker knows the terminals' working keys
    finally:
        kill(proc, signal.SIGTERM)


async def test_two_worker_processes_on_the_shared_subscription(harness: Harness) -> None:
    proc = start_serve(harness, workers=2)
    try:
        terms = [await harness.terminal(0), await harness.terminal(1)]
        outs = await _traffic(harness, terms, 8)
        assert all(o.approved for o in outs), [o.message for o in outs if not o.approved]
    finally:
        kill(proc, signal.SIGTERM)
