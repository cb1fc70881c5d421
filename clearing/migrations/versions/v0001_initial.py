"""0001: the clearing core — accounts, transfers, idempotency, cards, providers, terminals, host journal,
card counters, settlement windows, batch settlements, voucher lots, counters."""

from __future__ import annotations

from sqlalchemy.engine import Connection

from clearing import schema

VERSION = "0001"

TABLES = (
    "accounts", "transfers", "idempotency", "cards", "providers", "terminals", "host_txns", "card_counters",
    "settlement_windows", "batch_settlements", "voucher_lots", "counters",
)


def upgrade(conn: Connection) -> None:
    tables = [schema.metadata.tables[name] for name in TABLES]
    schema.metadata.create_all(conn, tables=tables, checkfirst=True)
    if conn.dialect.name == "postgresql":
        schema.RRN_SEQUENCE.create(conn, checkfirst=True)
        schema.TRANSFER_ID_SEQUENCE.create(conn, checkfirst=True)
