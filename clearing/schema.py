"""The clearing database schema (清算库表): one SQLAlchemy ``MetaData`` for SQLite and PostgreSQL.

Other clearing modules (end of day: ``clearing/eod_schema.py``) add their own tables
to :data:`metadata`; :func:`clearing.db.init_db` creates every table registered on it.

Money columns are ``BIGINT`` fen. Times are stored in UTC (:class:`UtcDateTime`
always hands back aware datetimes, also on SQLite). ``transfers`` rows are never
updated or deleted; corrections are new rows naming the one they correct.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Sequence,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.types import TypeDecorator

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(column_0_label)s",
        "uq": "uq_%(table_name)s_%(column_0_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

# Identifier widths (UnionPay POS conventions, DESIGN.md "Money, time, identifiers").
CARD_NO_LEN = 19
ID_NO_LEN = 18
TERMINAL_ID_LEN = 8
PROVIDER_ID_LEN = 15
BATCH_NO_LEN = 6
TRACE_NO_LEN = 6
RRN_LEN = 12
AUTH_CODE_LEN = 6
ACCOUNT_CODE_MAX = 64
KEY_MAX = 96

# Account flags (TigerBeetle-style bit flags).
FLAG_NO_OVERDRAFT = 1
"""``debits_must_not_exceed_credits``: beneficiary accounts never go below zero."""

# Sequences: PostgreSQL uses real sequences; SQLite a counter row in ``counters`` (see clearing.db.allocate_ids).
RRN_SEQUENCE = Sequence("rrn_seq", metadata=metadata, start=1)
TRANSFER_ID_SEQUENCE = Sequence("transfer_id_seq", metadata=metadata, start=1)

_BIGID = BigInteger().with_variant(Integer, "sqlite")


class UtcDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC timestamp on both backends (SQLite stores naive UTC text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: store aware UTC timestamps only")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if getattr(dialect, "name", "") == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


accounts = Table(
    "accounts",
    metadata,
    Column("id", _BIGID, primary_key=True, autoincrement=True),
    Column("code", String(ACCOUNT_CODE_MAX), nullable=False, unique=True),
    Column("kind", String(16), nullable=False),  # card provider fund bank suspense expired migration
    Column("program", String(16)),
    Column("owner", String(32)),  # card_no, provider_id, district
    Column("flags", Integer, nullable=False, default=0),
    Column("debits_posted", BigInteger, nullable=False, default=0),
    Column("credits_posted", BigInteger, nullable=False, default=0),
    Column("created_at", UtcDateTime, nullable=False),
    CheckConstraint("debits_posted >= 0 AND credits_posted >= 0", name="nonneg_totals"),
    CheckConstraint("(flags & 1) = 0 OR credits_posted >= debits_posted", name="no_overdraft"),
)
Index("ix_accounts_owner", accounts.c.owner)

transfers = Table(
    "transfers",
    metadata,
    Column("id", _BIGID, primary_key=True, autoincrement=False),
    Column("transfer_key", String(KEY_MAX), nullable=False, unique=True),
    Column("debit_account_id", _BIGID, ForeignKey("accounts.id"), nullable=False),
    Column("credit_account_id", _BIGID, ForeignKey("accounts.id"), nullable=False),
    Column("amount_fen", BigInteger, nullable=False),
    Column("code", String(24), nullable=False),
    Column("business_date", Date, nullable=False),
    Column("created_at", UtcDateTime, nullable=False),
    Column("terminal_id", String(TERMINAL_ID_LEN)),
    Column("batch_no", String(BATCH_NO_LEN)),
    Column("trace_no", String(TRACE_NO_LEN)),
    Column("rrn", String(RRN_LEN)),
    Column("corrects_transfer_id", _BIGID, ForeignKey("transfers.id")),
    Column("memo", String(200)),
    CheckConstraint("amount_fen > 0", name="positive_amount"),
    CheckConstraint("debit_account_id <> credit_account_id", name="distinct_accounts"),
)
Index("ix_transfers_business_date", transfers.c.business_date)
Index("ix_transfers_debit", transfers.c.debit_account_id)
Index("ix_transfers_credit", transfers.c.credit_account_id)

idempotency = Table(
    "idempotency",
    metadata,
    Column("id", _BIGID, primary_key=True, autoincrement=True),
    Column("scope", String(32), nullable=False),
    Column("key", String(128), nullable=False),
    Column("request_hash", String(64), nullable=False),
    Column("response", Text, nullable=False),  # JSON
    Column("created_at", UtcDateTime, nullable=False),
    UniqueConstraint("scope", "key", name="uq_idempotency_scope_key"),
)

cards = Table(
    "cards",
    metadata,
    Column("card_no", String(CARD_NO_LEN), primary_key=True),
    Column("app_serial", String(16), nullable=False, unique=True),
    Column("id_no", String(ID_NO_LEN), nullable=False),
    Column("holder_name", String(64), nullable=False, default=""),
    Column("district", String(6), nullable=False),
    Column("street", String(9), nullable=False, default=""),
    Column("status", String(12), nullable=False),  # issued active lost closed cancelled
    Column("category", String(32), nullable=False, default=""),
    Column("valid_until", Date, nullable=False),
    Column("programs", String(64), nullable=False),  # comma list: voucher,nursing
    Column("key_version", Integer, nullable=False, default=1),
    Column("suite", String(8), nullable=False, default="sm4"),
    Column("replaced_by", String(CARD_NO_LEN)),
    Column("issued_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
)
Index("ix_cards_id_no", cards.c.id_no)

providers = Table(
    "providers",
    metadata,
    Column("provider_id", String(PROVIDER_ID_LEN), primary_key=True),
    Column("name", String(128), nullable=False),
    Column("programs", String(64), nullable=False),
    Column("service_categories", String(400), nullable=False),
    Column("status", String(12), nullable=False),  # active suspended withdrawn
    Column("settle_account", String(64), nullable=False),
    Column("district", String(6), nullable=False, default=""),
    Column("created_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
)

terminals = Table(
    "terminals",
    metadata,
    Column("terminal_id", String(TERMINAL_ID_LEN), primary_key=True),
    Column("provider_id", String(PROVIDER_ID_LEN), ForeignKey("providers.provider_id"), nullable=False),
    Column("psam_serial", String(32), nullable=False),
    Column("install_date", Date, nullable=False),
    Column("address", String(200), nullable=False, default=""),
    Column("status", String(12), nullable=False),  # active suspended removed
    Column("sm2_public_key", String(130), nullable=False, default=""),
    Column("tmk_kcv", String(6), nullable=False, default=""),
    Column("created_at", UtcDateTime, nullable=False),
    Column("updated_at", UtcDateTime, nullable=False),
)

# THE HOST JOURNAL (主机流水): one row per terminal transaction, approved or declined, written by the
# group-commit writer in the same database transaction as its transfer. Meaning of ``status``:
# - PURCHASE / ADVICE: SUCCESS = posted (``transfer_id`` set); FAILED = declined, no money moved
#   (a failed ADVICE carries ``review_reason`` — end of day opens an error case for it); REVERSED = posted and
#   later reversed (the REVERSAL row holds the correcting transfer), or reversed before it arrived (no transfer).
# - VOID / REFUND: SUCCESS = posted (transfer corrects the original's; ``orig_rrn`` = original's RRN); FAILED.
# - REVERSAL: SUCCESS with ``transfer_id`` = money returned; SUCCESS without = acknowledged, nothing to undo
#   (original never received — ``orig_key`` is then a tombstone that blocks the late original —, declined, or
#   already reversed); FAILED = refused (e.g. the original was voided or refunded).
# A provider's net for a date = Σ SUCCESS PURCHASE+ADVICE − Σ SUCCESS VOID − Σ SUCCESS REFUND; it equals the
# movement of ``provider:{id}:payable`` on that date when no reversal crosses the cut-off.
host_txns = Table(
    "host_txns",
    metadata,
    Column("id", _BIGID, primary_key=True, autoincrement=True),
    Column("rrn", String(RRN_LEN), nullable=False, unique=True),
    Column("txn_key", String(KEY_MAX), nullable=False, unique=True),  # terminal:batch:trace:TYPE
    Column("msg_key", String(KEY_MAX), nullable=False, unique=True),  # terminal:msg_id
    Column("request_hash", String(64), nullable=False),
    Column("business_date", Date, nullable=False),
    Column("provider_id", String(PROVIDER_ID_LEN), nullable=False),
    Column("terminal_id", String(TERMINAL_ID_LEN), nullable=False),
    Column("batch_no", String(BATCH_NO_LEN), nullable=False),
    Column("trace_no", String(TRACE_NO_LEN), nullable=False),
    Column("txn_type", String(10), nullable=False),  # PURCHASE VOID REFUND REVERSAL ADVICE
    Column("program", String(16)),
    Column("card_no", String(CARD_NO_LEN)),
    Column("amount_fen", BigInteger, nullable=False),
    Column("fee_fen", BigInteger, nullable=False, default=0),
    Column("txn_time", UtcDateTime, nullable=False),
    Column("status", String(10), nullable=False),  # SUCCESS FAILED REVERSED
    Column("orig_rrn", String(RRN_LEN)),
    Column("orig_key", String(KEY_MAX)),  # reversals: txn_key of the purchase they undo (tombstone)
    Column("response_code", String(2), nullable=False),
    Column("msg_id", String(40), nullable=False),
    Column("auth_code", String(AUTH_CODE_LEN)),
    Column("service_category", String(32)),
    Column("balance_after_fen", BigInteger),
    Column("transfer_id", _BIGID, ForeignKey("transfers.id")),
    Column("message", String(200), nullable=False, default=""),
    Column("review_reason", String(64)),  # set when end of day should open an error case (e.g. failed advice)
    Column("created_at", UtcDateTime, nullable=False),
    Column("atc", Integer),  # the card counter this row spent (PURCHASE/ADVICE whose TAC verified), see below
    Column("atc_gap", Integer),  # counters skipped since the highest seen for the card (0 = none)
)
Index("ix_host_txns_business_date", host_txns.c.business_date)
Index("ix_host_txns_terminal_batch", host_txns.c.terminal_id, host_txns.c.batch_no)
# Only corrections carry these (purchases, the bulk of the journal, hold NULL): partial indexes stay small.
Index("ix_host_txns_orig_rrn", host_txns.c.orig_rrn, sqlite_where=host_txns.c.orig_rrn.is_not(None),
      postgresql_where=host_txns.c.orig_rrn.is_not(None))
Index("ix_host_txns_orig_key", host_txns.c.orig_key, sqlite_where=host_txns.c.orig_key.is_not(None),
      postgresql_where=host_txns.c.orig_key.is_not(None))
# Card counters (卡交易序号 ATC): the journal row that spent a card's TAC counter carries it in ``atc``
# (``atc_gap`` = counters skipped since the highest seen before it, 0 = none). Each (card, counter) is spent
# at most once — a replayed TAC is declined ``59`` and its row carries no ``atc``. Until migration 0002 this
# was the separate table ``card_counters`` (counter_key UNIQUE): the same rule, one row and two indexes more.
Index("uq_host_txns_card_atc", host_txns.c.card_no, host_txns.c.atc, unique=True,
      sqlite_where=host_txns.c.atc.is_not(None), postgresql_where=host_txns.c.atc.is_not(None))

settlement_windows = Table(
    "settlement_windows",
    metadata,
    Column("business_date", Date, primary_key=True),
    Column("status", String(8), nullable=False),  # open closed
    Column("closed_at", UtcDateTime),
)

batch_settlements = Table(
    "batch_settlements",
    metadata,
    Column("id", _BIGID, primary_key=True, autoincrement=True),
    Column("msg_key", String(KEY_MAX), nullable=False, unique=True),
    Column("terminal_id", String(TERMINAL_ID_LEN), nullable=False),
    Column("provider_id", String(PROVIDER_ID_LEN), nullable=False),
    Column("batch_no", String(BATCH_NO_LEN), nullable=False),
    Column("business_date", Date, nullable=False),
    Column("balanced", Boolean, nullable=False),
    Column("terminal_totals", Text, nullable=False),  # JSON BatchTotals
    Column("host_totals", Text, nullable=False),  # JSON BatchTotals
    Column("received_at", UtcDateTime, nullable=False),
)
Index("ix_batch_settlements_tb", batch_settlements.c.terminal_id, batch_settlements.c.batch_no)

voucher_lots = Table(
    "voucher_lots",
    metadata,
    Column("id", _BIGID, primary_key=True, autoincrement=True),
    Column("card_no", String(CARD_NO_LEN), nullable=False),
    Column("program", String(16), nullable=False),
    Column("batch_id", String(64), nullable=False),
    Column("amount_fen", BigInteger, nullable=False),
    Column("period", String(6), nullable=False),
    Column("expires_on", Date),
    Column("closed_at", UtcDateTime),  # swept (expired) or rolled over
    Column("created_at", UtcDateTime, nullable=False),
)
Index("ix_voucher_lots_card", voucher_lots.c.card_no)

counters = Table(
    "counters",
    metadata,
    Column("name", String(32), primary_key=True),
    Column("value", BigInteger, nullable=False),
)

schema_migrations = Table(
    "schema_migrations",
    metadata,
    Column("version", String(32), primary_key=True),
    Column("applied_at", UtcDateTime, nullable=False),
)
