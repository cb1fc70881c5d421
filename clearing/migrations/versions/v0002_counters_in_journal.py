"""0002: leaner journal rows — card counters fold into ``host_txns``; the correction indexes become partial.

- ``host_txns.atc`` / ``atc_gap``: the card counter a journal row spent and the gap before it, with the
  partial UNIQUE index ``uq_host_txns_card_atc (card_no, atc) WHERE atc IS NOT NULL`` — the same
  "each counter of a card is spent once" rule ``card_counters.counter_key`` enforced. Every
  ``card_counters`` row moves onto the journal row of its RRN (the writer always wrote both in one
  transaction); a counter row that has no such journal row stops the migration (nothing is lost silently).
  Then ``card_counters`` is dropped.
- ``ix_host_txns_orig_rrn`` / ``ix_host_txns_orig_key`` are rebuilt ``WHERE … IS NOT NULL``: only
  corrections carry them, so purchases no longer add two index entries each.

Runs on SQLite and PostgreSQL, on a database made by 0001 at any time (fresh or with data).
"""

from __future__ import annotations

from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection

from clearing import schema
from clearing.db import DatabaseError

VERSION = "0002"

PARTIAL = ("ix_host_txns_orig_rrn", "ix_host_txns_orig_key", "uq_host_txns_card_atc")


def upgrade(conn: Connection) -> None:
    insp = inspect(conn)
    columns = {c["name"] for c in insp.get_columns("host_txns")}
    for name in ("atc", "atc_gap"):
        if name not in columns:  # a fresh database already has them (0001 creates host_txns as it is now)
            conn.execute(text(f"ALTER TABLE host_txns ADD COLUMN {name} INTEGER"))
    if "card_counters" in insp.get_table_names():
        conn.execute(text("UPDATE host_txns SET atc = c.atc, atc_gap = c.gap FROM card_counters AS c "
                          "WHERE c.rrn = host_txns.rrn"))  # UPDATE … FROM: SQLite ≥ 3.33 and PostgreSQL
        lost = conn.execute(text(
            "SELECT count(*) FROM card_counters c WHERE NOT EXISTS (SELECT 1 FROM host_txns h "
            "WHERE h.rrn = c.rrn AND h.card_no = c.card_no AND h.atc = c.atc AND h.atc_gap = c.gap)")).scalar_one()
        if lost:
            raise DatabaseError(f"migration 0002: {lost} card_counters row(s) have no journal row of their RRN "
                                "(or two share one); move or remove them by hand, then run init-db again")
        conn.execute(text("DROP TABLE card_counters"))
    indexes = {ix.name: ix for ix in schema.host_txns.indexes}
    for name in PARTIAL:
        conn.execute(text(f"DROP INDEX IF EXISTS {name}"))
        indexes[name].create(conn)
