"""The hot-path encoders give the same bytes as the definitions they replace.

``canonical_json`` (a prebuilt C encoder) must equal ``json.dumps(sort_keys, compact)`` for any JSON body, the
MAC'd form and the request hash must not change form (a journal row stores the hash; a terminal computes
the MAC), and ``signed_json`` must parse to exactly ``signed()``.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clearing.pipeline.context import body_hash
from keys.mac import cbc_mac, pad80
from keys.suite import SM4
from protocol.messages import (
    BatchItem,
    BatchUpload,
    CardProof,
    Purchase,
    TxnResult,
    canonical_json,
    mac_hex,
    parse_message,
    with_mac,
)

TAK = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")

json_scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
                | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=30))
json_bodies = st.dictionaries(
    st.text(max_size=12),
    st.recursive(json_scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids,
                                                                                          max_size=5), max_leaves=15),
    max_size=8)


def _reference(body: dict, ensure_ascii: bool = False) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=ensure_ascii).encode("utf-8")


@settings(max_examples=400, deadline=None)
@given(json_bodies)
def test_canonical_json_equals_json_dumps(body: dict) -> None:
    assert canonical_json(body) == _reference(body)
    assert canonical_json(body, ensure_ascii=True) == _reference(body, ensure_ascii=True)


def test_canonical_json_escapes_and_unicode_like_json_dumps() -> None:
    body = {"z": "引号\"\\\n\t\x00\x1f\x7f\u2028 é", "a": [1, 2.5, None, True], "m": {"b": 1, "a": {}}}
    assert canonical_json(body) == _reference(body)
    assert canonical_json(body, ensure_ascii=True) == _reference(body, ensure_ascii=True)
    assert canonical_json(body, ensure_ascii=True).isascii()


def test_canonical_json_refuses_what_json_dumps_refuses() -> None:
    with pytest.raises(TypeError):
        canonical_json({"when": datetime(2026, 1, 1)})
    with pytest.raises(TypeError):
        canonical_json({(1, 2): "tuple key"})  # type: ignore[dict-item]


def _purchase(category: str = "meal") -> Purchase:
    return Purchase(terminal_id="T0000001", msg_id=uuid.uuid4().hex, sent_at=datetime(2026, 11, 28, 2, 15, tzinfo=UTC),
                    provider_id="P00000000000001", batch_no="000001", trace_no="000042", program="voucher",
                    service_category=category, amount_fen=1500,
                    card=CardProof(card_no="6210000000000000001", app_serial="0000000000000001", key_version=1,
                                   atc=7, ttn=42, txn_date="20261128", txn_time="101500", tac="1C66751A"))


def test_mac_is_the_pboc_sm4_mac_over_the_json_dumps_form() -> None:
    msg = _purchase()
    reference = _reference(msg.model_dump(mode="json", exclude={"mac"}))
    assert msg.canonical_bytes() == reference
    expected = cbc_mac(TAK, pad80(reference, 16), None, SM4)[:8].hex().upper()
    assert msg.compute_mac(TAK) == mac_hex(TAK, reference) == expected


def test_request_hash_keeps_its_stored_form() -> None:
    """The hash stored with every journal row: SHA-256 of the ASCII json.dumps form without msg_id/sent_at/mac."""
    msg = _purchase()
    body = msg.model_dump(mode="json", exclude={"msg_id", "sent_at", "mac"})
    reference = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert body_hash(msg) == reference
    assert body_hash(msg.signed(TAK)) == reference  # neither the MAC nor a new msg_id changes it
    assert body_hash(msg.model_copy(update={"msg_id": uuid.uuid4().hex})) == reference
    assert body_hash(msg.model_copy(update={"amount_fen": 1501})) != reference


@pytest.mark.parametrize("make", [
    _purchase,
    lambda: TxnResult(type="purchase_result", terminal_id="T0000001", msg_id=uuid.uuid4().hex,
                      sent_at=datetime.now(UTC), orig_msg_id="abcdef0123", batch_no="000001", trace_no="000042",
                      response_code="51", rrn="000000000123", balance_after_fen=0, business_date="2026-11-28",
                      message="余额不足 \"quoted\"\n"),
    lambda: BatchUpload(terminal_id="T0000001", msg_id=uuid.uuid4().hex, sent_at=datetime.now(UTC),
                        provider_id="P00000000000001", batch_no="000001",
                        items=[BatchItem(trace_no="000001", txn_type="PURCHASE", amount_fen=5,
                                         card_no="6210000000000000001", program="voucher")]),
])
def test_signed_json_parses_to_signed(make) -> None:  # type: ignore[no-untyped-def]
    msg = make()
    wire = msg.signed_json(TAK)
    parsed = parse_message(wire)
    assert parsed == msg.signed(TAK)
    assert parsed.mac_ok(TAK)
    assert json.loads(wire) == json.loads(msg.signed(TAK).to_json())


def test_signed_json_tampered_fails_the_mac() -> None:
    wire = json.loads(_purchase().signed_json(TAK))
    wire["amount_fen"] = 15000
    assert not parse_message(json.dumps(wire)).mac_ok(TAK)


def test_with_mac_keeps_a_json_object() -> None:
    assert json.loads(with_mac(b"{}", "AB")) == {"mac": "AB"}
    assert json.loads(with_mac(b'{"a":1}', "AB")) == {"a": 1, "mac": "AB"}


@settings(max_examples=300, deadline=None)
@given(json_bodies, st.binary(min_size=8, max_size=8))
def test_without_mac_inverts_with_mac(body: dict, mac_bytes: bytes) -> None:
    from protocol.messages import without_mac

    body.pop("mac", None)
    canonical = canonical_json(body)
    mac = mac_bytes.hex().upper()
    assert without_mac(with_mac(canonical, mac), mac) == canonical
    other = "0" * 16 if mac != "0" * 16 else "1" * 16
    assert without_mac(with_mac(canonical, mac), other) is None


@given(st.binary(max_size=64), st.text(alphabet="0123456789ABCDEF", min_size=16, max_size=16))
def test_without_mac_never_fails_on_any_bytes(payload: bytes, mac: str) -> None:
    from protocol.messages import without_mac

    out = without_mac(payload, mac)
    assert out is None or (out.endswith(b"}") and len(out) < len(payload))


def test_wire_json_is_the_signed_message_with_its_mac_last() -> None:
    from protocol.messages import without_mac

    msg = Purchase(terminal_id="T0000001", msg_id=uuid.uuid4().hex, sent_at=datetime.now(UTC),
                   provider_id="P110105V0000001", batch_no="000001", trace_no="000007", program="voucher",
                   service_category="meal", amount_fen=2500,
                   card=CardProof(card_no="6218880000000000015", app_serial="0001000000000001", key_version=1, atc=3,
                                  ttn=9, txn_date="20260301", txn_time="101500", tac="0A0B0C0D"))
    signed = msg.signed(TAK)
    wire = signed.wire_json()
    assert parse_message(wire) == parse_message(signed.to_json()) == signed
    assert without_mac(wire, signed.mac) == signed.canonical_bytes()  # what the receiver MACs, as sent
    assert wire == signed.signed_json(TAK)
    assert msg.wire_json() == msg.to_json()  # unsigned: nothing to cut off


_digits = "0123456789"
_upper = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["purchase_result", "void_result", "refund_result", "reversal_result", "advice_result"]),
    st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2099, 12, 31), timezones=st.sampled_from(
        [UTC, __import__("zoneinfo").ZoneInfo("Asia/Shanghai")])),
    st.text(_digits, min_size=6, max_size=6), st.sampled_from(["00", "51", "62", "96", "A0"]),
    st.none() | st.text(_upper, min_size=12, max_size=12), st.none() | st.text(_upper, min_size=6, max_size=6),
    st.none() | st.integers(min_value=0, max_value=10**12), st.none() | st.dates().map(lambda d: d.isoformat()),
    st.text(max_size=200),
)
def test_txn_result_canonical_equals_the_model_s_bytes(kind, sent_at, trace, code, rrn, auth, balance, bdate,
                                                       message) -> None:  # type: ignore[no-untyped-def]
    from protocol.messages import Answered, txn_result_canonical

    fields = dict(type=kind, terminal_id="T0000001", msg_id=uuid.uuid4().hex, sent_at=sent_at,
                  orig_msg_id="M00000000001", batch_no="000001", trace_no=trace, response_code=code, rrn=rrn,
                  auth_code=auth, balance_after_fen=balance, business_date=bdate, message=message)
    model = TxnResult(**fields)
    fast = txn_result_canonical(**fields)
    assert fast == model.canonical_bytes()
    answered = Answered("T0000001", kind, code, fast)
    assert parse_message(answered.signed_json(TAK)) == model.signed(TAK)
