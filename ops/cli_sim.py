"""CLI verbs: ``carepay sim …`` — the hardware nobody has on a desk.

- ``sim reader --pty`` — a virtual serial reader (card slot + PSAM slot) on a pseudo-terminal.
- ``sim cards issue`` — personalise virtual cards into a card-deck file.

(``sim traffic`` and ``sim bank-file`` join this group in their own section below.)
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path

import typer

from keys.issuer import IssuerKeySet
from keys.suite import CryptoError, Suite
from ops.config import load_settings
from ops.errors import BadInput, CarepayError

sim_app = typer.Typer(
    help="Simulated hardware and traffic: virtual cards, a virtual serial reader.\n\n"
    "Example:\n\n  carepay sim cards issue --count 10 --out cards.json\n\n"
    "  carepay sim reader --pty --cards cards.json --link /tmp/carepay-reader",
    no_args_is_help=True,
)
cards_app = typer.Typer(help="Virtual cards: personalisation.\n\nExample:\n\n  carepay sim cards issue --count 10 "
                        "--out cards.json", no_args_is_help=True)
sim_app.add_typer(cards_app, name="cards")

DEFAULT_DEMO_CARDS = 3


def register(app: typer.Typer) -> None:
    """Add this module's verbs to the top-level app."""
    app.add_typer(sim_app, name="sim")


def parse_aid(aid_hex: str | None) -> bytes:
    value = aid_hex or load_settings().card.aid_hex
    try:
        aid = bytes.fromhex(value)
    except ValueError:
        raise BadInput(f"AID {value!r} is not hex") from None
    if not 5 <= len(aid) <= 16:
        raise BadInput("AID must be 5..16 bytes")
    return aid


# --- sim cards issue


