"""SM3 hash (GB/T 32905-2016) through OpenSSL."""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes

SM3_DIGEST_BYTES = 32


def sm3(data: bytes) -> bytes:
    """SM3 digest.

    >>> sm3(b"abc").hex().upper()
    '66C7F0F462EEEDD9D1F2D46BDC10E4E24167C4875CF2F7A2297DA02B8F4BA8E0'
    """
    h = hashes.Hash(hashes.SM3())
    h.update(data)
    return h.finalize()


class SM3Hasher:
    """Incremental SM3 over a stream (files, audit chains)."""

    def __init__(self) -> None:
        self._h = hashes.Hash(hashes.SM3())

    def update(self, data: bytes) -> None:
        self._h.update(data)

    def digest(self) -> bytes:
        return self._h.copy().finalize()
