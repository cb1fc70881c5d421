"""CLI verbs that run services over MQTT: ``clearing serve``, ``terminal run``, ``sim traffic``.

They join the ``clearing``, ``terminal`` and ``sim`` groups made by ``ops/cli_clearing.py``,
``ops/cli_terminal.py`` and ``ops/cli_sim.py`` (this module is registered last).

Keys: with a key store (``--keystore`` or ``$CAREPAY_KEYSTORE_PATH`` plus
``$CAREPAY_KEY_COMPONENTS``) the clearing service takes terminal TMKs, SM2 public keys and the
issuer keys from it; without one it uses the public demo keys and says so (simulation only).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import typer

from ops.config import Settings, load_settings
from ops.errors import BadInput, CarepayError

DEFAULT_MQTT_HOST, DEFAULT_MQTT_PORT = "127.0.0.1", 1883
WORKER_READY_TIMEOUT_S = 30.0
MAX_WORKERS = 64
DEMO_PROVIDER_ID = "P110105DEMO0001"
"""The provider ``clearing serve --demo`` registers (terminal T0000001 belongs to it)."""
DEMO_TERMINAL_ID = "T0000001"


def stop_processes(procs: list[subprocess.Popen[Any]], timeout_s: float = 10) -> None:
    """Ask every process to stop (SIGTERM), then wait for each; kill one that has not stopped in ``timeout_s``."""
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout_s)
        except subprocess.TimeoutExpired:
            p.kill()


def _port_open(host: str, port: int) -> bool:
    import socket

    try:
        with socket.create_connection((host, port), timeout=0.3):
            return True
    except OSError:
        return False


def _sub_app(module: str, attr: str, name: str, app: typer.Typer, help_text: str) -> typer.Typer:
    """The group made by another CLI module, or our own (registered once) when that module has none yet."""
    import importlib

    mod = importlib.import_module(module)
    sub = getattr(mod, attr, None)
    if isinstance(sub, typer.Typer):
        return sub
    sub = typer.Typer(help=help_text, no_args_is_help=True)
    app.add_typer(sub, name=name)
    return sub


# --- keys ------------------------------------------------------------------------------------------


class HostKeys:
    """What the clearing side needs: issuer key sets, terminal keys, the working-key master."""

    def __init__(self, issuer_keys: Any, terminal_keys: Any, wkm: bytes, demo: bool, store: Any = None) -> None:
        self.issuer_keys = issuer_keys
        self.terminal_keys = terminal_keys
        self.wkm = wkm
        self.demo = demo
        self.store = store

    def __repr__(self) -> str:
        return f"HostKeys(demo={self.demo})"


def load_host_keys(keystore: str | None, settings: Settings) -> HostKeys:
    from clearing.terminal_keys import (
        DemoTerminalKeys,
        KeyStoreTerminalKeys,
        demo_working_key_master,
        working_key_master_from_keystore,
    )
    from keys.issuer import IssuerKeySet

    path = keystore or settings.keystore_path or os.environ.get("CAREPAY_KEYSTORE_PATH", "")
    if not path:
        return HostKeys([IssuerKeySet.demo(), IssuerKeySet.demo(suite="3des")], DemoTerminalKeys(),
                        demo_working_key_master(), demo=True)
    from keys.store import KeyStore

    try:
        store = KeyStore.from_env(path)
    except Exception as exc:
        raise CarepayError(f"cannot open the key store: {exc}") from None
    sets = [store.issuer_key_set("sm4")]
    try:
        sets.append(store.issuer_key_set("3des"))
    except Exception:
        pass
    return HostKeys(sets, KeyStoreTerminalKeys(store), working_key_master_from_keystore(store), demo=False,
                    store=store)


# --- clearing serve ----------------------------------------------------------------------------------


async def _demo_setup(engine: Any, cards: Path | None) -> str:
    """Register the demo provider, terminal T0000001 and the deck's cards (funded), once."""
    from clearing.registry import RegistryError, add_provider, register_terminal
    from clearing.terminal_keys import demo_terminal_sm2, demo_terminal_tmk
    from keys.diversify import kcv
    from ops.fleet import PROGRAM_CATEGORIES, issue_and_fund_cards_from, today_local

    notes = []
    try:
        await add_provider(engine, DEMO_PROVIDER_ID, "示范养老服务驿站 (demo)", ["voucher"],
                           PROGRAM_CATEGORIES["voucher"], "6222000000000001", "110105")
        await register_terminal(engine, DEMO_TERMINAL_ID, DEMO_PROVIDER_ID, "PSAM00000001", today_local(),
                                sm2_public_key=demo_terminal_sm2(DEMO_TERMINAL_ID).public_key.hex().upper(),
                                tmk_kcv=kcv(demo_terminal_tmk(DEMO_TERMINAL_ID)).hex().upper())
        notes.append(f"demo provider {DEMO_PROVIDER_ID} and terminal {DEMO_TERMINAL_ID} registered")
    except RegistryError:
        notes.append(f"demo provider and terminal {DEMO_TERMINAL_ID} already registered")
    if cards is not None:
        from simulator.cardfile import DeckError, load_deck

        try:
            deck = load_deck(cards)
        except (DeckError, OSError) as exc:
            raise BadInput(f"--cards: {exc}") from None
        added = await issue_and_fund_cards_from(engine, deck.cards)
        notes.append(f"{added} card(s) of {cards} registered and funded" if added else
                     f"cards of {cards} already registered")
    return "; ".join(notes)


