"""The worker's handling of bad input: any payload on an up topic gives a refusal or nothing, never a crash."""

from __future__ import annotations

import asyncio
import json
import uuid

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clearing.worker import ClearingWorker, _terminal_of
from protocol.messages import RC, Heartbeat, Purchase, TxnResult, now_utc


class NoKeys:
    """A terminal that never signed on: no working keys."""

    async def candidates(self, terminal_id: str, refresh: bool = False) -> list[bytes]:
        return []

    async def current(self, terminal_id: str) -> bytes | None:
        return None


class MustNotBeCalled:
    async def handle(self, msg: object) -> None:
        raise AssertionError("nothing may reach the clearing service without a good MAC")


def _worker() -> ClearingWorker:
    return ClearingWorker("mqtt://127.0.0.1:1", MustNotBeCalled(), NoKeys(), None)  # type: ignore[arg-type]


TOPIC = "carepay/v1/term/T0000001/up"
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                           lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=10), kids,
                                                                                     max_size=6), max_leaves=20)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=400), json_values.map(lambda v: json.dumps(v).encode())))
def test_garbage_is_refused_quietly(payload: bytes) -> None:
    worker = _worker()
    answer, key = asyncio.run(worker._answer(TOPIC, payload))
    assert answer is None and key is None
    assert worker.stats.refused == 1


@settings(max_examples=50, deadline=None)
@given(st.sampled_from(["purchase", "void", "refund", "reversal", "batch_settle", "heartbeat", "sign_on_ok"]),
       st.text(alphabet="0123456789ABCDEF", max_size=16))
def test_messages_without_a_good_mac_are_answered_a0_or_dropped(kind: str, mac: str) -> None:
    worker = _worker()
    base = {"type": kind, "terminal_id": "T0000001", "msg_id": uuid.uuid4().hex, "sent_at": now_utc().isoformat(),
            "mac": mac}
    answer, _ = asyncio.run(worker._answer(TOPIC, json.dumps(base).encode()))
    if answer is not None:
        assert answer.response_code == RC.MAC_ERROR  # type: ignore[attr-defined]


def test_topic_must_name_the_sender() -> None:
    worker = _worker()
    hb = Heartbeat(terminal_id="T0000002", msg_id=uuid.uuid4().hex, sent_at=now_utc())
    answer, _ = asyncio.run(worker._answer(TOPIC, hb.to_json()))
    assert answer is None and worker.stats.refused == 1
    assert _terminal_of("carepay/v1/term/T0000001/up") == "T0000001"
    assert _terminal_of("carepay/v1/term/T0000001/down") is None and _terminal_of("x/y") is None


def test_a_purchase_without_keys_gets_a0_and_never_reaches_the_service() -> None:
    from protocol.messages import CardProof

    p = Purchase(terminal_id="T0000001", msg_id=uuid.uuid4().hex, sent_at=now_utc(), provider_id="P110105V0000001",
                 batch_no="000001", trace_no="000001", program="voucher", service_category="meal", amount_fen=100,
                 card=CardProof(card_no="6218880000000000015", app_serial="0001000000000001", key_version=1, atc=1,
                                ttn=1, txn_date="20260301", txn_time="100000", tac="00000000")).signed(bytes(16))
    worker = _worker()
    answer, _ = asyncio.run(worker._answer(TOPIC, p.to_json()))
    assert answer is not None and answer.response_code == RC.MAC_ERROR and answer.orig_msg_id == p.msg_id
    assert worker.stats.mac_failures == 1


class OneKey:
    """A signed-on terminal: one working key."""

    def __init__(self, key: bytes) -> None:
        self.key = key

    async def candidates(self, terminal_id: str, refresh: bool = False) -> list[bytes]:
        return [self.key]

    async def current(self, terminal_id: str) -> bytes | None:
        return self.key


class Records:
    def __init__(self) -> None:
        self.seen: list[object] = []

    async def handle(self, msg: object) -> None:
        self.seen.append(msg)


