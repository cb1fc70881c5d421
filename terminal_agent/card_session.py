"""The terminal's card session (刷卡会话): prove the card genuine, read it, check it, get its cryptogram.

Steps, as DESIGN.md "The card and the reader" fixes them (APDUs: ``protocol.card_files``):

1. :meth:`CardSession.start` — power the card, SELECT the civil-affairs ADF (6A82 → ``wrong_aid``),
   read the FCI (application serial, key version, suite, status, ATC); INTERNAL AUTHENTICATE with a
   fresh random checked by the PSAM (mismatch → ``forged``; no master key → ``unknown_key_version``);
   READ BINARY of the cardholder EF with secure messaging (PSAM MAC; 9302 → ``bad_mac``) and of the
   entitlement EF. Returns :class:`CardInfo`.
2. :meth:`CardSession.authorize` — local checks (status ``card_blocked``, valid-until ``expired``,
   program ``program_not_allowed``), VERIFY PIN when the amount exceeds the threshold (63Cx →
   ``pin_wrong`` with the tries left, 6983 → ``pin_blocked``), a TTN from the PSAM, then the
   TRANSACTION CRYPTOGRAM. Before the cryptogram command leaves, ``on_pending`` receives a
   :class:`PendingCryptogram` for the caller to persist. Returns :class:`CardTransaction` — all the
   host message needs.
3. :meth:`CardSession.complete` — after host approval: EXTERNAL AUTHENTICATE with the PSAM's
   cryptogram, then APPEND RECORD of the transaction log with a PSAM-computed MAC. With
   ``resume=True`` it first reads log record 1 and skips the append when the record is there
   (idempotent after a tear).

Recovery (no lost or double charge): a card pulled during step 2 raises ``card_removed`` with the
pending record attached. On the next :meth:`start` with the same card, :meth:`recover` asks the card
for the cryptogram of the expected ATC (GET TRANSACTION PROVE): found and matching → the same
:class:`CardTransaction` (send it to the host; never ask the card again); absent → ``None`` (the card
never counted it: nothing was charged, the pending record can be dropped). Recovery must come before the
card makes ``CRYPTOGRAM_HISTORY`` more cryptograms elsewhere; after that it raises ``recovery_unavailable``
and the host's record decides.

Every failure is a :class:`CardSessionError` with a :class:`Reason`, a clear message and the ISO 8583
response code a host would give. Card numbers and ID numbers leave this module masked in summaries.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

from protocol import card_files as cf
from protocol.channel import POWER_ON, CardChannel, CardRemoved, ChannelError, ChannelTimeout, transmit_many
from protocol.ids import mask_card_no, mask_id_no
from protocol.status_words import (
    SW_AUTH_BLOCKED,
    SW_CONDITIONS_NOT_SATISFIED,
    SW_FILE_NOT_FOUND,
    SW_MAC_INVALID,
    SW_OK,
    SW_REFERENCED_DATA_NOT_FOUND,
    SW_SM_DATA_INCORRECT,
    describe,
    tries_left,
)
from terminal_agent.psam_session import PsamError, PsamKeyMissing, PsamSession

LOCAL_TZ = ZoneInfo("Asia/Shanghai")
DEFAULT_PIN_THRESHOLD_FEN = 20_000
SM_CHALLENGE_BYTES = 4
EXTERNAL_AUTH_CHALLENGE_BYTES = 8


class Reason(enum.StrEnum):
    """Why a card session stopped."""

    WRONG_AID = "wrong_aid"
    NOT_A_CARD = "not_a_card"
    CARD_BLOCKED = "card_blocked"
    FORGED = "forged"
    UNKNOWN_KEY_VERSION = "unknown_key_version"
    BAD_MAC = "bad_mac"
    PIN_REQUIRED = "pin_required"
    PIN_WRONG = "pin_wrong"
    PIN_BLOCKED = "pin_blocked"
    EXPIRED = "expired"
    PROGRAM_NOT_ALLOWED = "program_not_allowed"
    CARD_REMOVED = "card_removed"
    TIMEOUT = "timeout"
    READER_ERROR = "reader_error"
    PSAM_ERROR = "psam_error"
    CARD_ERROR = "card_error"
    RECOVERY_MISMATCH = "recovery_mismatch"
    RECOVERY_UNAVAILABLE = "recovery_unavailable"


RESPONSE_CODES = {
    Reason.EXPIRED: "54", Reason.PROGRAM_NOT_ALLOWED: "57", Reason.CARD_BLOCKED: "62", Reason.FORGED: "14",
    Reason.WRONG_AID: "14", Reason.NOT_A_CARD: "14", Reason.UNKNOWN_KEY_VERSION: "14", Reason.PIN_WRONG: "55",
    Reason.PIN_BLOCKED: "75", Reason.PIN_REQUIRED: "55", Reason.BAD_MAC: "A0",
}
"""ISO 8583 response codes for refusals the host would give too; everything else is a terminal fault (96)."""


class CardSessionError(Exception):
    """A card session stopped; ``reason`` says why, the message says it in words, never with card data."""

    def __init__(self, reason: Reason, message: str, *, sw: int | None = None, tries: int | None = None,
                 pending: PendingCryptogram | None = None) -> None:
        self.reason = reason
        self.sw = sw
        self.tries_left = tries
        self.pending = pending
        super().__init__(f"{reason.value}: {message}")

    @property
    def response_code(self) -> str:
        return RESPONSE_CODES.get(self.reason, "96")


@dataclass(frozen=True)
class Cardholder:
    """The cardholder EF, decoded. Shown to people only through :meth:`masked`."""

    card_no: str
    name: str
    id_no: str
    birth_date: str
    district_code: str
    street_code: str
    category: str
    category_grade: int
    valid_until: str

    def __repr__(self) -> str:
        return f"Cardholder(card_no={mask_card_no(self.card_no)}, id_no={mask_id_no(self.id_no)})"

    def masked(self) -> dict[str, Any]:
        d = asdict(self)
        d["card_no"] = mask_card_no(self.card_no)
        d["id_no"] = mask_id_no(self.id_no)
        d["name"] = self.name[:1] + "*" * (len(self.name) - 1)
        d["birth_date"] = self.birth_date[:4] + "****"
        return d


@dataclass(frozen=True)
class CardInfo:
    """What :meth:`CardSession.start` learned from an authenticated card."""

    app_serial: str
    key_version: int
    suite: str
    status: int
    atc: int
    cardholder: Cardholder
    programs: tuple[str, ...]
    grade: int

    @property
    def card_no(self) -> str:
        return self.cardholder.card_no

    def summary(self) -> dict[str, Any]:
        """Masked, display-safe view (for ``terminal read-card`` and receipts)."""
        return {"card_no": mask_card_no(self.card_no), "app_serial": self.app_serial, "key_version": self.key_version,
                "suite": self.suite, "status": cf.CardStatus(self.status).name.lower() if self.status in
                set(cf.CardStatus) else self.status, "atc": self.atc,
                "cardholder": self.cardholder.masked(), "programs": list(self.programs), "grade": self.grade}


@dataclass(frozen=True)
class PendingCryptogram:
    """Written by the caller before the cryptogram command leaves: the key to recovery after a tear."""

    app_serial: str
    card_no: str
    key_version: int
    suite: str
    program: str
    amount_fen: int
    terminal_id: str
    ttn: int
    txn_date: str
    txn_time: str
    expected_atc: int
    pin_verified: bool = False

    def __repr__(self) -> str:
        return (f"PendingCryptogram(card_no={mask_card_no(self.card_no)}, program={self.program}, "
                f"amount_fen={self.amount_fen}, ttn={self.ttn}, expected_atc={self.expected_atc})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PendingCryptogram:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__})

    def request_bytes(self) -> bytes:
        return cf.CRYPTOGRAM_REQUEST.build({
            "amount_fen": self.amount_fen, "program": cf.PROGRAM_CODES[self.program], "terminal_id": self.terminal_id,
            "ttn": self.ttn, "txn_date": self.txn_date, "txn_time": self.txn_time})


@dataclass(frozen=True)
class CardTransaction:
    """Everything the host purchase message needs from the card; ``tac`` and ``app_serial`` in hex."""

    card_no: str
    app_serial: str
    key_version: int
    suite: str
    program: str
    amount_fen: int
    atc: int
    ttn: int
    terminal_id: str
    txn_date: str
    txn_time: str
    tac: str
    pin_verified: bool = False
    recovered: bool = False
    cardholder: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        return (f"CardTransaction(card_no={mask_card_no(self.card_no)}, program={self.program}, "
                f"amount_fen={self.amount_fen}, atc={self.atc}, ttn={self.ttn})")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _session_error(exc: ChannelError, what: str, pending: PendingCryptogram | None) -> CardSessionError:
    """The card-session error for a failed exchange (the message never carries APDU bytes)."""
    if isinstance(exc, CardRemoved):
        return CardSessionError(Reason.CARD_REMOVED, f"card removed during {what}", pending=pending)
    if isinstance(exc, ChannelTimeout):
        return CardSessionError(Reason.TIMEOUT, f"no answer from the card during {what}", pending=pending)
    return CardSessionError(Reason.READER_ERROR, f"reader failed during {what}: {exc}", pending=pending)


def _split(raw: bytes) -> tuple[bytes, int]:
    if len(raw) < 2:
        raise CardSessionError(Reason.CARD_ERROR, "card answered fewer than 2 bytes")
    return raw[:-2], (raw[-2] << 8) | raw[-1]


class CardSession:
    """One card in the card slot, with the terminal's PSAM. Not thread-safe: one session per worker thread."""

    def __init__(self, card: CardChannel, psam: PsamSession, aid: bytes, *,
                 pin_threshold_fen: int = DEFAULT_PIN_THRESHOLD_FEN,
                 clock: Callable[[], datetime] | None = None) -> None:
        self.card = card
        self.psam = psam
        self.aid = bytes(aid)
        self.pin_threshold_fen = pin_threshold_fen
        self.clock = clock or (lambda: datetime.now(LOCAL_TZ))
        self.info: CardInfo | None = None
        self._serial = b""
        self._pin_verified = False
        self._ext_challenge: bytes | None = None  # fetched with the cryptogram, spent by EXTERNAL AUTHENTICATE
        self._ttn: int | None = None  # drawn by start(purchase=True), spent by authorize
        self.apdus = 0

    # --- plumbing

    def _transmit(self, apdu: bytes, what: str, pending: PendingCryptogram | None = None) -> tuple[bytes, int]:
        self.apdus += 1
        try:
            return _split(self.card.transmit(apdu))
        except ChannelError as exc:
            raise _session_error(exc, what, pending) from None

    def _transmit_many(self, apdus: list[bytes], what: str, pending: PendingCryptogram | None = None, *,
                       keep_partial: bool = False) -> list[tuple[bytes, int]]:
        """Independent commands in one reader exchange where the reader can (see protocol.channel.transmit_many).

        A failure raises CardSessionError as :meth:`_transmit` would — unless ``keep_partial`` and some
        commands ran: then their answers are returned (a shorter list) and the rest is dropped."""
        self.apdus += len(apdus)
        try:
            return [_split(r) for r in transmit_many(self.card, apdus)]
        except ChannelError as exc:
            if keep_partial and exc.answers:
                return [_split(r) for r in exc.answers]
            raise _session_error(exc, what, pending) from None

    def _expect_ok(self, apdu: bytes, what: str) -> bytes:
        data, sw = self._transmit(apdu, what)
        return self._check_ok(data, sw, what)

    @staticmethod
    def _check_ok(data: bytes, sw: int, what: str) -> bytes:
        if sw == SW_OK:
            return data
        if sw == SW_MAC_INVALID:
            raise CardSessionError(Reason.BAD_MAC, f"card rejected the secure-messaging MAC on {what} (9302)", sw=sw)
        if sw == SW_SM_DATA_INCORRECT:
            raise CardSessionError(Reason.BAD_MAC, f"card found the secure-messaging data incorrect on {what} (6988)",
                                   sw=sw)
        raise CardSessionError(Reason.CARD_ERROR, f"{what}: card answered {describe(sw)}", sw=sw)

    def _psam(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except PsamKeyMissing:
            raise CardSessionError(Reason.UNKNOWN_KEY_VERSION,
                                   "the PSAM holds no issuer key for this card's key version") from None
        except PsamError as exc:
            raise CardSessionError(Reason.PSAM_ERROR, str(exc), sw=exc.sw) from None
        except ChannelTimeout:
            raise CardSessionError(Reason.TIMEOUT, "no answer from the PSAM") from None
        except ChannelError as exc:
            raise CardSessionError(Reason.PSAM_ERROR, f"PSAM slot failed: {exc}") from None

    def _info(self) -> CardInfo:
        if self.info is None:
            raise CardSessionError(Reason.CARD_ERROR, "no card session started")
        return self.info

    @staticmethod
    def _get_challenge(n: int) -> bytes:
        return bytes([cf.CLA_PLAIN, cf.INS_GET_CHALLENGE, 0, 0, n])

    def _challenge(self, n: int, what: str) -> bytes:
        return self._challenge_ok(*self._transmit(self._get_challenge(n), f"GET CHALLENGE for {what}"), n, what)

    def _challenge_ok(self, data: bytes, sw: int, n: int, what: str) -> bytes:
        ch = self._check_ok(data, sw, f"GET CHALLENGE for {what}")
        if len(ch) != n:
            raise CardSessionError(Reason.CARD_ERROR, "challenge of the wrong length")
        return ch

    @staticmethod
    def _sm_header(ins: int, p1: int, p2: int, data: bytes) -> bytes:
        return bytes([cf.CLA_SM, ins, p1, p2, len(data) + cf.SM_MAC_BYTES])

    def _sm_apdu(self, ins: int, p1: int, p2: int, data: bytes, le: int | None, what: str,
                 challenge: bytes | None = None, mac: bytes | None = None) -> bytes:
        """A line-protected command: challenge from the card (or the one given), MAC from the PSAM (or given)."""
        info = self._info()
        header = self._sm_header(ins, p1, p2, data)
        if mac is None:
            if challenge is None:
                challenge = self._challenge(SM_CHALLENGE_BYTES, what)
            mac = self._psam(self.psam.sm_mac, self._serial, info.key_version, info.suite, challenge, header + data)
        return header + data + mac + (bytes([le]) if le is not None else b"")

    # --- step 1

    def start(self, *, purchase: bool = False) -> CardInfo:
        """Power, select, authenticate and read the card. Raises CardSessionError.

        ``purchase``: a charge follows — the PSAM draws its TTN in the same exchange as the authentication
        check (one exchange fewer); unused if the session stops before :meth:`authorize` (a gap in the
        terminal's numbering, as after any refused attempt)."""
        self.info = None
        self._pin_verified = False
        self._ext_challenge = None
        self._ttn = None
        select = bytes([cf.CLA_PLAIN, cf.INS_SELECT, 0x04, 0x00, len(self.aid)]) + self.aid + b"\x00"
        self.apdus += 1
        try:  # power on and SELECT in one exchange
            _atr, answer = transmit_many(self.card, [POWER_ON, select])
        except ChannelError as exc:
            if exc.answers:  # powered, then lost during SELECT
                raise _session_error(exc, "SELECT", None) from None
            if isinstance(exc, CardRemoved):
                raise CardSessionError(Reason.CARD_REMOVED, "no card in the reader") from None
            raise CardSessionError(Reason.READER_ERROR, f"cannot power the card: {exc}") from None
        data, sw = _split(answer)
        if sw == SW_FILE_NOT_FOUND:
            raise CardSessionError(Reason.WRONG_AID, "the card has no civil-affairs application (6A82)", sw=sw)
        if sw != SW_OK:
            raise CardSessionError(Reason.CARD_ERROR, f"SELECT: card answered {describe(sw)}", sw=sw)
        try:
            fci = cf.parse_fci(data)
        except cf.CardFileError as exc:
            raise CardSessionError(Reason.NOT_A_CARD, str(exc)) from None
        if fci["aid"] != self.aid:
            raise CardSessionError(Reason.WRONG_AID, "the card selected another application")
        serial, kv, suite = fci["app_serial"], fci["key_version"], fci["suite"]
        assert isinstance(serial, bytes) and isinstance(kv, int) and isinstance(suite, str)
        self._serial = serial
        block = 16 if suite == "sm4" else 8
        rnd = os.urandom(block)
        # INTERNAL AUTHENTICATE and the challenge for the secure-messaging read: independent, one exchange
        (ia, ia_sw), (ch, ch_sw) = self._transmit_many(
            [bytes([cf.CLA_PLAIN, cf.INS_INTERNAL_AUTH, 0, 0, block]) + rnd + b"\x00",
             self._get_challenge(SM_CHALLENGE_BYTES)], "INTERNAL AUTHENTICATE")
        answer = self._check_ok(ia, ia_sw, "INTERNAL AUTHENTICATE")
        sm_challenge = self._challenge_ok(ch, ch_sw, SM_CHALLENGE_BYTES, "READ BINARY cardholder EF")
        read_data = b""
        header = self._sm_header(cf.INS_READ_BINARY, 0x80 | cf.SFI_CARDHOLDER, 0, read_data)
        # the PSAM checks the card and makes the read's MAC in one exchange
        genuine, mac, self._ttn = (False, b"", None) if len(answer) != block else self._psam(
            self.psam.verify_internal_auth_and_sm_mac, serial, kv, suite, rnd, answer, sm_challenge,
            header + read_data, draw_ttn=purchase)
        if not genuine:
            raise CardSessionError(Reason.FORGED, "internal authentication failed: the card is not genuine "
                                   "(forged or wrong issuer key)")
        # provisional info so _sm_apdu knows the key version and suite; cleared again on any failure
        self.info = CardInfo(serial.hex().upper(), kv, suite, int(fci["status"]), int(fci["atc"]),  # type: ignore[arg-type]
                             Cardholder("", "", "", "", "", "", "", 0, ""), (), 0)
        try:
            self.info = self._read_files(self.info, mac)
        except BaseException:
            self.info = None
            raise
        return self.info

    def _read_files(self, info: CardInfo, mac: bytes) -> CardInfo:
        # both reads in one exchange: the cardholder EF under secure messaging (MAC made by the PSAM), the plain one
        (raw, raw_sw), (ent, ent_sw) = self._transmit_many(
            [self._sm_apdu(cf.INS_READ_BINARY, 0x80 | cf.SFI_CARDHOLDER, 0, b"", cf.CARDHOLDER_BYTES,
                           "READ BINARY cardholder EF", mac=mac),
             bytes([cf.CLA_PLAIN, cf.INS_READ_BINARY, 0x80 | cf.SFI_ENTITLEMENT, 0, cf.ENTITLEMENT_BYTES])],
            "READ BINARY cardholder and entitlement EFs")
        raw = self._check_ok(raw, raw_sw, "READ BINARY cardholder EF")
        ent = self._check_ok(ent, ent_sw, "READ BINARY entitlement EF")
        try:
            h = cf.parse(cf.CARDHOLDER, raw, "cardholder EF")
            e = cf.parse(cf.ENTITLEMENT, ent, "entitlement EF")
        except cf.CardFileError as exc:
            raise CardSessionError(Reason.NOT_A_CARD, str(exc)) from None
        category = cf.CATEGORY_NAMES.get(h.category, str(h.category))  # type: ignore[call-overload]
        holder = Cardholder(h.card_no, h.name, h.id_no, h.birth_date, h.district_code, h.street_code, category,
                            h.category_grade, h.valid_until)
        return CardInfo(info.app_serial, info.key_version, info.suite, info.status, info.atc, holder,
                        cf.programs_from_bits(e.programs), e.grade)

    # --- step 2

    def check(self, program: str, txn_date: str) -> None:
        """Local checks: status, eligibility valid-until, program allowed."""
        info = self._info()
        if info.status != cf.CardStatus.ACTIVE:
            raise CardSessionError(Reason.CARD_BLOCKED, "the card's application is blocked")
        if info.cardholder.valid_until < txn_date:
            raise CardSessionError(Reason.EXPIRED, f"eligibility expired on {info.cardholder.valid_until}")
        if program not in info.programs:
            raise CardSessionError(Reason.PROGRAM_NOT_ALLOWED,
                                   f"program {program!r} not allowed for this card (allowed: {', '.join(info.programs)})")

    def verify_pin(self, pin: str) -> None:
        try:
            block = cf.pin_block(pin)
        except cf.CardFileError as exc:
            raise CardSessionError(Reason.PIN_WRONG, str(exc)) from None
        _, sw = self._transmit(bytes([cf.CLA_PLAIN, cf.INS_VERIFY, 0, 0, len(block)]) + block, "VERIFY PIN")
        if sw == SW_OK:
            self._pin_verified = True
            return
        left = tries_left(sw)
        if left is not None and left > 0:
            raise CardSessionError(Reason.PIN_WRONG, f"wrong PIN, {left} {'try' if left == 1 else 'tries'} left",
                                   sw=sw, tries=left)
        if sw == SW_AUTH_BLOCKED or left == 0:
            raise CardSessionError(Reason.PIN_BLOCKED, "PIN blocked: too many wrong PINs", sw=sw, tries=0)
        raise CardSessionError(Reason.CARD_ERROR, f"VERIFY PIN: card answered {describe(sw)}", sw=sw)

    def authorize(self, amount_fen: int, program: str, *, pin: str | Callable[[], str] | None = None,
                  on_pending: Callable[[PendingCryptogram], None] | None = None,
                  now: datetime | None = None) -> CardTransaction:
        """Checks, PIN over the threshold, TTN, then the card's cryptogram."""
        info = self._info()
        if not isinstance(amount_fen, int) or amount_fen <= 0:
            raise CardSessionError(Reason.CARD_ERROR, "amount must be a positive integer of fen")
        if program not in cf.PROGRAM_CODES:
            raise CardSessionError(Reason.PROGRAM_NOT_ALLOWED, f"unknown program {program!r}")
        when = (now or self.clock()).astimezone(LOCAL_TZ)
        txn_date, txn_time = f"{when:%Y%m%d}", f"{when:%H%M%S}"
        self.check(program, txn_date)
        if amount_fen > self.pin_threshold_fen and not self._pin_verified:
            if pin is None:
                raise CardSessionError(Reason.PIN_REQUIRED, f"PIN required above {self.pin_threshold_fen} fen")
            self.verify_pin(pin() if callable(pin) else pin)
        ttn, self._ttn = self._ttn, None  # drawn with the authentication check (start(purchase=True)), or now
        if ttn is None:
            ttn = self._psam(self.psam.next_ttn)
        terminal_id = self._psam(lambda: self.psam.terminal_id)
        pending = PendingCryptogram(info.app_serial, info.card_no, info.key_version, info.suite, program, amount_fen,
                                    terminal_id, ttn, txn_date, txn_time, info.atc + 1, self._pin_verified)
        if on_pending is not None:
            on_pending(pending)
        p1 = cf.CRYPTOGRAM_P1_PIN_VERIFIED if self._pin_verified else 0
        req = pending.request_bytes()
        # the cryptogram and, in the same exchange, the challenge EXTERNAL AUTHENTICATE will answer after approval
        answers = self._transmit_many([bytes([cf.CLA_PROPRIETARY, cf.INS_CRYPTOGRAM, p1, 0, len(req)]) + req
                                       + bytes([cf.CRYPTOGRAM_RESPONSE_BYTES]),
                                       self._get_challenge(EXTERNAL_AUTH_CHALLENGE_BYTES)],
                                      "TRANSACTION CRYPTOGRAM", pending, keep_partial=True)
        data, sw = answers[0]
        self._ext_challenge = None
        if len(answers) > 1 and answers[1][1] == SW_OK and len(answers[1][0]) == EXTERNAL_AUTH_CHALLENGE_BYTES:
            self._ext_challenge = answers[1][0]
        if sw != SW_OK or len(data) != cf.CRYPTOGRAM_RESPONSE_BYTES:
            raise CardSessionError(Reason.CARD_ERROR, f"TRANSACTION CRYPTOGRAM: card answered {describe(sw)}",
                                   sw=sw, pending=pending)
        atc = int.from_bytes(data[:2], "big")
        self.info = CardInfo(**{**info.__dict__, "atc": atc})
        return self._transaction(pending, atc, data[2:], recovered=False)

    def _transaction(self, p: PendingCryptogram, atc: int, tac: bytes, *, recovered: bool) -> CardTransaction:
        info = self._info()
        return CardTransaction(p.card_no, p.app_serial, p.key_version, p.suite, p.program, p.amount_fen, atc, p.ttn,
                               p.terminal_id, p.txn_date, p.txn_time, tac.hex().upper(), p.pin_verified, recovered,
                               info.cardholder.masked())

    # --- recovery

    def recover(self, pending: PendingCryptogram) -> CardTransaction | None:
        """After a tear: the cryptogram the card made for ``pending`` (same card), or None if it never made one."""
        info = self._info()
        if info.app_serial != pending.app_serial:
            raise CardSessionError(Reason.RECOVERY_MISMATCH, "a different card is in the reader; insert the card "
                                   "of the interrupted transaction")
        if info.atc < pending.expected_atc:
            return None
        data, sw = self._transmit(bytes([cf.CLA_PROPRIETARY, cf.INS_TXN_PROVE, 0, 0, 2])
                                  + pending.expected_atc.to_bytes(2, "big") + b"\x00", "GET TRANSACTION PROVE")
        if sw == SW_REFERENCED_DATA_NOT_FOUND:
            # the card counted a cryptogram at that ATC, but it has left the card's history: only the host knows
            raise CardSessionError(Reason.RECOVERY_UNAVAILABLE, f"the card no longer holds the cryptogram of ATC "
                                   f"{pending.expected_atc}; settle the interrupted transaction with the host", sw=sw)
        if sw != SW_OK or len(data) != cf.TRANSACTION_PROVE.sizeof():
            raise CardSessionError(Reason.CARD_ERROR, f"GET TRANSACTION PROVE: card answered {describe(sw)}", sw=sw)
        proof = cf.TRANSACTION_PROVE.parse(data)
        if proof.request != pending.request_bytes():
            # the card's cryptogram at that ATC belongs to another transaction (e.g. another terminal)
            return None
        return self._transaction(pending, proof.atc, proof.tac, recovered=True)

    # --- step 3

    def complete(self, txn: CardTransaction, *, resume: bool = False) -> None:
        """After host approval: external authentication, then the transaction-log record (PSAM MAC)."""
        info = self._info()
        if txn.app_serial != info.app_serial:
            raise CardSessionError(Reason.RECOVERY_MISMATCH, "a different card is in the reader")
        record = cf.LOG_RECORD.build({
            "terminal_id": txn.terminal_id, "txn_date": txn.txn_date, "txn_time": txn.txn_time,
            "program": cf.PROGRAM_CODES[txn.program], "amount_fen": txn.amount_fen, "atc": txn.atc,
            "tac": bytes.fromhex(txn.tac)})
        log_p2 = (cf.SFI_TXN_LOG << 3) | 0x04
        if resume:
            data, sw = self._transmit(bytes([cf.CLA_PLAIN, cf.INS_READ_RECORD, 1, log_p2, cf.LOG_RECORD_BYTES]),
                                      "READ RECORD log")
            if sw == SW_OK and data == record:
                return
        cached, self._ext_challenge = self._ext_challenge, None
        if resume:  # a log read came after the cached challenge: a real card may have dropped it
            cached = None
        for challenge in (cached, None) if cached is not None else (None,):
            if challenge is None:
                challenge = self._challenge(EXTERNAL_AUTH_CHALLENGE_BYTES, "EXTERNAL AUTHENTICATE")
            crypto = self._psam(self.psam.external_auth_cryptogram, self._serial, info.key_version, info.suite,
                                challenge)
            # EXTERNAL AUTHENTICATE and the challenge for the log append's MAC in one exchange
            answers = self._transmit_many([bytes([cf.CLA_PLAIN, cf.INS_EXTERNAL_AUTH, 0, 0, len(crypto)]) + crypto,
                                           self._get_challenge(SM_CHALLENGE_BYTES)], "EXTERNAL AUTHENTICATE")
            sw = answers[0][1]
            if sw == SW_CONDITIONS_NOT_SATISFIED and challenge is cached:
                continue  # the card no longer holds the challenge fetched with the cryptogram: ask for a fresh one
            break
        if sw != SW_OK:
            left = tries_left(sw)
            raise CardSessionError(Reason.PSAM_ERROR if left is not None else Reason.CARD_ERROR,
                                   f"EXTERNAL AUTHENTICATE refused: {describe(sw)}", sw=sw, tries=left)
        sm_challenge = self._challenge_ok(*answers[1], SM_CHALLENGE_BYTES, "APPEND RECORD log")
        self._expect_ok(self._sm_apdu(cf.INS_APPEND_RECORD, 0, cf.SFI_TXN_LOG << 3, record, None, "APPEND RECORD log",
                                      challenge=sm_challenge), "APPEND RECORD log")

    def read_log(self, max_records: int = cf.LOG_RECORDS) -> list[dict[str, Any]]:
        """The card's transaction log, newest first (plain reads)."""
        out = []
        for n in range(1, max_records + 1):
            data, sw = self._transmit(bytes([cf.CLA_PLAIN, cf.INS_READ_RECORD, n, (cf.SFI_TXN_LOG << 3) | 0x04,
                                             cf.LOG_RECORD_BYTES]), "READ RECORD log")
            if sw != SW_OK:
                break
            r = cf.parse(cf.LOG_RECORD, data, "log record")
            out.append({"terminal_id": r.terminal_id, "txn_date": r.txn_date, "txn_time": r.txn_time,
                        "program": cf.PROGRAM_BY_CODE.get(r.program, str(r.program)), "amount_fen": r.amount_fen,
                        "atc": r.atc, "tac": r.tac.hex().upper()})
        return out

    def close(self) -> None:
        try:
            self.card.power_off()
        except ChannelError:
            pass