async def _serve(db_url: str, mqtt_url: str | None, workers: int, metrics_port: int, keystore: str | None,
                 demo: bool, cards: Path | None, worker_index: int, max_age_s: int, as_json: bool,
                 ledger_process: bool = False) -> None:
    from clearing.db import init_db, make_engine, url_for_display
    from clearing.metrics import serve_metrics
    from clearing.service import ClearingConfig
    from clearing.worker import clearing_runtime

    settings = load_settings()
    keys = load_host_keys(keystore, settings)
    engine = make_engine(db_url)
    procs: list[subprocess.Popen[bytes]] = []
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with AsyncExitStack() as stack:
            embedded = False
            url = mqtt_url
            if url is None:
                if _port_open(DEFAULT_MQTT_HOST, DEFAULT_MQTT_PORT):
                    url = f"mqtt://{DEFAULT_MQTT_HOST}:{DEFAULT_MQTT_PORT}"
                else:
                    from ops.embedded_broker import EmbeddedBroker

                    # nothing listens on 1883: take it, so terminals find the broker at the default URL
                    try:
                        broker = await stack.enter_async_context(EmbeddedBroker(port=DEFAULT_MQTT_PORT))
                    except Exception:
                        broker = await stack.enter_async_context(EmbeddedBroker())
                    url, embedded = broker.url, True
                    if workers > 1:
                        print("carepay: the embedded broker has no shared subscriptions: running 1 worker",
                              file=sys.stderr)
                        workers = 1
            notes = []
            if worker_index == 0:
                await init_db(engine)
                if demo:
                    notes.append(await _demo_setup(engine, cards))
            if keys.demo and worker_index == 0:
                print("carepay: no key store given: using the PUBLIC demo keys (simulation only)", file=sys.stderr)
            if metrics_port:
                serve_metrics(metrics_port + worker_index)
            key_source = keys.terminal_keys
            if not keys.demo:
                from clearing.terminal_keys import RegistryTerminalKeys

                key_source = RegistryTerminalKeys(keys.terminal_keys, engine)  # SM2 public keys from the registry
            # child processes get the database URL in their environment, never on a command line (it may hold a
            # password, and command lines are public on the machine)
            child_env = {**os.environ, "CAREPAY_DB_URL": db_url}
            ledger_argv = None
            if ledger_process:  # clearing.ledger_link: the service in a child of this worker
                ledger_argv = [sys.executable, "-m", "ops.ledger_child"]
                if keystore:
                    ledger_argv += ["--keystore", keystore]
                if metrics_port:
                    ledger_argv += ["--metrics-port", str(metrics_port + workers + worker_index)]
            worker = await stack.enter_async_context(clearing_runtime(
                engine, url, issuer_keys=keys.issuer_keys, key_source=key_source, wkm=keys.wkm,
                config=ClearingConfig.from_settings(settings.clearing), embedded=embedded,
                max_age_s=max_age_s, name=f"w{worker_index}", service_process=True, ledger_argv=ledger_argv,
                ledger_env=child_env))
            if worker_index == 0:
                for i in range(1, workers):
                    args = [sys.executable, "-m", "ops.cli", "clearing", "serve", "--mqtt", url,
                            "--worker-index", str(i), "--max-age-s", str(max_age_s)]
                    if metrics_port:
                        args += ["--metrics-port", str(metrics_port)]
                    if keystore:
                        args += ["--keystore", keystore]
                    if ledger_process:
                        args += ["--ledger-process", "--workers", str(workers)]
                    procs.append(subprocess.Popen(args, stdout=subprocess.PIPE, stderr=None, env=child_env))
                for p in procs:
                    assert p.stdout is not None
                    line = await asyncio.wait_for(asyncio.to_thread(p.stdout.readline), WORKER_READY_TIMEOUT_S)
                    if b"ready" not in line:
                        raise CarepayError("a clearing worker process did not start")
                info = {"ready": True, "workers": workers, "ledger_process": ledger_process, "mqtt": url,
                        "embedded_broker": embedded,
                        "db": url_for_display(db_url), "metrics_port": metrics_port or None,
                        "demo_keys": keys.demo, "setup": notes}
                if as_json:
                    print(json.dumps(info, ensure_ascii=False), flush=True)
                else:
                    print(f"clearing ready: {workers} worker(s) on {url}"
                          f"{' (embedded broker)' if embedded else ''}, db {url_for_display(db_url)}"
                          + (f", metrics on :{metrics_port}" + (f"..{metrics_port + workers - 1}" if workers > 1
                                                                  else "") if metrics_port else ""), flush=True)
                    for n in notes:
                        print(f"  {n}", flush=True)
            else:
                print("ready", flush=True)
            _ = worker
            await stop.wait()
    finally:
        stop_processes(procs)
        await engine.dispose()
        if keys.store is not None:
            keys.store.close()


