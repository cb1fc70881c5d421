"""Card-deck files (卡片文件): many simulated cards in one JSON file, so a card travels between terminals and runs.

Format (``carepay-card-deck/1``)::

    {"format": "carepay-card-deck/1", "issuer": "demo:carepay-demo", "suites": ["sm4"],
     "aid": "D156…", "cards": [<VirtualCard.to_dict()>, …]}

``issuer`` names the issuer key set a PSAM needs to serve these cards (``demo:SEED`` =
``IssuerKeySet.demo(SEED, suite)``; a key-store reference later). The file holds the simulated
cards' own diversified keys — it is a simulator artefact, never real key material. Writes are
atomic (temporary file + ``os.replace``), so a crash never leaves half a deck.
"""

from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from keys.issuer import IssuerKeySet
from keys.suite import Suite
from simulator.card import VirtualCard

DECK_FORMAT = "carepay-card-deck/1"
MAX_DECK_BYTES = 64 * 1024 * 1024
MAX_DECK_CARDS = 100_000


class DeckError(ValueError):
    """A deck file that cannot be read or does not hold a valid deck; the message says why."""


@dataclass
class CardDeck:
    """Cards plus the issuer they belong to; ``save()`` writes the whole deck back to ``path``."""

    cards: list[VirtualCard]
    issuer: str = "demo:carepay-demo"
    path: Path | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def suites(self) -> list[str]:
        return sorted({c.suite.value for c in self.cards})

    def to_dict(self) -> dict:
        aid = self.cards[0].aid.hex().upper() if self.cards else ""
        return {"format": DECK_FORMAT, "issuer": self.issuer, "suites": self.suites, "aid": aid,
                "cards": [c.to_dict() for c in self.cards]}

    def save(self, path: Path | str | None = None) -> Path:
        target = Path(path) if path else self.path
        if target is None:
            raise DeckError("deck has no file to save to")
        with self._lock:
            tmp = target.with_name(target.name + ".tmp")
            tmp.write_text(json.dumps(self.to_dict(), ensure_ascii=False, separators=(",", ":")))
            os.replace(tmp, target)
        self.path = target
        return target

    def persist_on_commit(self) -> None:
        """Make every card write the deck back whenever its state changes (ATC, PIN counter, log)."""
        for c in self.cards:
            c.on_commit = lambda _card: self.save()

    def key_sets(self) -> dict[Suite, IssuerKeySet]:
        """The issuer key sets a PSAM needs for these cards (demo issuers only, for now)."""
        return issuer_key_sets(self.issuer, self.suites or ["sm4"])

    def find(self, ref: str) -> VirtualCard:
        """A card by index (``0``), card label or application serial (hex)."""
        if ref.isdigit() and int(ref) < len(self.cards):
            return self.cards[int(ref)]
        for c in self.cards:
            if ref in (c.label, c.app_serial.hex().upper()):
                return c
        raise DeckError(f"no card {ref!r} in the deck ({len(self.cards)} cards)")


def issuer_key_sets(issuer: str, suites: list[str]) -> dict[Suite, IssuerKeySet]:
    """Resolve an issuer reference to key sets per suite."""
    kind, _, arg = issuer.partition(":")
    if kind != "demo" or not arg:
        raise DeckError(f"unsupported issuer reference {issuer!r} (expected demo:SEED)")
    return {Suite(s): IssuerKeySet.demo(arg, s) for s in suites}


def load_deck(path: Path | str) -> CardDeck:
    """Read a deck; DeckError with the reason for a missing, oversized or malformed file."""
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as exc:
        raise DeckError(f"cannot read card deck {p}: {exc.strerror}") from None
    if size > MAX_DECK_BYTES:
        raise DeckError(f"card deck {p} is {size} bytes, over MAX_DECK_BYTES={MAX_DECK_BYTES}")
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DeckError(f"card deck {p} is not JSON: {type(exc).__name__}") from None
    return deck_from_dict(doc, p)


def deck_from_dict(doc: object, path: Path | None = None) -> CardDeck:
    if not isinstance(doc, dict) or doc.get("format") != DECK_FORMAT:
        raise DeckError(f"not a {DECK_FORMAT} file")
    raw_cards = doc.get("cards")
    if not isinstance(raw_cards, list) or len(raw_cards) > MAX_DECK_CARDS:
        raise DeckError(f"deck 'cards' must be a list of at most {MAX_DECK_CARDS}")
    cards = []
    for i, rc in enumerate(raw_cards):
        try:
            cards.append(VirtualCard.from_dict(rc))
        except ValueError as exc:
            raise DeckError(f"card #{i}: {exc}") from None
    issuer = doc.get("issuer", "demo:carepay-demo")
    if not isinstance(issuer, str):
        raise DeckError("deck 'issuer' must be a string")
    return CardDeck(cards=cards, issuer=issuer, path=path)
