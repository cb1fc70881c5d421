"""The batch snapshot (批量快照): everything the participants read, loaded set-based once per batch.

The group-commit writer (:mod:`clearing.ledger`) collects a batch of requests and, in its
ONE driver call per batch, loads the cards, terminals and providers the batch names with
one ``IN`` query per table (``json_each`` on SQLite, ``= ANY`` on PostgreSQL). The
participants then run as plain functions over this snapshot; what changes inside the
batch (card counters used, account balances, originals posted earlier in the batch) they
read through ``batch`` — the writer's in-memory state — so two purchases on one card in
the same batch see each other's effect.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from clearing.lifecycle import Card
from clearing.registry import Provider, Terminal

Select = Callable[[str, list[tuple[Any, str]]], list[tuple[Any, ...]]]
"""``store.select(sql, [(values, pg_type), …])`` of the writer: ``{IN1}``… render per backend."""

_CARD_COLS = ("card_no", "app_serial", "id_no", "district", "street", "status", "category", "valid_until",
              "programs", "key_version", "suite", "replaced_by")
_PROVIDER_COLS = ("provider_id", "name", "programs", "service_categories", "status", "settle_account", "district")
_TERMINAL_COLS = ("terminal_id", "provider_id", "psam_serial", "install_date", "address", "status",
                  "sm2_public_key", "tmk_kcv")


class _Row:
    """A mapping-backed row for the registries' ``from_row`` constructors."""

    __slots__ = ("_mapping",)

    def __init__(self, mapping: dict[str, Any]):
        self._mapping = mapping


def _as_date(v: Any) -> date:
    return date.fromisoformat(v) if isinstance(v, str) else v


@dataclass
class Snapshot:
    """Registry rows of one batch plus a view of the writer's in-batch state (``batch``)."""

    cards: dict[str, Card] = field(default_factory=dict)
    terminals: dict[str, Terminal] = field(default_factory=dict)
    providers: dict[str, Provider] = field(default_factory=dict)
    batch: Any = None  # clearing.ledger._Batch: used_counters, accts, by_rrn

    def counter_used(self, card_no: str, atc: int) -> bool:
        return f"{card_no}:{atc}" in self.batch.used_counters

    def balance(self, account_code: str) -> int | None:
        """The account's balance as of this point of the batch (None: no such account)."""
        a = self.batch.accts.get(account_code)
        return None if a is None else a.balance

    def original(self, rrn: str | None) -> dict[str, Any] | None:
        """A journal row by RRN: stored, or written earlier in this batch."""
        return self.batch.by_rrn.get(rrn or "")


@dataclass
class RegistryCache:
    """Registry rows kept between batches by a writer that can prove nothing changed them since it read them
    (SQLite: :class:`clearing.ledger._KnownState` hands it out only while ``data_version`` and friends show
    that no other connection committed). Only rows found are kept; a key not in the registry is asked again."""

    cards: dict[str, Card] = field(default_factory=dict)
    terminals: dict[str, Terminal] = field(default_factory=dict)
    providers: dict[str, Provider] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.cards) + len(self.terminals) + len(self.providers)

    def clear(self) -> None:
        self.cards.clear()
        self.terminals.clear()
        self.providers.clear()


def load_snapshot(select: Select, card_nos: Iterable[str], terminal_ids: Iterable[str],
                  provider_ids: Iterable[str], cache: RegistryCache | None = None) -> Snapshot:
    """Cards, terminals and providers by key: three set-based queries (one each, none when empty); with a
    ``cache``, only for the keys it does not hold (and what they find is added to it)."""
    snap = Snapshot()
    held = cache if cache is not None else RegistryCache()

    def wanted(keys: Iterable[str], known: dict[str, Any], into: dict[str, Any]) -> list[str]:
        missing = []
        for k in set(keys):
            row = known.get(k)
            if row is None:
                missing.append(k)
            else:
                into[k] = row
        return sorted(missing)

    for values in select(f"SELECT {', '.join(_CARD_COLS)} FROM cards WHERE card_no {{IN}}",
                         [(wanted(card_nos, held.cards, snap.cards), "text")]):
        m = dict(zip(_CARD_COLS, values, strict=True))
        m["valid_until"] = _as_date(m["valid_until"])
        snap.cards[m["card_no"]] = held.cards[m["card_no"]] = Card.from_row(_Row(m))
    for values in select(f"SELECT {', '.join(_TERMINAL_COLS)} FROM terminals WHERE terminal_id {{IN}}",
                         [(wanted(terminal_ids, held.terminals, snap.terminals), "text")]):
        m = dict(zip(_TERMINAL_COLS, values, strict=True))
        m["install_date"] = _as_date(m["install_date"])
        snap.terminals[m["terminal_id"]] = held.terminals[m["terminal_id"]] = Terminal.from_row(_Row(m))
    for values in select(f"SELECT {', '.join(_PROVIDER_COLS)} FROM providers WHERE provider_id {{IN}}",
                         [(wanted(provider_ids, held.providers, snap.providers), "text")]):
        m = dict(zip(_PROVIDER_COLS, values, strict=True))
        snap.providers[m["provider_id"]] = held.providers[m["provider_id"]] = Provider.from_row(_Row(m))
    return snap
