"""The encrypted key store (密钥库): one JSON file, key material sealed under the KEK with SM4-GCM.

What the file holds, in clear: per entry the purpose, version, kind
(``symmetric`` or ``sm2``), suite, KCV (for SM2 a fingerprint: the first 3 bytes
of SM3 over the public key), public key (SM2 only), creation time and status
(``active`` — the version new cards/keys use; ``retired`` — kept so old-version
cards keep working; ``zeroized`` — destroyed). The key material itself is only
in ``ciphertext``: SM4-GCM under a key derived from the KEK (HKDF-SM3, salt =
the store id), with the entry's metadata as associated data. A file-level
HMAC-SM3 over everything else catches edits of status, removed or reordered
entries. Wrong KEK, tampering and malformed files raise :class:`KeyStoreError`
with a message that never carries key bytes.

Purposes (用途):

- issuer master keys: ``internal_auth``, ``external_auth``, ``sm_mac``, ``tac``, ``pin``
  (``keys.issuer.PURPOSES``); ``rotate("issuer")`` rotates all of them to one new version;
- ``tmk:<terminal_id>``: a terminal master key (终端主密钥);
- ``sm2:clearing`` (report signatures) and ``sm2:<terminal_id>``: SM2 key pairs.

Writes are atomic (temporary file, fsync, rename, fsync of the directory) and
serialised between processes by an advisory lock on ``<path>.lock``; each write
re-reads the file under the lock so two officers' changes do not overwrite each
other. Zeroisation also overwrites the previous file's blocks in place after
the rename (best effort: SSDs and journalling file systems may keep copies).
"""

from __future__ import annotations

import contextlib
import fcntl
import hmac
import json
import logging
import os
import re
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from keys.components import KEK_BYTES, KeyComponent, combine, kcv_hex, read_component_file
from keys.diversify import kcv
from keys.issuer import PURPOSES as ISSUER_PURPOSES
from keys.issuer import IssuerKeySet
from keys.sm2 import PRIVATE_KEY_BYTES, SM2KeyPair, normalize_public_key
from keys.sm3 import sm3
from keys.suite import CryptoError, Suite, clear_context_cache

log = logging.getLogger("carepay.keys.store")

STORE_FORMAT = "carepay-keystore"
STORE_FORMAT_VERSION = 1
SYMMETRIC_KEY_BYTES = 16
GCM_NONCE_BYTES = 12
GCM_TAG_BYTES = 16
MAX_KEY_VERSION = 255  # the card's FCI carries the key version in one byte
MAX_STORE_FILE_BYTES = 64 * 1024 * 1024
ISSUER_GROUP = "issuer"
ENV_COMPONENTS = "CAREPAY_KEY_COMPONENTS"
ENV_STORE_PATH = "CAREPAY_KEYSTORE_PATH"

KIND_SYMMETRIC = "symmetric"
KIND_SM2 = "sm2"
STATUS_ACTIVE = "active"
STATUS_RETIRED = "retired"
STATUS_ZEROIZED = "zeroized"
STATUSES = (STATUS_ACTIVE, STATUS_RETIRED, STATUS_ZEROIZED)

_TERMINAL_ID = r"[A-Za-z0-9]{8}"
_PURPOSE_RE = re.compile(rf"(?:tmk:{_TERMINAL_ID}|sm2:(?:clearing|{_TERMINAL_ID}))")


class KeyStoreError(CryptoError):
    """The key store refused an operation: wrong KEK, tampered or malformed file, unknown or destroyed key."""


@dataclass(frozen=True)
class KeyInfo:
    """What may be shown about a stored key: metadata and KCV, never the key."""

    purpose: str
    version: int
    kind: str
    suite: str
    kcv: str
    status: str
    created_at: str
    public_key: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "purpose": self.purpose, "version": self.version, "kind": self.kind, "suite": self.suite,
            "kcv": self.kcv, "status": self.status, "created_at": self.created_at, "public_key": self.public_key,
        }


