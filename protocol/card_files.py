"""The civil-affairs partition (民政应用专区) as the card and the terminal both see it: commands, FCI, file layouts.

House convention (no public spec of the 民政 partition exists; reference §0.5). Everything
here is shared by ``simulator/`` (which answers it) and ``terminal_agent/`` (which asks it).

Card commands (CLA 00 plain, 04 secure messaging = line protection, 80 proprietary):

===========================  ===============================================  =====================================
command                      APDU                                             answer
===========================  ===============================================  =====================================
SELECT ADF by AID            ``00 A4 04 00 Lc AID 00``                        FCI (below); 6A82 unknown AID
GET CHALLENGE                ``00 84 00 00 04|08``                             random (one use)
INTERNAL AUTHENTICATE        ``00 88 00 00 Lc R``  (R = one suite block)      E(K_internal_auth, R)
EXTERNAL AUTHENTICATE        ``00 82 00 00 Lc C``                             63Cx on a wrong C, then 6983
READ BINARY (SFI)            ``00|04 B0 (80|SFI) off [MAC] Le``               file bytes
READ RECORD (SFI)            ``00 B2 rec (SFI<<3|04) Le``                     record (1 = newest), 6A83
UPDATE BINARY (SFI)          ``04 D6 (80|SFI) off Lc data‖MAC``               9302 bad MAC, 6988 MAC missing
UPDATE RECORD                ``04 DC rec (SFI<<3|04) Lc rec‖MAC``             9302 / 6988
APPEND RECORD                ``04 E2 00 (SFI<<3) Lc rec‖MAC``                 9302 / 6988
VERIFY PIN                   ``00 20 00 00 Lc PIN`` (BCD, F-padded)           63Cx, then 6983
CHANGE PIN                   ``80 5E 01 00 Lc old‖FF‖new``                    63Cx, then 6983
TRANSACTION CRYPTOGRAM       ``80 C8 P1 00 18`` :data:`CRYPTOGRAM_REQUEST`    ATC(2)‖TAC(4); P1 bit 1 = PIN verified
GET TRANSACTION PROVE        ``80 5A 00 00 02 ATC``                           :data:`TRANSACTION_PROVE`; 6A88
===========================  ===============================================  =====================================

FCI: ``6F { 84 AID, A5 { 9F0C app serial(8), 9F08 key version(1), 9F09 algorithm id(1: 04 sm4,
00 3des), C4 application status(1), 9F36 ATC(2) } }`` (``protocol.tlv``'s house FCI plus status and ATC).

A secure-messaging MAC is ``keys.mac.line_protection_mac`` under the card's ``sm_mac`` key over
``CLA INS P1 P2 Lc'‖data`` (Lc' counts the 4 MAC bytes; a READ BINARY carries only the MAC, so
the MAC covers ``04 B0 P1 P2 04``), IV = the last GET CHALLENGE answer right-padded with zeros.
The challenge is consumed by the next SM command or EXTERNAL AUTHENTICATE whatever its outcome.
EXTERNAL AUTHENTICATE's cryptogram is E(K_external_auth, challenge right-padded to a block).

Access conditions: cardholder EF — read and update only with secure messaging (personal data
goes only to terminals holding a PSAM); entitlement EF — read free, update with SM after external
authentication; transaction log — read free, append/update with SM after external authentication
in the same selection. The TAC is ``keys.cryptogram.compute_tac`` over
``keys.cryptogram.cryptogram_data`` with the ATC after its increment.

PSAM commands (CLA 80; P1 = key version, P2 = algorithm id :data:`SUITE_CODES`), keys diversified
from the issuer master key by the 8-byte application serial:

- READ BINARY ``00 B0 96 00 08`` — terminal id (EF 0016, 8 ASCII characters);
- ``80 F0`` VERIFY INTERNAL AUTH: serial(8)‖R‖answer → 9000, or 6300 when the answer is wrong;
- ``80 F2`` EXTERNAL AUTH CRYPTOGRAM: serial(8)‖challenge → the cryptogram (one block);
- ``80 F4`` SM MAC: serial(8)‖len(challenge)(1)‖challenge‖covered bytes → MAC(4) for the card's line protection;
- ``80 F6 00 00 04`` NEXT TTN: increments and returns the terminal transaction number (4 bytes).
Missing master key (unknown key version) answers 6A88.
"""

