"""The terminal's side of the PSAM (PSAM卡会话): what the card session asks of the PSAM, as typed calls.

Wraps a PSAM ``CardChannel`` with the house command set of ``protocol.card_files``: read the
terminal id, verify a card's internal-authentication answer, compute an external-authentication
cryptogram and a secure-messaging MAC for a card's serial, and draw the next TTN. Failures raise
:class:`PsamError` with the status word; an unknown key version raises :class:`PsamKeyMissing`.
"""

from __future__ import annotations

from protocol import card_files as cf
from protocol.channel import CardChannel, transmit_many
from protocol.status_words import SW_OK, SW_REFERENCED_DATA_NOT_FOUND, SW_VERIFY_FAILED, describe

TERMINAL_ID_BYTES = 8
TTN_BYTES = 4


class PsamError(Exception):
    """The PSAM refused or failed a command."""

    def __init__(self, what: str, sw: int) -> None:
        self.sw = sw
        super().__init__(f"PSAM {what}: {describe(sw)}")


class PsamKeyMissing(PsamError):
    """The PSAM holds no master key for the card's key version / suite."""


def _split(raw: bytes) -> tuple[bytes, int]:
    if len(raw) < 2:
        raise PsamError("answer", 0x6F00)
    return raw[:-2], int.from_bytes(raw[-2:], "big")


def _checked(what: str, raw: bytes) -> bytes:
    """The data of a PSAM answer; PsamKeyMissing / PsamError unless 9000."""
    data, sw = _split(raw)
    if sw != SW_OK:
        if sw == SW_REFERENCED_DATA_NOT_FOUND:
            raise PsamKeyMissing(what, sw)
        raise PsamError(what, sw)
    return data


class PsamSession:
    """Typed PSAM calls over a powered PSAM channel. Call :meth:`open` once per reader power-up."""

    def __init__(self, channel: CardChannel) -> None:
        self.channel = channel
        self._terminal_id: str | None = None

    def open(self) -> str:
        """Power the PSAM slot and read the terminal id (cached)."""
        self.channel.power_on()
        self._terminal_id = None
        return self.terminal_id

    @property
    def terminal_id(self) -> str:
        if self._terminal_id is None:
            data = self._call("read terminal id",
                              bytes([cf.CLA_PLAIN, cf.INS_READ_BINARY, 0x80 | cf.SFI_PSAM_TERMINAL_ID, 0,
                                     TERMINAL_ID_BYTES]))
            if len(data) != TERMINAL_ID_BYTES:
                raise PsamError("terminal id length", 0x6700)
            self._terminal_id = data.decode("ascii", "replace")
        return self._terminal_id

    def _call(self, what: str, apdu: bytes) -> bytes:
        return _checked(what, self.channel.transmit(apdu))

    @staticmethod
    def _keyed(ins: int, key_version: int, suite: str, data: bytes, le: int | None) -> bytes:
        apdu = bytes([cf.CLA_PROPRIETARY, ins, key_version & 0xFF, cf.SUITE_CODES[suite], len(data)]) + data
        return apdu + bytes([le]) if le is not None else apdu

    def verify_internal_auth(self, app_serial: bytes, key_version: int, suite: str, challenge: bytes,
                             answer: bytes) -> bool:
        """True when ``answer`` is the card's internal-auth key applied to ``challenge``."""
        return self._verified(self.channel.transmit(
            self._verify_apdu(app_serial, key_version, suite, challenge, answer)))

    def verify_internal_auth_and_sm_mac(self, app_serial: bytes, key_version: int, suite: str, challenge: bytes,
                                        answer: bytes, sm_challenge: bytes, covered: bytes, *,
                                        draw_ttn: bool = False) -> tuple[bool, bytes, int | None]:
        """:meth:`verify_internal_auth`, :meth:`sm_mac` and optionally :meth:`next_ttn` in one reader exchange
        (independent commands): ``(genuine, mac, ttn)``.

        The MAC is only returned when the verification succeeded (a forged card gets nothing more); a TTN drawn
        for a forged card is spent (a gap in the terminal's numbering, as after any refused attempt)."""
        apdus = [self._verify_apdu(app_serial, key_version, suite, challenge, answer),
                 self._sm_mac_apdu(app_serial, key_version, suite, sm_challenge, covered)]
        if draw_ttn:
            apdus.append(self._NEXT_TTN)
        raw = transmit_many(self.channel, apdus)
        ttn = self._ttn_answer(raw[2]) if draw_ttn else None
        if not self._verified(raw[0]):
            return False, b"", ttn
        return True, self._mac_answer(raw[1]), ttn

    def _verify_apdu(self, app_serial: bytes, key_version: int, suite: str, challenge: bytes, answer: bytes) -> bytes:
        return self._keyed(cf.INS_PSAM_VERIFY_INTERNAL, key_version, suite, app_serial + challenge + answer, None)

    @staticmethod
    def _verified(raw: bytes) -> bool:
        _, sw = _split(raw)
        if sw == SW_OK:
            return True
        if sw == SW_VERIFY_FAILED:
            return False
        if sw == SW_REFERENCED_DATA_NOT_FOUND:
            raise PsamKeyMissing("verify internal authentication", sw)
        raise PsamError("verify internal authentication", sw)

    def external_auth_cryptogram(self, app_serial: bytes, key_version: int, suite: str, challenge: bytes) -> bytes:
        apdu = self._keyed(cf.INS_PSAM_EXTERNAL_CRYPTOGRAM, key_version, suite, app_serial + challenge, 0)
        return self._call("external authentication cryptogram", apdu)

    def sm_mac(self, app_serial: bytes, key_version: int, suite: str, challenge: bytes, covered: bytes) -> bytes:
        """The line-protection MAC the card expects over ``covered`` (``CLA INS P1 P2 Lc' ‖ data``)."""
        return self._mac_answer(self.channel.transmit(
            self._sm_mac_apdu(app_serial, key_version, suite, challenge, covered)))

    def _sm_mac_apdu(self, app_serial: bytes, key_version: int, suite: str, challenge: bytes, covered: bytes) -> bytes:
        return self._keyed(cf.INS_PSAM_SM_MAC, key_version, suite,
                           app_serial + bytes([len(challenge)]) + challenge + covered, cf.SM_MAC_BYTES)

    @staticmethod
    def _mac_answer(raw: bytes) -> bytes:
        mac = _checked("secure-messaging MAC", raw)
        if len(mac) != cf.SM_MAC_BYTES:
            raise PsamError("secure-messaging MAC length", 0x6700)
        return mac

    _NEXT_TTN = bytes([cf.CLA_PROPRIETARY, cf.INS_PSAM_NEXT_TTN, 0, 0, TTN_BYTES])

    def next_ttn(self) -> int:
        """Draw the next terminal transaction number (the PSAM persists it before answering)."""
        return self._ttn_answer(self.channel.transmit(self._NEXT_TTN))

    @staticmethod
    def _ttn_answer(raw: bytes) -> int:
        data = _checked("next TTN", raw)
        if len(data) != TTN_BYTES:
            raise PsamError("TTN length", 0x6700)
        return int.from_bytes(data, "big")
