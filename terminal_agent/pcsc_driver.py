"""PC/SC reader driver (PC/SC读卡器驱动) through pyscard — an optional extra, imported only when used.

``pyscard`` has no Linux wheel and needs pcsc-lite plus swig to build, so it is the ``pcsc``
extra (``pip install 'carepay[pcsc]'``). Without it :class:`PcscReader` raises
:class:`protocol.channel.ReaderUnavailable` with that instruction, never an ImportError.

Slots: PC/SC sees each slot as its own reader (a dual reader lists "… ICC 0" and "… SAM 0").
``PcscReader(card_index, psam_index)`` takes the card reader's index in ``readers()`` and the
PSAM reader's (default: the next one). T=0 cards answering ``61xx``/``6Cxx`` are followed with
``protocol.apdu.transceive_t0``.
"""

from __future__ import annotations

import importlib
from typing import Any

from protocol.apdu import ApduError, Command, transceive_t0
from protocol.channel import CardRemoved, ChannelError, ReaderUnavailable

PYSCARD_MISSING = ("PC/SC readers need the optional 'pcsc' extra: pip install 'carepay[pcsc]' "
                   "(pyscard; building it needs pcsc-lite headers and swig). Use --reader serial:PATH or sim instead.")


def load_pyscard() -> Any:
    """Import pyscard's ``smartcard`` package or raise ReaderUnavailable with the install hint."""
    try:
        return importlib.import_module("smartcard.System")
    except ImportError:
        raise ReaderUnavailable(PYSCARD_MISSING) from None


class PcscChannel:
    """One PC/SC reader used as one slot."""

    def __init__(self, reader: Any, name: str) -> None:
        self._reader = reader
        self.name = name
        self._conn: Any = None

    def _exc(self) -> tuple[type[BaseException], ...]:
        exc_mod = importlib.import_module("smartcard.Exceptions")
        return (exc_mod.CardConnectionException, exc_mod.NoCardException)

    def power_on(self) -> bytes:
        try:
            self._conn = self._reader.createConnection()
            self._conn.connect()
            return bytes(self._conn.getATR())
        except self._exc() as exc:
            raise CardRemoved(f"no card in the {self.name} reader ({type(exc).__name__})") from None

    def power_off(self) -> None:
        if self._conn is not None:
            try:
                self._conn.disconnect()
            except Exception:  # deactivation never fails the caller
                pass
            self._conn = None

    def _send(self, raw: bytes) -> bytes:
        data, sw1, sw2 = self._conn.transmit(list(raw))
        return bytes(data) + bytes([sw1, sw2])

    def transmit(self, apdu: bytes) -> bytes:
        if self._conn is None:
            raise ChannelError(f"{self.name} reader not powered")
        try:
            return transceive_t0(self._send, Command.parse(apdu)).to_bytes()
        except ApduError as exc:
            raise ChannelError(f"{self.name}: {exc}") from None
        except self._exc():
            raise CardRemoved(f"card pulled from the {self.name} reader") from None

    def card_present(self) -> bool:
        try:
            conn = self._reader.createConnection()
            conn.connect()
            conn.disconnect()
            return True
        except self._exc():
            return False


class PcscReader:
    """A card slot and a PSAM slot as two PC/SC readers."""

    def __init__(self, card_index: int = 0, psam_index: int | None = None) -> None:
        system = load_pyscard()
        found = system.readers()
        psam_index = card_index + 1 if psam_index is None else psam_index
        if card_index >= len(found) or psam_index >= len(found):
            raise ReaderUnavailable(f"PC/SC lists {len(found)} reader(s); need indexes {card_index} (card) and "
                                    f"{psam_index} (PSAM)")
        self._card = PcscChannel(found[card_index], "card")
        self._psam = PcscChannel(found[psam_index], "psam")

    @property
    def card(self) -> PcscChannel:
        return self._card

    @property
    def psam(self) -> PcscChannel:
        return self._psam

    def close(self) -> None:
        self._card.power_off()
        self._psam.power_off()
