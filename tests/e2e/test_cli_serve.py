"""The CLI a new user runs: ``clearing serve --demo``, ``terminal run`` (sim and serial reader), ``sim traffic``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ops.mosquitto_proc import MosquittoProcess

pytestmark = pytest.mark.mqtt
ROOT = Path(__file__).resolve().parents[2]


def carepay(*args: str, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ops.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=timeout)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    tmp_path = tmp_path_factory.mktemp("served")
    env = {**os.environ, "CAREPAY_DATA_DIR": str(tmp_path / "data")}
    deck = tmp_path / "cards.json"
    assert carepay("sim", "cards", "issue", "--count", "2", "--out", str(deck), env=env).returncode == 0
    with MosquittoProcess(tmp_path / "mq") as broker:
        db = f"sqlite+aiosqlite:///{tmp_path / 'c.db'}"
        proc = subprocess.Popen([sys.executable, "-m", "ops.cli", "clearing", "serve", "--demo", "--cards", str(deck),
                                 "--db", db, "--mqtt", broker.url, "--json"], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, cwd=ROOT, env=env, start_new_session=True)
        try:
            info = json.loads(proc.stdout.readline())  # type: ignore[union-attr]
            assert info["ready"] and "registered" in info["setup"][0]
            yield env, deck, broker, db, tmp_path / "journal-T0000001.db"  # one terminal, one journal
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(10)


def test_terminal_run_charges_voids_and_settles(served, tmp_path: Path) -> None:
    env, deck, broker, _db, journal = served
    common = ["terminal", "run", "--terminal-id", "T0000001", "--reader", "sim", "--cards", str(deck),
              "--mqtt", broker.url, "--journal", str(journal)]
    r = carepay(*common, "--amount", "1500", "--json", env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)["results"][0]
    assert out["outcome"]["approved"] and out["outcome"]["balance_after_fen"] == 100_000 - 1_500
    assert "RMB 15.00" in out["receipt"] and out["outcome"]["rrn"] in out["receipt"]
    assert "商户 PROVIDER: 示范养老服务驿站 (demo)" in out["receipt"]  # the registry's name, from the sign-on answer
    r = carepay(*common, "--void", out["outcome"]["trace_no"], env=env)
    assert r.returncode == 0 and "VOID" in r.stdout and "APPROVED" in r.stdout, r.stderr
    r = carepay(*common, "--settle", env=env)
    assert r.returncode == 0 and "balanced" in r.stdout and "NOT" not in r.stdout, r.stdout + r.stderr


def test_terminal_run_through_the_serial_driver_and_the_pty_reader(served, tmp_path: Path) -> None:
    env, deck, broker, _db, journal = served
    link = tmp_path / "reader"
    reader = subprocess.Popen([sys.executable, "-m", "ops.cli", "sim", "reader", "--pty", "--cards", str(deck),
                               "--link", str(link)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              stdin=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    try:
        reader.stdout.readline()  # type: ignore[union-attr]
        deadline = time.monotonic() + 10
        while not link.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        r = carepay("terminal", "run", "--terminal-id", "T0000001", "--reader", f"serial:{link}", "--mqtt",
                    broker.url, "--amount", "800", "--journal", str(journal), env=env)
        assert r.returncode == 0, r.stderr
        assert "APPROVED" in r.stdout and "RMB 8.00" in r.stdout and "T0000001" in r.stdout
    finally:
        reader.terminate()
        reader.wait(10)


def test_sim_traffic_with_faults_leaves_nothing_behind(served, tmp_path: Path) -> None:
    env, _deck, broker, db, _journal = served
    r = carepay("sim", "traffic", "--db", db, "--mqtt", broker.url, "--terminals", "2", "--cards", "12", "--txns",
                "12", "--lost-answers", "0.1", "--seed", "3", "--journal-dir", str(tmp_path / "sim"), "--json",
                env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["purchases"] >= 6 and summary["backlog_left"] == 0
    assert summary["outcomes"].get("approved", 0) >= 3
    import asyncio

    from clearing.db import make_engine
    from clearing.invariants import check_invariants

    async def inv() -> list[str]:
        engine = make_engine(db)
        try:
            return await check_invariants(engine)
        finally:
            await engine.dispose()

    assert asyncio.run(inv()) == []