from __future__ import annotations

import enum

from construct import Adapter, Bytes, Const, ConstructError, Int8ub, Int16ub, Int32ub, PaddedString, Struct

from protocol import tlv

# --- commands
CLA_PLAIN = 0x00
CLA_SM = 0x04
CLA_PROPRIETARY = 0x80

INS_SELECT = 0xA4
INS_GET_CHALLENGE = 0x84
INS_INTERNAL_AUTH = 0x88
INS_EXTERNAL_AUTH = 0x82
INS_READ_BINARY = 0xB0
INS_READ_RECORD = 0xB2
INS_UPDATE_BINARY = 0xD6
INS_UPDATE_RECORD = 0xDC
INS_APPEND_RECORD = 0xE2
INS_VERIFY = 0x20
INS_CHANGE_PIN = 0x5E
INS_CRYPTOGRAM = 0xC8
INS_TXN_PROVE = 0x5A

INS_PSAM_VERIFY_INTERNAL = 0xF0
INS_PSAM_EXTERNAL_CRYPTOGRAM = 0xF2
INS_PSAM_SM_MAC = 0xF4
INS_PSAM_NEXT_TTN = 0xF6
SFI_PSAM_TERMINAL_ID = 0x16

CRYPTOGRAM_P1_PIN_VERIFIED = 0x01
SM_MAC_BYTES = 4

# --- files of the partition
SFI_CARDHOLDER = 0x05
SFI_ENTITLEMENT = 0x06
SFI_TXN_LOG = 0x07
LOG_RECORDS = 10  # cyclic transaction log capacity
CRYPTOGRAM_HISTORY = 8  # cryptograms the card remembers for GET TRANSACTION PROVE
PIN_TRIES = 3
EXTERNAL_AUTH_TRIES = 3
MIN_PIN_DIGITS = 4
MAX_PIN_DIGITS = 12

SUITE_CODES = {"sm4": tlv.ALG_SM4, "3des": tlv.ALG_3DES}
"""Algorithm ids (FCI tag 9F09 and PSAM P2)."""
SUITE_BY_CODE = {v: k for k, v in SUITE_CODES.items()}

PROGRAM_CODES = {"voucher": 0x01, "nursing": 0x02, "restricted": 0x03}
"""One-byte program codes; equal to ``keys.cryptogram.PROGRAM_CODES`` (a test holds them equal)."""
PROGRAM_BY_CODE = {v: k for k, v in PROGRAM_CODES.items()}
PROGRAM_BITS = {"voucher": 0x01, "nursing": 0x02, "restricted": 0x04}
"""Entitlement EF bitmask of the programs a card may spend."""

# --- FCI extras beside protocol.tlv's house tags
TAG_CARD_STATUS = 0xC4  # application status (house)
TAG_ATC = 0x9F36  # application transaction counter (as EMV)


class CardStatus(enum.IntEnum):
    """Application status byte in the FCI (应用状态)."""

    ACTIVE = 0x00
    BLOCKED = 0x01  # 应用锁定 (e.g. after a lost report written back to the card)


class Category(enum.IntEnum):
    """Eligibility category (优待类别)."""

    AGE60 = 1  # 60+ 老年人
    AGE80 = 2  # 80+ 高龄
    DISABILITY = 3  # 残疾人 (grade 1-4)
    DISABLED_ELDERLY = 4  # 失能老年人 (grade = 失能等级)


CATEGORY_NAMES = {Category.AGE60: "60+", Category.AGE80: "80+", Category.DISABILITY: "disability",
                  Category.DISABLED_ELDERLY: "失能"}


class CardFileError(ValueError):
    """Card data that does not parse (FCI, EF content, record)."""


