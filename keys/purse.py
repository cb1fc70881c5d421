"""PBOC purse formulas (电子钱包): session key, MAC1, MAC2, TAC — for both suites.

3DES follows PBOC 2.0 EP exactly (vector-backed). SM4 follows the documented
"house convention A": the 8-byte session-key input is padded with ``80 00…`` to a
block, and the TAC is an SM4 CBC-MAC under the 16-byte diversified TAC key
directly (no folding). Both are constructor-free constants here, pinned by the
DERIVED vectors in the reference.
"""

from __future__ import annotations

from keys.mac import fold_des_key, pboc_mac
from keys.suite import DES3, SM4, CryptoError, Suite, encrypt_ecb

SM4_SESSION_PAD = bytes.fromhex("8000000000000000")  # house convention A


def session_key(purchase_key: bytes, card_random: bytes, card_tsn: bytes, ttn: bytes, suite: Suite = SM4) -> bytes:
    """SESPK = E(DPK, random(4) ‖ card TSN(2) ‖ TTN[2:4]); SM4 pads the 8 bytes to a block (convention A).

    >>> session_key(bytes.fromhex("11223344556677888877665544332211"), bytes.fromhex("11223344"),
    ...             bytes.fromhex("0000"), bytes.fromhex("00000001"), DES3).hex().upper()
    '003238ABC57659DD'
    """
    if len(card_random) != 4 or len(card_tsn) != 2 or len(ttn) != 4:
        raise CryptoError("session key input: random 4, TSN 2, TTN 4 bytes")
    block = card_random + card_tsn + ttn[2:4]
    if suite is SM4:
        return encrypt_ecb(purchase_key, block + SM4_SESSION_PAD, SM4)
    return encrypt_ecb(purchase_key, block, DES3)


def session_mac(sespk: bytes, data: bytes, suite: Suite = SM4) -> bytes:
    """MAC under a session key (8-byte DES key for 3DES, 16-byte SM4 key)."""
    return pboc_mac(sespk, data, None, suite)


def mac1(sespk: bytes, amount_fen: int, txn_type: int, terminal_id: bytes, date: bytes, time: bytes,
         suite: Suite = SM4) -> bytes:
    """MAC1 = MAC(SESPK, amount(4) ‖ type(1) ‖ terminal(6) ‖ date(4 BCD) ‖ time(3 BCD))."""
    data = amount_fen.to_bytes(4, "big") + bytes([txn_type]) + terminal_id + date + time
    return session_mac(sespk, data, suite)


def mac2(sespk: bytes, amount_fen: int, suite: Suite = SM4) -> bytes:
    """MAC2 = MAC(SESPK, amount(4))."""
    return session_mac(sespk, amount_fen.to_bytes(4, "big"), suite)


def tac(tac_key: bytes, data: bytes, suite: Suite = SM4) -> bytes:
    """TAC (交易验证码) over the transaction data with the card's diversified TAC key.

    3DES: single-DES MAC under DTK_L XOR DTK_R. SM4: SM4 CBC-MAC under DTK (convention A).

    >>> tac(bytes.fromhex("00112233445566778899AABBCCDDEEFF"),
    ...     bytes.fromhex("0000100006001122334455000000012012022913510"+"0"), DES3).hex().upper()
    'B3A0D49C'
    """
    if suite is SM4:
        return pboc_mac(tac_key, data, None, SM4)
    return pboc_mac(fold_des_key(tac_key), data, None, DES3)


def purchase_tac_data(amount_fen: int, txn_type: int, terminal_id: bytes, ttn: bytes, date: bytes,
                      time: bytes) -> bytes:
    """PBOC purchase TAC input: amount(4) ‖ type(1) ‖ terminal(6) ‖ TTN(4) ‖ date(4) ‖ time(3)."""
    return amount_fen.to_bytes(4, "big") + bytes([txn_type]) + terminal_id + ttn + date + time
