"""keys.* against independent references: the pure-Python ``gmssl`` (SM4, SM3, SM2) and OpenSSL's own CBC."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from gmssl import func as gm_func
from gmssl import sm3 as gm_sm3
from gmssl.sm2 import CryptSM2
from gmssl.sm4 import SM4_DECRYPT, SM4_ENCRYPT, CryptSM4
from hypothesis import given, settings
from hypothesis import strategies as st

from keys import sm2
from keys.mac import pad80, pboc_mac
from keys.sm3 import sm3
from keys.suite import SM4, CryptoError, decrypt_cbc, decrypt_ecb, encrypt_cbc, encrypt_ecb

GMSSL_RAW_ECB = 2  # an unknown padding_mode value is the only raw-ECB mode of gmssl's CryptSM4

keys16 = st.binary(min_size=16, max_size=16)
blocks = st.integers(min_value=1, max_value=8).flatmap(lambda n: st.binary(min_size=16 * n, max_size=16 * n))


def _gm_sm4(key: bytes, mode: int) -> CryptSM4:
    c = CryptSM4(padding_mode=GMSSL_RAW_ECB)
    c.set_key(key, mode)
    return c


@settings(max_examples=60, deadline=None)
@given(key=keys16, data=blocks)
def test_sm4_ecb_matches_gmssl(key: bytes, data: bytes) -> None:
    ours = encrypt_ecb(key, data, SM4)
    assert ours == _gm_sm4(key, SM4_ENCRYPT).crypt_ecb(data)
    assert decrypt_ecb(key, ours, SM4) == data
    assert _gm_sm4(key, SM4_DECRYPT).crypt_ecb(ours) == data


@settings(max_examples=60, deadline=None)
@given(key=keys16, iv=keys16, data=blocks)
def test_sm4_cbc_matches_openssl_fresh_context(key: bytes, iv: bytes, data: bytes) -> None:
    """The cached, re-chained CBC context must equal a fresh OpenSSL CBC context, call after call."""
    enc = Cipher(algorithms.SM4(key), modes.CBC(iv)).encryptor()
    expected = enc.update(data) + enc.finalize()
    assert encrypt_cbc(key, data, iv, SM4) == expected
    assert encrypt_cbc(key, data, iv, SM4) == expected  # second call on the cached context
    assert decrypt_cbc(key, expected, iv, SM4) == data


@settings(max_examples=40, deadline=None)
@given(key=keys16, data=st.binary(max_size=80))
def test_pboc_sm4_mac_matches_gmssl_block_by_block(key: bytes, data: bytes) -> None:
    gm = _gm_sm4(key, SM4_ENCRYPT)
    padded = pad80(data, 16)
    x = bytes(16)
    for i in range(0, len(padded), 16):
        x = gm.crypt_ecb(bytes(a ^ b for a, b in zip(x, padded[i : i + 16], strict=True)))
    assert pboc_mac(key, data, suite=SM4) == x[:4]


def test_sm4_rejects_partial_blocks_and_bad_keys() -> None:
    with pytest.raises(CryptoError):
        encrypt_ecb(bytes(16), bytes(15), SM4)
    with pytest.raises(CryptoError):
        encrypt_ecb(bytes(15), bytes(16), SM4)
    with pytest.raises(CryptoError):
        encrypt_cbc(bytes(16), bytes(16), bytes(8), SM4)


def test_sm4_context_cache_is_per_thread() -> None:
    from concurrent.futures import ThreadPoolExecutor

    key, iv = os.urandom(16), os.urandom(16)
    data = os.urandom(64)
    expected = encrypt_cbc(key, data, iv)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: [encrypt_cbc(key, data, iv) for _ in range(200)], range(4)))
    assert all(r == expected for batch in results for r in batch)


@settings(max_examples=40, deadline=None)
@given(data=st.binary(max_size=300))
def test_sm3_matches_gmssl(data: bytes) -> None:
    assert sm3(data).hex() == gm_sm3.sm3_hash(gm_func.bytes_to_list(data))


# --- SM2 against gmssl's pure-Python CryptSM2


def _gmssl_safe_pair() -> sm2.SM2KeyPair:
    """A fresh pair whose bare X‖Y hex does not start with '04' (gmssl's lstrip('04') would corrupt it)."""
    while True:
        kp = sm2.SM2KeyPair.generate()
        if not kp.public_key.hex().startswith("04"):
            return kp


def _ref(kp: sm2.SM2KeyPair, mode: int = 1) -> CryptSM2:
    return CryptSM2(private_key=kp.private_key.hex(), public_key=kp.public_key.hex(), mode=mode)


def test_sm2_sign_verify_round_trip() -> None:
    kp = sm2.SM2KeyPair.generate()
    sig = kp.sign(b"report digest")
    assert len(sig) == sm2.SIGNATURE_BYTES
    assert sm2.verify(kp.public_key, b"report digest", sig)
    assert not sm2.verify(kp.public_key, b"report digesT", sig)
    assert not sm2.verify(sm2.SM2KeyPair.generate().public_key, b"report digest", sig)
    assert not sm2.verify(b"\x00" * 64, b"report digest", sig)  # not a point: False, no exception


def test_sm2_from_private_matches_generated_public_key() -> None:
    kp = sm2.SM2KeyPair.generate()
    assert sm2.SM2KeyPair.from_private(kp.private_key).public_key == sm2.normalize_public_key(kp.public_key)


@pytest.mark.parametrize("message", [b"", b"a", b"message digest", os.urandom(200)], ids=["empty", "1", "std", "200"])
def test_sm2_our_signature_verifies_in_gmssl(message: bytes) -> None:
    kp = _gmssl_safe_pair()
    assert _ref(kp).verify_with_sm3(kp.sign(message).hex(), message)


@pytest.mark.parametrize("message", [b"a", b"message digest", os.urandom(200)], ids=["1", "std", "200"])
def test_sm2_gmssl_signature_verifies_in_ours(message: bytes) -> None:
    kp = _gmssl_safe_pair()
    sig_hex = _ref(kp).sign_with_sm3(message)
    assert sm2.verify(kp.public_key, message, bytes.fromhex(sig_hex))


def test_sm2_encrypt_decrypt_round_trip_and_tamper() -> None:
    kp = sm2.SM2KeyPair.generate()
    ct = sm2.encrypt(kp.public_key, b"working key material")
    assert ct[0] == 4 and len(ct) == 1 + 64 + 32 + len(b"working key material")
    assert sm2.decrypt(kp.private_key, ct) == b"working key material"
    for pos in (5, 70, len(ct) - 1):  # C1, C3, C2
        bad = bytearray(ct)
        bad[pos] ^= 1
        with pytest.raises(CryptoError):
            sm2.decrypt(kp.private_key, bytes(bad))
    with pytest.raises(CryptoError):
        sm2.decrypt(sm2.SM2KeyPair.generate().private_key, ct)
    with pytest.raises(CryptoError):
        sm2.decrypt(kp.private_key, ct[:50])
    with pytest.raises(CryptoError):
        sm2.encrypt(kp.public_key, b"")


def test_sm2_ciphertext_interoperates_with_gmssl_c1c3c2() -> None:
    kp = _gmssl_safe_pair()
    ours = sm2.encrypt(kp.public_key, b"TAK for terminal")
    assert _ref(kp, mode=1).decrypt(ours[1:]) == b"TAK for terminal"  # gmssl's C1 has no 04 prefix
    theirs = _ref(kp, mode=1).encrypt(b"TEK for terminal")
    assert sm2.decrypt(kp.private_key, b"\x04" + theirs) == b"TEK for terminal"