# --- terminal run ------------------------------------------------------------------------------------


def _terminal_identity(terminal_id: str, provider_id: str, keystore: str | None, settings: Settings) -> Any:
    from terminal_agent.agent import TerminalIdentity

    path = keystore or settings.keystore_path or os.environ.get("CAREPAY_KEYSTORE_PATH", "")
    if path:
        from keys.store import KeyStore

        try:
            store = KeyStore.from_env(path)
            try:
                return TerminalIdentity(terminal_id, provider_id, store.get_symmetric(f"tmk:{terminal_id}"),
                                        store.get_sm2(terminal_id))
            finally:
                store.close()
        except Exception as exc:
            raise CarepayError(f"terminal keys not available from the key store: {exc}") from None
    from clearing.terminal_keys import demo_terminal_sm2, demo_terminal_tmk

    print("carepay: no key store given: this terminal uses the PUBLIC demo keys (simulation only)", file=sys.stderr)
    return TerminalIdentity(terminal_id, provider_id, demo_terminal_tmk(terminal_id), demo_terminal_sm2(terminal_id))


async def _terminal_run(opts: dict[str, Any]) -> int:
    from terminal_agent.agent import AgentError, AgentSettings, TerminalAgent
    from terminal_agent.card_session import CardSession
    from terminal_agent.host_client import HostClient, HostLink, HostTimeout, HostUnavailable
    from terminal_agent.journal import Journal
    from terminal_agent.psam_session import PsamError, PsamSession

    settings = load_settings()
    ts = settings.terminal
    agent_settings = AgentSettings(answer_timeout_s=ts.answer_timeout_ms / 1000,
                                   reversal_retry_s=ts.reversal_retry_ms / 1000,
                                   offline_floor_limit_fen=ts.offline_floor_limit_fen,
                                   offline_max_per_card=ts.offline_max_per_card, heartbeat_s=ts.heartbeat_s)
    from ops.cli_terminal import open_reader
    from ops.metrics import observe_terminal_outcome, refresh_terminal_gauges

    terminal_id = opts["terminal_id"]
    reader = open_reader(opts["reader"], cards=opts["cards"], card_ref=opts["card"], terminal_id=terminal_id)
    journal_path = opts["journal"] or ts.journal_path or str(settings.data_dir / "terminals" /
                                                               f"journal-{terminal_id}.db")
    identity = _terminal_identity(terminal_id, opts["provider_id"], opts["keystore"], settings)
    results: list[dict[str, Any]] = []
    try:
        psam = PsamSession(reader.psam)
        try:
            psam_tid = psam.open()
        except (PsamError, Exception) as exc:
            raise CarepayError(f"PSAM not usable: {exc}") from None
        if psam_tid != terminal_id:
            raise BadInput(f"the PSAM in the reader belongs to terminal {psam_tid}, not {terminal_id}")
        with Journal(journal_path) as journal:
            async with HostLink(opts["mqtt"], [terminal_id]) as link:
                agent = TerminalAgent(identity, HostClient(link, terminal_id), journal, agent_settings)
                await agent.start()
                if not agent.signed_on:
                    print(f"carepay: host not reachable on {opts['mqtt']}: working offline", file=sys.stderr)
                aid = bytes.fromhex(settings.card.aid_hex)

                def observed(out: Any, started: float) -> None:
                    """The terminal's metrics: one count (and the time it took) per outcome, the queue gauges."""
                    observe_terminal_outcome(out.kind, out.state, time.perf_counter() - started)
                    refresh_terminal_gauges(journal, link.connected)

                refresh_terminal_gauges(journal, link.connected)

                async def charge(amount: int, program: str, category: str, pin: str | None,
                                 record: bool = True) -> str:
                    session = CardSession(reader.card, psam, aid, pin_threshold_fen=settings.card.pin_threshold_fen)
                    started = time.perf_counter()
                    try:
                        out = await agent.purchase(session, program, amount, service_category=category, pin=pin)
                    finally:
                        session.close()
                    observed(out, started)
                    if record:
                        results.append({"outcome": out.to_dict(), "receipt": agent.receipt(out)})
                    return agent.receipt(out)

                try:
                    if opts["amount"] is not None:
                        await charge(opts["amount"], opts["program"], opts["category"], opts["pin"])
                    if opts["void"]:
                        started = time.perf_counter()
                        out = await agent.void(opts["void"])
                        observed(out, started)
                        results.append({"outcome": out.to_dict(), "receipt": agent.receipt(out)})
                    if opts["refund"]:
                        if opts["refund_amount"] is None:
                            raise BadInput("--refund needs --refund-amount FEN")
                        started = time.perf_counter()
                        out = await agent.refund(opts["refund"], opts["refund_amount"])
                        observed(out, started)
                        results.append({"outcome": out.to_dict(), "receipt": agent.receipt(out)})
                    if opts["settle"]:
                        s = await agent.settle()
                        results.append({"settlement": s.to_dict()})
                    if opts["interactive"]:
                        await _interactive(agent, charge, opts)
                except AgentError as exc:
                    raise CarepayError(str(exc)) from None
                except (HostTimeout, HostUnavailable) as exc:
                    raise CarepayError(f"host not reachable: {exc}") from None
                with_backlog = journal.backlog()
                refresh_terminal_gauges(journal, link.connected)
                await agent.stop()
    finally:
        reader.close()
    if opts["json"]:
        print(json.dumps({"terminal_id": terminal_id, "journal": journal_path, "backlog": with_backlog,
                          "results": results}, ensure_ascii=False))
    else:
        for r in results:
            if "receipt" in r:
                print(r["receipt"])
            else:
                s = r["settlement"]
                print(f"batch {s['batch_no']}: {'balanced' if s['balanced'] else 'NOT balanced'}; "
                      f"next batch {s['next_batch_no']}")
                for k in ("missing_on_host", "missing_on_terminal", "amount_differs"):
                    if s[k]:
                        print(f"  {k.replace('_', ' ')}: {', '.join(s[k])}")
        if with_backlog:
            print(f"{with_backlog} item(s) still waiting for the host in {journal_path}; "
                  "they are sent on the next run", file=sys.stderr)
    failed = [r for r in results if "outcome" in r and not r["outcome"]["approved"]]
    return 1 if failed and opts["amount"] is not None and len(results) == 1 else 0


