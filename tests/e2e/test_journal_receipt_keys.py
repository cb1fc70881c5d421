"""Terminal journal (crash recovery, queues), receipts (masking), sign-on nonces and working keys."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clearing.db import init_db, make_engine
from clearing.signon import SignOnService
from clearing.terminal_keys import (
    DemoTerminalKeys,
    WorkingKeys,
    demo_working_key_master,
    derive_working_key,
    ensure_schema,
)
from terminal_agent.journal import Journal
from terminal_agent.receipt import ReceiptData, render_receipt

CARD = "6218880000000000015"


def _record(j: Journal, msg_id: str, kind: str = "purchase", state: str = "pending", amount: int = 100) -> str:
    trace = j.next_trace_no()
    j.record(msg_id=msg_id, kind=kind, state=state, batch_no=j.batch_no, trace_no=trace, amount_fen=amount,
             request_json=json.dumps({"msg_id": msg_id}), program="voucher", card_no=CARD)
    return trace


def test_journal_survives_a_restart_and_knows_every_state(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    j = Journal(path)
    t1 = _record(j, "m-approved-1")
    j.answer("m-approved-1", state="approved", response_code="00", rrn="000000000001", auth_code="123456")
    t2 = _record(j, "m-pending-2")  # sent, then the power went
    j.set_pending_card({"app_serial": "0001000000000001", "expected_atc": 3})
    j.close()

    j2 = Journal(path)
    assert j2.get("m-approved-1").state == "approved" and j2.get("m-approved-1").rrn == "000000000001"
    assert [r.trace_no for r in j2.recover()] == [t2]
    assert j2.get("m-pending-2").state == "reversing"
    assert j2.pending_card() == {"app_serial": "0001000000000001", "expected_atc": 3}
    assert j2.next_trace_no() == f"{int(t2) + 1:06d}" and t1 == "000001"
    assert j2.backlog() == 1
    j2.close()


def test_offline_queue_and_per_card_count(tmp_path: Path) -> None:
    with Journal(tmp_path / "j.db") as j:
        _record(j, "off-1")
        j.to_offline("off-1", "A1B2C3")
        _record(j, "off-2")
        j.to_offline("off-2", "D4E5F6")
        assert j.offline_count(CARD) == 2 and [r.msg_id for r in j.offline_queue()] == ["off-1", "off-2"]
        j.answer("off-1", state="advised", response_code="00")
        assert j.offline_count(CARD) == 1


def test_trace_numbers_wrap_and_batches_advance(tmp_path: Path) -> None:
    with Journal(tmp_path / "j.db") as j:
        j._exec("UPDATE meta SET value='999999' WHERE key='trace_no'")
        assert j.next_trace_no() == "000001"
        assert j.close_batch() == "000002" and j.batch_no == "000002"


def test_receipt_masks_the_card_and_shows_the_facts() -> None:
    text = render_receipt(ReceiptData("P110105V0000001", "幸福驿站", "T0000001", CARD, "voucher", "purchase", 12_345,
                                      "000001", "000042", datetime(2026, 3, 1, 2, 0, tzinfo=UTC), True, "00", "",
                                      87_655, "000000000042", "654321"))
    assert CARD not in text and "621888*********0015" in text
    for needle in ("P110105V0000001", "T0000001", "RMB 123.45", "RMB 876.55", "000000000042", "654321",
                   "2026-03-01 10:00:00", "APPROVED", "幸福驿站"):
        assert needle in text


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 10**8), st.booleans(), st.text(max_size=80))
def test_receipt_never_prints_a_full_card_number(amount: int, approved: bool, message: str) -> None:
    text = render_receipt(ReceiptData("P110105V0000001", "", "T0000001", CARD, "nursing", "refund", amount, "000001",
                                      "000001", datetime.now(UTC), approved, None if approved else "51", message))
    assert CARD not in text.replace(message, "")


async def test_working_keys_rotate_with_grace_and_are_shared_through_the_database(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / 'c.db'}")
    await init_db(engine)
    await ensure_schema(engine)
    wkm = demo_working_key_master()
    w1, w2 = WorkingKeys(engine, wkm), WorkingKeys(engine, wkm)  # two worker processes
    v1, tak1, _ = await w1.rotate("T0000001", "N1")
    assert v1 == 1 and await w2.candidates("T0000001") == [tak1]
    v2, tak2, tek2 = await w1.rotate("T0000001", "N2")
    assert v2 == 2 and tak2 != tak1 and tek2 != tak2
    assert await w2.candidates("T0000001", refresh=True) == [tak2, tak1]  # previous TAK during the grace
    assert await w1.rotate("T0000001", "N2") is None  # the same sign-on nonce cannot rotate twice
    import sqlalchemy as sa

    async with engine.connect() as conn:
        row = (await conn.execute(sa.text("SELECT * FROM terminal_working_keys"))).mappings().one()
    assert tak2.hex() not in json.dumps({k: str(v) for k, v in row.items()}).lower()  # no key in the database
    assert derive_working_key(wkm, "tak", "T0000001", 2, bytes.fromhex(row["salt_hex"])) == tak2
    _, tak9, _ = await w1.rotate("T0000009", "N9")
    w3 = WorkingKeys(engine, wkm)  # a worker starting up: every terminal's keys in one read
    assert await w3.preload() == 2
    async with engine.begin() as conn:  # answered from what preload read, not from the table
        await conn.execute(sa.text("DELETE FROM terminal_working_keys"))
    assert await w3.candidates("T0000001") == [tak2, tak1] and await w3.candidates("T0000009") == [tak9]
    assert await w3.candidates("T0000009", refresh=True) == []
    await engine.dispose()


def test_sign_on_nonce_is_stateless_bound_and_expires() -> None:
    svc = SignOnService(DemoTerminalKeys(), None, demo_working_key_master())  # type: ignore[arg-type]
    other = SignOnService(DemoTerminalKeys(), None, demo_working_key_master())  # type: ignore[arg-type]
    nonce = svc.new_nonce("T0000001")
    assert other.nonce_ok("T0000001", nonce)  # another worker checks it without shared state
    assert not other.nonce_ok("T0000002", nonce)  # bound to the terminal
    tampered = nonce[:-2] + ("00" if nonce[-2:] != "00" else "11")
    assert not svc.nonce_ok("T0000001", tampered)
    old = ((1_000).to_bytes(8, "big") + bytes(8)).hex().upper()
    assert not svc.nonce_ok("T0000001", old + svc._nonce_tag("T0000001", bytes.fromhex(old)).hex())
    assert not svc.nonce_ok("T0000001", "zz")


@pytest.mark.parametrize("kind", ["tak", "tek"])
def test_working_key_derivation_is_deterministic(kind: str) -> None:
    wkm = demo_working_key_master()
    a = derive_working_key(wkm, kind, "T0000001", 1, bytes(16))
    assert a == derive_working_key(wkm, kind, "T0000001", 1, bytes(16)) and len(a) == 16
    assert a != derive_working_key(wkm, kind, "T0000001", 2, bytes(16))
    assert a != derive_working_key(bytes(16), kind, "T0000001", 1, bytes(16))
