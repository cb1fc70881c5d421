"""The lean receive path's bookkeeping without a broker: in-flight count, back-pressure, queue-depth metric,
and the answer on the wire (MAC'd under the TAK that verified the request)."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import pytest
from prometheus_client import REGISTRY

import clearing.worker as worker_mod
from clearing.worker import ClearingWorker
from protocol.messages import RC, CardProof, Message, Purchase, TxnResult, down_topic, parse_message, up_topic

TAK = bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")
TERMINAL = "T0000001"


class Keys:
    async def candidates(self, terminal_id: str, refresh: bool = False) -> list[bytes]:
        return [TAK] if terminal_id == TERMINAL else []

    async def current(self, terminal_id: str) -> bytes | None:
        return TAK if terminal_id == TERMINAL else None


class GatedService:
    """Answers every purchase approved once ``gate`` opens."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.seen: list[Message] = []

    async def handle(self, msg: Message) -> Message:
        self.seen.append(msg)
        await self.gate.wait()
        return TxnResult(type="purchase_result", terminal_id=msg.terminal_id, msg_id=uuid.uuid4().hex,
                         sent_at=datetime.now(UTC), orig_msg_id=msg.msg_id, batch_no=msg.batch_no,  # type: ignore[attr-defined]
                         trace_no=msg.trace_no, response_code=RC.APPROVED, rrn="000000000001",  # type: ignore[attr-defined]
                         auth_code="123456")


class FakeConn:
    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []
        self.pauses = 0
        self.resumes = 0

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        self.published.append((topic, payload))

    def pause(self) -> None:
        self.pauses += 1

    def resume(self) -> None:
        self.resumes += 1


def _purchase(trace: int) -> bytes:
    msg = Purchase(terminal_id=TERMINAL, msg_id=uuid.uuid4().hex, sent_at=datetime.now(UTC),
                   provider_id="P00000000000001", batch_no="000001", trace_no=f"{trace:06d}", program="voucher",
                   service_category="meal", amount_fen=100,
                   card=CardProof(card_no="6210000000000000001", app_serial="0000000000000001", key_version=1,
                                  atc=trace, ttn=trace, txn_date="20261128", txn_time="101500", tac="1C66751A"))
    return msg.signed(TAK).to_json()


def _queue_depth() -> float | None:
    return REGISTRY.get_sample_value("carepay_queue_depth")


async def test_in_flight_back_pressure_and_queue_depth(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker_mod, "MAX_IN_FLIGHT", 3)
    service = GatedService()
    before = _queue_depth() or 0  # other workers of this process (idle) count too
    worker = ClearingWorker("mqtt://127.0.0.1:1", service, Keys(), None, lean=True)  # type: ignore[arg-type]
    conn = FakeConn()
    worker._conn = conn  # type: ignore[assignment]
    for i in range(1, 5):
        worker._on_lean_message(up_topic(TERMINAL), _purchase(i))
    await asyncio.sleep(0.01)
    assert worker.in_flight == 4 and len(service.seen) == 4
    assert conn.pauses == 1  # paused once when the limit was reached, not once per message
    assert _queue_depth() == before + 4
    service.gate.set()
    for _ in range(100):
        if not worker.in_flight:
            break
        await asyncio.sleep(0.005)
    assert worker.in_flight == 0 and _queue_depth() == before
    assert conn.resumes == 1
    assert worker.stats.answered == 4 and worker.stats.errors == 0
    for topic, payload in conn.published:
        answer = parse_message(payload)
        assert topic == down_topic(TERMINAL)
        assert answer.type == "purchase_result" and answer.mac_ok(TAK)
    assert {parse_message(p).orig_msg_id for _, p in conn.published} == {m.msg_id for m in service.seen}  # type: ignore[attr-defined]


async def test_bad_mac_is_answered_a0_and_nothing_reaches_the_service() -> None:
    service = GatedService()
    worker = ClearingWorker("mqtt://127.0.0.1:1", service, Keys(), None, lean=True)  # type: ignore[arg-type]
    conn = FakeConn()
    worker._conn = conn  # type: ignore[assignment]
    good = parse_message(_purchase(7))
    forged = good.model_copy(update={"amount_fen": 100_000}).to_json()  # the MAC of the 100 fen purchase
    worker._on_lean_message(up_topic(TERMINAL), forged)
    for _ in range(100):
        if not worker.in_flight:
            break
        await asyncio.sleep(0.005)
    assert service.seen == [] and worker.stats.mac_failures == 1
    (topic, payload), = conn.published
    assert topic == down_topic(TERMINAL)
    answer = parse_message(payload)
    assert answer.response_code == RC.MAC_ERROR and answer.mac_ok(TAK)  # type: ignore[attr-defined]