class Bcd(Adapter):
    """Decimal digits as packed BCD, right-padded with F for an odd count."""

    def __init__(self, nbytes: int) -> None:
        super().__init__(Bytes(nbytes))
        self.nbytes = nbytes

    def _decode(self, obj: bytes, context, path) -> str:  # type: ignore[no-untyped-def]
        digits = obj.hex().upper().rstrip("F")
        if not digits.isdigit():
            raise CardFileError("BCD field holds non-decimal nibbles")
        return digits

    def _encode(self, obj: str, context, path) -> bytes:  # type: ignore[no-untyped-def]
        if not isinstance(obj, str) or not obj.isdigit() or len(obj) > self.nbytes * 2:
            raise CardFileError(f"BCD field wants up to {self.nbytes * 2} decimal digits")
        return bytes.fromhex(obj.ljust(self.nbytes * 2, "F"))


class GbkText(Adapter):
    """A fixed-size GBK text field padded with zero bytes (names on the card are GBK)."""

    def __init__(self, nbytes: int) -> None:
        super().__init__(Bytes(nbytes))
        self.nbytes = nbytes

    def _decode(self, obj: bytes, context, path) -> str:  # type: ignore[no-untyped-def]
        try:
            return obj.rstrip(b"\x00").decode("gbk")
        except UnicodeDecodeError:
            raise CardFileError("text field is not GBK") from None

    def _encode(self, obj: str, context, path) -> bytes:  # type: ignore[no-untyped-def]
        raw = obj.encode("gbk")
        if len(raw) > self.nbytes:
            raise CardFileError(f"text longer than {self.nbytes} GBK bytes")
        return raw.ljust(self.nbytes, b"\x00")


CARDHOLDER = Struct(
    "format" / Const(b"\x01"),
    "card_no" / PaddedString(19, "ascii"),
    "name" / GbkText(30),
    "id_no" / PaddedString(18, "ascii"),
    "birth_date" / Bcd(4),
    "district_code" / Bcd(3),
    "street_code" / Bcd(5),
    "category" / Int8ub,
    "category_grade" / Int8ub,
    "valid_until" / Bcd(4),
)
"""Cardholder EF (持卡人信息文件), SFI 05, binary."""
CARDHOLDER_BYTES = CARDHOLDER.sizeof()

ENTITLEMENT = Struct(
    "format" / Const(b"\x01"),
    "programs" / Int8ub,  # PROGRAM_BITS
    "grade" / Int8ub,
    "reserved" / Bytes(5),
)
"""Entitlement EF (补贴资格文件), SFI 06, binary."""
ENTITLEMENT_BYTES = ENTITLEMENT.sizeof()

LOG_RECORD = Struct(
    "terminal_id" / PaddedString(8, "ascii"),
    "txn_date" / Bcd(4),
    "txn_time" / Bcd(3),
    "program" / Int8ub,
    "amount_fen" / Int32ub,
    "atc" / Int16ub,
    "tac" / Bytes(4),
)
"""Transaction log record (交易明细记录), SFI 07, cyclic, record 1 = newest."""
LOG_RECORD_BYTES = LOG_RECORD.sizeof()

CRYPTOGRAM_REQUEST = Struct(
    "amount_fen" / Int32ub,
    "program" / Int8ub,
    "terminal_id" / PaddedString(8, "ascii"),
    "ttn" / Int32ub,
    "txn_date" / Bcd(4),
    "txn_time" / Bcd(3),
)
"""Data of the TRANSACTION CRYPTOGRAM command (24 bytes)."""
CRYPTOGRAM_REQUEST_BYTES = CRYPTOGRAM_REQUEST.sizeof()

CRYPTOGRAM_RESPONSE = Struct("atc" / Int16ub, "tac" / Bytes(4))
CRYPTOGRAM_RESPONSE_BYTES = CRYPTOGRAM_RESPONSE.sizeof()

