"""SM2 verification: the OpenSSL fast path and the GmSSL path agree, on the standard vector and at random."""

from __future__ import annotations

import ctypes.util
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import gmssl_pyx
import pytest
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from keys import sm2, sm2_openssl

STD_PUB = bytes.fromhex("09F9DF311E5421A150DD7D161E4BC5C672179FAD1833FC076BB08FF356F35020"
                        "CCEA490CE26775A52DC6EA718CC1AA600AED05FBF35E084A6632F6072DA9AD13")
STD_SIG = bytes.fromhex("F5A03B0648D2C4630EEAC513E1BB81A15944DA3827D5B74143AC7EACEEE720B3"
                        "B1B6AA29DF212FD8763182BC0D421CA1BB9038FD1F7F42D4840B69C485BBC1AA")
STD_MSG = b"message digest"

needs_libcrypto = pytest.mark.skipif(ctypes.util.find_library("crypto") is None,
                                     reason="no system libcrypto: the GmSSL path is the only one")


def _der(sig: bytes) -> bytes:
    return encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))


@pytest.fixture(params=["openssl", "gmssl"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "gmssl":
        monkeypatch.setattr(sm2_openssl, "verify_digest", lambda *_: None)
    elif not sm2_openssl.available():
        pytest.skip("OpenSSL SM2 path unavailable here")
    return request.param


@needs_libcrypto
def test_openssl_path_is_on_where_libcrypto_3_is() -> None:
    assert sm2_openssl.available()


def test_standard_vector_on_both_paths(backend: str) -> None:
    assert sm2.verify(STD_PUB, STD_MSG, STD_SIG)
    assert not sm2.verify(STD_PUB, STD_MSG + b"!", STD_SIG)
    assert not sm2.verify(STD_PUB, STD_MSG, STD_SIG, b"1234567812345679")
    assert not sm2.verify(STD_PUB, STD_MSG, STD_SIG[:31] + bytes([STD_SIG[31] ^ 1]) + STD_SIG[32:])


def test_random_signatures_on_both_paths(backend: str) -> None:
    for _ in range(5):
        kp = sm2.SM2KeyPair.generate()
        msg = os.urandom(40)
        sig = kp.sign(msg)
        assert sm2.verify(kp.public_key, msg, sig)
        assert not sm2.verify(sm2.SM2KeyPair.generate().public_key, msg, sig)


@needs_libcrypto
def test_openssl_and_gmssl_agree_on_raw_digests() -> None:
    kp = sm2.SM2KeyPair.generate()
    for size in range(1, 11):
        msg = os.urandom(size)
        e = sm2.digest(kp.public_key, msg)
        good = kp.sign(msg)
        bad = good[:32] + kp.sign(msg + b"x")[32:]  # r of one signature, s of another
        for sig, expected in ((good, True), (bad, False)):
            assert sm2_openssl.verify_digest(kp.public_key, e, _der(sig)) is expected
            assert bool(gmssl_pyx.sm2_verify_sm3_digest(kp.public_key, e, _der(sig))) is expected


@needs_libcrypto
@pytest.mark.parametrize(("pub", "digest", "der"), [
    (STD_PUB, bytes(32), b""),
    (STD_PUB, bytes(32), b"\x30\x03\x02\x01\x01"),
    (STD_PUB, bytes(31), _der(STD_SIG)),
    (bytes(64), bytes(32), _der(STD_SIG)),
    (STD_PUB[:63], bytes(32), _der(STD_SIG)),
], ids=["empty-sig", "short-der", "short-digest", "not-a-point", "short-key"])
def test_openssl_path_refuses_garbage_without_raising(pub: bytes, digest: bytes, der: bytes) -> None:
    assert sm2_openssl.verify_digest(pub, digest, der) is False


def test_verify_from_many_threads(backend: str) -> None:
    kp = sm2.SM2KeyPair.generate()
    sigs = [(m, kp.sign(m)) for m in (os.urandom(16) for _ in range(8))]

    def check(_: int) -> bool:
        return all(sm2.verify(kp.public_key, m, s) and not sm2.verify(kp.public_key, m + b"x", s) for m, s in sigs)

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(check, range(8)))


def test_env_switch_selects_gmssl() -> None:
    code = "from keys import sm2, sm2_openssl; import sys; sys.exit(0 if not sm2_openssl.available() else 1)"
    env = {**os.environ, sm2_openssl.ENV_BACKEND: "gmssl"}
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=60).returncode == 0
