"""Faults end to end: lost answers, card failures, broker restarts, offline mode, two workers, crashes."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from ops.fleet import card_number
from protocol import card_files as cf
from terminal_agent.host_client import HostLink
from tests.e2e.conftest import FAST, Harness, balance, host_rows

pytestmark = pytest.mark.mqtt


class LossyLink(HostLink):
    """A link that loses the next answers of given types (published by the host, never delivered)."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.drops: dict[str, int] = {"purchase_result": 1}
        self.dropped = 0

    def _dispatch(self, payload: object) -> None:
        if isinstance(payload, (bytes, bytearray)):
            text = bytes(payload).decode()
            for kind, left in self.drops.items():
                if left and f'"type":"{kind}"' in text:
                    self.drops[kind] -= 1
                    self.dropped += 1
                    return
        super()._dispatch(payload)


async def test_answer_lost_is_reversed_and_ledger_unchanged(harness: Harness) -> None:
    async with harness.clearing():
        link = LossyLink(harness.broker.url, [t.terminal_id for t in harness.fleet.terminals])
        await link.start()
        harness.links.append(link)
        term = await harness.terminal(0, link=link)
        card = harness.card("voucher")
        card_no = card_number(card)
        out = await term.purchase(card, 700)
        assert link.dropped == 1
        assert not out.approved and out.state == "reversing"
        row = term.agent.journal.find(trace_no=out.trace_no)
        assert row.state == "reversed", row  # the reversal went out at once and was acknowledged
        assert await balance(harness.engine, card_no, "voucher") == 100_000
        host = {(r["trace_no"], r["txn_type"]): r for r in await host_rows(harness.engine, term.terminal_id)}
        assert host[(out.trace_no, "PURCHASE")]["status"] == "REVERSED"
        assert len(card.log) == 0  # the card's log is written only after an approval the terminal saw


async def test_reversal_answer_lost_is_retried_until_acknowledged(harness: Harness) -> None:
    async with harness.clearing():
        link = LossyLink(harness.broker.url, [t.terminal_id for t in harness.fleet.terminals])
        await link.start()
        harness.links.append(link)
        term = await harness.terminal(0, link=link, settings=replace(FAST, answer_timeout_s=1.0))
        card = harness.card("voucher")
        link.drops = {"purchase_result": 1, "reversal_result": 1}
        out = await term.purchase(card, 800)
        assert not out.approved and out.state == "reversing"
        [queued] = term.agent.journal.reversal_queue()  # its answer was lost too: still queued
        assert term.agent.journal.find(trace_no=out.trace_no).state == "reversing"
        assert await balance(harness.engine, card_number(card), "voucher") == 100_000  # the host did reverse
        done = await term.agent.flush()  # the retry: a fresh message, same trace; the host answers again
        assert done["reversals"] == 1 and term.agent.journal.reversal_queue() == []
        assert term.agent.journal.get(queued.msg_id).attempts == 2
        assert term.agent.journal.find(trace_no=out.trace_no).state == "reversed"
        assert await balance(harness.engine, card_number(card), "voucher") == 100_000


async def test_card_failing_after_approval_is_reversed(harness: Harness) -> None:
    async with harness.clearing():
        term = await harness.terminal(0)
        card = harness.card("voucher", 1)
        card.arm_tear(cf.INS_EXTERNAL_AUTH)  # the card loses power in the completion step
        out = await term.purchase(card, 1_500)
        assert not out.approved and out.state == "reversing" and "card step failed" in out.message
        assert term.agent.journal.find(trace_no=out.trace_no).state == "reversed"
        assert await balance(harness.engine, card_number(card), "voucher") == 100_000


async def test_crash_before_answer_recovered_by_reversal_on_restart(harness: Harness) -> None:
    async with harness.clearing():
        term = await harness.terminal(0)
        card = harness.card("voucher", 2)
        session = term.session(card)
        session.start()
        txn = session.authorize(600, "voucher")
        agent = term.agent
        msg = agent._purchase_message(txn, agent.journal.next_trace_no(), "meal").signed(agent._tak)
        agent.journal.record(msg_id=msg.msg_id, kind="purchase", state="pending", batch_no=msg.batch_no,
                             trace_no=msg.trace_no, amount_fen=600, request_json=msg.to_json().decode(),
                             program="voucher", card_no=txn.card_no)
        await agent.host.send(msg)  # it leaves … and the terminal loses power before the answer
        await asyncio.sleep(0.5)
        assert await balance(harness.engine, txn.card_no, "voucher") == 100_000 - 600  # the host approved it
        # restart: a new agent on the same journal finds the purchase pending and reverses it
        from terminal_agent.agent import TerminalAgent

        restarted = TerminalAgent(agent.identity, agent.host, agent.journal, FAST)
        term.agent = restarted
        await restarted.start()
        assert restarted.journal.find(trace_no=msg.trace_no).state == "reversed"
        assert await balance(harness.engine, txn.card_no, "voucher") == 100_000


