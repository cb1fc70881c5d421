"""The virtual PSAM (虚拟PSAM卡): issuer master keys by purpose and version, a terminal number, a TTN counter.

Commands: see ``protocol.card_files`` (READ BINARY of EF 0016, ``80 F0/F2/F4/F6``). P1 is the
card's key version, P2 its algorithm id (sm4/3des); the PSAM diversifies the matching master
key with the card's application serial for every request, so it serves any card of the issuer.

The terminal transaction number (TTN, 终端交易序号) is persisted to ``state_path`` (JSON, atomic
replace) before the new value leaves the PSAM, so a restart never reuses a TTN. The state file
holds no key: the master keys come from the issuer key set given to the constructor.
"""

from __future__ import annotations

import hmac
import json
import os
from collections.abc import Mapping
from pathlib import Path

from keys.issuer import IssuerKeySet
from keys.mac import challenge_iv, line_protection_mac
from keys.suite import CryptoError, Suite, encrypt_ecb
from protocol import card_files as cf
from protocol.apdu import ApduError, Command
from protocol.status_words import (
    SW_CLA_NOT_SUPPORTED,
    SW_FILE_NOT_FOUND,
    SW_INCORRECT_P1P2,
    SW_INS_NOT_SUPPORTED,
    SW_OK,
    SW_REFERENCED_DATA_NOT_FOUND,
    SW_VERIFY_FAILED,
    SW_WRONG_DATA,
    SW_WRONG_LENGTH,
)

PSAM_ATR = bytes.fromhex("3B6900005053414D53494D30")  # historical bytes "PSAMSIM0"
MAX_TTN = 0xFFFFFFFF
SERIAL_BYTES = 8
MAX_CHALLENGE_BYTES = 16


def _rsp(data: bytes = b"", sw: int = SW_OK) -> bytes:
    return data + sw.to_bytes(2, "big")


