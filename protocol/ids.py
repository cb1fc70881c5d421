"""Identifiers: card number (卡号, Luhn), resident ID (公民身份号码, ISO 7064 MOD 11-2), POS identifiers.

Validators come in two forms: ``is_valid_x(s) -> bool`` and ``check_x(s) -> str`` which returns the
value or raises IdError (a ValueError) naming the field but never echoing a card or ID number.
Masking follows the program rule: card numbers keep the first 6 and last 4 digits, resident IDs
the first 6 and last 4 characters (``110105********1234``).

>>> is_valid_id_no("11010519491231002X")
True
>>> make_card_no("621700", 1)
'6217000000000000012'
>>> mask_id_no("11010519491231002X")
'110105********002X'
"""

from __future__ import annotations

import re
from datetime import date
from typing import Annotated

from pydantic import AfterValidator

CARD_NO_DIGITS = 19
ID_NO_CHARS = 18
TERMINAL_ID_CHARS = 8
PROVIDER_ID_CHARS = 15
BATCH_NO_DIGITS = 6
TRACE_NO_DIGITS = 6
RRN_CHARS = 12
AUTH_CODE_CHARS = 6
DISTRICT_CODE_DIGITS = 6
STREET_CODE_DIGITS = 9
MASK_KEEP_HEAD = 6
MASK_KEEP_TAIL = 4
MIN_BIRTH_YEAR = 1900
MASK_CHAR = "*"

ID_WEIGHTS = tuple(pow(2, 17 - i, 11) for i in range(17))  # 7 9 10 5 8 4 2 1 6 3 7 9 10 5 8 4 2
ID_CHECK_CHARS = "10X98765432"  # index = weighted sum mod 11


class IdError(ValueError):
    """An identifier failed validation. The message names the field, never the (sensitive) value."""


def luhn_check_digit(payload: str) -> str:
    """The Luhn (mod 10) check digit to append to a string of digits.

    >>> luhn_check_digit("7992739871")
    '3'
    """
    if not payload.isascii() or not payload.isdigit():
        raise IdError("Luhn payload must be digits")
    total = 0
    for i, ch in enumerate(reversed(payload)):
        d = int(ch)
        if i % 2 == 0:  # doubled: rightmost payload digit sits next to the check digit
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return str((10 - total % 10) % 10)


def luhn_ok(number: str) -> bool:
    """True when ``number`` (digits) ends with its correct Luhn check digit."""
    if len(number) < 2 or not number.isascii() or not number.isdigit():
        return False
    return luhn_check_digit(number[:-1]) == number[-1]


def is_valid_card_no(card_no: str) -> bool:
    return isinstance(card_no, str) and len(card_no) == CARD_NO_DIGITS and luhn_ok(card_no)


def check_card_no(card_no: str) -> str:
    if (
        not isinstance(card_no, str)
        or len(card_no) != CARD_NO_DIGITS
        or not card_no.isascii()
        or not card_no.isdigit()
    ):
        raise IdError(f"card number must be {CARD_NO_DIGITS} digits")
    if not luhn_ok(card_no):
        raise IdError("card number fails its Luhn check digit")
    return card_no


def make_card_no(prefix: str, serial: int | str) -> str:
    """A valid 19-digit card number: ``prefix`` (issuer BIN), ``serial`` zero-padded, Luhn digit."""
    body_len = CARD_NO_DIGITS - 1 - len(prefix)
    serial_s = str(serial)
    if not (prefix + serial_s).isascii() or not prefix.isdigit() or not serial_s.isdigit():
        raise IdError("card number prefix and serial must be digits")
    if body_len < 0 or len(serial_s) > body_len:
        raise IdError(f"prefix + serial exceed {CARD_NO_DIGITS - 1} digits")
    payload = prefix + serial_s.zfill(body_len)
    return payload + luhn_check_digit(payload)


def id_check_char(first17: str) -> str:
    """The ISO 7064 MOD 11-2 check character for the first 17 digits of a resident ID.

    >>> id_check_char("11010519491231002")
    'X'
    """
    if len(first17) != ID_NO_CHARS - 1 or not first17.isascii() or not first17.isdigit():
        raise IdError("resident ID body must be 17 digits")
    total = sum(int(c) * w for c, w in zip(first17, ID_WEIGHTS, strict=True))
    return ID_CHECK_CHARS[total % 11]


def id_birth_date(id_no: str) -> date:
    """The birth date encoded in characters 7-14 (YYYYMMDD); IdError when it is not a real date."""
    s = id_no[6:14]
    if len(s) != 8 or not s.isascii() or not s.isdigit():
        raise IdError("resident ID birth date must be 8 digits")
    try:
        return date(int(s[:4]), int(s[4:6]), int(s[6:]))
    except ValueError as exc:
        raise IdError("resident ID birth date is not a calendar date") from exc


def check_id_no(id_no: str, today: date | None = None) -> str:
    """Validate an 18-character resident ID: digits, plausible birth date, MOD 11-2 check char.

    A lower-case ``x`` is accepted and returned upper-case.
    """
    if not isinstance(id_no, str) or len(id_no) != ID_NO_CHARS:
        raise IdError(f"resident ID must be {ID_NO_CHARS} characters")
    id_no = id_no.upper()
    body, check = id_no[:17], id_no[17]
    if not body.isascii() or not body.isdigit() or check not in ID_CHECK_CHARS:
        raise IdError("resident ID must be 17 digits and a digit or X")
    born = id_birth_date(id_no)
    if born.year < MIN_BIRTH_YEAR or born > (today or date.today()):
        raise IdError("resident ID birth date is not plausible")
    if id_check_char(body) != check:
        raise IdError("resident ID fails its MOD 11-2 check character")
    return id_no