async def test_offline_purchases_uploaded_when_the_link_returns(harness: Harness) -> None:
    async with harness.clearing():
        term = await harness.terminal(0)
        cards = harness.fleet.cards_for("voucher")
        harness.broker.stop()  # the host is unreachable
        await asyncio.sleep(0.3)
        a = await term.purchase(cards[0], 1_000)
        b = await term.purchase(cards[0], 2_000)
        c = await term.purchase(cards[0], 500)  # third offline purchase of the same card: over the count
        d = await term.purchase(cards[1], 9_000)  # above the floor limit
        assert a.approved and a.offline and b.approved and b.offline
        assert not c.approved and "offline purchases" in c.message
        assert not d.approved and "floor limit" in d.message
        assert len(term.agent.journal.offline_queue()) == 2
        harness.broker.start()
        for _ in range(100):
            if term.agent.journal.offline_queue() == [] and harness.links[0].connected:
                break
            await asyncio.sleep(0.1)
            if harness.links[0].connected:
                await term.agent.flush()
        assert term.agent.journal.offline_queue() == []
        assert {r.state for r in term.agent.journal.rows(kind="offline_purchase")} == {"advised"}
        assert await balance(harness.engine, card_number(cards[0]), "voucher") == 100_000 - 3_000
        advices = [r for r in await host_rows(harness.engine, term.terminal_id) if r["txn_type"] == "ADVICE"]
        assert len(advices) == 2 and all(r["status"] == "SUCCESS" for r in advices)


async def _traffic(harness: Harness, terms: list, rounds: int, amount: int = 100) -> list:
    outs = []

    async def one(term, cards) -> None:
        for i in range(rounds):
            outs.append(await term.purchase(cards[i % len(cards)], amount))

    def cards_of(program: str) -> list:
        nursing = harness.fleet.cards_for("nursing")
        if program == "nursing":
            return nursing[:3]
        return [c for c in harness.fleet.cards_for("voucher") if c not in nursing][:3]  # one reader per card

    await asyncio.gather(*(one(t, cards_of(t.spec.program)) for t in terms))
    return outs


async def _settle_queues(terms: list, tries: int = 60) -> None:
    for _ in range(tries):
        for t in terms:
            if not t.agent.signed_on:
                try:
                    await t.agent.sign_on()
                except Exception:
                    continue
            await t.agent.flush()
        if all(t.agent.journal.backlog() == 0 for t in terms):
            return
        await asyncio.sleep(0.2)


async def test_broker_restarted_mid_run(harness: Harness) -> None:
    async with harness.clearing() as worker:
        terms = [await harness.terminal(0), await harness.terminal(1)]

        async def restart() -> None:
            await asyncio.sleep(0.4)
            harness.broker.stop()
            await asyncio.sleep(0.5)
            harness.broker.start()

        outs, _ = await asyncio.gather(_traffic(harness, terms, 12), restart())
        await _settle_queues(terms)
        assert all(t.agent.journal.backlog() == 0 for t in terms)
        assert sum(o.approved for o in outs) >= 6
        assert worker.stats.answered > 0


async def test_two_workers_share_the_subscription(harness: Harness) -> None:
    async with harness.clearing(name="w1") as w1, harness.clearing(name="w2") as w2:
        terms = [await harness.terminal(0), await harness.terminal(1)]
        outs = await _traffic(harness, terms, 10)
        assert all(o.approved for o in outs), [o for o in outs if not o.approved]
        assert w1.stats.answered > 0 and w2.stats.answered > 0  # the broker split the load
        assert w1.stats.answered + w2.stats.answered >= 20 + 4  # purchases and the sign-on steps
        for t in terms:
            settled = await t.agent.settle()
            assert settled.balanced
