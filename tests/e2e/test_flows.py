"""Terminal ↔ clearing through the project's mosquitto: happy paths, refusals, settlement."""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest

from clearing import metrics
from ops.fleet import card_number
from protocol import card_files as cf
from protocol.messages import RC, BatchTotals, Heartbeat, now_utc
from tests.e2e.conftest import Harness, balance, host_rows, raw_exchange

pytestmark = pytest.mark.mqtt


def _sample(name: str, **labels: str) -> float:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels) or 0.0



@pytest.fixture(params=["aiomqtt", "lean"])
def worker_client(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run the test with each of the clearing worker's MQTT clients (aiomqtt default, lean opt-in)."""
    monkeypatch.setenv("CAREPAY_MQTT_CLIENT", request.param)
    return request.param


async def test_sign_on_purchase_void_refund_and_settle(harness: Harness, worker_client: str) -> None:
    approved_before = _sample("carepay_auth_requests_total", type="purchase", code="00")
    latency_before = _sample("carepay_auth_latency_seconds_count", type="purchase")
    async with harness.clearing():
        term = await harness.terminal(0)
        assert term.agent.signed_on and term.agent.key_version == 1
        card = harness.card("voucher")
        card_no = card_number(card)
        out = await term.purchase(card, 1_234, program="voucher")
        assert out.approved, out
        assert out.rrn and out.auth_code and out.balance_after_fen == 100_000 - 1_234
        receipt = term.agent.receipt(out)
        assert "RMB 12.34" in receipt and out.rrn in receipt and card_no not in receipt
        assert card_no[:6] in receipt and card_no[-4:] in receipt
        assert len(card.log) == 1  # the card's transaction log written after approval

        second = await term.purchase(card, 500)
        assert second.approved
        voided = await term.agent.void(second.trace_no)
        assert voided.approved, voided
        refunded = await term.agent.refund(out.rrn, 234)
        assert refunded.approved, refunded
        assert await balance(harness.engine, card_no, "voucher") == 100_000 - 1_234 + 234

        await term.agent.heartbeat()
        settled = await term.agent.settle()
        assert settled.balanced, settled
        assert settled.terminal_totals == BatchTotals(purchase_count=2, purchase_fen=1_734, void_count=1,
                                                      void_fen=500, refund_count=1, refund_fen=234)
        assert settled.next_batch_no == "000002"
    assert _sample("carepay_auth_requests_total", type="purchase", code="00") == approved_before + 2
    assert _sample("carepay_auth_latency_seconds_count", type="purchase") >= latency_before + 2
    assert _sample("carepay_group_commit_batch_size_count") >= 1


async def test_nursing_purchase_and_local_declines(harness: Harness) -> None:
    async with harness.clearing():
        term = await harness.terminal(1)  # a nursing provider's terminal
        card = harness.card("nursing")
        out = await term.purchase(card, 2_000, program="nursing")
        assert out.approved and out.program == "nursing"
        only_voucher = next(c for c in harness.fleet.cards if "nursing" not in
                            cf.programs_from_bits(cf.ENTITLEMENT.parse(c.entitlement_ef).programs))
        refused = await term.purchase(only_voucher, 2_000, program="nursing")
        assert not refused.approved and refused.response_code == "57"  # the card refuses locally
        too_much = await term.purchase(card, 100_000, program="nursing")
        assert not too_much.approved and too_much.response_code == RC.INSUFFICIENT_BALANCE


async def test_bad_mac_answered_a0_and_nothing_posted(harness: Harness, worker_client: str) -> None:
    async with harness.clearing() as worker:
        term = await harness.terminal(0)
        card = harness.card("voucher")
        ok = await term.purchase(card, 100)
        assert ok.approved
        before = await host_rows(harness.engine)
        failures = metrics.MAC_FAILURES.labels(type="purchase")._value.get()
        msg = term.agent.journal.request(term.agent.journal.find(trace_no=ok.trace_no).msg_id)
        from protocol.messages import Purchase

        forged = Purchase.model_validate(msg).model_copy(update={
            "msg_id": uuid.uuid4().hex, "trace_no": "000900", "amount_fen": 99, "sent_at": now_utc()}).signed(
            bytes(16))
        answers = await raw_exchange(harness.broker.url, [forged])
        assert [a.response_code for a in answers] == [RC.MAC_ERROR]
        assert await host_rows(harness.engine) == before
        assert worker.stats.mac_failures == 1
        assert metrics.MAC_FAILURES.labels(type="purchase")._value.get() == failures + 1


async def test_duplicate_delivery_posts_once_and_replay_refused(harness: Harness, worker_client: str) -> None:
    async with harness.clearing(max_age_s=60):
        term = await harness.terminal(0)
        card = harness.card("voucher")
        card_no = card_number(card)
        session = term.session(card)
        session.start()
        card_txn = session.authorize(300, "voucher")
        tak = term.agent._tak
        assert tak is not None
        purchase = term.agent._purchase_message(card_txn, term.agent.journal.next_trace_no(), "meal").signed(tak)
        # QoS 1 may deliver twice: the same message twice → the same answer, one posting
        answers = await raw_exchange(harness.broker.url, [purchase, purchase])
        assert len(answers) == 2 and {a.rrn for a in answers} == {answers[0].rrn}
        assert all(a.response_code == RC.APPROVED for a in answers)
        assert await balance(harness.engine, card_no, "voucher") == 100_000 - 300
        # a replay with a new msg_id (re-MAC'd by someone holding the TAK) is a duplicate of the same trace
        again = purchase.model_copy(update={"msg_id": uuid.uuid4().hex, "sent_at": now_utc()}).signed(tak)
        [dup] = await raw_exchange(harness.broker.url, [again])
        assert dup.rrn == answers[0].rrn and dup.response_code in (RC.APPROVED, RC.DUPLICATE)
        # a message older than the window is refused
        stale = purchase.model_copy(update={"msg_id": uuid.uuid4().hex, "trace_no": "000777",
                                            "sent_at": now_utc() - timedelta(seconds=120)}).signed(tak)
        [refused] = await raw_exchange(harness.broker.url, [stale])
        assert refused.response_code == RC.INVALID_TXN and "stale" in refused.message
        assert await balance(harness.engine, card_no, "voucher") == 100_000 - 300
        rows = [r for r in await host_rows(harness.engine, term.terminal_id) if r["status"] == "SUCCESS"]
        assert len(rows) == 1
        # the raw purchase bypassed the journal: record it so the journal check holds
        term.agent.journal.record(msg_id=purchase.msg_id, kind="purchase", state="pending",
                                  batch_no=purchase.batch_no, trace_no=purchase.trace_no, amount_fen=300,
                                  request_json=purchase.to_json().decode(), program="voucher", card_no=card_no)
        term.agent.journal.answer(purchase.msg_id, state="approved", response_code="00", rrn=answers[0].rrn)


async def test_unknown_terminal_and_wrong_topic_get_nothing(harness: Harness) -> None:
    async with harness.clearing() as worker:
        hb = Heartbeat(terminal_id="X0000001", msg_id=uuid.uuid4().hex, sent_at=now_utc()).signed(bytes(16))
        answers = await raw_exchange(harness.broker.url, [hb], wait_s=0.5)
        assert answers == []
        assert worker.stats.mac_failures == 1  # a terminal that never signed on has no TAK


async def test_key_rotation_keeps_previous_tak_for_grace(harness: Harness) -> None:
    async with harness.clearing():
        term = await harness.terminal(0)
        card = harness.card("voucher", 1)
        old_tak = term.agent._tak
        assert await term.agent.sign_on() == 2
        assert term.agent._tak != old_tak
        # a message MAC'd under the previous TAK (in flight during the re-sign-on) is still accepted
        term.agent._tak, keep = old_tak, term.agent._tak
        out = await term.purchase(card, 100)
        assert out.approved, out
        term.agent._tak = keep
        out2 = await term.purchase(card, 100)
        assert out2.approved


async def test_key_rotation_grace_expired_gives_a0(harness: Harness) -> None:
    async with harness.clearing(grace_s=0):
        term = await harness.terminal(0)
        card = harness.card("voucher", 1)
        old_tak = term.agent._tak
        await term.agent.sign_on()
        term.agent._tak, new_tak = old_tak, term.agent._tak
        term.agent._prev_tak = None
        out = await term.purchase(card, 100)
        # the host answers A0 under the new TAK, which this (stale) terminal cannot verify: treated as no
        # answer, so the purchase is reversed; the host posted nothing
        assert not out.approved
        term.agent._tak = new_tak
        await term.agent.flush()
        rows = await host_rows(harness.engine, term.terminal_id)
        assert not [r for r in rows if r["txn_type"] == "PURCHASE" and r["status"] == "SUCCESS"]


async def test_batch_that_does_not_balance_is_uploaded_and_differences_found(harness: Harness) -> None:
    async with harness.clearing():
        term = await harness.terminal(0)
        card = harness.card("voucher", 2)
        outs = [await term.purchase(card, amount) for amount in (100, 200, 300)]
        assert all(o.approved for o in outs)
        # the terminal lost one approved purchase from its journal (restored from an old backup)
        lost = term.agent.journal.find(trace_no=outs[1].trace_no)
        term.agent.journal.set_state(lost.msg_id, "declined", "lost in a restore (test)")
        settled = await term.agent.settle()
        assert not settled.balanced
        assert settled.host_totals.purchase_count == 3 and settled.terminal_totals.purchase_count == 2
        assert settled.missing_on_terminal == [outs[1].trace_no]
        assert settled.missing_on_host == [] and settled.amount_differs == []
        # put the journal right so the end-of-test agreement check describes the real state
        term.agent.journal.set_state(lost.msg_id, "approved")


async def test_embedded_broker_single_worker_charges_a_card(engine, fleet, tmp_path) -> None:
    """The first-run setup: amqtt on a free port (no $share), one worker on the plain topic."""
    from clearing.terminal_keys import DemoTerminalKeys, demo_working_key_master
    from clearing.worker import clearing_runtime
    from ops.embedded_broker import EmbeddedBroker
    from ops.fleet import SimTerminal
    from terminal_agent.host_client import HostLink
    from terminal_agent.journal import Journal
    from tests.e2e.conftest import FAST

    async with EmbeddedBroker() as broker, clearing_runtime(
            engine, broker.url, issuer_keys=fleet.key_set, key_source=DemoTerminalKeys(),
            wkm=demo_working_key_master(), embedded=True) as worker:
        spec = fleet.terminals[0]
        async with HostLink(broker.url, [spec.terminal_id]) as link:
            with Journal(tmp_path / "j.db") as journal:
                term = SimTerminal(spec, fleet.key_set, link, journal, FAST)
                await term.agent.start()
                out = await term.purchase(fleet.cards_for("voucher")[0], 250)
                assert out.approved, out
                assert (await term.agent.settle()).balanced
        assert worker.stats.answered >= 4  # two sign-on steps, the purchase, the settlement
    from clearing.invariants import check_invariants

    assert await check_invariants(engine) == []


async def test_registry_keys_sign_on_and_suspended_terminal_refused(harness: Harness) -> None:
    """Production key source: SM2 public key and TMK KCV from the registry; only active terminals sign on."""
    from clearing.registry import set_terminal_status
    from clearing.terminal_keys import DemoTerminalKeys, RegistryTerminalKeys, demo_working_key_master
    from clearing.worker import clearing_runtime
    from terminal_agent.agent import SignOnFailed

    async with clearing_runtime(harness.engine, harness.broker.url, issuer_keys=harness.fleet.key_set,
                                key_source=RegistryTerminalKeys(DemoTerminalKeys(), harness.engine),
                                wkm=demo_working_key_master()):
        term = await harness.terminal(0)
        assert term.agent.signed_on
        assert (await term.purchase(harness.card("voucher", 3), 100)).approved
        other = await harness.terminal(1, start=False)
        await set_terminal_status(harness.engine, other.terminal_id, "suspended")
        with pytest.raises(SignOnFailed, match="59"):
            await other.agent.sign_on()
