"""Report signatures (报表签名): an SM3 digest and an SM2 signature beside every report file.

``PATH.sig.json`` holds::

    {"format": "carepay-report-signature", "version": 1, "file": "<name>", "size": <bytes>,
     "digest_sm3": "<hex>", "algorithm": "SM2-with-SM3", "user_id": "1234567812345678",
     "public_key": "<hex X‖Y>", "signer": "clearing", "signed_at": "<UTC ISO>", "signature": "<hex r‖s>"}

The signature covers the canonical JSON of every field except ``signature``
(so the digest, size, name, signer and time are all bound). Verification
re-hashes the file, checks the signature and — when a trusted public key is
known (the key store's or the data directory's clearing key) — that the
signer's key is that one, so a forger cannot simply re-sign with his own key.

The clearing key comes from the key store (``sm2:clearing``) when one is given,
else from a key pair persisted in the data directory (``keys/clearing_sm2.json``,
mode 0600, created on first use). The private key never leaves this module.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum
from pathlib import Path
from typing import Any

from keys.sm2 import DEFAULT_USER_ID, SM2KeyPair
from keys.sm2 import verify as sm2_verify
from keys.sm3 import SM3Hasher

SIG_SUFFIX = ".sig.json"
SIG_FORMAT = "carepay-report-signature"
SIG_FORMAT_VERSION = 1
DATA_DIR_KEY_FILE = "keys/clearing_sm2.json"
READ_CHUNK_BYTES = 1 << 20
MAX_SIG_FILE_BYTES = 64 * 1024


class VerifyStatus(IntEnum):
    """Exit codes of ``carepay report verify``."""

    INTACT = 0
    TAMPERED = 1
    MISSING = 2


@dataclass(frozen=True)
class VerifyResult:
    status: VerifyStatus
    reason: str
    digest_sm3: str = ""
    signer: str = ""

    @property
    def ok(self) -> bool:
        return self.status is VerifyStatus.INTACT


def sig_path(path: Path) -> Path:
    """Where the signature of ``path`` lives."""
    return path.with_name(path.name + SIG_SUFFIX)


def file_sm3(path: Path) -> str:
    """SM3 of a file's bytes, hex (streamed)."""
    h = SM3Hasher()
    with path.open("rb") as fh:
        while chunk := fh.read(READ_CHUNK_BYTES):
            h.update(chunk)
    return h.digest().hex()


def canonical(obj: Any) -> bytes:
    """Canonical JSON: sorted keys, no spaces, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


class ReportSigner:
    """Signs report files with the clearing SM2 key pair."""

    def __init__(self, pair: SM2KeyPair, signer: str = "clearing") -> None:
        self._pair = pair
        self.signer = signer

    def __repr__(self) -> str:
        return f"ReportSigner(signer={self.signer!r}, public_key={self.public_key_hex[:16]}…)"

    @property
    def public_key_hex(self) -> str:
        return self._pair.public_key.hex()

    def sign_bytes(self, message: bytes) -> bytes:
        return self._pair.sign(message)

    def sign_file(self, path: Path) -> Path:
        """Write ``PATH.sig.json`` for ``path``; returns the signature file's path."""
        doc: dict[str, Any] = {
            "format": SIG_FORMAT,
            "version": SIG_FORMAT_VERSION,
            "file": path.name,
            "size": path.stat().st_size,
            "digest_sm3": file_sm3(path),
            "algorithm": "SM2-with-SM3",
            "user_id": DEFAULT_USER_ID.decode(),
            "public_key": self.public_key_hex,
            "signer": self.signer,
            "signed_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        doc["signature"] = self._pair.sign(canonical(doc)).hex()
        out = sig_path(path)
        out.write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        return out


def load_data_dir_key(data_dir: Path, create: bool = True) -> SM2KeyPair | None:
    """The clearing key pair persisted in the data directory (created with mode 0600 when absent)."""
    path = data_dir / DATA_DIR_KEY_FILE
    if path.is_file():
        doc = json.loads(path.read_text(encoding="utf-8"))
        return SM2KeyPair(public_key=bytes.fromhex(doc["public_key"]), private_key=bytes.fromhex(doc["private_key"]))
    if not create:
        return None
    pair = SM2KeyPair.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        json.dump({"purpose": "sm2:clearing", "public_key": pair.public_key.hex(), "private_key": pair.private_key.hex()}, fh)
    return pair


def signer_for(data_dir: Path, keystore: Any | None = None) -> ReportSigner:
    """The report signer: the key store's ``sm2:clearing`` when a store is given, else the data-dir key."""
    if keystore is not None:
        return ReportSigner(keystore.get_sm2("clearing"), signer="keystore:sm2:clearing")
    pair = load_data_dir_key(data_dir, create=True)
    assert pair is not None
    return ReportSigner(pair, signer="data-dir:sm2:clearing")


def trusted_public_key(data_dir: Path | None, keystore: Any | None = None) -> str | None:
    """The clearing public key (hex) a verifier should trust, when one is at hand."""
    if keystore is not None:
        return keystore.get_sm2("clearing").public_key.hex()
    if data_dir is not None:
        pair = load_data_dir_key(data_dir, create=False)
        if pair is not None:
            return pair.public_key.hex()
    return None


def verify_file(path: Path, trusted_key_hex: str | None = None) -> VerifyResult:
    """Check ``path`` against ``PATH.sig.json``: MISSING when either is absent, TAMPERED on any mismatch."""
    sp = sig_path(path)
    if not path.is_file():
        return VerifyResult(VerifyStatus.MISSING, f"report {path} not found")
    if not sp.is_file():
        return VerifyResult(VerifyStatus.MISSING, f"signature {sp.name} not found")
    try:
        if sp.stat().st_size > MAX_SIG_FILE_BYTES:
            raise ValueError("signature file too large")
        doc = json.loads(sp.read_text(encoding="utf-8"))
        signature = bytes.fromhex(doc.pop("signature"))
        public_key = bytes.fromhex(doc["public_key"])
        want_digest = str(doc["digest_sm3"])
        if doc.get("format") != SIG_FORMAT:
            raise ValueError("not a carepay signature file")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        return VerifyResult(VerifyStatus.TAMPERED, f"signature file malformed: {type(exc).__name__}")
    actual = file_sm3(path)
    if actual != want_digest:
        return VerifyResult(VerifyStatus.TAMPERED, "SM3 digest differs: the report was changed", actual)
    if doc.get("size") != path.stat().st_size:
        return VerifyResult(VerifyStatus.TAMPERED, "size differs from the signed size", actual)
    if not sm2_verify(public_key, canonical(doc), signature):
        return VerifyResult(VerifyStatus.TAMPERED, "SM2 signature does not verify", actual)
    if trusted_key_hex is not None and public_key.hex().lower() != trusted_key_hex.lower():
        return VerifyResult(VerifyStatus.TAMPERED, "signed by a key that is not the clearing key", actual)
    return VerifyResult(VerifyStatus.INTACT, "intact", actual, str(doc.get("signer", "")))