@cards_app.command("issue")
def cards_issue(
    count: int = typer.Option(..., "--count", min=1, max=100_000, help="How many cards to personalise."),
    out: Path = typer.Option(..., "--out", help="Card-deck file to write (JSON)."),
    suite: str = typer.Option("sm4", "--suite", help="Crypto suite of the cards: sm4 (default) or 3des."),
    seed: int = typer.Option(1, "--seed", help="Seed for reproducible cardholder data."),
    issuer_seed: str = typer.Option("carepay-demo", "--issuer-seed",
                                    help="Demo issuer key set seed (the PSAM must use the same)."),
    aid: str = typer.Option(None, "--aid", help="Application AID (hex); default from configuration."),
    pin: str = typer.Option("123456", "--pin", help="PIN loaded into every card."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Personalise N virtual cards: issuer keys diversified and loaded, cardholder data written.

    Example: carepay sim cards issue --count 10 --out cards.json --suite sm4 --seed 7
    """
    from simulator.cardfile import CardDeck
    from simulator.personalise import issue_cards

    try:
        s = Suite.parse(suite)
    except CryptoError as exc:
        raise BadInput(str(exc)) from None
    try:
        cards = issue_cards(count, aid=parse_aid(aid), suite=s, seed=seed,
                            key_set=IssuerKeySet.demo(issuer_seed, s), pin=pin)
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    deck = CardDeck(cards=cards, issuer=f"demo:{issuer_seed}")
    try:
        deck.save(out)
    except OSError as exc:
        raise CarepayError(f"cannot write {out}: {exc.strerror}") from None
    if as_json:
        typer.echo(json.dumps({"out": str(out), "count": count, "suite": s.value, "issuer": deck.issuer}))
    else:
        typer.echo(f"issued {count} {s.value} cards to {out} (issuer {deck.issuer})")


# --- sim reader


def _load_deck(cards: Path | None, suite: str, issuer_seed: str, persist: bool = True):  # type: ignore[no-untyped-def]
    from simulator.cardfile import CardDeck, DeckError, load_deck
    from simulator.personalise import issue_cards

    if cards is not None:
        try:
            deck = load_deck(cards)
            if persist:
                deck.persist_on_commit()
            return deck
        except DeckError as exc:
            raise BadInput(str(exc)) from None
    s = Suite.parse(suite)
    return CardDeck(cards=issue_cards(DEFAULT_DEMO_CARDS, aid=parse_aid(None), suite=s,
                                      key_set=IssuerKeySet.demo(issuer_seed, s)), issuer=f"demo:{issuer_seed}")


@sim_app.command("reader")
def reader(
    pty: bool = typer.Option(False, "--pty", help="Serve on a pseudo-terminal (the only transport for now)."),
    cards: Path = typer.Option(None, "--cards", help="Card-deck file (sim cards issue); state is written back."),
    insert: str = typer.Option("0", "--insert", help="Card to insert at start (index, label or serial); "
                               "'none' for an empty slot."),
    baud: int = typer.Option(0, "--baud", min=0, help="Emulate this link speed (e.g. 115200); 0 = no delay."),
    terminal_id: str = typer.Option("T0000001", "--terminal-id", help="The PSAM's terminal id (8 characters)."),
    psam_state: Path = typer.Option(None, "--psam-state", help="PSAM state file (TTN); default CARDS.psam-TERMINAL.json beside --cards."),
    link: Path = typer.Option(None, "--link", help="Also make this symlink to the pty (a stable path)."),
    path_file: Path = typer.Option(None, "--path-file", help="Also write the pty path to this file."),
    suite: str = typer.Option("sm4", "--suite", help="Suite of the demo cards when no --cards is given."),
    issuer_seed: str = typer.Option("carepay-demo", "--issuer-seed", help="Demo issuer seed without --cards."),
    volatile: bool = typer.Option(False, "--volatile", help="Do not write card/PSAM state back (benchmarks)."),
    apdu_batch: bool = typer.Option(True, "--apdu-batch/--no-apdu-batch",
                                    help="Run the APDU-batch command (several APDUs per frame); off: answer it "
                                         "'unknown command' like a reader without it."),
    poll_ms: float = typer.Option(2.0, "--poll-ms", min=0, help="After each answer, poll the line without "
                                  "blocking this long, as a reader's controller does (0: always block)."),
) -> None:
    """A virtual serial reader (card slot + PSAM slot); prints the pty path, runs until stopped.

    Control lines on stdin: insert N | remove | remove-after N | tear [INS] | garbage HEX | status | quit.

    Example: carepay sim reader --pty --cards cards.json --link /tmp/carepay-reader --baud 115200
    """
    from simulator.cardfile import DeckError
    from simulator.psam import VirtualPsam
    from simulator.reader_pty import PtyReader

    if not pty:
        raise BadInput("only --pty is supported: carepay sim reader --pty")
    if len(terminal_id) != 8 or not terminal_id.isascii():
        raise BadInput("--terminal-id must be 8 ASCII characters")
    deck = _load_deck(cards, suite, issuer_seed, persist=not volatile)
    try:
        key_sets = deck.key_sets()
    except DeckError as exc:
        raise BadInput(str(exc)) from None
    state = psam_state or (cards.with_name(f"{cards.name}.psam-{terminal_id}.json") if cards else None)
    if volatile:
        state = None
    try:
        psam = VirtualPsam(key_sets, terminal_id=terminal_id, state_path=state)
    except ValueError as exc:
        raise BadInput(str(exc)) from None
    rd = PtyReader(psam, baud=baud or None, deck=deck, apdu_batch=apdu_batch, busy_poll_s=poll_ms / 1000,
                   log=lambda m: print(f"# {m}", file=sys.stderr, flush=True))
    if insert.lower() != "none" and deck.cards:
        try:
            rd.card.insert(deck.find(insert))
        except DeckError as exc:
            raise BadInput(str(exc)) from None
    if link is not None:
        if link.is_symlink():
            link.unlink()
        os.symlink(rd.path, link)
    if path_file is not None:
        path_file.write_text(rd.path + "\n")
    print(rd.path, flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    # Started with '&' from a shell, reading the terminal would stop the whole process (SIGTTIN): ignore the
    # signal so such a read fails instead, and the reader keeps serving without stdin controls.
    signal.signal(signal.SIGTTIN, signal.SIG_IGN)

    def read_controls() -> None:
        try:
            for line in sys.stdin:
                reply = rd.control(line)
                if reply:
                    print(reply, flush=True)
                if line.strip().lower() == "quit":
                    stop.set()
                    return
        except (OSError, ValueError):
            return

    threading.Thread(target=read_controls, name="controls", daemon=True).start()
    rd.start()
    try:
        while not stop.wait(0.2):
            pass
    finally:
        rd.close()
        if link is not None and link.is_symlink():
            link.unlink()
