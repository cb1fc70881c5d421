"""The virtual civil-affairs card (虚拟养老助残卡): the 民政应用专区 answered at the APDU level.

The card implements exactly the command set of ``protocol.card_files`` (see its docstring
for the table, access conditions and the secure-messaging MAC). It holds only its own
diversified keys (one per purpose of ``keys.issuer.PURPOSES``), never a master key.

State that survives power-off (the card's EEPROM) is the data in :meth:`VirtualCard.to_dict`:
files, keys, ATC, PIN and its retry counter, the external-auth retry counter, the cyclic
transaction log and the last :data:`CRYPTOGRAM_HISTORY` cryptograms. Every command that
changes it calls ``on_commit(card)`` before the answer leaves the card, so a file-backed
deck is written before the terminal sees the response (a tear never loses a commit).

Tear hook (拔卡): :meth:`arm_tear` makes the next matching command commit normally and then
raise :class:`TearInjected` instead of answering — the channel turns that into a removed card.

The AID is a constructor argument (the simulator does not read the ops configuration).
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from keys.cryptogram import compute_tac, cryptogram_data
from keys.issuer import PURPOSES
from keys.mac import challenge_iv, line_protection_mac
from keys.suite import CryptoError, Suite, encrypt_ecb
from protocol import card_files as cf
from protocol.apdu import ApduError, Command
from protocol.status_words import (
    SW_APPLICATION_LOCKED,
    SW_AUTH_BLOCKED,
    SW_CLA_NOT_SUPPORTED,
    SW_CONDITIONS_NOT_SATISFIED,
    SW_EEPROM_WRITE_FAILED,
    SW_FILE_NOT_FOUND,
    SW_INCORRECT_P1P2,
    SW_INS_NOT_SUPPORTED,
    SW_MAC_INVALID,
    SW_OFFSET_BEYOND_EOF,
    SW_OK,
    SW_RECORD_NOT_FOUND,
    SW_REFERENCED_DATA_NOT_FOUND,
    SW_SECURITY_NOT_SATISFIED,
    SW_SM_DATA_INCORRECT,
    SW_WRONG_DATA,
    SW_WRONG_LENGTH,
    verify_failed,
)

CARD_ATR = bytes.fromhex("3B6900004341524550415930")  # T=0, historical bytes "CAREPAY0"
CHALLENGE_LENGTHS = (4, 8)
MAX_ATC = 0xFFFF
CARD_FORMAT = "carepay-card/1"


class TearInjected(Exception):
    """The card committed the command, then lost power before answering (injected by :meth:`arm_tear`)."""


class _Sw(Exception):
    """Internal: abort the command with a status word."""

    def __init__(self, sw: int) -> None:
        self.sw = sw


def _rsp(data: bytes = b"", sw: int = SW_OK) -> bytes:
    return data + sw.to_bytes(2, "big")


@dataclass(repr=False)
class VirtualCard:
    """One simulated card. ``keys`` maps purpose → diversified key (never shown)."""

    aid: bytes
    suite: Suite
    app_serial: bytes
    key_version: int
    keys: dict[str, bytes]
    cardholder_ef: bytes
    entitlement_ef: bytes
    pin: str
    atc: int = 0
    status: int = cf.CardStatus.ACTIVE
    pin_tries_left: int = cf.PIN_TRIES
    ext_auth_tries_left: int = cf.EXTERNAL_AUTH_TRIES
    log: list[bytes] = field(default_factory=list)  # newest first
    cryptograms: list[tuple[int, bytes, bytes]] = field(default_factory=list)  # (atc, request, tac), newest first
    label: str = ""
    on_commit: Callable[[VirtualCard], None] | None = None
    # volatile (RAM) state
    _selected: bool = False
    _challenge: bytes | None = None
    _ext_authed: bool = False
    _pin_verified: bool = False
    _dirty: bool = False
    _tear_ins: int | None = None
    _tear_armed: bool = False

    def __post_init__(self) -> None:
        self.suite = Suite.parse(self.suite)
        if len(self.app_serial) != 8:
            raise ValueError("application serial must be 8 bytes")
        missing = [p for p in PURPOSES if p not in self.keys]
        if missing:
            raise ValueError(f"card keys missing for {missing}")
        self._handlers: dict[int, Callable[[Command], bytes]] = {
            cf.INS_SELECT: self._select,
            cf.INS_GET_CHALLENGE: self._get_challenge,
            cf.INS_INTERNAL_AUTH: self._internal_auth,
            cf.INS_EXTERNAL_AUTH: self._external_auth,
            cf.INS_READ_BINARY: self._read_binary,
            cf.INS_READ_RECORD: self._read_record,
            cf.INS_UPDATE_BINARY: self._update_binary,
            cf.INS_UPDATE_RECORD: self._update_record,
            cf.INS_APPEND_RECORD: self._append_record,
            cf.INS_VERIFY: self._verify_pin,
            cf.INS_CHANGE_PIN: self._change_pin,
            cf.INS_CRYPTOGRAM: self._cryptogram,
            cf.INS_TXN_PROVE: self._txn_prove,
        }

    def __repr__(self) -> str:
        return (f"VirtualCard(serial={self.app_serial.hex().upper()}, suite={self.suite.value}, "
                f"key_version={self.key_version}, atc={self.atc}, keys=<hidden>)")

    # --- power and the tear hook

    def power_on(self) -> bytes:
        """Cold reset: security state cleared, the application deselected; returns the ATR."""
        self._reset_security()
        self._selected = False
        return CARD_ATR

    def power_off(self) -> None:
        self._reset_security()
        self._selected = False

    def arm_tear(self, ins: int | None = None) -> None:
        """Lose power after committing the next command with this INS (any command when None)."""
        self._tear_armed = True
        self._tear_ins = ins

    def _reset_security(self) -> None:
        self._challenge = None
        self._ext_authed = False
        self._pin_verified = False

    # --- the APDU dispatcher

    def process(self, apdu: bytes) -> bytes:
        """Answer one command APDU with ``data ‖ SW``. Never raises except :class:`TearInjected`."""
        try:
            cmd = Command.parse(apdu)
        except ApduError:
            return _rsp(sw=SW_WRONG_LENGTH)
        handler = self._handlers.get(cmd.ins)
        self._dirty = False
        try:
            if handler is None:
                out = _rsp(sw=SW_INS_NOT_SUPPORTED)
            elif cmd.cla not in (cf.CLA_PLAIN, cf.CLA_SM, cf.CLA_PROPRIETARY):
                out = _rsp(sw=SW_CLA_NOT_SUPPORTED)
            else:
                out = handler(cmd)
        except _Sw as exc:
            out = _rsp(sw=exc.sw)
        except (CryptoError, cf.CardFileError, ValueError):
            out = _rsp(sw=SW_WRONG_DATA)
        if self._dirty and self.on_commit is not None:
            try:
                self.on_commit(self)
            except OSError:  # the backing file could not be written: the card reports an EEPROM failure
                out = _rsp(sw=SW_EEPROM_WRITE_FAILED)
        if self._tear_armed and (self._tear_ins is None or self._tear_ins == cmd.ins):
            self._tear_armed = False
            self._reset_security()
            self._selected = False
            raise TearInjected(f"card torn after INS {cmd.ins:02X}")
        return out

    # --- helpers

    def _need_selected(self) -> None:
        if not self._selected:
            raise _Sw(SW_CONDITIONS_NOT_SATISFIED)

    def _key(self, purpose: str) -> bytes:
        return self.keys[purpose]

    def _take_challenge(self) -> bytes:
        ch, self._challenge = self._challenge, None
        if ch is None:
            raise _Sw(SW_CONDITIONS_NOT_SATISFIED)
        return ch

    def _check_sm(self, cmd: Command) -> bytes:
        """Verify the line-protection MAC of an SM command; returns the data without the MAC."""
        if cmd.cla != cf.CLA_SM:
            raise _Sw(SW_SECURITY_NOT_SATISFIED)
        challenge = self._take_challenge()
        if len(cmd.data) < cf.SM_MAC_BYTES:
            raise _Sw(SW_SM_DATA_INCORRECT)
        body, mac = cmd.data[: -cf.SM_MAC_BYTES], cmd.data[-cf.SM_MAC_BYTES :]
        covered = bytes([cmd.cla, cmd.ins, cmd.p1, cmd.p2, len(cmd.data)]) + body
        expected = line_protection_mac(self._key("sm_mac"), covered, challenge, self.suite)
        if not hmac.compare_digest(expected, mac):
            raise _Sw(SW_MAC_INVALID)
        return body

    def _binary_file(self, p1: int) -> tuple[int, bytes]:
        if not p1 & 0x80:
            raise _Sw(SW_INCORRECT_P1P2)
        sfi = p1 & 0x1F
        if sfi == cf.SFI_CARDHOLDER:
            return sfi, self.cardholder_ef
        if sfi == cf.SFI_ENTITLEMENT:
            return sfi, self.entitlement_ef
        raise _Sw(SW_FILE_NOT_FOUND)

    def _log_sfi(self, p2: int, with_mode: bool) -> None:
        if p2 >> 3 != cf.SFI_TXN_LOG or (with_mode and p2 & 0x07 != 0x04):
            raise _Sw(SW_FILE_NOT_FOUND if p2 >> 3 != cf.SFI_TXN_LOG else SW_INCORRECT_P1P2)

    # --- commands

    def _select(self, cmd: Command) -> bytes:
        if cmd.cla != cf.CLA_PLAIN or cmd.p1 != 0x04:
            raise _Sw(SW_INCORRECT_P1P2)
        self._reset_security()
        if cmd.data != self.aid:
            self._selected = False
            raise _Sw(SW_FILE_NOT_FOUND)
        self._selected = True
        return _rsp(cf.build_fci(self.aid, self.app_serial, self.key_version, self.suite.value, self.status,
                                 self.atc))

    def _get_challenge(self, cmd: Command) -> bytes:
        if cmd.le not in CHALLENGE_LENGTHS or cmd.data:
            raise _Sw(SW_WRONG_LENGTH)
        self._challenge = os.urandom(cmd.le)
        return _rsp(self._challenge)

    def _internal_auth(self, cmd: Command) -> bytes:
        self._need_selected()
        if len(cmd.data) != self.suite.block_bytes:
            raise _Sw(SW_WRONG_LENGTH)
        return _rsp(encrypt_ecb(self._key("internal_auth"), cmd.data, self.suite))

    def _external_auth(self, cmd: Command) -> bytes:
        self._need_selected()
        if self.ext_auth_tries_left <= 0:
            self._challenge = None
            raise _Sw(SW_AUTH_BLOCKED)
        challenge = self._take_challenge()
        if len(cmd.data) != self.suite.block_bytes:
            raise _Sw(SW_WRONG_LENGTH)
        expected = encrypt_ecb(self._key("external_auth"), challenge_iv(challenge, self.suite), self.suite)
        if not hmac.compare_digest(expected, cmd.data):
            self.ext_auth_tries_left -= 1
            self._dirty = True
            raise _Sw(verify_failed(self.ext_auth_tries_left))
        if self.ext_auth_tries_left != cf.EXTERNAL_AUTH_TRIES:
            self.ext_auth_tries_left = cf.EXTERNAL_AUTH_TRIES
            self._dirty = True
        self._ext_authed = True
        return _rsp()

    def _read_binary(self, cmd: Command) -> bytes:
        self._need_selected()
        sfi, content = self._binary_file(cmd.p1)
        if sfi == cf.SFI_CARDHOLDER or cmd.cla == cf.CLA_SM:
            if self._check_sm(cmd):
                raise _Sw(SW_SM_DATA_INCORRECT)  # a READ BINARY carries nothing but its MAC
        elif cmd.data:
            raise _Sw(SW_WRONG_LENGTH)
        offset = cmd.p2
        if offset > len(content):
            raise _Sw(SW_OFFSET_BEYOND_EOF)
        n = len(content) - offset if cmd.le is None else min(cmd.le, len(content) - offset)
        return _rsp(content[offset : offset + n])

    def _read_record(self, cmd: Command) -> bytes:
        self._need_selected()
        self._log_sfi(cmd.p2, with_mode=True)
        if cmd.cla != cf.CLA_PLAIN:
            raise _Sw(SW_CLA_NOT_SUPPORTED)
        if not 1 <= cmd.p1 <= len(self.log):
            raise _Sw(SW_RECORD_NOT_FOUND)
        return _rsp(self.log[cmd.p1 - 1])

    def _need_ext_auth(self) -> None:
        if not self._ext_authed:
            raise _Sw(SW_SECURITY_NOT_SATISFIED)

    def _update_binary(self, cmd: Command) -> bytes:
        self._need_selected()
        sfi, content = self._binary_file(cmd.p1)
        data = self._check_sm(cmd)
        self._need_ext_auth()
        offset = cmd.p2
        if offset + len(data) > len(content):
            raise _Sw(SW_OFFSET_BEYOND_EOF)
        new = content[:offset] + data + content[offset + len(data) :]
        cf.parse(cf.CARDHOLDER if sfi == cf.SFI_CARDHOLDER else cf.ENTITLEMENT, new, "file")  # keep it well-formed
        if sfi == cf.SFI_CARDHOLDER:
            self.cardholder_ef = new
        else:
            self.entitlement_ef = new
        self._dirty = True
        return _rsp()

    def _update_record(self, cmd: Command) -> bytes:
        self._need_selected()
        self._log_sfi(cmd.p2, with_mode=True)
        data = self._check_sm(cmd)
        self._need_ext_auth()
        if len(data) != cf.LOG_RECORD_BYTES:
            raise _Sw(SW_WRONG_LENGTH)
        if not 1 <= cmd.p1 <= len(self.log):
            raise _Sw(SW_RECORD_NOT_FOUND)
        self.log[cmd.p1 - 1] = data
        self._dirty = True
        return _rsp()

    def _append_record(self, cmd: Command) -> bytes:
        self._need_selected()
        self._log_sfi(cmd.p2, with_mode=False)
        data = self._check_sm(cmd)
        self._need_ext_auth()
        if len(data) != cf.LOG_RECORD_BYTES:
            raise _Sw(SW_WRONG_LENGTH)
        self.log.insert(0, data)
        del self.log[cf.LOG_RECORDS :]
        self._dirty = True
        return _rsp()

    def _check_pin(self, given: bytes) -> None:
        if self.pin_tries_left <= 0:
            raise _Sw(SW_AUTH_BLOCKED)
        if not hmac.compare_digest(given, cf.pin_block(self.pin)):
            self.pin_tries_left -= 1
            self._pin_verified = False
            self._dirty = True
            raise _Sw(verify_failed(self.pin_tries_left))
        if self.pin_tries_left != cf.PIN_TRIES:
            self.pin_tries_left = cf.PIN_TRIES
            self._dirty = True

    def _verify_pin(self, cmd: Command) -> bytes:
        self._need_selected()
        if not cmd.data:  # VERIFY without data asks for the retry counter
            if self.pin_tries_left <= 0:
                raise _Sw(SW_AUTH_BLOCKED)
            raise _Sw(verify_failed(self.pin_tries_left))
        self._check_pin(cmd.data)
        self._pin_verified = True
        return _rsp()

    def _change_pin(self, cmd: Command) -> bytes:
        self._need_selected()
        sep = cmd.data.find(b"\xff")
        if cmd.p1 != 0x01 or sep < 1:
            raise _Sw(SW_WRONG_DATA)
        old, new = cmd.data[:sep], cmd.data[sep + 1 :]
        new_digits = new.hex().upper().rstrip("F")
        if not new_digits.isdigit() or not cf.MIN_PIN_DIGITS <= len(new_digits) <= cf.MAX_PIN_DIGITS:
            raise _Sw(SW_WRONG_DATA)
        self._check_pin(old)
        self.pin = new_digits
        self._pin_verified = True
        self._dirty = True
        return _rsp()

    def _cryptogram(self, cmd: Command) -> bytes:
        self._need_selected()
        if self.status != cf.CardStatus.ACTIVE:
            raise _Sw(SW_APPLICATION_LOCKED)
        if len(cmd.data) != cf.CRYPTOGRAM_REQUEST_BYTES:
            raise _Sw(SW_WRONG_LENGTH)
        if cmd.p1 & cf.CRYPTOGRAM_P1_PIN_VERIFIED and not self._pin_verified:
            raise _Sw(SW_SECURITY_NOT_SATISFIED)
        req = cf.parse(cf.CRYPTOGRAM_REQUEST, cmd.data, "cryptogram request")
        program = cf.PROGRAM_BY_CODE.get(req.program)
        ent = cf.parse(cf.ENTITLEMENT, self.entitlement_ef, "entitlement EF")
        if program is None or program not in cf.programs_from_bits(ent.programs):
            raise _Sw(SW_CONDITIONS_NOT_SATISFIED)
        if self.atc >= MAX_ATC:
            raise _Sw(SW_APPLICATION_LOCKED)
        atc = self.atc + 1
        data = cryptogram_data(req.amount_fen, program, req.terminal_id, req.ttn, req.txn_date, req.txn_time, atc)
        tac = compute_tac(self._key("tac"), data, self.suite)
        self.atc = atc
        self.cryptograms.insert(0, (atc, bytes(cmd.data), tac))
        del self.cryptograms[cf.CRYPTOGRAM_HISTORY :]
        self._dirty = True
        return _rsp(atc.to_bytes(2, "big") + tac)

    def _txn_prove(self, cmd: Command) -> bytes:
        self._need_selected()
        if len(cmd.data) != 2:
            raise _Sw(SW_WRONG_LENGTH)
        atc = int.from_bytes(cmd.data, "big")
        for seen, request, tac in self.cryptograms:
            if seen == atc:
                return _rsp(request + atc.to_bytes(2, "big") + tac)
        raise _Sw(SW_REFERENCED_DATA_NOT_FOUND)

    # --- persistence

    def to_dict(self) -> dict[str, Any]:
        """The card's EEPROM as JSON-able data (keys included: this IS the simulated card)."""
        return {
            "format": CARD_FORMAT, "label": self.label, "aid": self.aid.hex().upper(), "suite": self.suite.value,
            "app_serial": self.app_serial.hex().upper(), "key_version": self.key_version,
            "keys": {p: k.hex().upper() for p, k in self.keys.items()},
            "cardholder_ef": self.cardholder_ef.hex().upper(), "entitlement_ef": self.entitlement_ef.hex().upper(),
            "pin": self.pin, "atc": self.atc, "status": int(self.status), "pin_tries_left": self.pin_tries_left,
            "ext_auth_tries_left": self.ext_auth_tries_left, "log": [r.hex().upper() for r in self.log],
            "cryptograms": [[a, r.hex().upper(), t.hex().upper()] for a, r, t in self.cryptograms],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> VirtualCard:
        """Rebuild a card; ValueError naming the problem when the data is malformed."""
        if not isinstance(d, dict) or d.get("format") != CARD_FORMAT:
            raise ValueError(f"not a {CARD_FORMAT} card")
        try:
            return cls(
                aid=bytes.fromhex(d["aid"]), suite=Suite.parse(d["suite"]), app_serial=bytes.fromhex(d["app_serial"]),
                key_version=int(d["key_version"]), keys={p: bytes.fromhex(k) for p, k in d["keys"].items()},
                cardholder_ef=bytes.fromhex(d["cardholder_ef"]), entitlement_ef=bytes.fromhex(d["entitlement_ef"]),
                pin=str(d["pin"]), atc=int(d["atc"]), status=int(d["status"]), pin_tries_left=int(d["pin_tries_left"]),
                ext_auth_tries_left=int(d["ext_auth_tries_left"]), log=[bytes.fromhex(r) for r in d["log"]],
                cryptograms=[(int(a), bytes.fromhex(r), bytes.fromhex(t)) for a, r, t in d["cryptograms"]],
                label=str(d.get("label", "")),
            )
        except (KeyError, TypeError, ValueError, AttributeError, CryptoError) as exc:
            raise ValueError(f"card data malformed: {type(exc).__name__} {exc}") from None
