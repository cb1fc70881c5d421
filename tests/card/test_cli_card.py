"""`carepay sim cards issue`, `carepay sim reader --pty` (a real subprocess) and `carepay terminal read-card`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from keys.issuer import IssuerKeySet
from simulator.cardfile import load_deck
from simulator.personalise import issue_cards

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
AID_HEX = "D15600000599434152455041590001"


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def carepay(capsys: pytest.CaptureFixture[str]) -> Callable[..., Result]:
    """Run the ``carepay`` entry point in this process (fast); the pty reader stays a real subprocess."""
    from ops.cli import main

    def run(*args: str) -> Result:
        capsys.readouterr()
        code = main(list(args))
        out = capsys.readouterr()
        return Result(code, out.out, out.err)

    return run


@pytest.fixture
def deck_file(tmp_path: Path, carepay: Callable[..., Result]) -> Path:
    out = tmp_path / "cards.json"
    r = carepay("sim", "cards", "issue", "--count", "3", "--out", str(out), "--seed", "5", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["count"] == 3
    # add a forged card (issued under another issuer's keys) as card #3
    deck = load_deck(out)
    deck.cards += issue_cards(1, aid=bytes.fromhex(AID_HEX), key_set=IssuerKeySet.demo("forger"), first_index=99)
    deck.save(out)
    return out


@pytest.fixture
def pty_reader_proc(deck_file: Path) -> Iterator[tuple[subprocess.Popen, str]]:
    proc = subprocess.Popen([sys.executable, "-m", "ops.cli", "sim", "reader", "--pty", "--cards", str(deck_file)],
                            cwd=ROOT, env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, bufsize=1)
    try:
        assert proc.stdout is not None
        path = proc.stdout.readline().strip()
        assert path.startswith("/dev/"), proc.stderr.read() if proc.stderr else ""
        yield proc, path
    finally:
        proc.terminate()
        proc.wait(timeout=5)


def control(proc: subprocess.Popen, line: str) -> str:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
    return proc.stdout.readline().strip()


def test_read_card_through_the_pty_reader(pty_reader_proc, deck_file, carepay) -> None:
    proc, path = pty_reader_proc
    r = carepay("terminal", "read-card", "--reader", f"serial:{path}", "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    raw_deck = deck_file.read_text()
    card0 = json.loads(raw_deck)["cards"][0]
    assert doc["app_serial"] == card0["app_serial"] and doc["terminal_id"] == "T0000001"
    assert "*" in doc["card_no"] and "*" in doc["cardholder"]["id_no"]
    assert doc["card_no"] != card0["label"]
    # text output, and the forged card is refused with a reason and exit 1
    assert control(proc, "insert 3").startswith("inserted")
    bad = carepay("terminal", "read-card", "--reader", f"serial:{path}")
    assert bad.returncode == 1
    assert "forged" in bad.stderr and "Traceback" not in bad.stderr
    assert control(proc, "remove") == "removed"
    gone = carepay("terminal", "read-card", "--reader", f"serial:{path}")
    assert gone.returncode == 1 and "card_removed" in gone.stderr
    assert control(proc, "status").startswith("pty=")


def test_read_card_sim_and_errors(deck_file, carepay) -> None:
    r = carepay("terminal", "read-card", "--reader", "sim", "--cards", str(deck_file), "--card", "1", "--log")
    assert r.returncode == 0, r.stderr
    assert "card authenticated" in r.stdout and "resident ID" in r.stdout
    forged = carepay("terminal", "read-card", "--reader", "sim", "--cards", str(deck_file), "--card", "3")
    assert forged.returncode == 1 and "card refused: forged" in forged.stderr
    bad = carepay("terminal", "read-card", "--reader", "floppy:1")
    assert bad.returncode == 2 and "unknown reader" in bad.stderr
    pcsc = carepay("terminal", "read-card", "--reader", "pcsc:0")
    assert pcsc.returncode == 1 and "pip install 'carepay[pcsc]'" in pcsc.stderr
    nodev = carepay("terminal", "read-card", "--reader", "serial:/dev/does-not-exist", "--timeout-ms", "100")
    assert nodev.returncode == 1 and "cannot open serial reader" in nodev.stderr


def test_pcsc_missing_library_message() -> None:
    from protocol.channel import ReaderUnavailable
    from terminal_agent.pcsc_driver import PcscReader

    try:
        import smartcard  # noqa: F401
    except ImportError:
        with pytest.raises(ReaderUnavailable, match=r"carepay\[pcsc\]"):
            PcscReader(0)
    else:  # pragma: no cover
        pytest.skip("pyscard is installed here")


def test_cards_issue_bad_input(tmp_path, carepay) -> None:
    r = carepay("sim", "cards", "issue", "--count", "2", "--out", str(tmp_path / "c.json"), "--suite", "aes")
    assert r.returncode == 2 and "unknown crypto suite" in r.stderr
    r = carepay("sim", "cards", "issue", "--count", "2", "--out", str(tmp_path / "c.json"), "--aid", "XYZ")
    assert r.returncode == 2 and "not hex" in r.stderr
    r = carepay("sim", "reader", "--cards", str(tmp_path / "c.json"))
    assert r.returncode == 2 and "--pty" in r.stderr


def test_state_written_back_by_the_reader(pty_reader_proc, deck_file) -> None:
    """A swipe through the pty reader process changes the card, and the deck file on disk shows it."""
    from ops.config import DEFAULT_AID_HEX
    from terminal_agent.card_session import CardSession
    from terminal_agent.psam_session import PsamSession
    from terminal_agent.serial_driver import SerialReader

    _, path = pty_reader_proc
    with SerialReader(path, timeout_ms=2000) as sr:
        ps = PsamSession(sr.psam)
        ps.open()
        s = CardSession(sr.card, ps, bytes.fromhex(DEFAULT_AID_HEX))
        s.start()
        s.complete(s.authorize(300, "voucher"))
    deadline = time.monotonic() + 2
    while load_deck(deck_file).cards[0].atc != 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    card = load_deck(deck_file).cards[0]
    assert card.atc == 1 and len(card.log) == 1
    assert json.loads(Path(str(deck_file) + ".psam-T0000001.json").read_text())["ttn"] == 1