TRANSACTION_PROVE = Struct("request" / Bytes(CRYPTOGRAM_REQUEST_BYTES), "atc" / Int16ub, "tac" / Bytes(4))
"""GET TRANSACTION PROVE answer: the original request, the ATC and the TAC (recovery after a tear)."""


_COMPILED: dict[int, tuple[Struct, int, object]] = {}


def _compiled(struct: Struct) -> tuple[int, object]:
    """``(size, parser)``: construct's compiled form of a declaration (same results, about twice as fast;
    checked by the tests), made once per struct."""
    hit = _COMPILED.get(id(struct))
    if hit is None or hit[0] is not struct:
        hit = _COMPILED[id(struct)] = (struct, struct.sizeof(), struct.compile())
    return hit[1], hit[2]


def parse(struct: Struct, raw: bytes, what: str):  # type: ignore[no-untyped-def]
    """Parse ``raw`` with ``struct`` exactly; CardFileError naming ``what`` on any damage."""
    size, parser = _compiled(struct)
    if len(raw) != size:
        raise CardFileError(f"{what}: expected {size} bytes, got {len(raw)}")
    try:
        return parser.parse(raw)  # type: ignore[attr-defined]
    except (ConstructError, CardFileError, UnicodeDecodeError) as exc:
        raise CardFileError(f"{what}: {exc if isinstance(exc, CardFileError) else 'malformed'}") from None


def programs_from_bits(bits: int) -> tuple[str, ...]:
    return tuple(p for p, b in PROGRAM_BITS.items() if bits & b)


def programs_to_bits(programs: tuple[str, ...] | list[str]) -> int:
    try:
        return sum(PROGRAM_BITS[p] for p in set(programs))
    except KeyError as exc:
        raise CardFileError(f"unknown program {exc.args[0]!r}") from None


# --- FCI, through protocol.tlv (house tags: 9F0C serial, 9F08 key version, 9F09 algorithm, plus ATC and status)


def build_fci(aid: bytes, app_serial: bytes, key_version: int, suite: str, status: int, atc: int) -> bytes:
    """``6F { 84 AID, A5 { 9F0C serial, 9F08 key version, 9F09 algorithm, C4 status, 9F36 ATC } }``."""
    return tlv.build_fci(aid, app_serial=app_serial, key_version=key_version, algorithm=SUITE_CODES[suite],
                         extra=(tlv.Tlv(TAG_CARD_STATUS, bytes([status])), tlv.Tlv(TAG_ATC, atc.to_bytes(2, "big"))))


def parse_fci(raw: bytes) -> dict[str, object]:
    """FCI → ``{aid, app_serial, key_version, suite, status, atc}``; CardFileError when anything is off."""
    try:
        fci = tlv.parse_fci(raw)
    except (tlv.TlvError, ValueError):
        raise CardFileError("FCI malformed") from None
    serial, kv, alg = fci.app_serial, fci.key_version, fci.algorithm
    status, atc = fci.get(TAG_CARD_STATUS), fci.get(TAG_ATC)
    if serial is None or len(serial) != 8 or kv is None or alg is None or status is None or atc is None:
        raise CardFileError("FCI: application serial, key version, algorithm, status or ATC missing")
    if len(status) != 1 or len(atc) != 2:
        raise CardFileError("FCI: element of the wrong length")
    if alg not in SUITE_BY_CODE:
        raise CardFileError("FCI: unknown algorithm id")
    return {"aid": fci.df_name, "app_serial": serial, "key_version": kv, "suite": SUITE_BY_CODE[alg],
            "status": status[0], "atc": int.from_bytes(atc, "big")}


def pin_block(pin: str) -> bytes:
    """A PIN as BCD digits right-padded with F (VERIFY data)."""
    if not pin.isdigit() or not MIN_PIN_DIGITS <= len(pin) <= MAX_PIN_DIGITS:
        raise CardFileError(f"PIN must be {MIN_PIN_DIGITS}-{MAX_PIN_DIGITS} digits")
    return bytes.fromhex(pin + ("F" if len(pin) % 2 else ""))