def is_valid_id_no(id_no: str, today: date | None = None) -> bool:
    try:
        check_id_no(id_no, today)
    except IdError:
        return False
    return True


def make_id_no(district6: str, birth_date: date, seq3: int | str) -> str:
    """A valid resident ID for tests and the simulator: district, birth date, sequence, check char.

    The sequence's last digit is odd for men and even for women (not checked here).

    >>> from datetime import date
    >>> make_id_no("110105", date(1949, 12, 31), 2)
    '11010519491231002X'
    """
    check_district_code(district6)
    seq = str(seq3).zfill(3)
    if len(seq) != 3 or not seq.isdigit():
        raise IdError("resident ID sequence must be 0..999")
    body = f"{district6}{birth_date:%Y%m%d}{seq}"
    return body + id_check_char(body)


def _mask(value: str, total: int) -> str:
    if len(value) <= MASK_KEEP_HEAD + MASK_KEEP_TAIL:
        return MASK_CHAR * len(value)
    middle = max(total, len(value)) - MASK_KEEP_HEAD - MASK_KEEP_TAIL
    return value[:MASK_KEEP_HEAD] + MASK_CHAR * middle + value[-MASK_KEEP_TAIL:]


def mask_card_no(card_no: str) -> str:
    """First 6 and last 4 digits kept: ``621700*********0012``. Short input is masked whole."""
    return _mask(str(card_no), len(str(card_no)))


def mask_id_no(id_no: str) -> str:
    """First 6 and last 4 characters kept: ``110105********1234``. Short input is masked whole."""
    return _mask(str(id_no), len(str(id_no)))


_CARD_IN_TEXT = re.compile(r"(?<![0-9A-Za-z])\d{19}(?![0-9A-Za-z])")
_ID_IN_TEXT = re.compile(r"(?<![0-9A-Za-z])\d{17}[0-9Xx](?![0-9A-Za-z])")


def mask_in_text(text: str) -> str:
    """Mask every 19-digit card number and 18-character resident ID found in free text (for logs)."""
    text = _CARD_IN_TEXT.sub(lambda m: mask_card_no(m.group()), text)
    return _ID_IN_TEXT.sub(lambda m: mask_id_no(m.group()), text)


def is_masked_card_no(value: str) -> bool:
    """True for the masked form ``dddddd*********dddd`` (19 characters)."""
    return (
        len(value) == CARD_NO_DIGITS
        and value[:MASK_KEEP_HEAD].isdigit()
        and value[-MASK_KEEP_TAIL:].isdigit()
        and set(value[MASK_KEEP_HEAD:-MASK_KEEP_TAIL]) == {MASK_CHAR}
    )


# --- POS and statistics identifiers -----------------------------------------------------------

_DIGITS = "0-9"
_ALNUM = "0-9A-Za-z"


def _fixed(name: str, length: int, charset: str):
    pattern = re.compile(rf"[{charset}]{{{length}}}")
    what = "digits" if charset == _DIGITS else "letters or digits"

    def check(value: str) -> str:
        if not isinstance(value, str) or not value.isascii() or not pattern.fullmatch(value):
            raise IdError(f"{name} must be {length} {what}")
        return value

    check.__name__ = f"check_{name.replace(' ', '_')}"
    check.__doc__ = f"Return ``value`` when it is a valid {name} ({length} {what}); else IdError."
    return check


check_terminal_id = _fixed("terminal id", TERMINAL_ID_CHARS, _ALNUM)
check_provider_id = _fixed("provider id", PROVIDER_ID_CHARS, _ALNUM)
check_batch_no = _fixed("batch no", BATCH_NO_DIGITS, _DIGITS)
check_trace_no = _fixed("trace no", TRACE_NO_DIGITS, _DIGITS)
check_rrn = _fixed("rrn", RRN_CHARS, _ALNUM)
check_auth_code = _fixed("auth code", AUTH_CODE_CHARS, _ALNUM)
check_district_code = _fixed("district code", DISTRICT_CODE_DIGITS, _DIGITS)
check_street_code = _fixed("street code", STREET_CODE_DIGITS, _DIGITS)


def _is(check):
    def is_valid(value: str) -> bool:
        try:
            check(value)
        except IdError:
            return False
        return True

    return is_valid


is_valid_terminal_id = _is(check_terminal_id)
is_valid_provider_id = _is(check_provider_id)
is_valid_batch_no = _is(check_batch_no)
is_valid_trace_no = _is(check_trace_no)
is_valid_rrn = _is(check_rrn)
is_valid_auth_code = _is(check_auth_code)
is_valid_district_code = _is(check_district_code)
is_valid_street_code = _is(check_street_code)

# Annotated types for pydantic models (messages, configuration, report rows).
CardNo = Annotated[str, AfterValidator(check_card_no)]
IdNo = Annotated[str, AfterValidator(lambda v: check_id_no(v))]
TerminalId = Annotated[str, AfterValidator(check_terminal_id)]
ProviderId = Annotated[str, AfterValidator(check_provider_id)]
BatchNo = Annotated[str, AfterValidator(check_batch_no)]
TraceNo = Annotated[str, AfterValidator(check_trace_no)]
Rrn = Annotated[str, AfterValidator(check_rrn)]
AuthCode = Annotated[str, AfterValidator(check_auth_code)]
DistrictCode = Annotated[str, AfterValidator(check_district_code)]
StreetCode = Annotated[str, AfterValidator(check_street_code)]