def validate_purpose(purpose: str) -> str:
    """Return ``purpose`` if it names a key this store holds, else raise KeyStoreError."""
    if purpose in ISSUER_PURPOSES or _PURPOSE_RE.fullmatch(purpose):
        return purpose
    raise KeyStoreError(f"unknown key purpose {purpose!r}: expected one of {', '.join(ISSUER_PURPOSES)}, "
                        "tmk:<terminal id>, sm2:clearing or sm2:<terminal id>")


def sm2_purpose(name: str) -> str:
    """``clearing`` → ``sm2:clearing``; an already prefixed name is kept."""
    return validate_purpose(name if name.startswith("sm2:") else f"sm2:{name}")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


@dataclass
class _Entry:
    purpose: str
    version: int
    kind: str
    suite: str
    kcv: str
    status: str
    created_at: str
    public_key: str | None = None
    nonce: str | None = None
    ciphertext: str | None = None

    def aad(self, store_id: str) -> bytes:
        return _canonical({
            "store_id": store_id, "purpose": self.purpose, "version": self.version, "kind": self.kind,
            "suite": self.suite, "kcv": self.kcv, "public_key": self.public_key, "created_at": self.created_at,
        })

    def info(self) -> KeyInfo:
        return KeyInfo(self.purpose, self.version, self.kind, self.suite, self.kcv, self.status, self.created_at,
                       self.public_key)

    def to_json(self) -> dict[str, Any]:
        return {**self.info().to_dict(), "nonce": self.nonce, "ciphertext": self.ciphertext}

    @classmethod
    def from_json(cls, doc: Any) -> _Entry:
        if not isinstance(doc, dict):
            raise KeyStoreError("key store entry is not an object")
        try:
            e = cls(**{k: doc[k] for k in ("purpose", "version", "kind", "suite", "kcv", "status", "created_at")},
                    public_key=doc.get("public_key"), nonce=doc.get("nonce"), ciphertext=doc.get("ciphertext"))
        except (KeyError, TypeError):
            raise KeyStoreError("key store entry lacks a field") from None
        if type(e.version) is not int or not 1 <= e.version <= MAX_KEY_VERSION:
            raise KeyStoreError("key store entry version out of range")
        if not isinstance(e.purpose, str) or e.status not in STATUSES or e.kind not in (KIND_SYMMETRIC, KIND_SM2):
            raise KeyStoreError("key store entry metadata malformed")
        validate_purpose(e.purpose)
        return e


class _Sealer:
    """SM4-GCM sealing and the file HMAC, keyed from the KEK. Holds only derived keys, in wipeable buffers."""

    def __init__(self, kek: bytes, store_id: str) -> None:
        if len(kek) != KEK_BYTES:
            raise KeyStoreError(f"the key-encryption key is {KEK_BYTES} bytes")
        salt = store_id.encode()
        self._enc = bytearray(HKDF(hashes.SM3(), 16, salt, b"carepay keystore sm4-gcm").derive(bytes(kek)))
        self._mac = bytearray(HKDF(hashes.SM3(), 32, salt, b"carepay keystore hmac-sm3").derive(bytes(kek)))

    def __repr__(self) -> str:
        return "_Sealer(<hidden>)"

    def seal(self, plaintext: bytes, aad: bytes) -> tuple[str, str]:
        nonce = os.urandom(GCM_NONCE_BYTES)
        enc = Cipher(algorithms.SM4(bytes(self._enc)), modes.GCM(nonce)).encryptor()
        enc.authenticate_additional_data(aad)
        ct = enc.update(plaintext) + enc.finalize()
        return nonce.hex(), (ct + enc.tag).hex()

    def open(self, nonce_hex: str, ct_hex: str, aad: bytes) -> bytes:
        try:
            nonce, blob = bytes.fromhex(nonce_hex), bytes.fromhex(ct_hex)
            if len(nonce) != GCM_NONCE_BYTES or len(blob) <= GCM_TAG_BYTES:
                raise ValueError
            dec = Cipher(algorithms.SM4(bytes(self._enc)),
                         modes.GCM(nonce, blob[-GCM_TAG_BYTES:])).decryptor()
            dec.authenticate_additional_data(aad)
            return dec.update(blob[:-GCM_TAG_BYTES]) + dec.finalize()
        except (InvalidTag, ValueError, TypeError):
            raise KeyStoreError("key store entry failed authentication (tampered file or wrong KEK)") from None

    def mac(self, body: bytes) -> str:
        h = crypto_hmac.HMAC(bytes(self._mac), hashes.SM3())
        h.update(body)
        return h.finalize().hex()

    def wipe(self) -> None:
        for buf in (self._enc, self._mac):
            buf[:] = bytes(len(buf))


