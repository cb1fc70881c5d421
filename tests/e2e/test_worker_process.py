"""``carepay clearing serve`` as real processes: killed mid-run and restarted; two processes sharing the load."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.e2e.conftest import Harness
from tests.e2e.test_faults import _settle_queues, _traffic

pytestmark = pytest.mark.mqtt
ROOT = Path(__file__).resolve().parents[2]


def start_serve(harness: Harness, workers: int = 1, *extra: str) -> subprocess.Popen[str]:
    db_url = str(harness.engine.url)
    proc = subprocess.Popen(
        [sys.executable, "-m", "ops.cli", "clearing", "serve", "--db", db_url, "--mqtt", harness.broker.url,
         "--workers", str(workers), "--json", *extra],
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
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
            (second,) = [int(k) for k in f.read().split()]
        with open(f"/proc/{second}/cmdline", "rb") as f:  # the database URL travels in the environment
            assert str(harness.engine.url).encode() not in f.read()
        terms = [await harness.terminal(0), await harness.terminal(1)]
        outs = await _traffic(harness, terms, 8)
        assert all(o.approved for o in outs), [o.message for o in outs if not o.approved]
    finally:
        kill(proc, signal.SIGTERM)


def ledger_children(pid: int) -> list[int]:
    """The ledger processes (ops.ledger_child) the serve process ``pid`` started."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        kids = [int(k) for k in f.read().split()]
    out = []
    for k in kids:
        try:
            with open(f"/proc/{k}/cmdline", "rb") as f:
                if b"ops.ledger_child" in f.read():
                    out.append(k)
        except FileNotFoundError:
            continue
    return out


async def test_ledger_process_serves_and_is_restarted_when_killed(harness: Harness) -> None:
    """``--ledger-process``: the worker hands verified requests to its ledger process. That process killed while
    it holds a request (stopped first, so the purchase is surely in its hands): the request gets no answer at
    all — not a decline: it might have posted — the terminal reverses it, the journals agree with the host
    (harness check); the worker starts a new ledger process, which serves the traffic after."""
    port = free_port()
    proc = start_serve(harness, 1, "--ledger-process", "--metrics-port", str(port))
    try:
        terms = [await harness.terminal(0), await harness.terminal(1)]
        first = ledger_children(proc.pid)
        assert len(first) == 1
        with open(f"/proc/{first[0]}/cmdline", "rb") as f:  # the database URL travels in the environment
            assert str(harness.engine.url).encode() not in f.read()
        warm = await _traffic(harness, terms, 2)
        assert all(o.approved for o in warm), [o.message for o in warm if not o.approved]
        os.kill(first[0], signal.SIGSTOP)
        card = harness.fleet.cards_for(terms[0].spec.program)[0]
        held = asyncio.ensure_future(terms[0].purchase(card, 100))
        await asyncio.sleep(0.5)  # the request reached the ledger process's input; it cannot answer
        os.kill(first[0], signal.SIGKILL)
        out = await held
        assert not out.approved and out.state == "reversing" and out.response_code is None  # no answer, no 96
        await _settle_queues(terms)
        assert all(t.agent.journal.backlog() == 0 for t in terms)
        again = ledger_children(proc.pid)
        assert len(again) == 1 and again != first  # a new ledger process
        after = await _traffic(harness, terms, 3)
        assert all(o.approved for o in after), [o.message for o in after if not o.approved]
        # metrics: the worker's on PORT (answers), its ledger process's on PORT+WORKERS (decisions, batches)
        worker_metrics, ledger_metrics = [await asyncio.to_thread(scrape, p) for p in (port, port + 1)]
        assert 'carepay_auth_requests_total{code="00",type="purchase"}' in worker_metrics
        assert "carepay_ledger_process_restarts_total 1.0" in worker_metrics
        assert "carepay_ledger_unanswered_total 1.0" in worker_metrics  # the held purchase
        assert 'carepay_clearing_decisions_total{code="00",type="purchase"} 6.0' in ledger_metrics  # the new one's
        assert "carepay_group_commit_batch_size_count" in ledger_metrics
    finally:
        kill(proc, signal.SIGTERM)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()
