"""Regressions from the soak test: a 96 answer is an unknown outcome (reversed, never a decline), a torn card
transaction whose cryptogram aged out of the card does not block the card, and the invariants check sees one
snapshot of the ledger while postings flow (PostgreSQL REPEATABLE READ).

The first two run through the project's mosquitto and a real clearing worker; the worker's answer is forced to
96 by a wrapper around the clearing service's ``handle`` (after the host really posted, or instead of it). The
``harness`` fixture checks the ledger invariants and that every terminal journal agrees with the host at the end.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from clearing.invariants import check_invariants
from clearing.worker import ClearingWorker, refusal
from keys.issuer import IssuerKeySet
from ops.fleet import card_number
from protocol import card_files as cf
from protocol.messages import RC, Message, TxnResult
from terminal_agent.card_session import PendingCryptogram
from tests.e2e.conftest import Harness, balance, host_rows

pytestmark = pytest.mark.mqtt

START_BALANCE_FEN = 100_000


def force_96(worker: ClearingWorker, msg_type: str, *, post_first: bool, times: int = 1) -> list[Message]:
    """Answer the next ``times`` messages of ``msg_type`` with 96: after the host posted them (``post_first``,
    the race of two workers on a duplicate delivery) or without handling them at all (a failed batch)."""
    service = worker._service
    real: Callable[[Message], Awaitable[Message | None]] = service.handle
    forced: list[Message] = []

    async def handle(msg: Message) -> Message | None:
        if msg.type != msg_type or len(forced) >= times:
            return await real(msg)
        forced.append(msg)
        if post_first:
            answer = await real(msg)
            assert isinstance(answer, TxnResult)
            return answer.model_copy(update={"response_code": RC.SYSTEM_ERROR, "message": "system error; retry",
                                             "auth_code": None})
        return refusal(msg, RC.SYSTEM_ERROR, "system error; retry")

    service.handle = service.handle_answered = handle  # type: ignore[method-assign]
    return forced


# --- 1. a 96 answer to a purchase is an unknown outcome -----------------------------------------------------


@pytest.mark.parametrize("post_first", [True, False], ids=["host-posted", "host-did-not-post"])
async def test_purchase_answered_96_is_reversed_not_declined(harness: Harness, post_first: bool) -> None:
    async with harness.clearing() as worker:
        term = await harness.terminal(0)
        card = harness.card("voucher", 3)
        card_no = card_number(card)
        forced = force_96(worker, "purchase", post_first=post_first)
        out = await term.purchase(card, 1_200)
        assert len(forced) == 1
        assert not out.approved and out.state == "reversing" and out.response_code == RC.SYSTEM_ERROR
        assert "not completed" in out.message
        receipt = term.agent.receipt(out)
        assert "DECLINED (96)" in receipt and "not completed" in receipt
        row = term.agent.journal.find(trace_no=out.trace_no, kind="purchase")
        assert row is not None and row.state == "reversed", row  # the reversal went out and was acknowledged
        assert term.agent.journal.reversal_queue() == []
        assert await balance(harness.engine, card_no, "voucher") == START_BALANCE_FEN
        host = {(r["trace_no"], r["txn_type"]): r for r in await host_rows(harness.engine, term.terminal_id)}
        purchase = host.get((out.trace_no, "PURCHASE"))
        if post_first:
            assert purchase is not None and purchase["status"] == "REVERSED"
        else:
            assert purchase is None or purchase["status"] != "SUCCESS"
        assert len(card.log) == 0  # the card's log is written only after an approval the terminal saw
        again = await term.purchase(card, 300)  # the next purchase goes through normally
        assert again.approved
        assert await balance(harness.engine, card_no, "voucher") == START_BALANCE_FEN - 300


async def test_purchase_answer_that_cannot_be_verified_is_reversed(harness: Harness) -> None:
    async with harness.clearing():
        term = await harness.terminal(0)
        card = harness.card("voucher", 4)
        link = harness.links[0]
        original_dispatch = link._dispatch

        def corrupt(payload: object) -> None:  # the host approved and posted; the answer arrives with a bad MAC
            if isinstance(payload, (bytes, bytearray)) and b'"purchase_result"' in payload:
                text = bytes(payload).decode()
                mac_at = text.index('"mac":"') + len('"mac":"')
                payload = (text[:mac_at] + ("0" if text[mac_at] != "0" else "1") + text[mac_at + 1:]).encode()
            original_dispatch(payload)

        link._dispatch = corrupt  # type: ignore[method-assign]
        out = await term.purchase(card, 900)
        link._dispatch = original_dispatch  # type: ignore[method-assign]
        assert not out.approved and out.state == "reversing" and "not completed" in out.message
        assert term.agent.untrusted_answers >= 1
        assert term.agent.journal.find(trace_no=out.trace_no, kind="purchase").state == "reversed"
        assert await balance(harness.engine, card_number(card), "voucher") == START_BALANCE_FEN


async def test_purchase_answer_that_cannot_be_parsed_is_reversed_at_once(harness: Harness) -> None:
    async with harness.clearing():
        term = await harness.terminal(0)
        card = harness.card("voucher", 2)
        link = harness.links[0]
        original_dispatch = link._dispatch

        def garble(payload: object) -> None:  # the host approved and posted; its answer arrives unreadable
            if isinstance(payload, (bytes, bytearray)) and b'"purchase_result"' in payload:
                payload = bytes(payload).replace(b'"purchase_result"', b'"purchase_result?"')
            original_dispatch(payload)

        link._dispatch = garble  # type: ignore[method-assign]
        loop = asyncio.get_running_loop()
        started = loop.time()
        out = await term.purchase(card, 650)
        elapsed = loop.time() - started
        link._dispatch = original_dispatch  # type: ignore[method-assign]
        assert link.bad_answers >= 1
        assert not out.approved and out.state == "reversing" and "not completed" in out.message
        assert elapsed < term.agent.settings.answer_timeout_s  # no waiting out the timeout
        assert term.agent.journal.find(trace_no=out.trace_no, kind="purchase").state == "reversed"
        assert await balance(harness.engine, card_number(card), "voucher") == START_BALANCE_FEN


async def test_void_answered_96_is_retried_and_ends_as_the_host_recorded_it(harness: Harness) -> None:
    async with harness.clearing() as worker:
        term = await harness.terminal(0)
        card = harness.card("voucher", 5)
        card_no = card_number(card)
        bought = await term.purchase(card, 2_000)
        assert bought.approved
        forced = force_96(worker, "void", post_first=True)
        out = await term.agent.void(bought.trace_no)
        assert len(forced) == 1
        assert not out.approved and out.state == "pending" and out.response_code == RC.SYSTEM_ERROR
        assert term.agent.journal.find(trace_no=out.trace_no, kind="void").state == "pending"
        done = await term.agent.flush()  # the retransmission: same trace, the host answers with its record
        assert done["retransmitted"] == 1
        row = term.agent.journal.find(trace_no=out.trace_no, kind="void")
        assert row.state == "approved" and row.response_code == RC.APPROVED
        assert await balance(harness.engine, card_no, "voucher") == START_BALANCE_FEN


# --- 2. a torn transaction the card can no longer prove -----------------------------------------------------


def _use_elsewhere(term: Any, card: Any, times: int = cf.CRYPTOGRAM_HISTORY) -> None:
    """The card makes ``times`` cryptograms at another till (never sent anywhere): its history rolls over."""
    for _ in range(times):
        session = term.session(card)
        try:
            session.start()
            session.authorize(100, "voucher", pin="123456")
        finally:
            session.close()
            term.reader.card.remove()


async def test_torn_transaction_lost_from_the_card_and_never_sent_is_cancelled(harness: Harness) -> None:
    async with harness.clearing():
        term = await harness.terminal(0)
        card = harness.card("voucher", 6)
        card_no = card_number(card)
        card.arm_tear(cf.INS_CRYPTOGRAM)  # the card counts the cryptogram, then loses power
        torn = await term.purchase(card, 700)
        assert not torn.approved and torn.state == "card_declined"
        pending = term.agent.journal.pending_card()
        assert pending is not None
        _use_elsewhere(term, card)
        out = await term.purchase(card, 500)
        assert out.approved, out
        assert "never reached the host" in out.message and "no charge" in out.message
        assert term.agent.journal.pending_card() is None
        [cancelled] = term.agent.journal.rows(state="cancelled")
        assert cancelled.amount_fen == 700 and cancelled.card_no == card_no
        assert cancelled.final and term.agent.journal.backlog() == 0
        host = {(r["trace_no"], r["txn_type"]) for r in await host_rows(harness.engine, term.terminal_id)}
        assert (cancelled.trace_no, "PURCHASE") not in host
        assert await balance(harness.engine, card_no, "voucher") == START_BALANCE_FEN - 500
        later = await term.purchase(card, 200)  # and the card keeps working
        assert later.approved and "interrupted" not in later.message
        assert await balance(harness.engine, card_no, "voucher") == START_BALANCE_FEN - 700


async def test_torn_transaction_the_host_has_is_kept(harness: Harness) -> None:
    async with harness.clearing():
        term = await harness.terminal(0)
        card = harness.card("voucher", 7)
        card_no = card_number(card)
        agent = term.agent
        seen: list[dict[str, Any]] = []
        real_set = agent.journal.set_pending_card

        def keep(record: dict[str, Any] | None) -> None:
            if record is not None:
                seen.append(record)
            real_set(record)

        agent.journal.set_pending_card = keep  # type: ignore[method-assign]
        first = await term.purchase(card, 1_100)
        agent.journal.set_pending_card = real_set  # type: ignore[method-assign]
        assert first.approved and seen
        # the terminal lost power just after the host's approval, before its pending record was cleared
        real_set(seen[-1])
        record = PendingCryptogram.from_dict(seen[-1])
        assert agent.journal.find_card_txn(card_no, ttn=record.ttn, atc=record.expected_atc).trace_no == first.trace_no
        _use_elsewhere(term, card)
        out = await term.purchase(card, 400)
        assert out.approved and f"trace {first.trace_no} stands" in out.message, out
        assert agent.journal.pending_card() is None
        assert agent.journal.find(trace_no=first.trace_no, kind="purchase").state == "approved"
        assert await balance(harness.engine, card_no, "voucher") == START_BALANCE_FEN - 1_500


# --- 3. the invariants check sees one snapshot while postings flow --------------------------------------------


POSTING_TASKS = 4
POSTINGS_PER_TASK = 40
CHECKS_WHILE_POSTING_MIN = 5


async def test_invariants_have_no_false_alarms_under_concurrent_postings(pg_url: str) -> None:
    from clearing.db import init_db
    from tests.clearing.conftest import build_world, drop_pg_schema, fresh_pg_engine

    engine, schema = await fresh_pg_engine(pg_url)
    try:
        await init_db(engine)
        world = await build_world(engine, IssuerKeySet.demo())
        async with world.svc:
            cards = [await world.add_card(900 + i, programs=("voucher",)) for i in range(POSTING_TASKS)]
            for c in cards:
                await world.fund(c, "voucher", 1_000_000)
            stop = asyncio.Event()
            alarms: list[list[str]] = []
            checks = 0

            async def post(card_no: str) -> None:
                for _ in range(POSTINGS_PER_TASK):
                    answer = await world.svc.handle(world.purchase(card_no, 100))
                    assert answer.response_code == RC.APPROVED, answer  # type: ignore[attr-defined]
                    await world.fund(card_no, "voucher", 100)  # a second writer path: direct recharge postings

            async def check() -> None:
                nonlocal checks
                while not stop.is_set():
                    problems = await check_invariants(engine)
                    checks += 1
                    if problems:
                        alarms.append(problems)

            checker = asyncio.create_task(check())
            await asyncio.gather(*(post(c) for c in cards))
            stop.set()
            await checker
        assert alarms == [], alarms[:3]
        assert checks >= CHECKS_WHILE_POSTING_MIN, checks
        assert await check_invariants(engine) == []
    finally:
        await engine.dispose()
        await drop_pg_schema(pg_url, schema)


async def test_invariants_run_in_one_transaction_on_sqlite(tmp_path: Any) -> None:
    """On SQLite the checks run in one explicit read transaction on one connection (one WAL snapshot)."""
    from sqlalchemy import event

    from clearing.db import init_db, make_engine

    engine = make_engine(f"sqlite+aiosqlite:///{tmp_path / f'{uuid.uuid4().hex}.db'}")
    await init_db(engine)
    statements: list[tuple[int, str]] = []

    @event.listens_for(engine.sync_engine, "before_cursor_execute")
    def _seen(conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append((id(conn.connection.dbapi_connection), statement.strip().split()[0].upper()))

    try:
        assert await check_invariants(engine) == []
    finally:
        await engine.dispose()
    assert len({c for c, _ in statements}) == 1
    kinds = [k for _, k in statements]
    assert kinds[0] == "BEGIN" and kinds.count("BEGIN") == 1 and kinds.count("SELECT") >= 6


# --- 4. the CLI: logging through ops.logging on stderr, terminal metrics, the PSAM's terminal id ---------------


def test_cli_logs_go_to_stderr_masked_and_json_stays_clean(capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    import json
    import logging

    from ops.cli import main

    monkeypatch.setenv("CAREPAY_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("CAREPAY_LOG_JSON", "true")
    monkeypatch.setenv("CAREPAY_LOG_LEVEL", "DEBUG")
    assert main(["clearing", "init-db", "--json"]) == 0
    capsys.readouterr()
    logging.getLogger("carepay.test").warning("card 6218880000000012345 charged")
    assert main(["clearing", "check", "--json"]) == 0
    out, err = capsys.readouterr()
    json.loads(out)  # stdout is the result alone
    line = next(x for x in err.splitlines() if "charged" in x)
    assert json.loads(line)["event"].startswith("card 621888") and "6218880000000012345" not in line


def test_terminal_run_gives_the_psam_its_terminal_and_fills_the_metrics(capsys: pytest.CaptureFixture[str],
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       tmp_path: Any) -> None:
    import json

    from ops import metrics
    from ops.cli import main
    from tests.conftest import free_port

    monkeypatch.setenv("CAREPAY_DATA_DIR", str(tmp_path / "data"))
    deck = tmp_path / "cards.json"
    assert main(["sim", "cards", "issue", "--count", "1", "--out", str(deck)]) == 0
    labels = {"type": "offline_purchase", "outcome": "offline"}
    before = metrics.sample_value("carepay_terminal_transactions_total", labels) or 0.0
    capsys.readouterr()
    # T0000009 is not the simulated PSAM's default terminal; nobody listens on the port: the terminal works offline
    code = main(["terminal", "run", "--terminal-id", "T0000009", "--reader", "sim", "--cards", str(deck),
                 "--mqtt", f"mqtt://127.0.0.1:{free_port()}", "--journal", str(tmp_path / "j.db"),
                 "--amount", "300", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)["results"][0]["outcome"]
    assert result["approved"] and result["offline"]
    assert metrics.sample_value("carepay_terminal_transactions_total", labels) == before + 1
    assert metrics.sample_value("carepay_terminal_backlog", {"queue": "offline_advice"}) == 1
    assert metrics.sample_value("carepay_terminal_offline", {}) == 1