@dataclass
class _State:
    header: dict[str, Any]
    entries: list[_Entry]

    def body(self) -> dict[str, Any]:
        return {**self.header, "entries": [e.to_json() for e in self.entries]}


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: Path, data: bytes, scrub_old: bool = False) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, rename, fsync dir); mode 0600.

    With ``scrub_old`` the replaced file's blocks are overwritten with zeros after the rename.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    old_fd: int | None = None
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if scrub_old and path.exists():
            old_fd = os.open(path, os.O_WRONLY)
        os.replace(tmp, path)
        _fsync_dir(path)
        if old_fd is not None:
            size = os.fstat(old_fd).st_size
            os.pwrite(old_fd, bytes(size), 0)
            os.fsync(old_fd)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise KeyStoreError(f"cannot write key store {path}: {exc.strerror}") from None
    finally:
        if old_fd is not None:
            os.close(old_fd)


class KeyStore:
    """An open key store. Create with :meth:`create`, open with :meth:`open` (or :meth:`from_components`)."""

    def __init__(self, path: Path, sealer: _Sealer, state: _State) -> None:
        self._path = path
        self._sealer = sealer
        self._state = state
        self._batch_depth = 0
        self._batch_dirty = False
        self._batch_scrub = False

    def __repr__(self) -> str:
        return f"KeyStore(path={str(self._path)!r}, entries={len(self._state.entries)})"

    __str__ = __repr__

    # --- opening

    @property
    def path(self) -> Path:
        return self._path

    @property
    def store_id(self) -> str:
        return str(self._state.header["store_id"])

    @property
    def kek_kcv(self) -> str:
        return str(self._state.header["kek_kcv"])

    @classmethod
    def create(cls, path: str | Path, kek: bytes) -> KeyStore:
        """A new, empty store at ``path`` (which must not exist) sealed under ``kek``."""
        p = Path(path)
        if p.exists():
            raise KeyStoreError(f"key store {p} already exists; refusing to overwrite")
        kek = bytes(kek)
        if len(kek) != KEK_BYTES:
            raise KeyStoreError(f"the key-encryption key is {KEK_BYTES} bytes")
        header = {
            "format": STORE_FORMAT, "format_version": STORE_FORMAT_VERSION, "store_id": str(uuid.uuid4()),
            "created_at": _now(), "kek_kcv": kcv_hex(kek), "kdf": "hkdf-sm3", "aead": "sm4-gcm",
            "mac_alg": "hmac-sm3",
        }
        store = cls(p, _Sealer(kek, header["store_id"]), _State(header, []))
        with store._locked():
            if p.exists():
                raise KeyStoreError(f"key store {p} already exists; refusing to overwrite")
            store._write()
        log.info("keystore created path=%s kek_kcv=%s", p, header["kek_kcv"])
        return store

    @classmethod
    def open(cls, path: str | Path, kek: bytes) -> KeyStore:
        """Open and verify an existing store. Wrong KEK or any tampering raises KeyStoreError."""
        p = Path(path)
        kek = bytes(kek)
        if len(kek) != KEK_BYTES:
            raise KeyStoreError(f"the key-encryption key is {KEK_BYTES} bytes")
        header = _read_header(p)
        if not hmac.compare_digest(kcv_hex(kek), header["kek_kcv"]):
            raise KeyStoreError(f"wrong key-encryption key for {p}: its KCV is {kcv_hex(kek)}, "
                                f"the store was sealed under KCV {header['kek_kcv']}")
        store = cls(p, _Sealer(kek, header["store_id"]), _State(header, []))
        store._state = store._load()
        return store

    @classmethod
    def from_components(cls, path: str | Path, component_files: Sequence[str | Path]) -> KeyStore:
        """Open a store with the KEK rebuilt from 2 or 3 officers' component files."""
        comps: list[KeyComponent] = [read_component_file(f) for f in component_files]
        return cls.open(path, combine(comps))

    @classmethod
    def from_env(cls, path: str | Path | None = None) -> KeyStore:
        """Open ``path`` (or ``$CAREPAY_KEYSTORE_PATH``) with the files in ``$CAREPAY_KEY_COMPONENTS`` (a,b[,c])."""
        store_path = path or os.environ.get(ENV_STORE_PATH, "")
        files = [f.strip() for f in os.environ.get(ENV_COMPONENTS, "").split(",") if f.strip()]
        if not store_path:
            raise KeyStoreError(f"no key store path: pass one or set {ENV_STORE_PATH}")
        if not files:
            raise KeyStoreError(f"no key components: set {ENV_COMPONENTS} to the component files, comma-separated")
        return cls.from_components(store_path, files)

    def close(self) -> None:
        """Wipe the derived keys held in memory; the object is unusable afterwards."""
        self._sealer.wipe()

    def __enter__(self) -> KeyStore:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # --- reading

    def list(self) -> list[KeyInfo]:
        """Metadata and KCV of every entry, sorted by purpose and version."""
        return [e.info() for e in sorted(self._state.entries, key=lambda e: (e.purpose, e.version))]

    def versions(self, purpose: str) -> list[int]:
        return sorted(e.version for e in self._state.entries if e.purpose == purpose)

    def active_version(self, purpose: str) -> int:
        for e in self._state.entries:
            if e.purpose == purpose and e.status == STATUS_ACTIVE:
                return e.version
        raise KeyStoreError(f"no active key for purpose {purpose!r}")

    def info(self, purpose: str, version: int | None = None) -> KeyInfo:
        return self._find(purpose, version).info()

    def get_symmetric(self, purpose: str, version: int | None = None) -> bytes:
        """The key for ``purpose`` (the active version unless ``version`` is given; retired versions stay usable)."""
        e = self._find(purpose, version)
        if e.kind != KIND_SYMMETRIC:
            raise KeyStoreError(f"{purpose!r} is an SM2 key pair, not a symmetric key")
        key = self._open_entry(e)
        if not hmac.compare_digest(kcv(key, Suite.parse(e.suite)).hex().upper(), e.kcv):
            raise KeyStoreError(f"key {purpose!r} version {e.version} does not match its KCV")
        return key

    def get_sm2(self, name: str, version: int | None = None) -> SM2KeyPair:
        """The SM2 key pair ``name`` (``clearing``, a terminal id, or ``sm2:…``)."""
        e = self._find(sm2_purpose(name), version)
        private = self._open_entry(e)
        if len(private) != PRIVATE_KEY_BYTES or e.public_key is None:
            raise KeyStoreError(f"SM2 entry {e.purpose!r} version {e.version} malformed")
        return SM2KeyPair(public_key=bytes.fromhex(e.public_key), private_key=private)

    def issuer_key_set(self, suite: Suite | str | None = None) -> IssuerKeySet:
        """All usable versions of the issuer master keys as an :class:`IssuerKeySet`.

        ``current_version`` is the highest version at which every purpose has a usable (not zeroized) key:
        the version new cards get. Lower versions stay in the set so old-version cards keep working.
        """
        entries = [e for e in self._state.entries
                   if e.purpose in ISSUER_PURPOSES and e.kind == KIND_SYMMETRIC and e.status != STATUS_ZEROIZED]
        if suite is None:
            suites = {e.suite for e in entries if e.status == STATUS_ACTIVE}
            if len(suites) != 1:
                raise KeyStoreError("issuer keys: no single active suite in the store; name the suite")
            chosen = Suite.parse(suites.pop())
        else:
            chosen = Suite.parse(suite)
        entries = [e for e in entries if e.suite == chosen.value]
        usable = {(e.purpose, e.version) for e in entries}
        complete = [v for v in {e.version for e in entries}
                    if all((p, v) in usable for p in ISSUER_PURPOSES)]
        if not complete:
            raise KeyStoreError("issuer keys: no version has a key for every purpose "
                                f"({', '.join(ISSUER_PURPOSES)})")
        ks = IssuerKeySet(suite=chosen, current_version=max(complete))
        for e in entries:
            ks.put(e.purpose, e.version, self.get_symmetric(e.purpose, e.version))
        return ks

    # --- writing

    def put_symmetric(self, purpose: str, key: bytes, suite: Suite | str, version: int | None = None) -> int:
        """Store a symmetric key; returns its version. A new highest version becomes active, the old one retired."""
        validate_purpose(purpose)
        s = Suite.parse(suite)
        key = bytes(key)
        if len(key) != SYMMETRIC_KEY_BYTES:
            raise KeyStoreError(f"symmetric keys are {SYMMETRIC_KEY_BYTES} bytes, got {len(key)}")
        if purpose.startswith("sm2:"):
            raise KeyStoreError("sm2: purposes hold SM2 key pairs; use put_sm2")
        return self._add(purpose, version, KIND_SYMMETRIC, s.value, kcv(key, s).hex().upper(), None, key)

    def put_sm2(self, name: str, pair: SM2KeyPair, version: int | None = None) -> int:
        """Store an SM2 key pair under ``sm2:<name>``; returns its version."""
        purpose = sm2_purpose(name)
        if len(pair.private_key) != PRIVATE_KEY_BYTES:
            raise KeyStoreError(f"SM2 private keys are {PRIVATE_KEY_BYTES} bytes")
        pub = normalize_public_key(pair.public_key)
        return self._add(purpose, version, KIND_SM2, "sm2", sm3(pub)[:3].hex().upper(), pub.hex().upper(),
                         bytes(pair.private_key))

    def generate_symmetric(self, purpose: str, suite: Suite | str) -> int:
        """A fresh random key (os.urandom) for ``purpose``; returns its version."""
        return self.put_symmetric(purpose, os.urandom(SYMMETRIC_KEY_BYTES), suite)

    def generate_sm2(self, name: str) -> int:
        """A fresh SM2 key pair under ``sm2:<name>``; returns its version."""
        return self.put_sm2(name, SM2KeyPair.generate())

    def rotate(self, purpose: str) -> int:
        """A new random key (or SM2 pair) as the next version; the old version stays usable, status retired.

        ``issuer`` rotates every issuer purpose to one common new version (cards carry one key version).
        """
        if purpose == ISSUER_GROUP:
            current = [e for e in self._state.entries if e.purpose in ISSUER_PURPOSES and e.status == STATUS_ACTIVE]
            if not current:
                raise KeyStoreError("no active issuer keys to rotate")
            suite = current[0].suite
            new_version = 1 + max(e.version for e in self._state.entries if e.purpose in ISSUER_PURPOSES)
            fresh = {p: os.urandom(SYMMETRIC_KEY_BYTES) for p in ISSUER_PURPOSES}

            def add_all(state: _State) -> None:
                for p, key in fresh.items():
                    self._add_to(state, p, new_version, KIND_SYMMETRIC, suite,
                                 kcv(key, Suite.parse(suite)).hex().upper(), None, key)

            self._mutate(add_all)
            log.info("keystore rotate path=%s purpose=%s version=%d", self._path, ISSUER_GROUP, new_version)
            return new_version
        validate_purpose(purpose)
        current_entry = self._find(purpose, None)
        if current_entry.kind == KIND_SM2:
            return self.generate_sm2(purpose)
        return self.generate_symmetric(purpose, current_entry.suite)

    def zeroize(self, purpose: str | None = None) -> list[KeyInfo]:
        """Destroy the material of every version of ``purpose`` (all keys when None); returns what was zeroized.

        ``issuer`` names all issuer purposes. The file is rewritten and its old blocks overwritten.
        """
        if purpose is None:
            targets: set[str] | None = None
        elif purpose == ISSUER_GROUP:
            targets = set(ISSUER_PURPOSES)
        else:
            targets = {validate_purpose(purpose)}
        done: list[KeyInfo] = []

        def wipe(state: _State) -> None:
            for e in state.entries:
                if (targets is None or e.purpose in targets) and e.status != STATUS_ZEROIZED:
                    e.status, e.nonce, e.ciphertext = STATUS_ZEROIZED, None, None
                    done.append(e.info())

        if targets is not None and not any(e.purpose in targets for e in self._state.entries):
            raise KeyStoreError(f"no key for purpose {purpose!r}")
        self._mutate(wipe, scrub_old=True)
        clear_context_cache()
        log.info("keystore zeroize path=%s purpose=%s count=%d", self._path, purpose or "*", len(done))
        return done

    # --- internals

    def _find(self, purpose: str, version: int | None) -> _Entry:
        validate_purpose(purpose)
        matches = [e for e in self._state.entries if e.purpose == purpose]
        if version is None:
            matches = [e for e in matches if e.status == STATUS_ACTIVE]
            if not matches:
                if any(e.purpose == purpose for e in self._state.entries):
                    raise KeyStoreError(f"no active key for purpose {purpose!r} (retired or zeroized)")
                raise KeyStoreError(f"no key for purpose {purpose!r}")
        else:
            matches = [e for e in matches if e.version == version]
            if not matches:
                raise KeyStoreError(f"no key for purpose {purpose!r} version {version}")
        e = matches[0]
        if e.status == STATUS_ZEROIZED:
            raise KeyStoreError(f"key {purpose!r} version {e.version} was zeroized")
        return e

    def _open_entry(self, e: _Entry) -> bytes:
        if e.nonce is None or e.ciphertext is None:
            raise KeyStoreError(f"key {e.purpose!r} version {e.version} has no material")
        return self._sealer.open(e.nonce, e.ciphertext, e.aad(self.store_id))

    def _add(self, purpose: str, version: int | None, kind: str, suite: str, kcv_: str, public_key: str | None,
             material: bytes) -> int:
        result: list[int] = []
        self._mutate(lambda st: result.append(self._add_to(st, purpose, version, kind, suite, kcv_, public_key,
                                                           material)))
        log.info("keystore put path=%s purpose=%s version=%d kcv=%s", self._path, purpose, result[0], kcv_)
        return result[0]

    def _add_to(self, state: _State, purpose: str, version: int | None, kind: str, suite: str, kcv_: str,
                public_key: str | None, material: bytes) -> int:
        same = [e for e in state.entries if e.purpose == purpose]
        if same and any(e.kind != kind for e in same):
            raise KeyStoreError(f"purpose {purpose!r} holds {same[0].kind} keys")
        highest = max((e.version for e in same), default=0)
        v = highest + 1 if version is None else version
        if type(v) is not int or not 1 <= v <= MAX_KEY_VERSION:
            raise KeyStoreError(f"key version must be 1..{MAX_KEY_VERSION}")
        if any(e.version == v for e in same):
            raise KeyStoreError(f"key {purpose!r} version {v} already exists; keys are never overwritten")
        status = STATUS_ACTIVE if v > highest else STATUS_RETIRED
        if status == STATUS_ACTIVE:
            for e in same:
                if e.status == STATUS_ACTIVE:
                    e.status = STATUS_RETIRED
        entry = _Entry(purpose, v, kind, suite, kcv_, status, _now(), public_key)
        entry.nonce, entry.ciphertext = self._sealer.seal(material, entry.aad(self.store_id))
        state.entries.append(entry)
        return v

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        lock_path = self._path.with_name(self._path.name + ".lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise KeyStoreError(f"cannot lock key store {self._path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _mutate(self, change: Callable[[_State], None], scrub_old: bool = False) -> None:
        if self._batch_depth:
            change(self._state)  # the batch holds the lock and wrote nothing yet: one write at its end
            self._batch_dirty = True
            self._batch_scrub = self._batch_scrub or scrub_old
            return
        with self._locked():
            state = self._load()  # re-read under the lock: another officer may have written meanwhile
            change(state)
            self._state = state
            self._write(scrub_old=scrub_old)

    @contextlib.contextmanager
    def batch(self) -> Iterator[KeyStore]:
        """Group many puts (e.g. installing a fleet's TMKs and SM2 pairs) into one locked read and one write.

        If the block raises, nothing is written and the in-memory state is re-read from the file.
        """
        if self._batch_depth:
            self._batch_depth += 1
            try:
                yield self
            finally:
                self._batch_depth -= 1
            return
        with self._locked():
            self._state = self._load()
            self._batch_depth, self._batch_dirty, self._batch_scrub = 1, False, False
            try:
                yield self
            except BaseException:
                self._batch_depth = 0
                self._state = self._load()
                raise
            self._batch_depth = 0
            if self._batch_dirty:
                self._write(scrub_old=self._batch_scrub)

    def _write(self, scrub_old: bool = False) -> None:
        body = self._state.body()
        doc = {**body, "mac": self._sealer.mac(_canonical(body))}
        atomic_write(self._path, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode(), scrub_old)

    def _load(self) -> _State:
        doc = _read_doc(self._path)
        mac = doc.pop("mac", None)
        if not isinstance(mac, str) or not hmac.compare_digest(self._sealer.mac(_canonical(doc)), mac):
            raise KeyStoreError(f"key store {self._path} failed its integrity check (tampered file or wrong KEK)")
        if doc.get("store_id") != self.store_id or doc.get("kek_kcv") != self.kek_kcv:
            raise KeyStoreError(f"key store {self._path} was replaced by another store")
        entries_doc = doc.pop("entries", None)
        if not isinstance(entries_doc, list):
            raise KeyStoreError("key store entries malformed")
        entries = [_Entry.from_json(x) for x in entries_doc]
        if len({(e.purpose, e.version) for e in entries}) != len(entries):
            raise KeyStoreError("key store holds a duplicate (purpose, version)")
        return _State(doc, entries)


def _read_doc(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_STORE_FILE_BYTES + 1)
    except FileNotFoundError:
        raise KeyStoreError(f"no key store at {path}") from None
    except OSError as exc:
        raise KeyStoreError(f"cannot read key store {path}: {exc.strerror}") from None
    if len(raw) > MAX_STORE_FILE_BYTES:
        raise KeyStoreError(f"key store {path} larger than {MAX_STORE_FILE_BYTES} bytes")
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise KeyStoreError(f"key store {path} is not JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != STORE_FORMAT:
        raise KeyStoreError(f"{path} is not a {STORE_FORMAT} file")
    if doc.get("format_version") != STORE_FORMAT_VERSION:
        raise KeyStoreError(f"{path}: unsupported key store version {doc.get('format_version')!r}")
    return doc


_KCV_RE = re.compile(r"[0-9A-F]{6}")


def _read_header(path: Path) -> dict[str, Any]:
    doc = _read_doc(path)
    for k in ("store_id", "kek_kcv"):
        if not isinstance(doc.get(k), str):
            raise KeyStoreError(f"key store {path} header lacks {k}")
    if not _KCV_RE.fullmatch(doc["kek_kcv"]):  # compared with hmac.compare_digest and shown in errors
        raise KeyStoreError(f"key store {path} header has a malformed kek_kcv (6 hex digits expected)")
    return doc
