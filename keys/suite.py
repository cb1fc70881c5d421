"""Crypto suites (算法套件): one interface over SM4 (国密, 16-byte blocks) and 3DES (legacy PBOC, 8-byte blocks).

Every primitive that depends on the block cipher takes a :class:`Suite`. The
ciphers come from ``cryptography`` (OpenSSL), so SM4 runs at C speed.

Hot path: building an OpenSSL cipher context costs about ten times one block
of SM4, so each thread keeps its ECB and CBC contexts per key (bounded by
``KEY_CACHE_ENTRIES``) and reuses them. ECB contexts are stateless between
whole blocks; a CBC context carries its last output block as the chaining
value, which the caller folds into the first input block to restart the chain
from any IV (``C1 = E(P1 ⊕ IV)`` = ``E((P1 ⊕ IV ⊕ prev) ⊕ prev)``).
"""

from __future__ import annotations

import enum
import threading
from functools import lru_cache

from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes

SM4_BLOCK_BYTES = 16
DES_BLOCK_BYTES = 8
KEY_CACHE_ENTRIES = 4096


class CryptoError(Exception):
    """A cryptographic operation was refused (wrong length, bad suite). Never carries key bytes."""


class Suite(enum.StrEnum):
    """The two card crypto suites: ``sm4`` (default) and ``3des`` (old-program PBOC cards)."""

    SM4 = "sm4"
    DES3 = "3des"

    @property
    def block_bytes(self) -> int:
        return _BLOCK_BYTES[self._value_]  # a dict lookup: ``Suite.SM4`` through the enum class costs more

    @classmethod
    def parse(cls, value: str | Suite) -> Suite:
        try:
            return cls(str(value).lower())
        except ValueError:
            raise CryptoError(f"unknown crypto suite {value!r}; expected 'sm4' or '3des'") from None


SM4 = Suite.SM4
DES3 = Suite.DES3
_BLOCK_BYTES = {"sm4": SM4_BLOCK_BYTES, "3des": DES_BLOCK_BYTES}


def _des3_key(key: bytes) -> bytes:
    """Normalise an 8/16/24-byte DES key to the 24-byte K1‖K2‖K3 form ``cryptography`` wants."""
    if len(key) == 8:
        return key * 3
    if len(key) == 16:
        return key + key[:8]
    if len(key) == 24:
        return key
    raise CryptoError(f"3DES key must be 8, 16 or 24 bytes, got {len(key)}")


@lru_cache(maxsize=KEY_CACHE_ENTRIES)
def _ecb(suite: Suite, key: bytes) -> Cipher:
    if suite is Suite.SM4:
        if len(key) != 16:
            raise CryptoError(f"SM4 key must be 16 bytes, got {len(key)}")
        return Cipher(algorithms.SM4(key), modes.ECB())
    return Cipher(TripleDES(_des3_key(key)), modes.ECB())


def _check_blocks(suite: Suite, data: bytes) -> None:
    if len(data) % suite.block_bytes:
        raise CryptoError(f"{suite.value} data must be a multiple of {suite.block_bytes} bytes, got {len(data)}")


class _Contexts(threading.local):
    """Per-thread cipher contexts keyed by (suite, key): ECB encryptors/decryptors and CBC encryptors."""

    def __init__(self) -> None:
        self.ecb_enc: dict[tuple[Suite, bytes], CipherContext] = {}
        self.ecb_dec: dict[tuple[Suite, bytes], CipherContext] = {}
        self.cbc_enc: dict[tuple[Suite, bytes], list] = {}


_CTX = _Contexts()


def clear_context_cache() -> None:
    """Drop this thread's cached cipher contexts and the shared Cipher cache (after zeroisation)."""
    _CTX.ecb_enc.clear()
    _CTX.ecb_dec.clear()
    _CTX.cbc_enc.clear()
    _ecb.cache_clear()


def _bounded(cache: dict) -> dict:
    if len(cache) >= KEY_CACHE_ENTRIES:
        cache.clear()
    return cache


def _ecb_encryptor(suite: Suite, key: bytes) -> CipherContext:
    ck = (suite, key)
    ctx = _CTX.ecb_enc.get(ck)
    if ctx is None:
        ctx = _bounded(_CTX.ecb_enc)[ck] = _ecb(suite, key).encryptor()
    return ctx


def _ecb_decryptor(suite: Suite, key: bytes) -> CipherContext:
    ck = (suite, key)
    ctx = _CTX.ecb_dec.get(ck)
    if ctx is None:
        ctx = _bounded(_CTX.ecb_dec)[ck] = _ecb(suite, key).decryptor()
    return ctx


