"""Card-side fixtures: a PSAM, the pty reader in a thread, the real serial driver, a session factory."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from card_kit import AID, NOW, TEST_TIMEOUT_MS

from keys.issuer import IssuerKeySet
from simulator.psam import VirtualPsam
from simulator.reader_pty import PtyReader
from terminal_agent.card_session import CardSession
from terminal_agent.psam_session import PsamSession
from terminal_agent.serial_driver import SerialReader


@pytest.fixture(params=["sm4", "3des"])
def suite(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def key_sets() -> dict:
    return {s: IssuerKeySet.demo("carepay-demo", s) for s in ("sm4", "3des")}


@pytest.fixture
def psam(key_sets: dict) -> VirtualPsam:
    return VirtualPsam({ks.suite: ks for ks in key_sets.values()}, terminal_id="T0000042")


@pytest.fixture
def pty_reader(psam: VirtualPsam) -> Iterator[PtyReader]:
    """The virtual serial reader on a pty, served from a thread (the same code `carepay sim reader` runs)."""
    rd = PtyReader(psam).start()
    try:
        yield rd
    finally:
        rd.close()


@pytest.fixture
def serial_reader(pty_reader: PtyReader) -> Iterator[SerialReader]:
    """The REAL serial driver, opened on the pty's slave path."""
    with SerialReader(pty_reader.path, timeout_ms=TEST_TIMEOUT_MS) as sr:
        yield sr


@pytest.fixture
def session_for(serial_reader: SerialReader) -> Callable[..., CardSession]:
    def make(aid: bytes = AID, pin_threshold_fen: int = 20_000) -> CardSession:
        ps = PsamSession(serial_reader.psam)
        ps.open()
        return CardSession(serial_reader.card, ps, aid, pin_threshold_fen=pin_threshold_fen, clock=lambda: NOW)

    return make

