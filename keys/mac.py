"""MACs: PBOC CBC-MAC for both suites, SM4 CBC-MAC, ISO 9797-1 retail MAC, line protection (线路保护)."""

from __future__ import annotations

from keys.suite import DES3, SM4, CryptoError, Suite, des_decrypt_block, des_encrypt_block, encrypt_cbc, xor

PBOC_MAC_BYTES = 4


def pad80(data: bytes, block_bytes: int) -> bytes:
    """ISO 9797-1 padding method 2: append 80, then 00 to a block boundary (always, even when aligned)."""
    padded = data + b"\x80"
    rem = len(padded) % block_bytes
    return padded + bytes(block_bytes - rem) if rem else padded


def challenge_iv(challenge: bytes, suite: Suite = SM4) -> bytes:
    """An IV from a card challenge, right-padded with zeros to the suite's block size."""
    if len(challenge) > suite.block_bytes:
        raise CryptoError(f"challenge longer than a {suite.value} block")
    return challenge + bytes(suite.block_bytes - len(challenge))


def cbc_mac(key: bytes, data: bytes, iv: bytes | None = None, suite: Suite = SM4) -> bytes:
    """Plain CBC-MAC with the suite's cipher, no padding; returns the last block (full length).

    >>> cbc_mac(bytes.fromhex("EEF3C9888129755F2C769DBC459448CE"),
    ...         bytes.fromhex("99C9D02D03F2CD394A680DC51B112322"),
    ...         bytes.fromhex("FBD7B7AB0793F814B28A970F9E859C05")).hex().upper()
    '530EDF0605A302F30096AE46BD6316AF'
    """
    return encrypt_cbc(key, data, iv, suite)[-suite.block_bytes :]


def retail_mac(key16: bytes, data: bytes, iv: bytes | None = None) -> bytes:
    """ISO 9797-1 MAC algorithm 3 (retail MAC) over already padded data; returns 8 bytes."""
    if len(key16) != 16:
        raise CryptoError(f"retail MAC key must be 16 bytes, got {len(key16)}")
    kl, kr = key16[:8], key16[8:]
    x = encrypt_cbc(kl, data, iv or bytes(8), DES3)[-8:]
    return des_encrypt_block(kl, des_decrypt_block(kr, x))


def pboc_mac(key: bytes, data: bytes, iv: bytes | None = None, suite: Suite = SM4) -> bytes:
    """PBOC MAC: pad 80 00.., chain with the suite's block cipher from ``iv``, keep the leftmost 4 bytes.

    ``sm4``: SM4-CBC-MAC with a 16-byte key. ``3des``: an 8-byte key gives single-DES CBC-MAC, a 16-byte
    key gives the ISO 9797-1 retail MAC. ``iv`` may be shorter than a block (a card challenge): it is
    right-padded with zeros.

    >>> pboc_mac(bytes.fromhex("003238ABC57659DD"), bytes.fromhex("00001000060011223344552012022913510"+"0"),
    ...          suite=DES3).hex().upper()
    'F15CAB75'
    """
    block = suite.block_bytes
    iv_full = challenge_iv(iv, suite) if iv is not None else bytes(block)
    padded = pad80(data, block)
    if suite is SM4:
        return cbc_mac(key, padded, iv_full, SM4)[:PBOC_MAC_BYTES]
    if len(key) == 8:
        return encrypt_cbc(key, padded, iv_full, DES3)[-8:][:PBOC_MAC_BYTES]
    if len(key) == 16:
        return retail_mac(key, padded, iv_full)[:PBOC_MAC_BYTES]
    raise CryptoError(f"3DES MAC key must be 8 or 16 bytes, got {len(key)}")


def line_protection_mac(key: bytes, apdu_header_and_data: bytes, challenge: bytes, suite: Suite = SM4) -> bytes:
    """Secure-messaging MAC over ``CLA INS P1 P2 Lc' ‖ data`` (Lc' counts the 4 MAC bytes), IV from the challenge.

    >>> line_protection_mac(b"\\xff" * 16, bytes.fromhex("04D600001411223344556677889900AABBCCDDEEFF"),
    ...                     bytes.fromhex("44A47DEB"), DES3).hex().upper()
    'F2F62231'
    """
    return pboc_mac(key, apdu_header_and_data, challenge, suite)


def fold_des_key(key16: bytes) -> bytes:
    """The PBOC TAC key form for 3DES cards: left half XOR right half (8 bytes)."""
    if len(key16) != 16:
        raise CryptoError(f"TAC key must be 16 bytes, got {len(key16)}")
    return xor(key16[:8], key16[8:])
