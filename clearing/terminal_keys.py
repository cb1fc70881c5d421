"""Terminal keys on the host: TMK and SM2 public key per terminal, and the working keys of each sign-on.

终端主密钥 (TMK) and the terminal's SM2 public key come from a :class:`TerminalKeySource`
(the encrypted key store in production, a public deterministic derivation for the
demo and tests).

Working keys (工作密钥: TAK for message MACs, TEK for data) — how every worker
process sees the current TAK without a key ever being written to the database:

    TAK = SM3("carepay|tak|" ‖ WKM ‖ terminal_id ‖ key_version ‖ salt)[:16]
    TEK = SM3("carepay|tek|" ‖ WKM ‖ terminal_id ‖ key_version ‖ salt)[:16]

``WKM`` is the host's working-key master (16 bytes; from the key store, derived
from the clearing service's SM2 private key, or the demo seed) that every worker
holds; ``salt`` is 16 random bytes drawn at each sign-on. The database row
``terminal_working_keys`` stores only ``(terminal_id, key_version, salt)`` for the
current and the previous sign-on — useless without WKM. Any worker derives the
same keys from the row.

Rotation without downtime: a new sign-on moves the current (version, salt) to
``prev_*`` and stamps ``prev_valid_until``; until then messages MAC'd under the
previous TAK are still accepted (answers in flight during the re-sign-on).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from typing import Any, Protocol

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine

from clearing.db import write_transaction
from keys.sm2 import SM2KeyPair
from keys.sm3 import sm3

WORKING_KEY_BYTES = 16
SALT_BYTES = 16
KEY_GRACE_S = 300
"""How long the previous TAK stays valid after a new sign-on."""
MAX_CACHED_TERMINALS = 100_000
DEMO_SEED = "carepay-demo"

metadata = sa.MetaData()

terminal_working_keys = sa.Table(
    "terminal_working_keys",
    metadata,
    sa.Column("terminal_id", sa.String(8), primary_key=True),
    sa.Column("key_version", sa.Integer, nullable=False),
    sa.Column("salt_hex", sa.String(2 * SALT_BYTES), nullable=False),
    sa.Column("signed_on_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("prev_key_version", sa.Integer, nullable=True),
    sa.Column("prev_salt_hex", sa.String(2 * SALT_BYTES), nullable=True),
    sa.Column("prev_valid_until", sa.DateTime(timezone=True), nullable=True),
    sa.Column("last_nonce_hex", sa.String(128), nullable=True),
)


async def ensure_schema(engine: AsyncEngine) -> None:
    """Create the working-key table when missing (idempotent)."""
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all, checkfirst=True)


class TerminalKeySource(Protocol):
    """Where the host finds a terminal's TMK and SM2 public key (None: unknown terminal)."""

    def tmk(self, terminal_id: str) -> bytes | None: ...

    def sm2_public_key(self, terminal_id: str) -> bytes | None: ...


@lru_cache(maxsize=4096)
def demo_terminal_tmk(terminal_id: str, seed: str = DEMO_SEED) -> bytes:
    """A public, deterministic TMK for the demo, the simulator and tests. Never for production."""
    return sm3(f"{seed}|tmk|{terminal_id}".encode())[:16]


@lru_cache(maxsize=4096)
def demo_terminal_sm2(terminal_id: str, seed: str = DEMO_SEED) -> SM2KeyPair:
    """A public, deterministic SM2 pair for the demo, the simulator and tests. Never for production."""
    return SM2KeyPair.from_private(sm3(f"{seed}|sm2|{terminal_id}".encode()))


def demo_working_key_master(seed: str = DEMO_SEED) -> bytes:
    return sm3(f"{seed}|working-key-master".encode())[:16]


@dataclass
class DemoTerminalKeys:
    """Every 8-character terminal id has demo keys (or only ``allowed`` ones, when given)."""

    seed: str = DEMO_SEED
    allowed: frozenset[str] | None = None

    def tmk(self, terminal_id: str) -> bytes | None:
        if self.allowed is not None and terminal_id not in self.allowed:
            return None
        return demo_terminal_tmk(terminal_id, self.seed)

    def sm2_public_key(self, terminal_id: str) -> bytes | None:
        if self.allowed is not None and terminal_id not in self.allowed:
            return None
        return demo_terminal_sm2(terminal_id, self.seed).public_key