class VirtualPsam:
    """A PSAM for one terminal. ``key_sets`` maps suite → issuer key set (one suite or both)."""

    def __init__(self, key_sets: Mapping[Suite, IssuerKeySet] | IssuerKeySet, terminal_id: str = "T0000001",
                 ttn: int = 0, state_path: Path | str | None = None) -> None:
        if isinstance(key_sets, IssuerKeySet):
            key_sets = {key_sets.suite: key_sets}
        self._key_sets = dict(key_sets)
        if len(terminal_id) != 8 or not terminal_id.isascii():
            raise ValueError("terminal id must be 8 ASCII characters")
        self.terminal_id = terminal_id
        self.ttn = ttn
        self.state_path = Path(state_path) if state_path else None
        if self.state_path and self.state_path.exists():
            self._load()

    def __repr__(self) -> str:
        return f"VirtualPsam(terminal_id={self.terminal_id}, ttn={self.ttn}, suites={sorted(self._key_sets)})"

    # --- persistence of the TTN

    def _load(self) -> None:
        assert self.state_path is not None
        try:
            state = json.loads(self.state_path.read_text())
            self.terminal_id = str(state["terminal_id"])
            self.ttn = int(state["ttn"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"PSAM state file {self.state_path} unreadable: {type(exc).__name__}") from None

    def _save(self) -> None:
        if self.state_path is None:
            return
        tmp = self.state_path.with_suffix(self.state_path.suffix + ".tmp")
        tmp.write_text(json.dumps({"format": "carepay-psam/1", "terminal_id": self.terminal_id, "ttn": self.ttn}))
        os.replace(tmp, self.state_path)

    # --- power

    def power_on(self) -> bytes:
        return PSAM_ATR

    def power_off(self) -> None:
        return None

    # --- commands

    def process(self, apdu: bytes) -> bytes:
        """Answer one command APDU with ``data ‖ SW``; never raises."""
        try:
            cmd = Command.parse(apdu)
        except ApduError:
            return _rsp(sw=SW_WRONG_LENGTH)
        try:
            if cmd.cla == cf.CLA_PLAIN and cmd.ins == cf.INS_READ_BINARY:
                return self._read_binary(cmd)
            if cmd.cla != cf.CLA_PROPRIETARY:
                return _rsp(sw=SW_CLA_NOT_SUPPORTED)
            if cmd.ins == cf.INS_PSAM_NEXT_TTN:
                return self._next_ttn(cmd)
            if cmd.ins not in (cf.INS_PSAM_VERIFY_INTERNAL, cf.INS_PSAM_EXTERNAL_CRYPTOGRAM, cf.INS_PSAM_SM_MAC):
                return _rsp(sw=SW_INS_NOT_SUPPORTED)
            return self._keyed(cmd)
        except CryptoError:
            return _rsp(sw=SW_WRONG_DATA)

    def _read_binary(self, cmd: Command) -> bytes:
        if cmd.p1 != 0x80 | cf.SFI_PSAM_TERMINAL_ID:
            return _rsp(sw=SW_FILE_NOT_FOUND)
        data = self.terminal_id.encode("ascii")
        return _rsp(data[cmd.p2 : cmd.p2 + (cmd.le or len(data))])

    def _next_ttn(self, cmd: Command) -> bytes:
        if self.ttn >= MAX_TTN:
            return _rsp(sw=SW_WRONG_DATA)
        self.ttn += 1
        self._save()
        return _rsp(self.ttn.to_bytes(4, "big"))

    def _card_key(self, purpose: str, cmd: Command, serial: bytes) -> tuple[bytes, Suite] | None:
        suite_name = cf.SUITE_BY_CODE.get(cmd.p2)
        if suite_name is None:
            return None
        suite = Suite(suite_name)
        ks = self._key_sets.get(suite)
        if ks is None or not ks.has(purpose, cmd.p1):
            return None
        return ks.card_key(purpose, cmd.p1, serial), suite

    def _keyed(self, cmd: Command) -> bytes:
        data = cmd.data
        if len(data) < SERIAL_BYTES + 1:
            return _rsp(sw=SW_WRONG_LENGTH)
        serial, rest = data[:SERIAL_BYTES], data[SERIAL_BYTES:]
        if cmd.ins == cf.INS_PSAM_VERIFY_INTERNAL:
            found = self._card_key("internal_auth", cmd, serial)
            if found is None:
                return _rsp(sw=SW_REFERENCED_DATA_NOT_FOUND)
            key, suite = found
            block = suite.block_bytes
            if len(rest) != 2 * block:
                return _rsp(sw=SW_WRONG_LENGTH)
            expected = encrypt_ecb(key, rest[:block], suite)
            return _rsp(sw=SW_OK if hmac.compare_digest(expected, rest[block:]) else SW_VERIFY_FAILED)
        if cmd.ins == cf.INS_PSAM_EXTERNAL_CRYPTOGRAM:
            found = self._card_key("external_auth", cmd, serial)
            if found is None:
                return _rsp(sw=SW_REFERENCED_DATA_NOT_FOUND)
            key, suite = found
            if not 1 <= len(rest) <= suite.block_bytes:
                return _rsp(sw=SW_WRONG_LENGTH)
            return _rsp(encrypt_ecb(key, challenge_iv(rest, suite), suite))
        # SM MAC: P2 high nibble unused; data = serial ‖ challenge-length(1) ‖ challenge ‖ covered bytes
        found = self._card_key("sm_mac", cmd, serial)
        if found is None:
            return _rsp(sw=SW_REFERENCED_DATA_NOT_FOUND)
        key, suite = found
        n = rest[0]
        if not 1 <= n <= min(MAX_CHALLENGE_BYTES, suite.block_bytes) or len(rest) < 1 + n + 1:
            return _rsp(sw=SW_INCORRECT_P1P2 if n == 0 else SW_WRONG_LENGTH)
        challenge, covered = rest[1 : 1 + n], rest[1 + n :]
        return _rsp(line_protection_mac(key, covered, challenge, suite))