def encrypt_ecb(key: bytes, data: bytes, suite: Suite = SM4) -> bytes:
    """Raw ECB encryption (no padding) with the suite's block cipher.

    >>> encrypt_ecb(bytes.fromhex("0123456789ABCDEFFEDCBA9876543210"),
    ...             bytes.fromhex("0123456789ABCDEFFEDCBA9876543210")).hex().upper()
    '681EDF34D206965E86B3E94F536E4246'
    """
    if len(data) % suite.block_bytes:
        _check_blocks(suite, data)
    return _ecb_encryptor(suite, bytes(key)).update(data)


def decrypt_ecb(key: bytes, data: bytes, suite: Suite = SM4) -> bytes:
    """Raw ECB decryption (no padding).

    >>> decrypt_ecb(bytes.fromhex("0123456789ABCDEFFEDCBA9876543210"),
    ...             bytes.fromhex("681EDF34D206965E86B3E94F536E4246")).hex().upper()
    '0123456789ABCDEFFEDCBA9876543210'
    """
    if len(data) % suite.block_bytes:
        _check_blocks(suite, data)
    return _ecb_decryptor(suite, bytes(key)).update(data)


def _cbc(suite: Suite, key: bytes, iv: bytes) -> Cipher:
    if len(iv) != suite.block_bytes:
        raise CryptoError(f"{suite.value} IV must be {suite.block_bytes} bytes, got {len(iv)}")
    if suite is Suite.SM4:
        if len(key) != 16:
            raise CryptoError(f"SM4 key must be 16 bytes, got {len(key)}")
        return Cipher(algorithms.SM4(key), modes.CBC(iv))
    return Cipher(TripleDES(_des3_key(key)), modes.CBC(iv))


def encrypt_cbc(key: bytes, data: bytes, iv: bytes | None = None, suite: Suite = SM4) -> bytes:
    """Raw CBC encryption (no padding); IV defaults to zeros.

    >>> encrypt_cbc(bytes(16), bytes(32)).hex().upper()[:32] == encrypt_ecb(bytes(16), bytes(16)).hex().upper()
    True
    """
    block = suite.block_bytes
    _check_blocks(suite, data)
    if not iv:
        iv = bytes(block)
    elif len(iv) != block:
        raise CryptoError(f"{suite.value} IV must be {block} bytes, got {len(iv)}")
    if not data:
        return b""
    key = bytes(key)
    ck = (suite, key)
    slot = _CTX.cbc_enc.get(ck)
    if slot is None:
        zero = bytes(block)
        slot = _bounded(_CTX.cbc_enc)[ck] = [_cbc(suite, key, zero).encryptor(), zero]
    ctx, prev = slot
    first = (int.from_bytes(data[:block], "big") ^ int.from_bytes(iv, "big") ^ int.from_bytes(prev, "big"))
    out = ctx.update(first.to_bytes(block, "big") + data[block:])
    slot[1] = out[-block:]
    return out


def decrypt_cbc(key: bytes, data: bytes, iv: bytes | None = None, suite: Suite = SM4) -> bytes:
    """Raw CBC decryption (no padding); IV defaults to zeros. P = D(C) ⊕ (IV ‖ C[:-1 block]).

    >>> k = bytes(range(16)); decrypt_cbc(k, encrypt_cbc(k, bytes(48), bytes(16))) == bytes(48)
    True
    """
    block = suite.block_bytes
    _check_blocks(suite, data)
    if not iv:
        iv = bytes(block)
    elif len(iv) != block:
        raise CryptoError(f"{suite.value} IV must be {block} bytes, got {len(iv)}")
    if not data:
        return b""
    raw = decrypt_ecb(key, data, suite)
    chain = iv + data[:-block]
    return (int.from_bytes(raw, "big") ^ int.from_bytes(chain, "big")).to_bytes(len(data), "big")


def des_encrypt_block(key8: bytes, block: bytes) -> bytes:
    """Single DES on one 8-byte block (as 3DES with K‖K‖K)."""
    if len(key8) != 8:
        raise CryptoError(f"DES key must be 8 bytes, got {len(key8)}")
    return encrypt_ecb(key8, block, DES3)


def des_decrypt_block(key8: bytes, block: bytes) -> bytes:
    if len(key8) != 8:
        raise CryptoError(f"DES key must be 8 bytes, got {len(key8)}")
    return decrypt_ecb(key8, block, DES3)


def xor(a: bytes, b: bytes) -> bytes:
    """Byte-wise XOR of two equal-length strings."""
    if len(a) != len(b):
        raise CryptoError(f"xor of unequal lengths {len(a)} and {len(b)}")
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).to_bytes(len(a), "big")