class KeyStoreTerminalKeys:
    """TMKs (``tmk:<terminal_id>``) and SM2 public keys (``sm2:<terminal_id>``) from the encrypted key store."""

    def __init__(self, store: object) -> None:
        self._store = store

    def __repr__(self) -> str:
        return "KeyStoreTerminalKeys(<key store>)"

    def tmk(self, terminal_id: str) -> bytes | None:
        try:
            return self._store.get_symmetric(f"tmk:{terminal_id}")  # type: ignore[attr-defined]
        except Exception:
            return None

    def sm2_public_key(self, terminal_id: str) -> bytes | None:
        try:
            return self._store.get_sm2(terminal_id).public_key  # type: ignore[attr-defined]
        except Exception:
            return None


class RegistryTerminalKeys:
    """Production source: the TMK from the key store, the SM2 public key from the terminal registry.

    The host never needs a terminal's SM2 private key: the public key registered at installation
    (``terminals.sm2_public_key``) verifies the sign-on. Only an ``active`` terminal may sign on, and
    the key store's TMK must match the KCV registered for the terminal (a mis-loaded key is refused).
    """

    def __init__(self, tmk_source: TerminalKeySource, engine: AsyncEngine) -> None:
        self._tmks = tmk_source
        self._engine = engine

    def __repr__(self) -> str:
        return "RegistryTerminalKeys(<key store>, <registry>)"

    async def _row(self, terminal_id: str) -> dict | None:
        from clearing.schema import terminals

        async with self._engine.connect() as conn:
            row = (await conn.execute(sa.select(terminals.c.status, terminals.c.sm2_public_key, terminals.c.tmk_kcv)
                                      .where(terminals.c.terminal_id == terminal_id))).mappings().first()
        return dict(row) if row else None

    def tmk(self, terminal_id: str) -> bytes | None:
        return self._tmks.tmk(terminal_id)

    async def sm2_public_key(self, terminal_id: str) -> bytes | None:  # type: ignore[override]
        from keys.diversify import kcv

        row = await self._row(terminal_id)
        if row is None or row["status"] != "active" or not row["sm2_public_key"]:
            return None
        tmk = self._tmks.tmk(terminal_id)
        if tmk is None or (row["tmk_kcv"] and kcv(tmk).hex().upper() != row["tmk_kcv"].upper()):
            return None
        try:
            return bytes.fromhex(row["sm2_public_key"])
        except ValueError:
            return None


def working_key_master_from_keystore(store: object) -> bytes:
    """WKM derived from the clearing service's SM2 private key in the key store (every worker holds it)."""
    pair = store.get_sm2("clearing")  # type: ignore[attr-defined]
    return sm3(b"carepay|working-key-master|" + pair.private_key)[:16]


def derive_working_key(wkm: bytes, kind: str, terminal_id: str, key_version: int, salt: bytes) -> bytes:
    """TAK (``kind='tak'``) or TEK (``'tek'``) for one sign-on; see the module docstring."""
    if kind not in ("tak", "tek"):
        raise ValueError("working key kind must be 'tak' or 'tek'")
    data = f"carepay|{kind}|".encode() + wkm + terminal_id.encode() + key_version.to_bytes(4, "big") + salt
    return sm3(data)[:WORKING_KEY_BYTES]


@dataclass
class _Entry:
    version: int
    tak: bytes = field(repr=False)
    prev_version: int | None = None
    prev_tak: bytes | None = field(default=None, repr=False)
    prev_valid_until: float = 0.0  # wall-clock epoch seconds
    loaded_at: float = 0.0  # monotonic


