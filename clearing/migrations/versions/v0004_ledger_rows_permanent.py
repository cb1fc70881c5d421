"""0004: ledger accounts and transfers are permanent — never deleted, their ids never changed; on PostgreSQL the
reference checks of 0003 then need no row locks.

The money rule is that postings are never edited or deleted; an account, once it exists, is what its
transfers point at for good (a closed card keeps its account at zero). Until now a row that nothing referenced
yet could still be deleted, so the set-based reference triggers of 0003 had to lock every referenced account
and transfer ``FOR KEY SHARE`` (as a foreign key does) to keep a concurrent delete from slipping between the
check and the commit. Those locks are a write to every referenced row's header in every batch — and, for the
PostgreSQL writer's pipeline, a lock the next batch takes on accounts the batch before it is still updating.

Now, on both backends, deleting an ``accounts`` or ``transfers`` row, or changing its id, fails with an
integrity error (SQLSTATE 23001 ``restrict_violation`` on PostgreSQL; ``RAISE(ABORT)`` on SQLite, which keeps its
foreign keys as well). With rows that cannot go, checking that a referenced row exists is enough: the
PostgreSQL triggers keep the existence check (SQLSTATE 23503 ``foreign_key_violation``, as before) and drop the
lock pass. ``TRUNCATE`` is not a row operation and is not affected (tests empty their schema with it).
"""

from __future__ import annotations

from sqlalchemy.engine import Connection

VERSION = "0004"

TABLES = ("accounts", "transfers")

_PG = (
    """
CREATE OR REPLACE FUNCTION carepay_ledger_row_permanent() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.id = OLD.id THEN
        RETURN NEW;
    END IF;
    RAISE EXCEPTION '% row % is permanent: it is never deleted and its id never changes', TG_TABLE_NAME, OLD.id
        USING ERRCODE = 'restrict_violation';
END $$""",
    """
CREATE OR REPLACE FUNCTION carepay_transfers_accounts_exist() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    bad bigint;
BEGIN
    SELECT n.id INTO bad FROM carepay_new n
      WHERE NOT EXISTS (SELECT 1 FROM accounts a WHERE a.id = n.debit_account_id)
         OR NOT EXISTS (SELECT 1 FROM accounts a WHERE a.id = n.credit_account_id)
      LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'transfer % refers to an account that does not exist', bad
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END $$""",
    """
CREATE OR REPLACE FUNCTION carepay_host_txns_transfer_exists() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    bad text;
BEGIN
    SELECT n.rrn INTO bad FROM carepay_new n
      WHERE n.transfer_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM transfers t WHERE t.id = n.transfer_id)
      LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'journal row % refers to a transfer that does not exist', bad
            USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NULL;
END $$""",
    "DROP TRIGGER IF EXISTS carepay_accounts_del ON accounts",
    "DROP TRIGGER IF EXISTS carepay_transfers_del ON transfers",
    "DROP FUNCTION IF EXISTS carepay_account_unreferenced()",
    "DROP FUNCTION IF EXISTS carepay_transfer_unreferenced()",
    *(f"CREATE TRIGGER carepay_{t}_permanent BEFORE DELETE OR UPDATE OF id ON {t} "
      "FOR EACH ROW EXECUTE FUNCTION carepay_ledger_row_permanent()" for t in TABLES),
)

_SQLITE = tuple(
    stmt
    for t in TABLES
    for stmt in (
        f"CREATE TRIGGER IF NOT EXISTS carepay_{t}_no_delete BEFORE DELETE ON {t} "
        f"BEGIN SELECT RAISE(ABORT, '{t} rows are permanent: never deleted'); END",
        f"CREATE TRIGGER IF NOT EXISTS carepay_{t}_no_new_id BEFORE UPDATE OF id ON {t} WHEN NEW.id <> OLD.id "
        f"BEGIN SELECT RAISE(ABORT, '{t} rows are permanent: their id never changes'); END",
    )
)


def upgrade(conn: Connection) -> None:
    for sql in _PG if conn.dialect.name == "postgresql" else _SQLITE:
        conn.exec_driver_sql(sql)  # as they are: no bind-parameter parsing of the bodies
