"""Host message models: canonical bytes, MAC, parse round trips, and hostile input."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.messages import (
    MAX_AMOUNT_FEN,
    MAX_MESSAGE_BYTES,
    RC,
    BatchSettle,
    BatchTotals,
    CardProof,
    MessageError,
    Purchase,
    TxnResult,
    parse_message,
)

TAK = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
OTHER_KEY = bytes.fromhex("00112233445566778899AABBCCDDEEFF")


def make_purchase(amount_fen: int = 1500, trace_no: str = "000001") -> Purchase:
    return Purchase(
        terminal_id="T0000001",
        msg_id=uuid.uuid4().hex,
        sent_at=datetime(2026, 11, 28, 2, 15, tzinfo=UTC),
        provider_id="P00000000000001",
        batch_no="000001",
        trace_no=trace_no,
        program="voucher",
        service_category="meal",
        amount_fen=amount_fen,
        card=CardProof(card_no="6210000000000000001", app_serial="0000000000000001", key_version=1, atc=7,
                       ttn=42, txn_date="20261128", txn_time="101500", tac="1C66751A"),
    )


def test_mac_round_trip_and_tamper() -> None:
    msg = make_purchase().signed(TAK)
    assert len(msg.mac) == 16
    parsed = parse_message(msg.to_json())
    assert parsed == msg
    assert parsed.mac_ok(TAK)
    assert not parsed.mac_ok(OTHER_KEY)
    tampered = json.loads(msg.to_json())
    tampered["amount_fen"] = 150000
    assert not parse_message(json.dumps(tampered)).mac_ok(TAK)


def test_canonical_bytes_ignore_field_order_and_mac() -> None:
    msg = make_purchase()
    body = json.loads(msg.to_json())
    reordered = json.dumps(dict(reversed(list(body.items()))))
    assert parse_message(reordered).canonical_bytes() == msg.canonical_bytes()
    assert msg.signed(TAK).canonical_bytes() == msg.canonical_bytes()


def test_unsigned_message_never_verifies() -> None:
    assert not make_purchase().mac_ok(TAK)


@pytest.mark.parametrize(
    ("field", "value"),
    [("amount_fen", 0), ("amount_fen", -5), ("amount_fen", MAX_AMOUNT_FEN + 1), ("amount_fen", 1.5), ("terminal_id", "short"), ("batch_no", "12345A"),
     ("program", "casino"), ("extra_field", 1)],
)
def test_bad_fields_are_refused_with_the_field_named(field: str, value: object) -> None:
    body = json.loads(make_purchase().to_json())
    body[field] = value
    with pytest.raises(MessageError) as err:
        parse_message(json.dumps(body))
    assert field in str(err.value) or "extra" in str(err.value).lower()


def test_oversized_message_refused() -> None:
    with pytest.raises(MessageError, match="exceeds"):
        parse_message(b" " * (MAX_MESSAGE_BYTES + 1))


def test_results_and_batch_round_trip() -> None:
    res = TxnResult(type="purchase_result", terminal_id="T0000001", msg_id=uuid.uuid4().hex,
                    sent_at=datetime.now(UTC), orig_msg_id="abc", batch_no="000001", trace_no="000002",
                    response_code=RC.APPROVED, rrn="000000000001", auth_code="A1B2C3", balance_after_fen=100)
    assert parse_message(res.signed(TAK).to_json()).approved
    settle = BatchSettle(terminal_id="T0000001", msg_id=uuid.uuid4().hex, sent_at=datetime.now(UTC),
                         provider_id="P00000000000001", batch_no="000001",
                         totals=BatchTotals(purchase_count=2, purchase_fen=3000))
    assert parse_message(settle.to_json()) == settle
    assert RC.describe("51") == "insufficient balance"


@settings(max_examples=300)
@given(st.binary(max_size=400))
def test_random_bytes_never_parse(raw: bytes) -> None:
    with pytest.raises(MessageError):
        parse_message(raw)


@settings(max_examples=200)
@given(st.dictionaries(st.sampled_from(["type", "terminal_id", "msg_id", "sent_at", "mac", "amount_fen", "card"]),
                       st.one_of(st.text(max_size=20), st.integers(), st.none()), max_size=7))
def test_random_json_objects_never_parse(body: dict) -> None:
    with pytest.raises(MessageError):
        parse_message(json.dumps(body))


@settings(max_examples=100)
@given(st.integers(min_value=1, max_value=MAX_AMOUNT_FEN), st.integers(min_value=0, max_value=999_999))
def test_purchase_round_trip_property(amount_fen: int, trace: int) -> None:
    msg = make_purchase(amount_fen, f"{trace:06d}").signed(TAK)
    again = parse_message(msg.to_json())
    assert again == msg and again.mac_ok(TAK)