class WorkingKeys:
    """Per-worker view of every terminal's current (and grace-period previous) TAK, backed by the database."""

    def __init__(self, engine: AsyncEngine, wkm: bytes, grace_s: int = KEY_GRACE_S) -> None:
        self._engine = engine
        self._wkm = wkm
        self._grace_s = grace_s
        self._cache: dict[str, _Entry] = {}

    def __repr__(self) -> str:
        return f"WorkingKeys(terminals={len(self._cache)})"

    async def rotate(self, terminal_id: str, nonce_hex: str) -> tuple[int, bytes, bytes] | None:
        """A new sign-on: fresh salt, version + 1; returns (version, TAK, TEK). None when ``nonce_hex`` was used."""
        salt = os.urandom(SALT_BYTES)
        now = datetime.now(UTC)
        async with write_transaction(self._engine) as conn:
            row = (await conn.execute(
                sa.select(terminal_working_keys).where(terminal_working_keys.c.terminal_id == terminal_id)
                .with_for_update()
            )).mappings().first()
            if row is None:
                version = 1
                await conn.execute(sa.insert(terminal_working_keys).values(
                    terminal_id=terminal_id, key_version=version, salt_hex=salt.hex(), signed_on_at=now,
                    last_nonce_hex=nonce_hex))
            else:
                if row["last_nonce_hex"] == nonce_hex:
                    return None
                version = row["key_version"] + 1
                result = await conn.execute(sa.update(terminal_working_keys)
                                   .where(terminal_working_keys.c.terminal_id == terminal_id)
                                   .where(terminal_working_keys.c.key_version == row["key_version"])
                                   .values(key_version=version, salt_hex=salt.hex(), signed_on_at=now,
                                           prev_key_version=row["key_version"], prev_salt_hex=row["salt_hex"],
                                           prev_valid_until=now + timedelta(seconds=self._grace_s),
                                           last_nonce_hex=nonce_hex))
                if result.rowcount != 1:  # another worker rotated this terminal at the same moment
                    return None
        self._cache.pop(terminal_id, None)
        tak = derive_working_key(self._wkm, "tak", terminal_id, version, salt)
        tek = derive_working_key(self._wkm, "tek", terminal_id, version, salt)
        return version, tak, tek

    async def preload(self) -> int:
        """Read every signed-on terminal's keys in one query (at most ``MAX_CACHED_TERMINALS``): a worker that
        starts under load then answers its first message from each terminal without a database read.
        Returns how many terminals were loaded."""
        async with self._engine.connect() as conn:
            rows = (await conn.execute(sa.select(terminal_working_keys).limit(MAX_CACHED_TERMINALS))).mappings().all()
        for row in rows:
            self._cache[row["terminal_id"]] = self._entry(row)
        return len(rows)

    async def _load(self, terminal_id: str) -> _Entry | None:
        async with self._engine.connect() as conn:
            row = (await conn.execute(
                sa.select(terminal_working_keys).where(terminal_working_keys.c.terminal_id == terminal_id)
            )).mappings().first()
        if row is None:
            self._cache.pop(terminal_id, None)
            return None
        entry = self._entry(row)
        if len(self._cache) >= MAX_CACHED_TERMINALS:
            self._cache.clear()
        self._cache[terminal_id] = entry
        return entry

    def _entry(self, row: Any) -> _Entry:
        terminal_id = row["terminal_id"]
        entry = _Entry(
            version=row["key_version"],
            tak=derive_working_key(self._wkm, "tak", terminal_id, row["key_version"], bytes.fromhex(row["salt_hex"])),
            loaded_at=time.monotonic(),
        )
        if row["prev_key_version"] is not None and row["prev_salt_hex"]:
            entry.prev_version = row["prev_key_version"]
            entry.prev_tak = derive_working_key(self._wkm, "tak", terminal_id, row["prev_key_version"],
                                                bytes.fromhex(row["prev_salt_hex"]))
            until = row["prev_valid_until"]
            if until is not None and until.tzinfo is None:  # SQLite returns naive UTC
                until = until.replace(tzinfo=UTC)
            entry.prev_valid_until = until.timestamp() if until else 0.0
        return entry

    async def candidates(self, terminal_id: str, refresh: bool = False) -> list[bytes]:
        """TAKs to try for ``terminal_id``: current first, then the previous one while its grace lasts.

        ``refresh`` re-reads the database (after a MAC failure: another worker may have rotated). The
        read is one primary-key lookup; a flood of bad MACs costs one each (the broker's credentials and
        ACL stand in front of it), and a rotation is seen at once by every worker.
        """
        entry = self._cache.get(terminal_id)
        if entry is None or refresh:
            entry = await self._load(terminal_id)
        if entry is None:
            return []
        keys = [entry.tak]
        if entry.prev_tak is not None and time.time() < entry.prev_valid_until:
            keys.append(entry.prev_tak)
        return keys

    async def current(self, terminal_id: str) -> bytes | None:
        keys = await self.candidates(terminal_id)
        return keys[0] if keys else None
