"""0001: the clearing core — accounts, transfers, idempotency, cards, providers, terminals, host journal,
card counters, settlement windows, batch settlements, voucher lots, counters.

The tables come from :mod:`clearing.schema` as it is now (later steps are written to run after this one on
a fresh database too); ``card_counters``, which 0002 folds into ``host_txns``, is defined here as it was.
"""

from __future__ import annotations

from sqlalchemy import Column, Index, Integer, MetaData, String, Table
from sqlalchemy.engine import Connection

from clearing import schema

VERSION = "0001"

TABLES = (
    "accounts", "transfers", "idempotency", "cards", "providers", "terminals", "host_txns",
    "settlement_windows", "batch_settlements", "voucher_lots", "counters",
)

_legacy = MetaData()
card_counters = Table(  # as of 0001; dropped by 0002 (its rows move to host_txns.atc / atc_gap)
    "card_counters",
    _legacy,
    Column("id", schema._BIGID, primary_key=True, autoincrement=True),
    Column("counter_key", String(40), nullable=False, unique=True),  # card_no:atc — a TAC counter is used once
    Column("card_no", String(schema.CARD_NO_LEN), nullable=False),
    Column("atc", Integer, nullable=False),
    Column("gap", Integer, nullable=False, default=0),
    Column("rrn", String(schema.RRN_LEN)),
    Column("created_at", schema.UtcDateTime, nullable=False),
)
Index("ix_card_counters_card", card_counters.c.card_no, card_counters.c.atc)


def upgrade(conn: Connection) -> None:
    tables = [schema.metadata.tables[name] for name in TABLES]
    schema.metadata.create_all(conn, tables=tables, checkfirst=True)
    card_counters.create(conn, checkfirst=True)
    if conn.dialect.name == "postgresql":
        schema.RRN_SEQUENCE.create(conn, checkfirst=True)
        schema.TRANSFER_ID_SEQUENCE.create(conn, checkfirst=True)
