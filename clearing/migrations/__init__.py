"""Versioned schema migrations (迁移): an ordered list of steps, each applied once and recorded.

Each step is a module in ``clearing/migrations/versions`` named ``vNNNN_<slug>.py``
with ``VERSION`` and ``upgrade(conn)`` (a synchronous SQLAlchemy ``Connection``
inside the migration transaction). Applied versions are rows in
``schema_migrations``. After the steps, every table registered on
``clearing.schema.metadata`` that does not exist yet is created — that is how
other clearing parts (``clearing/eod_schema.py``) get their tables from
``carepay clearing init-db`` without a step of their own.
"""

from __future__ import annotations

import importlib
import pkgutil
from datetime import UTC, datetime
from types import ModuleType

from sqlalchemy import inspect, select, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from clearing import schema
from clearing.db import write_transaction
from clearing.migrations import versions as _versions_pkg

SQLITE_COUNTERS = ("rrn", "transfer_id")


def steps() -> list[ModuleType]:
    """The migration modules in version order."""
    mods = [importlib.import_module(f"{_versions_pkg.__name__}.{m.name}")
            for m in pkgutil.iter_modules(_versions_pkg.__path__) if m.name.startswith("v")]
    return sorted(mods, key=lambda m: m.VERSION)


def _upgrade_sync(conn: Connection) -> list[str]:
    schema.schema_migrations.create(conn, checkfirst=True)
    done = set(conn.execute(select(schema.schema_migrations.c.version)).scalars())
    applied = []
    for step in steps():
        if step.VERSION in done:
            continue
        step.upgrade(conn)
        conn.execute(schema.schema_migrations.insert().values(version=step.VERSION, applied_at=datetime.now(UTC)))
        applied.append(step.VERSION)
    # tables registered later by other parts (end of day, …): create what is missing
    schema.metadata.create_all(conn, checkfirst=True)
    if conn.dialect.name == "sqlite":
        for name in SQLITE_COUNTERS:
            conn.execute(text("INSERT INTO counters (name, value) VALUES (:n, 0) ON CONFLICT (name) DO NOTHING"),
                         {"n": name})
    return applied


async def upgrade(engine: AsyncEngine) -> list[str]:
    """Apply every pending step in one transaction; returns the versions applied."""
    async with write_transaction(engine) as conn:
        return await conn.run_sync(_upgrade_sync)


async def current_tables(engine: AsyncEngine) -> list[str]:
    async with engine.connect() as conn:
        return await conn.run_sync(lambda c: sorted(inspect(c).get_table_names()))
