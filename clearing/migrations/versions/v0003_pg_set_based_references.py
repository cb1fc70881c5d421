"""0003 (PostgreSQL): the hot references checked once per statement instead of once per row; HOT balance updates.

A PostgreSQL foreign key runs one lookup query per inserted row (an internal row trigger): for the
group-commit writer's batch of 1,000 postings that is 3,000 lookups — ``transfers.debit_account_id`` and
``credit_account_id`` → ``accounts``, ``host_txns.transfer_id`` → ``transfers`` — about half of the batch's
insert time. Here those three constraints become statement-level triggers over the statement's new rows
(transition tables) that make the same guarantees set-based, in one query each:

- inserting or updating ``transfers`` / ``host_txns`` fails (SQLSTATE 23503 ``foreign_key_violation``, as
  a foreign key would) when a referenced row does not exist; the referenced rows are locked ``FOR KEY
  SHARE`` like a foreign key locks them, so a concurrent delete waits and then sees the new reference;
- deleting (or changing the id of) an ``accounts`` / ``transfers`` row that is referenced fails the same way
  (a row check, as the foreign key's; nothing deletes these rows in normal operation, and ``TRUNCATE`` is
  not a row operation — the same as with the foreign keys' ``CASCADE``).

The cheap references stay real foreign keys (``transfers.corrects_transfer_id``: NULL for nearly every row;
``terminals.provider_id``). SQLite keeps all its foreign keys (there a check is a B-tree probe, no query).

``accounts`` gets ``fillfactor = 80`` so the writer's per-batch balance ``UPDATE`` can stay on the page
(HOT update: no new entries in the account indexes for each new row version).
"""

from __future__ import annotations

from sqlalchemy.engine import Connection

VERSION = "0003"

DROPPED = (
    ("transfers", "fk_transfers_debit_account_id_accounts"),
    ("transfers", "fk_transfers_credit_account_id_accounts"),
    ("host_txns", "fk_host_txns_transfer_id_transfers"),
)

_MISSING = "USING ERRCODE = 'foreign_key_violation'"

STATEMENTS = (
    f"""
CREATE OR REPLACE FUNCTION carepay_transfers_accounts_exist() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    bad bigint;
BEGIN
    PERFORM 1 FROM accounts a
      WHERE a.id IN (SELECT debit_account_id FROM carepay_new UNION SELECT credit_account_id FROM carepay_new)
      ORDER BY a.id FOR KEY SHARE OF a;
    SELECT n.id INTO bad FROM carepay_new n
      WHERE NOT EXISTS (SELECT 1 FROM accounts a WHERE a.id = n.debit_account_id)
         OR NOT EXISTS (SELECT 1 FROM accounts a WHERE a.id = n.credit_account_id)
      LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'transfer % refers to an account that does not exist', bad {_MISSING};
    END IF;
    RETURN NULL;
END $$""",
    f"""
CREATE OR REPLACE FUNCTION carepay_host_txns_transfer_exists() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    bad text;
BEGIN
    PERFORM 1 FROM transfers t WHERE t.id IN (SELECT transfer_id FROM carepay_new WHERE transfer_id IS NOT NULL)
      ORDER BY t.id FOR KEY SHARE OF t;
    SELECT n.rrn INTO bad FROM carepay_new n
      WHERE n.transfer_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM transfers t WHERE t.id = n.transfer_id)
      LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'journal row % refers to a transfer that does not exist', bad {_MISSING};
    END IF;
    RETURN NULL;
END $$""",
    f"""
CREATE OR REPLACE FUNCTION carepay_account_unreferenced() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.id = OLD.id THEN
        RETURN NEW;
    END IF;
    IF EXISTS (SELECT 1 FROM transfers WHERE debit_account_id = OLD.id)
       OR EXISTS (SELECT 1 FROM transfers WHERE credit_account_id = OLD.id) THEN
        RAISE EXCEPTION 'account % is referenced by transfers', OLD.id {_MISSING};
    END IF;
    RETURN CASE TG_OP WHEN 'DELETE' THEN OLD ELSE NEW END;
END $$""",
    f"""
CREATE OR REPLACE FUNCTION carepay_transfer_unreferenced() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.id = OLD.id THEN
        RETURN NEW;
    END IF;
    IF EXISTS (SELECT 1 FROM host_txns WHERE transfer_id = OLD.id) THEN
        RAISE EXCEPTION 'transfer % is referenced by the host journal', OLD.id {_MISSING};
    END IF;
    RETURN CASE TG_OP WHEN 'DELETE' THEN OLD ELSE NEW END;
END $$""",
    # one trigger per event: a trigger with transition tables may not list several events
    "CREATE TRIGGER carepay_transfers_ins AFTER INSERT ON transfers REFERENCING NEW TABLE AS carepay_new "
    "FOR EACH STATEMENT EXECUTE FUNCTION carepay_transfers_accounts_exist()",
    "CREATE TRIGGER carepay_transfers_upd AFTER UPDATE ON transfers REFERENCING NEW TABLE AS carepay_new "
    "FOR EACH STATEMENT EXECUTE FUNCTION carepay_transfers_accounts_exist()",
    "CREATE TRIGGER carepay_host_txns_ins AFTER INSERT ON host_txns REFERENCING NEW TABLE AS carepay_new "
    "FOR EACH STATEMENT EXECUTE FUNCTION carepay_host_txns_transfer_exists()",
    "CREATE TRIGGER carepay_host_txns_upd AFTER UPDATE ON host_txns REFERENCING NEW TABLE AS carepay_new "
    "FOR EACH STATEMENT EXECUTE FUNCTION carepay_host_txns_transfer_exists()",
    "CREATE TRIGGER carepay_accounts_del BEFORE DELETE OR UPDATE OF id ON accounts "
    "FOR EACH ROW EXECUTE FUNCTION carepay_account_unreferenced()",
    "CREATE TRIGGER carepay_transfers_del BEFORE DELETE OR UPDATE OF id ON transfers "
    "FOR EACH ROW EXECUTE FUNCTION carepay_transfer_unreferenced()",
    "ALTER TABLE accounts SET (fillfactor = 80)",
)


def upgrade(conn: Connection) -> None:
    if conn.dialect.name != "postgresql":
        return
    for table, name in DROPPED:
        conn.exec_driver_sql(f"ALTER TABLE {table} DROP CONSTRAINT IF EXISTS {name}")
    for sql in STATEMENTS:  # as they are: no bind-parameter parsing of the function bodies
        conn.exec_driver_sql(sql)