async def _interactive(agent: Any, charge: Any, opts: dict[str, Any]) -> None:
    """A small operator prompt: purchase / void / refund / settle / journal / quit."""
    from ops.metrics import observe_terminal_outcome

    help_text = ("commands: buy FEN [PROGRAM] [CATEGORY] | void TRACE | refund RRN FEN | settle | journal | "
                 "flush | quit")
    print(help_text)
    while True:
        line = await asyncio.to_thread(input, "carepay> ")
        parts = line.split()
        if not parts:
            continue
        cmd, args = parts[0].lower(), parts[1:]
        try:
            if cmd in ("quit", "exit", "q"):
                return
            if cmd == "buy" and args:
                print(await charge(int(args[0]), args[1] if len(args) > 1 else opts["program"],
                                   args[2] if len(args) > 2 else opts["category"], opts["pin"], record=False))
            elif cmd == "void" and args:
                started = time.perf_counter()
                out = await agent.void(args[0])
                observe_terminal_outcome(out.kind, out.state, time.perf_counter() - started)
                print(agent.receipt(out))
            elif cmd == "refund" and len(args) == 2:
                started = time.perf_counter()
                out = await agent.refund(args[0], int(args[1]))
                observe_terminal_outcome(out.kind, out.state, time.perf_counter() - started)
                print(agent.receipt(out))
            elif cmd == "settle":
                s = await agent.settle()
                print(json.dumps(s.to_dict(), ensure_ascii=False, indent=1))
            elif cmd == "journal":
                for row in agent.journal.dump()[-20:]:
                    print(f"{row['batch_no']}/{row['trace_no']} {row['kind']:<16} {row['state']:<10} "
                          f"{row['amount_fen']:>8} {row['response_code'] or '--'} {row['rrn'] or ''}")
            elif cmd == "flush":
                print(await agent.flush())
            else:
                print(help_text)
        except Exception as exc:
            print(f"error: {exc}")


