"""SM2 (GB/T 32918) signatures and encryption through ``gmssl-pyx`` (C, bundles GmSSL).

Verification runs on the system OpenSSL 3 when it is there (``keys.sm2_openssl``, about twice
GmSSL's rate), else on GmSSL. Wire forms chosen here: signatures are raw ``r‖s`` (64 bytes); public keys are
bare ``X‖Y`` (64 bytes; a leading ``04`` is accepted on input); ciphertexts are
``04‖C1x‖C1y‖C3‖C2`` (C1‖C3‖C2, the current standard order).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import gmssl_pyx
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from keys import sm2_openssl
from keys.sm3 import sm3
from keys.suite import CryptoError

DEFAULT_USER_ID = b"1234567812345678"
SIGNATURE_BYTES = 64
PUBLIC_KEY_BYTES = 64
PRIVATE_KEY_BYTES = 32
MAX_PLAINTEXT_BYTES = 255

P = 0xFFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF00000000FFFFFFFFFFFFFFFF
A = 0xFFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF00000000FFFFFFFFFFFFFFFC
B = 0x28E9FA9E9D9F5E344D5A9E4BCF6509A7F39789F515AB8F92DDBCBD414D940E93
N = 0xFFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFF7203DF6B21C6052B53BBF40939D54123
GX = 0x32C4AE2C1F1981195F9904466A39C9948FE30BBFF2660BE1715A4589334C74C7
GY = 0xBC3736A2F4F6779C59BDCEE36B692153D0A9877CC62A474002DF32E52139F0A0


def normalize_public_key(public_key: bytes) -> bytes:
    """Return the bare 64-byte X‖Y form; accepts ``04‖X‖Y`` and compressed points. Checks the curve."""
    try:
        return gmssl_pyx.normalize_sm2_public_key(bytes(public_key))
    except gmssl_pyx.InvalidValueError:
        raise CryptoError("SM2 public key is not a point on the curve") from None


@dataclass(frozen=True)
class SM2KeyPair:
    """An SM2 key pair. The private half never shows in a repr."""

    public_key: bytes
    private_key: bytes = field(repr=False)

    def __repr__(self) -> str:
        return f"SM2KeyPair(public_key={self.public_key.hex()[:16]}…, private_key=<hidden>)"

    @classmethod
    def generate(cls) -> SM2KeyPair:
        pub, priv = gmssl_pyx.sm2_key_generate()
        return cls(public_key=pub, private_key=priv)

    @classmethod
    def from_private(cls, private_key: bytes) -> SM2KeyPair:
        """Rebuild a pair from the 32-byte private scalar (public = d·G, computed in Python)."""
        d = int.from_bytes(private_key, "big")
        if not 1 <= d < N - 1:
            raise CryptoError("SM2 private key out of range")
        x, y = _scalar_mult(d, (GX, GY))
        return cls(public_key=x.to_bytes(32, "big") + y.to_bytes(32, "big"), private_key=bytes(private_key))

    def sign(self, message: bytes, user_id: bytes = DEFAULT_USER_ID) -> bytes:
        return sign(self.private_key, self.public_key, message, user_id)


def za(public_key: bytes, user_id: bytes = DEFAULT_USER_ID) -> bytes:
    """ZA = SM3(ENTL ‖ ID ‖ a ‖ b ‖ Gx ‖ Gy ‖ xA ‖ yA), the signer-identity prefix."""
    pub = normalize_public_key(public_key)
    entl = (len(user_id) * 8).to_bytes(2, "big")
    parts = [entl, user_id] + [v.to_bytes(32, "big") for v in (A, B, GX, GY)] + [pub]
    return sm3(b"".join(parts))


def digest(public_key: bytes, message: bytes, user_id: bytes = DEFAULT_USER_ID) -> bytes:
    """e = SM3(ZA ‖ M)."""
    return sm3(za(public_key, user_id) + message)


def sign(private_key: bytes, public_key: bytes, message: bytes, user_id: bytes = DEFAULT_USER_ID) -> bytes:
    """Sign ``message`` with ZA(user_id); returns raw r‖s (64 bytes)."""
    pub = normalize_public_key(public_key)
    try:
        der = gmssl_pyx.sm2_sign_sm3_digest(bytes(private_key), digest(pub, message, user_id))
    except gmssl_pyx.GmsslInnerError:
        raise CryptoError("SM2 signing failed") from None
    r, s = decode_dss_signature(der)
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def verify(public_key: bytes, message: bytes, signature: bytes, user_id: bytes = DEFAULT_USER_ID) -> bool:
    """Verify a raw r‖s signature. False for any malformed input, never an exception."""
    if len(signature) != SIGNATURE_BYTES:
        return False
    r = int.from_bytes(signature[:32], "big")
    s = int.from_bytes(signature[32:], "big")
    if not (0 < r < N and 0 < s < N):
        return False
    try:
        pub = normalize_public_key(public_key)
        e = digest(pub, message, user_id)
        der = encode_dss_signature(r, s)
        fast = sm2_openssl.verify_digest(pub, e, der)  # OpenSSL 3 when present: about 2x GmSSL's rate
        if fast is not None:
            return fast
        return bool(gmssl_pyx.sm2_verify_sm3_digest(pub, e, der))
    except (CryptoError, gmssl_pyx.GmsslInnerError):
        return False


def encrypt(public_key: bytes, plaintext: bytes) -> bytes:
    """SM2 public-key encryption; returns ``04‖C1‖C3‖C2`` (C3 = SM3 hash, 32 bytes)."""
    if not 1 <= len(plaintext) <= MAX_PLAINTEXT_BYTES:
        raise CryptoError(f"SM2 plaintext must be 1..{MAX_PLAINTEXT_BYTES} bytes, got {len(plaintext)}")
    der = gmssl_pyx.sm2_encrypt(normalize_public_key(public_key), bytes(plaintext))
    x, y, c3, c2 = _der_sm2_ciphertext(der)
    return b"\x04" + x.to_bytes(32, "big") + y.to_bytes(32, "big") + c3 + c2


def decrypt(private_key: bytes, ciphertext: bytes) -> bytes:
    """Inverse of :func:`encrypt`. Raises CryptoError on any tampering."""
    if len(ciphertext) < 1 + 64 + 32 + 1 or ciphertext[0] != 4:
        raise CryptoError("SM2 ciphertext malformed")
    x = int.from_bytes(ciphertext[1:33], "big")
    y = int.from_bytes(ciphertext[33:65], "big")
    c3 = ciphertext[65:97]
    c2 = ciphertext[97:]
    der = _der_seq(_der_int(x) + _der_int(y) + _der_octets(c3) + _der_octets(c2))
    try:
        return gmssl_pyx.sm2_decrypt(bytes(private_key), der)
    except gmssl_pyx.GmsslInnerError:
        raise CryptoError("SM2 decryption failed") from None


# --- tiny DER helpers for the SM2 ciphertext SEQUENCE {INTEGER x, INTEGER y, OCTET STRING c3, OCTET STRING c2}


def _der_len(n: int) -> bytes:
    if n < 0x80:
        return bytes([n])
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(body)]) + body


def _der_int(v: int) -> bytes:
    body = v.to_bytes((v.bit_length() + 8) // 8 or 1, "big")
    return b"\x02" + _der_len(len(body)) + body


def _der_octets(b: bytes) -> bytes:
    return b"\x04" + _der_len(len(b)) + b


def _der_seq(b: bytes) -> bytes:
    return b"\x30" + _der_len(len(b)) + b


def _der_read(buf: bytes, pos: int, tag: int) -> tuple[bytes, int]:
    if pos >= len(buf) or buf[pos] != tag:
        raise CryptoError("SM2 ciphertext DER malformed")
    pos += 1
    first = buf[pos]
    pos += 1
    if first & 0x80:
        nlen = first & 0x7F
        length = int.from_bytes(buf[pos : pos + nlen], "big")
        pos += nlen
    else:
        length = first
    return buf[pos : pos + length], pos + length


def _der_sm2_ciphertext(der: bytes) -> tuple[int, int, bytes, bytes]:
    body, _ = _der_read(der, 0, 0x30)
    xb, pos = _der_read(body, 0, 0x02)
    yb, pos = _der_read(body, pos, 0x02)
    c3, pos = _der_read(body, pos, 0x04)
    c2, pos = _der_read(body, pos, 0x04)
    return int.from_bytes(xb, "big"), int.from_bytes(yb, "big"), c3, c2


# --- affine arithmetic, used only to rebuild a public key from a stored private key


def _point_add(p1: tuple[int, int] | None, p2: tuple[int, int] | None) -> tuple[int, int] | None:
    if p1 is None:
        return p2
    if p2 is None:
        return p1
    (x1, y1), (x2, y2) = p1, p2
    if x1 == x2 and (y1 + y2) % P == 0:
        return None
    if p1 == p2:
        lam = (3 * x1 * x1 + A) * pow(2 * y1, -1, P) % P
    else:
        lam = (y2 - y1) * pow(x2 - x1, -1, P) % P
    x3 = (lam * lam - x1 - x2) % P
    return x3, (lam * (x1 - x3) - y1) % P


def _scalar_mult(k: int, point: tuple[int, int]) -> tuple[int, int]:
    result: tuple[int, int] | None = None
    addend: tuple[int, int] | None = point
    while k:
        if k & 1:
            result = _point_add(result, addend)
        addend = _point_add(addend, addend)
        k >>= 1
    assert result is not None
    return result
