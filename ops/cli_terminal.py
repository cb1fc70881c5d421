"""CLI verbs: ``carepay terminal …`` — the vendor's terminal.

- ``terminal read-card --reader serial:PATH|pcsc:N[,M]|sim`` — authenticate the card in the reader and
  print its masked cardholder and entitlement data.

:func:`open_reader` turns a ``--reader`` spec into a ``protocol.channel.Reader`` and is shared by the
other terminal verbs (``terminal run``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from ops.config import load_settings
from ops.errors import BadInput, CarepayError
from protocol.channel import ChannelError, Reader

terminal_app = typer.Typer(
    help="The home-care vendor's terminal: read cards, run the terminal agent.\n\n"
    "Example:\n\n  carepay terminal read-card --reader serial:/tmp/carepay-reader",
    no_args_is_help=True,
)

DEFAULT_SIM_TERMINAL_ID = "T0000001"
READER_HELP = ("serial:PATH (framed serial reader, e.g. serial:/dev/ttyUSB0 or the pty of 'carepay sim reader'), "
               "pcsc:N[,M] (PC/SC reader N for the card, M for the PSAM; needs the pcsc extra), "
               "or sim (in-process simulated card and PSAM from --cards).")


def register(app: typer.Typer) -> None:
    """Add this module's verbs to the top-level app."""
    app.add_typer(terminal_app, name="terminal")


def open_reader(spec: str, *, cards: Path | None = None, card_ref: str = "0", timeout_ms: int | None = None,
                baud: int = 115_200, terminal_id: str = DEFAULT_SIM_TERMINAL_ID) -> Reader:
    """A reader from a ``--reader`` spec. Raises BadInput for a bad spec, CarepayError when it cannot open.

    ``terminal_id`` is given to the simulated PSAM of ``sim`` readers (real PSAMs carry their own).
    """
    kind, _, arg = spec.partition(":")
    timeout = timeout_ms or load_settings().card.apdu_timeout_ms
    try:
        if kind == "serial":
            if not arg:
                raise BadInput("--reader serial:PATH needs the port path")
            from terminal_agent.serial_driver import SerialReader

            return SerialReader(arg, baud=baud, timeout_ms=timeout).open()
        if kind == "pcsc":
            from terminal_agent.pcsc_driver import PcscReader

            parts = arg.split(",") if arg else ["0"]
            if not all(p.isdigit() for p in parts) or len(parts) > 2:
                raise BadInput("--reader pcsc:N[,M] wants reader indexes")
            return PcscReader(int(parts[0]), int(parts[1]) if len(parts) > 1 else None)
        if kind == "sim":
            return _sim_reader(cards, card_ref, terminal_id)
    except ChannelError as exc:
        raise CarepayError(str(exc)) from None
    raise BadInput(f"unknown reader {spec!r}: {READER_HELP}")


def _sim_reader(cards: Path | None, card_ref: str, terminal_id: str) -> Reader:
    from keys.issuer import IssuerKeySet
    from simulator.cardfile import CardDeck, DeckError, load_deck
    from simulator.channel import SimReader
    from simulator.personalise import issue_cards
    from simulator.psam import VirtualPsam

    try:
        if cards is not None:
            deck = load_deck(cards)
            deck.persist_on_commit()
        else:
            aid = bytes.fromhex(load_settings().card.aid_hex)
            deck = CardDeck(cards=issue_cards(1, aid=aid, key_set=IssuerKeySet.demo()))
        card = deck.find(card_ref)
        psam_state = cards.with_name(f"{cards.name}.psam-{terminal_id}.json") if cards else None
        return SimReader(card, VirtualPsam(deck.key_sets(), terminal_id=terminal_id, state_path=psam_state))
    except (DeckError, ValueError) as exc:
        raise BadInput(str(exc)) from None


def _print_card(summary: dict[str, Any]) -> None:
    holder = summary["cardholder"]
    rows = [
        ("card number", summary["card_no"]), ("name", holder["name"]), ("resident ID", holder["id_no"]),
        ("birth", holder["birth_date"]), ("district / street", f"{holder['district_code']} / {holder['street_code']}"),
        ("category", f"{holder['category']}" + (f" grade {holder['category_grade']}" if holder["category_grade"] else "")),
        ("valid until", holder["valid_until"]), ("programs", ", ".join(summary["programs"]) or "-"),
        ("application", f"serial {summary['app_serial']}, key version {summary['key_version']}, "
                        f"{summary['suite']}, {summary['status']}, ATC {summary['atc']}"),
    ]
    for k, v in rows:
        typer.echo(f"{k:>18}: {v}")


@terminal_app.command("read-card")
def read_card(
    reader: str = typer.Option(..., "--reader", help=READER_HELP),
    cards: Path = typer.Option(None, "--cards", help="Card-deck file for --reader sim."),
    card: str = typer.Option("0", "--card", help="For --reader sim: which card of the deck (index or serial)."),
    aid: str = typer.Option(None, "--aid", help="Civil-affairs application AID (hex); default from configuration."),
    timeout_ms: int = typer.Option(None, "--timeout-ms", min=1, help="Per-exchange timeout (default: configured)."),
    with_log: bool = typer.Option(False, "--log", help="Also read the card's transaction log."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Authenticate the card (internal authentication through the PSAM) and print its masked data.

    A forged or wrong-key card is refused with the reason and exit code 1.

    Example: carepay terminal read-card --reader serial:/tmp/carepay-reader --json
    """
    from terminal_agent.card_session import CardSession, CardSessionError
    from terminal_agent.psam_session import PsamError, PsamSession

    settings = load_settings()
    try:
        aid_bytes = bytes.fromhex(aid or settings.card.aid_hex)
    except ValueError:
        raise BadInput("--aid must be hex") from None
    rd = open_reader(reader, cards=cards, card_ref=card, timeout_ms=timeout_ms)
    try:
        psam = PsamSession(rd.psam)
        try:
            psam.open()
        except (ChannelError, PsamError) as exc:
            raise CarepayError(f"PSAM not usable: {exc}") from None
        session = CardSession(rd.card, psam, aid_bytes, pin_threshold_fen=settings.card.pin_threshold_fen)
        try:
            info = session.start()
            log = session.read_log() if with_log else None
        except CardSessionError as exc:
            raise CarepayError(f"card refused: {exc}") from None
        finally:
            session.close()
    finally:
        rd.close()
    summary = info.summary()
    summary["terminal_id"] = psam.terminal_id
    if log is not None:
        summary["log"] = log
    if as_json:
        typer.echo(json.dumps(summary, ensure_ascii=False))
        return
    typer.echo("card authenticated (internal authentication verified by the PSAM)")
    _print_card(summary)
    for rec in log or []:
        typer.echo(f"{'log':>18}: {rec['txn_date']} {rec['txn_time']} {rec['terminal_id']} {rec['program']} "
                   f"{rec['amount_fen']} fen ATC {rec['atc']}")