# --- sim traffic -------------------------------------------------------------------------------------


async def _sim_traffic(opts: dict[str, Any]) -> dict[str, Any]:
    from clearing.db import init_db, make_engine
    from clearing.terminal_keys import ensure_schema
    from ops.fleet import run_traffic

    engine = make_engine(opts["db"])
    try:
        await init_db(engine)
        await ensure_schema(engine)
        return await run_traffic(engine, opts["mqtt"], terminals=opts["terminals"], cards=opts["cards"],
                                 txns=opts["txns"], seed=opts["seed"], rate=opts["rate"],
                                 lost_answers=opts["lost_answers"], card_failures=opts["card_failures"],
                                 workdir=Path(opts["journal_dir"]), progress=not opts["json"])
    finally:
        await engine.dispose()


# --- registration ------------------------------------------------------------------------------------


def register(app: typer.Typer) -> None:
    """Add ``clearing serve``, ``terminal run`` and ``sim traffic`` to their groups."""
    clearing_app = _sub_app("ops.cli_clearing", "clearing_app", "clearing", app,
                            "The clearing service: schema, workers.\n\nExample:\n\n  carepay clearing serve")
    terminal_app = _sub_app("ops.cli_terminal", "terminal_app", "terminal", app, "The vendor's terminal.")
    sim_app = _sub_app("ops.cli_sim", "sim_app", "sim", app, "Simulated hardware and traffic.")

    @clearing_app.command("serve")
    def serve(
        db: str = typer.Option("", "--db", help="Database URL (default: SQLite under the data directory)."),
        mqtt: str = typer.Option(None, "--mqtt", help="Broker URL; default mosquitto on 127.0.0.1:1883 if it "
                                 "runs, else an embedded broker on 127.0.0.1:1883 (or a free port)."),
        workers: int = typer.Option(1, "--workers", min=1, max=MAX_WORKERS,
                                    help="Worker processes on the shared subscription."),
        metrics_port: int = typer.Option(0, "--metrics-port", min=0, max=65535,
                                         help="Serve /metrics here (worker i on PORT+i); 0 = off."),
        keystore: str = typer.Option(None, "--keystore", help="Key store file (components from "
                                     "$CAREPAY_KEY_COMPONENTS); default: the public demo keys."),
        demo: bool = typer.Option(False, "--demo", help=f"Register the demo provider and terminal "
                                  f"{DEMO_TERMINAL_ID} (and the --cards deck, funded) before serving."),
        cards: Path = typer.Option(None, "--cards", help="With --demo: a card deck (sim cards issue) to "
                                   "register and fund."),
        max_age_s: int = typer.Option(0, "--max-age-s", min=0, help="Refuse messages older than this "
                                      "(default: configuration, 300 s)."),
        worker_index: int = typer.Option(0, "--worker-index", hidden=True),
        as_json: bool = typer.Option(False, "--json", help="Print the ready line as one JSON document."),
        ledger_process: bool = typer.Option(False, "--ledger-process", help="Run each worker's ledger "
                                            "(authorisation pipeline, group-commit writer) in a process of its "
                                            "own beside it: two cores per worker (its metrics on PORT+WORKERS+i)."),
    ) -> None:
        """Run the clearing workers: MAC check, de-duplication, authorisation, group-committed posting.

        Runs until Ctrl-C / SIGTERM. Prints one 'clearing ready' line when subscribed.

        Example: carepay clearing serve --demo --cards cards.json --metrics-port 9100

        Example: carepay clearing serve --db postgresql+asyncpg://clearing@db/clearing --workers 2 --ledger-process
        """
        settings = load_settings()
        db_url = db or settings.resolved_db_url()
        if db_url.startswith("sqlite") and not db:
            settings.data_dir.mkdir(parents=True, exist_ok=True)
        if mqtt is not None:
            _check_url(mqtt)
        try:
            asyncio.run(_serve(db_url, mqtt, workers, metrics_port, keystore, demo, cards, worker_index,
                               max_age_s or settings.clearing.message_max_age_s, as_json, ledger_process))
        except (OSError, ConnectionError) as exc:
            raise CarepayError(f"clearing could not start: {exc}") from None

    @terminal_app.command("run")
    def run(
        terminal_id: str = typer.Option(..., "--terminal-id", help="This terminal's 8-character id."),
        reader: str = typer.Option(..., "--reader", help="serial:PATH | pcsc:N[,M] | sim"),
        mqtt: str = typer.Option(None, "--mqtt", help="Broker URL (default from configuration)."),
        provider_id: str = typer.Option(DEMO_PROVIDER_ID, "--provider-id", help="The provider the terminal "
                                        "belongs to (15 characters)."),
        amount: int = typer.Option(None, "--amount", min=1, help="Charge this many fen once, print the receipt."),
        program: str = typer.Option("voucher", "--program", help="voucher | nursing | restricted"),
        category: str = typer.Option("meal", "--category", help="Service category (meal, bathing, …)."),
        pin: str = typer.Option(None, "--pin", help="Cardholder PIN when the amount needs one."),
        void: str = typer.Option(None, "--void", help="Void the purchase with this trace number (this batch)."),
        refund: str = typer.Option(None, "--refund", help="Refund the purchase with this RRN."),
        refund_amount: int = typer.Option(None, "--refund-amount", min=1, help="Fen to refund."),
        settle: bool = typer.Option(False, "--settle", help="Settle the batch (upload it if the host disagrees)."),
        interactive: bool = typer.Option(False, "--interactive", "-i", help="An operator prompt."),
        journal: str = typer.Option(None, "--journal", help="Journal file (default under the data directory)."),
        cards: Path = typer.Option(None, "--cards", help="Card deck for --reader sim."),
        card: str = typer.Option("0", "--card", help="Which card of the deck for --reader sim."),
        keystore: str = typer.Option(None, "--keystore", help="Key store with tmk:<id> and sm2:<id>; default: "
                                     "the public demo keys."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
    ) -> None:
        """The terminal agent: sign on, then charge / void / refund / settle; journal first, receipts printed.

        Without --amount/--void/--refund/--settle/--interactive it signs on, sends what its journal
        still owes the host (reversals, offline advices) and exits.

        Example: carepay terminal run --terminal-id T0000001 --reader serial:/tmp/carepay-reader --amount 1500
        """
        import re

        if not re.fullmatch(r"[0-9A-Z]{8}", terminal_id):
            raise BadInput("--terminal-id must be 8 characters 0-9A-Z")
        if not re.fullmatch(r"[0-9A-Z]{15}", provider_id):
            raise BadInput("--provider-id must be 15 characters 0-9A-Z")
        if program not in ("voucher", "nursing", "restricted"):
            raise BadInput("--program must be voucher, nursing or restricted")
        url = mqtt or load_settings().mqtt_url
        _check_url(url)
        opts = {"terminal_id": terminal_id, "reader": reader, "mqtt": url, "provider_id": provider_id,
                "amount": amount, "program": program, "category": category, "pin": pin, "void": void,
                "refund": refund, "refund_amount": refund_amount, "settle": settle, "interactive": interactive,
                "journal": journal, "cards": cards, "card": card, "keystore": keystore, "json": as_json}
        code = asyncio.run(_terminal_run(opts))
        if code:
            raise typer.Exit(code)

    @sim_app.command("traffic")
    def traffic(
        db: str = typer.Option("", "--db", help="The clearing database (the fleet is registered there once)."),
        mqtt: str = typer.Option(None, "--mqtt", help="Broker URL of the running clearing service."),
        terminals: int = typer.Option(4, "--terminals", min=1, max=2_000, help="Simulated terminals."),
        cards: int = typer.Option(40, "--cards", min=1, max=100_000, help="Simulated cards."),
        txns: int = typer.Option(200, "--txns", min=1, max=1_000_000, help="Purchases in all."),
        seed: int = typer.Option(1, "--seed", help="Seed of the fleet and of the traffic."),
        rate: float = typer.Option(0.0, "--rate", min=0.0, help="Purchases per second offered (0 = as fast "
                                   "as the terminals go)."),
        lost_answers: float = typer.Option(0.0, "--lost-answers", min=0.0, max=1.0,
                                           help="Fault: share of host answers lost on the way (→ reversals)."),
        card_failures: float = typer.Option(0.0, "--card-failures", min=0.0, max=1.0,
                                            help="Fault: share of cards pulled before completion (→ reversals)."),
        journal_dir: str = typer.Option(None, "--journal-dir", help="Where the terminals keep their journals."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
    ) -> None:
        """A seeded fleet of simulated terminals (in-process cards and PSAMs) against a running clearing service.

        Example: carepay sim traffic --terminals 8 --cards 100 --txns 1000 --lost-answers 0.02
        """
        settings = load_settings()
        url = mqtt or settings.mqtt_url
        _check_url(url)
        opts = {"db": db or settings.resolved_db_url(), "mqtt": url, "terminals": terminals, "cards": cards,
                "txns": txns, "seed": seed, "rate": rate, "lost_answers": lost_answers,
                "card_failures": card_failures, "json": as_json,
                "journal_dir": journal_dir or str(settings.data_dir / "sim-terminals")}
        summary = asyncio.run(_sim_traffic(opts))
        if as_json:
            print(json.dumps(summary, ensure_ascii=False))
        else:
            for k, v in summary.items():
                print(f"{k:>22}: {v}")


def _check_url(url: str) -> None:
    from protocol.transport import TransportError, parse_mqtt_url

    try:
        parse_mqtt_url(url)
    except TransportError as exc:
        raise BadInput(str(exc)) from None
