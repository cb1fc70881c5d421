"""End-of-day tables (日终): audit chain, EOD runs, provider settlements, reconciliation runs and breaks,
error cases (差错账) and the data-access trail (使用痕迹).

Registered on the core :data:`clearing.schema.metadata`, so ``clearing.db.init_db``
creates them with everything else. Money is BIGINT fen; times aware UTC.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Date,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
)

from clearing.schema import KEY_MAX, PROVIDER_ID_LEN, RRN_LEN, TERMINAL_ID_LEN, UtcDateTime, metadata

_BIGID = BigInteger().with_variant(Integer, "sqlite")
HASH_HEX_LEN = 64

audit_log = Table(
    "audit_log",
    metadata,
    Column("seq", _BIGID, primary_key=True, autoincrement=False),
    Column("prev_hash", String(HASH_HEX_LEN), nullable=False, unique=True),  # one successor per entry: no forks
    Column("entry_hash", String(HASH_HEX_LEN), nullable=False, unique=True),
    Column("ts", String(40), nullable=False),  # UTC ISO text, exactly as hashed
    Column("actor", String(64), nullable=False),
    Column("action", String(64), nullable=False),
    Column("subject", String(200), nullable=False),
    Column("details", Text, nullable=False),  # canonical JSON, exactly as hashed
)

eod_runs = Table(
    "eod_runs",
    metadata,
    Column("business_date", Date, primary_key=True),
    Column("status", String(16), nullable=False),  # closed settled reconciled reported
    Column("cutoff_at", UtcDateTime, nullable=False),
    Column("closed_at", UtcDateTime, nullable=False),
    Column("settled_at", UtcDateTime),
    Column("fee_total_fen", BigInteger, nullable=False, default=0),
    Column("net_total_fen", BigInteger, nullable=False, default=0),
    Column("provider_count", Integer, nullable=False, default=0),
    Column("settlement_file", String(400)),
    Column("settlement_sm3", String(HASH_HEX_LEN)),
    Column("updated_at", UtcDateTime, nullable=False),
)

provider_settlements = Table(
    "provider_settlements",
    metadata,
    Column("business_date", Date, primary_key=True),
    Column("provider_id", String(PROVIDER_ID_LEN), primary_key=True),
    Column("provider_name", String(128), nullable=False),
    Column("settle_account", String(64), nullable=False),
    Column("purchase_count", Integer, nullable=False),
    Column("purchase_fen", BigInteger, nullable=False),
    Column("void_count", Integer, nullable=False),
    Column("void_fen", BigInteger, nullable=False),
    Column("refund_count", Integer, nullable=False),
    Column("refund_fen", BigInteger, nullable=False),
    Column("net_fen", BigInteger, nullable=False),
    Column("fee_fen", BigInteger, nullable=False),
    Column("zero_net", Boolean, nullable=False),  # recorded explicitly (SETTLEMENT_NET_ZERO)
    Column("fee_transfer_key", String(KEY_MAX)),
    Column("created_at", UtcDateTime, nullable=False),
)

recon_runs = Table(
    "recon_runs",
    metadata,
    Column("id", _BIGID, primary_key=True, autoincrement=True),
    Column("business_date", Date, nullable=False),
    Column("run_no", Integer, nullable=False),
    Column("started_at", UtcDateTime, nullable=False),
    Column("bank_file", String(400), nullable=False),
    Column("bank_file_sm3", String(HASH_HEX_LEN), nullable=False),
    Column("counts", Text, nullable=False),  # JSON {class: n}
    Column("batches_unbalanced", Integer, nullable=False, default=0),
    Column("manifest_path", String(400)),
    Column("manifest_sm3", String(HASH_HEX_LEN)),
    UniqueConstraint("business_date", "run_no", name="uq_recon_runs_date_run"),
)

recon_breaks = Table(
    "recon_breaks",
    metadata,
    Column("id", _BIGID, primary_key=True, autoincrement=True),
    Column("business_date", Date, nullable=False),
    Column("break_key", String(KEY_MAX + 40), nullable=False),  # class|key|side
    Column("class", String(20), nullable=False),
    Column("side", String(8), nullable=False),
    Column("rrn", String(RRN_LEN + 40), nullable=False),
    Column("provider_id", String(PROVIDER_ID_LEN), nullable=False, default=""),
    Column("terminal_id", String(TERMINAL_ID_LEN + 8), nullable=False, default=""),
    Column("batch_no", String(8), nullable=False, default=""),
    Column("trace_no", String(8), nullable=False, default=""),
    Column("txn_type", String(10), nullable=False, default=""),
    Column("program", String(16), nullable=False, default=""),
    Column("card_no_masked", String(24), nullable=False, default=""),
    Column("txn_time", String(40), nullable=False, default=""),
    Column("host_amount_fen", BigInteger),
    Column("bank_amount_fen", BigInteger),
    Column("diff_fen", BigInteger, nullable=False),
    Column("host_status", String(10)),
    Column("bank_status", String(10)),
    Column("in_grace", Boolean, nullable=False, default=False),
    Column("lifecycle", String(12), nullable=False),  # new persisting resolved
    Column("first_run_id", _BIGID, nullable=False),
    Column("last_run_id", _BIGID, nullable=False),
    UniqueConstraint("business_date", "break_key", name="uq_recon_breaks_date_key"),
)

error_cases = Table(
    "error_cases",
    metadata,
    Column("id", _BIGID, primary_key=True, autoincrement=True),
    Column("case_no", String(32), nullable=False, unique=True),  # EC-YYYYMMDD-NNNNNN
    Column("business_date", Date, nullable=False),
    Column("break_key", String(KEY_MAX + 40), nullable=False),
    Column("class", String(20), nullable=False),
    Column("complexity", String(8), nullable=False),  # general complex
    Column("rrn", String(RRN_LEN + 40), nullable=False, default=""),
    Column("provider_id", String(PROVIDER_ID_LEN), nullable=False, default=""),
    Column("terminal_id", String(TERMINAL_ID_LEN + 8), nullable=False, default=""),
    Column("card_no_masked", String(24), nullable=False, default=""),
    Column("host_amount_fen", BigInteger),
    Column("bank_amount_fen", BigInteger),
    Column("diff_fen", BigInteger, nullable=False),
    Column("exposure_fen", BigInteger, nullable=False, default=0),  # signed share parked in suspense
    Column("status", String(10), nullable=False),  # open proposed approved posted closed
    Column("source", String(8), nullable=False, default="auto"),  # auto manual
    Column("opened_at", UtcDateTime, nullable=False),
    Column("due_at", UtcDateTime, nullable=False),
    Column("suspense_transfer_key", String(KEY_MAX)),
    Column("action", String(12)),  # adjust reverse refund write_off dismiss
    Column("proposal_amount_fen", BigInteger),
    Column("proposal_note", String(400)),
    Column("maker", String(64)),
    Column("proposed_at", UtcDateTime),
    Column("checker", String(64)),
    Column("decided_at", UtcDateTime),
    Column("decision_note", String(400)),
    Column("rejections", Integer, nullable=False, default=0),
    Column("posted_by", String(64)),
    Column("posted_at", UtcDateTime),
    Column("correction_transfer_keys", Text),  # JSON list
    Column("closed_at", UtcDateTime),
    Column("resolution", String(400)),
    UniqueConstraint("business_date", "break_key", name="uq_error_cases_date_key"),
)
Index("ix_error_cases_status", error_cases.c.status)

access_events = Table(
    "access_events",
    metadata,
    Column("id", _BIGID, primary_key=True, autoincrement=True),
    Column("at", UtcDateTime, nullable=False),
    Column("actor", String(64), nullable=False),
    Column("action", String(12), nullable=False),  # view export copy delete
    Column("subject", String(400), nullable=False),  # report path, card (masked), API resource
    Column("record_count", Integer, nullable=False, default=0),
    Column("business_date", Date),
    Column("purpose", String(200), nullable=False, default=""),
)
Index("ix_access_events_at", access_events.c.at)

manifests = Table(
    "recon_manifests",
    metadata,
    Column("business_date", Date, primary_key=True),
    Column("path", String(400), nullable=False),
    Column("manifest_sm3", String(HASH_HEX_LEN), nullable=False),
    Column("previous_sm3", String(HASH_HEX_LEN), nullable=False),
    Column("written_at", UtcDateTime, nullable=False),
)
