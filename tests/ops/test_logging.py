"""Structured logs: card and ID numbers masked, secrets never printed, stdlib logging routed through."""

from __future__ import annotations

import io
import json
import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keys.issuer import IssuerKeySet
from ops.logging import REDACTED, configure_logging, get_logger, is_secret_name, mask_text, mask_value
from protocol.ids import make_card_no, make_id_no

CARD = make_card_no("622202", 1234567)
ID_NO = "11010519491231002X"


@pytest.fixture
def captured() -> io.StringIO:
    buf = io.StringIO()
    configure_logging(json=True, level="DEBUG", stream=buf)
    yield buf
    configure_logging(json=False, level="INFO")


def _lines(buf: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]


def test_mask_text_card_and_id() -> None:
    assert mask_text(f"card {CARD}") == f"card {CARD[:6]}{'*' * 9}{CARD[-4:]}"
    assert mask_text(f"id={ID_NO}.") == "id=110105********002X."
    assert mask_text("amount 12345 trace 000123") == "amount 12345 trace 000123"


@given(st.text(alphabet="0123456789 abcX|,:", max_size=200))
def test_mask_text_never_leaves_a_19_or_18_digit_run(text: str) -> None:
    import re

    out = mask_text(text)
    assert not re.search(r"(?<![0-9])[0-9]{19}(?![0-9])", out)
    assert not re.search(r"(?<![0-9A-Za-z])[0-9]{17}[0-9Xx](?![0-9A-Za-z])", out)


def test_secret_names() -> None:
    for name in ("tak", "tmk", "tek_hex", "master_key", "password", "keystore_passphrase", "kek", "key",
                 "component", "private_key", "mqtt_password"):
        assert is_secret_name(name), name
    for name in ("key_version", "tak_kcv", "keystore_path", "card_no", "amount_fen", "idempotency_key", "event",
                 "pin_threshold_fen", "pin_tries_left"):
        assert not is_secret_name(name), name


def test_mask_value_nested_and_bytes() -> None:
    out = mask_value({"card": {"card_no": CARD, "tak": "00" * 16}, "raw": b"\x01" * 16, "list": [ID_NO, 5]})
    assert out["card"]["card_no"].endswith(CARD[-4:]) and "*" in out["card"]["card_no"]
    assert out["card"]["tak"] == REDACTED
    assert out["raw"] == "<16 bytes>"
    assert out["list"] == ["110105********002X", 5]


def test_structlog_event_masked_and_key_dropped(captured: io.StringIO) -> None:
    keys = IssuerKeySet.demo()
    tak = keys.master("tac", 1)
    log = get_logger("carepay.test")
    log.info("purchase approved for " + CARD, card_no=CARD, id_no=ID_NO, tak=tak.hex(), tmk=tak,
             key_version=1, amount_fen=1500, nested={"password": "hunter2", "who": ID_NO})
    text = captured.getvalue()
    assert CARD not in text and ID_NO not in text
    assert tak.hex() not in text and tak.hex().upper() not in text and "hunter2" not in text
    (event,) = _lines(captured)
    assert event["tak"] == REDACTED and event["tmk"] == REDACTED
    assert event["key_version"] == 1 and event["amount_fen"] == 1500
    assert event["card_no"] == CARD[:6] + "*" * 9 + CARD[-4:]
    assert event["nested"] == {"password": REDACTED, "who": "110105********002X"}


def test_stdlib_logging_routed_and_masked(captured: io.StringIO) -> None:
    logging.getLogger("sqlalchemy.test").warning("row with card %s and id %s", CARD, ID_NO,
                                                 extra={"tmk": "ABCDEF0123456789ABCDEF0123456789"})
    text = captured.getvalue()
    assert CARD not in text and ID_NO not in text and "ABCDEF0123456789ABCDEF0123456789" not in text
    (event,) = _lines(captured)
    assert event["logger"] == "sqlalchemy.test" and event["level"] == "warning"
    assert event["tmk"] == REDACTED


def test_exception_text_masked(captured: io.StringIO) -> None:
    log = get_logger("carepay.test")
    try:
        raise ValueError(f"unknown card {CARD} of {ID_NO}")
    except ValueError:
        log.exception("lookup failed")
    text = captured.getvalue()
    assert "ValueError" in text and CARD not in text and ID_NO not in text


def test_log_file_is_json_lines(tmp_path) -> None:
    path = tmp_path / "logs" / "carepay.log"
    configure_logging(json=False, level="INFO", log_file=path, stream=io.StringIO())
    try:
        get_logger("carepay.test").info("card seen", card_no=make_card_no("621700", 42), id_no=make_id_no(
            "110105", __import__("datetime").date(1950, 1, 1), 7))
    finally:
        configure_logging(json=False, level="INFO")
    (line,) = path.read_text().splitlines()
    event = json.loads(line)
    assert "*" in event["card_no"] and "*" in event["id_no"]