def _purchase(amount: int = 100) -> Purchase:
    from protocol.messages import CardProof

    return Purchase(terminal_id="T0000001", msg_id=uuid.uuid4().hex, sent_at=now_utc(), provider_id="P110105V0000001",
                    batch_no="000001", trace_no="000001", program="voucher", service_category="meal",
                    amount_fen=amount, card=CardProof(card_no="6218880000000000015", app_serial="0001000000000001",
                                                      key_version=1, atc=1, ttn=1, txn_date="20260301",
                                                      txn_time="100000", tac="00000000"))


def test_the_mac_is_checked_over_the_sent_bytes_or_the_canonical_form_whatever_the_layout() -> None:
    """Our senders' form (canonical JSON + ``mac`` last) is checked over its own bytes; any other layout of a
    correctly MAC'd message (fields in model order, ``mac`` in the middle, spaces) over its canonical form."""
    tak = bytes(range(16))
    p = _purchase()
    signed = p.signed(tak)
    layouts = {
        "ours": p.signed_json(tak),
        "model order": signed.to_json(),
        "mac first, spaced": json.dumps({"mac": signed.mac, **json.loads(p.canonical_bytes())}, indent=1).encode(),
        "mac last, unsorted": json.dumps({**json.loads(signed.to_json())}).encode(),
    }
    for name, wire in layouts.items():
        service = Records()
        worker = ClearingWorker("mqtt://127.0.0.1:1", service, OneKey(tak), None)  # type: ignore[arg-type]
        asyncio.run(worker._answer(TOPIC, wire))
        assert [m.msg_id for m in service.seen] == [p.msg_id], name  # type: ignore[attr-defined]
        assert worker.stats.mac_failures == 0, name


def test_a_changed_byte_before_the_mac_member_is_a_mac_error() -> None:
    tak = bytes(range(16))
    p = _purchase(100)
    wire = p.signed_json(tak)
    forged = wire.replace(b'"amount_fen":100,', b'"amount_fen":900,')
    assert forged != wire
    wrong_mac = wire[:-3] + (b'1"}' if wire[-3:] != b'1"}' else b'2"}')
    for bad in (forged, wrong_mac):
        service = Records()
        worker = ClearingWorker("mqtt://127.0.0.1:1", service, OneKey(tak), None)  # type: ignore[arg-type]
        answer, _ = asyncio.run(worker._answer(TOPIC, bad))
        assert service.seen == []
        if answer is not None:  # a payload that still parses: answered A0
            assert answer.response_code == RC.MAC_ERROR and worker.stats.mac_failures == 1


class Approves:
    """A clearing service that approves everything once per call (counts its calls)."""

    def __init__(self) -> None:
        self.calls = 0

    async def handle(self, msg: Purchase) -> TxnResult:
        self.calls += 1
        return TxnResult(type="purchase_result", terminal_id=msg.terminal_id, msg_id=uuid.uuid4().hex,
                         sent_at=now_utc(), orig_msg_id=msg.msg_id, batch_no=msg.batch_no, trace_no=msg.trace_no,
                         response_code="00", rrn="000000000042", auth_code="123456", balance_after_fen=900,
                         business_date="2026-03-01", message="")


def test_a_retransmitted_request_gets_the_same_answer_from_plain_bytes_kept_outside_the_collector() -> None:
    import gc

    from clearing.worker import signed_payload
    from protocol.messages import parse_message

    tak = bytes(range(16))
    wire = _purchase().signed_json(tak)
    service = Approves()
    worker = ClearingWorker("mqtt://127.0.0.1:1", service, OneKey(tak), None)  # type: ignore[arg-type]

    async def twice() -> list[bytes]:
        out = []
        for _ in range(2):
            answer, key = await worker._answer(TOPIC, wire)
            assert answer is not None and key == tak
            out.append(signed_payload(answer, key))
        return out

    first, second = asyncio.run(twice())
    assert service.calls == 1 and worker.stats.refused == 1  # the second was a replay, not processed again
    assert first == second
    answer = parse_message(first)
    assert isinstance(answer, TxnResult) and answer.rrn == "000000000042" and answer.mac_ok(tak)
    (kept,) = worker._answers.values()
    assert [type(v) for v in kept] == [str, str, bytes]
    gc.collect()
    assert not gc.is_tracked(kept)  # 50,000 of these cost a full collection nothing
