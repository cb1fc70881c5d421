"""Every must-have vector of reference/card-and-crypto.md §7 (and the §2.4/§2.6 tables) against keys.*."""

from __future__ import annotations

import pytest

from keys import sm2
from keys.diversify import diversify, diversify_path, kcv
from keys.mac import cbc_mac, fold_des_key, line_protection_mac, pboc_mac
from keys.purse import mac1, mac2, purchase_tac_data, session_key, tac
from keys.sm3 import SM3Hasher, sm3
from keys.suite import DES3, SM4, decrypt_ecb, encrypt_ecb

H = bytes.fromhex
SM4_KEY = H("0123456789ABCDEFFEDCBA9876543210")
SM4_CT = H("681EDF34D206965E86B3E94F536E4246")
SM4_MILLION = H("595298C7C6FD271F0402F804C33D3F66")
PURCH_KEY = H("11223344556677888877665544332211")
TERMINAL_ID = H("001122334455")


def test_sm4_encrypt_standard_vector() -> None:
    assert encrypt_ecb(SM4_KEY, SM4_KEY, SM4) == SM4_CT


def test_sm4_decrypt_standard_vector() -> None:
    assert decrypt_ecb(SM4_KEY, SM4_CT, SM4) == SM4_KEY


@pytest.mark.slow
def test_sm4_one_million_encryptions() -> None:
    block = SM4_KEY
    for _ in range(1_000_000):
        block = encrypt_ecb(SM4_KEY, block, SM4)
    assert block == SM4_MILLION


def test_sm3_abc() -> None:
    assert sm3(b"abc") == H("66C7F0F462EEEDD9D1F2D46BDC10E4E24167C4875CF2F7A2297DA02B8F4BA8E0")


def test_sm3_abcd_times_16() -> None:
    assert sm3(b"abcd" * 16) == H("DEBE9FF92275B8A138604889C18E5A4D6FDB70E5387E5765293DCBA39C0C5732")


def test_sm3_incremental_matches_one_shot() -> None:
    h = SM3Hasher()
    for chunk in (b"ab", b"c"):
        h.update(chunk)
    assert h.digest() == sm3(b"abc")


# --- SM2 (GM/T 0003.5 Annex A)

SM2_D = H("3945208F7B2144B13F36E38AC6D39F95889393692860B51A42FB81EF4DF7C5B8")
SM2_PUB = H("09F9DF311E5421A150DD7D161E4BC5C672179FAD1833FC076BB08FF356F35020"
            "CCEA490CE26775A52DC6EA718CC1AA600AED05FBF35E084A6632F6072DA9AD13")
SM2_ZA = H("B2E14C5C79C6DF5B85F4FE7ED8DB7A262B9DA7E07CCB0EA9F4747B8CCDA8A4F3")
SM2_E = H("F0B43E94BA45ACCAACE692ED534382EB17E6AB5A19CE7B31F4486FDFC0D28640")
SM2_K = "59276E27D506861A16680F3AD9C02DCCEF3CC1FA3CDBE4CE6D54B80DEAC1BC21"
SM2_R = H("F5A03B0648D2C4630EEAC513E1BB81A15944DA3827D5B74143AC7EACEEE720B3")
SM2_S = H("B1B6AA29DF212FD8763182BC0D421CA1BB9038FD1F7F42D4840B69C485BBC1AA")
SM2_MSG = b"message digest"


def test_sm2_public_key_from_private() -> None:
    assert sm2.SM2KeyPair.from_private(SM2_D).public_key == SM2_PUB


def test_sm2_za_and_e() -> None:
    assert sm2.za(SM2_PUB) == SM2_ZA
    assert sm2.digest(SM2_PUB, SM2_MSG) == SM2_E


def test_sm2_standard_signature_verifies() -> None:
    assert sm2.verify(SM2_PUB, SM2_MSG, SM2_R + SM2_S) is True
    assert sm2.verify(b"\x04" + SM2_PUB, SM2_MSG, SM2_R + SM2_S) is True


def test_sm2_standard_r_s_reproduced_by_gmssl_reference_from_fixed_k() -> None:
    from gmssl.sm2 import CryptSM2

    ref = CryptSM2(private_key=SM2_D.hex(), public_key=SM2_PUB.hex())  # bare X‖Y, never '04'+…
    assert ref.sign(SM2_E, SM2_K).upper() == (SM2_R + SM2_S).hex().upper()
    assert ref.sign_with_sm3(SM2_MSG, SM2_K).upper() == (SM2_R + SM2_S).hex().upper()


@pytest.mark.parametrize(
    ("message", "user_id", "signature"),
    [
        (b"message digesT", sm2.DEFAULT_USER_ID, SM2_R + SM2_S),
        (SM2_MSG, b"1234567812345679", SM2_R + SM2_S),
        (SM2_MSG, sm2.DEFAULT_USER_ID, bytes([SM2_R[0] ^ 1]) + SM2_R[1:] + SM2_S),
        (SM2_MSG, sm2.DEFAULT_USER_ID, SM2_R + SM2_S[:-1] + bytes([SM2_S[-1] ^ 1])),
        (SM2_MSG, sm2.DEFAULT_USER_ID, SM2_R + SM2_S[:-1]),
        (SM2_MSG, sm2.DEFAULT_USER_ID, bytes(64)),
    ],
    ids=["tampered-message", "tampered-user-id", "tampered-r", "tampered-s", "short", "zero"],
)
def test_sm2_tampered_inputs_fail(message: bytes, user_id: bytes, signature: bytes) -> None:
    assert sm2.verify(SM2_PUB, message, signature, user_id) is False


# --- SM4 CBC-MAC, PBOC 3DES purse, TAC, line protection


def test_sm4_cbc_mac_vector() -> None:
    mac = cbc_mac(H("EEF3C9888129755F2C769DBC459448CE"), H("99C9D02D03F2CD394A680DC51B112322"),
                  H("FBD7B7AB0793F814B28A970F9E859C05"), SM4)
    assert mac == H("530EDF0605A302F30096AE46BD6316AF")


def test_pboc_purchase_3des() -> None:
    sespk = session_key(PURCH_KEY, H("11223344"), H("0000"), H("00000001"), DES3)
    assert sespk == H("003238ABC57659DD")
    assert mac1(sespk, 0x1000, 0x06, TERMINAL_ID, H("20120229"), H("135100"), DES3) == H("F15CAB75")
    assert mac2(sespk, 0x1000, DES3) == H("56988A13")


def test_pboc_purchase_mac1_with_the_other_date() -> None:
    sespk = H("003238ABC57659DD")
    assert mac1(sespk, 0x1000, 0x06, TERMINAL_ID, H("20111221"), H("214822"), DES3) == H("389656CB")


def test_pboc_load_3des() -> None:
    seslk = encrypt_ecb(PURCH_KEY, H("11223344" "0000" "8000"), DES3)
    assert seslk == H("9B1D924E05595603")
    assert pboc_mac(seslk, H("00000000" "00001000" "01" "001122334455"), suite=DES3) == H("2988AE5A")
    assert pboc_mac(seslk, H("00001000" "01" "001122334455" "20111221" "214822"), suite=DES3) == H("3A845BF0")


def test_tac_3des_folded_key() -> None:
    dtk = H("00112233445566778899AABBCCDDEEFF")
    assert fold_des_key(dtk) == H("8888888888888888")
    data = purchase_tac_data(0x1000, 0x06, TERMINAL_ID, H("00000001"), H("20120229"), H("135100"))
    assert data == H("00001000" "06" "001122334455" "00000001" "20120229" "135100")
    assert tac(dtk, data, DES3) == H("B3A0D49C")


@pytest.mark.parametrize(
    ("key", "challenge", "apdu", "expected"),
    [
        (b"\xff" * 16, "44A47DEB", "04D6000014112233445566778899" "00AABBCCDDEEFF", "F2F62231"),
        (b"\xff" * 16, "D0FE4FB9", "112233445566778899" "00AABBCCDDEEFF", "8D318577"),
        (b"\xff" * 16, "D0FE4FB9", "04B0000004", "F09C8A19"),
        (b"\x36" * 16, "A3BBCFC8",
         "04D6950022" "000122000001FFFF0101000022000000000000062016010120501231" "0000", "96E32EF1"),
    ],
    ids=["update-binary", "data-only", "read-binary", "update-0x15"],
)
def test_line_protection_retail_mac(key: bytes, challenge: str, apdu: str, expected: str) -> None:
    assert line_protection_mac(key, H(apdu), H(challenge), DES3) == H(expected)
    # an 8-byte challenge IV (Le=08) used as-is gives the same MAC as 4 bytes right-padded with zeros
    assert pboc_mac(key, H(apdu), H(challenge + "00000000"), DES3) == H(expected)


# --- diversification (密钥分散)


def test_3des_diversification() -> None:
    assert diversify(SM4_KEY, H("1234567890ABCDEF"), DES3) == H("479EF7C1ECFE64AC9BB75999A2E5CD53")


def test_3des_diversification_uses_rightmost_8_bytes_of_a_longer_factor() -> None:
    assert diversify(SM4_KEY, H("AAAA1234567890ABCDEF"), DES3) == diversify(SM4_KEY, H("1234567890ABCDEF"), DES3)


def test_sm4_diversification_one_and_two_levels() -> None:
    assert diversify(SM4_KEY, H("1234567890ABCDEF"), SM4) == H("E86BCB4726B27D2760B62C4731E4F570")
    two = diversify_path(SM4_KEY, [H("1234567890ABCDEF"), H("0000000000000001")], SM4)
    assert two == H("BDF0CFED4835A30EB418EC6F8DE56A89")


def test_3des_two_level_diversification_applies_factors_in_turn() -> None:
    one = diversify(SM4_KEY, H("1234567890ABCDEF"), DES3)
    assert diversify_path(SM4_KEY, [H("1234567890ABCDEF"), H("0000000000000001")], DES3) == diversify(
        one, H("0000000000000001"), DES3)


# --- SM4 purse, house convention A (DERIVED)

CARD_SERIAL = H("0000000000000001")


def test_sm4_purse_convention_a() -> None:
    dpk = diversify(PURCH_KEY, CARD_SERIAL, SM4)
    assert dpk == H("94AA6036A0259B3D5B6CE208675ADF13")
    sespk = session_key(dpk, H("11223344"), H("0000"), H("00000001"), SM4)
    assert sespk == H("62B69D297358E7AD53F57EFA01C407E0")
    assert encrypt_ecb(dpk, H("11223344" "0000" "0001" "0000000000000000"), SM4) == H(
        "E3A66867F4F968752E18C512D237CD3B")  # SESPK(B), the rejected candidate, checked for the record
    assert mac1(sespk, 0x1000, 0x06, TERMINAL_ID, H("20120229"), H("135100"), SM4) == H("5C7391AA")
    assert mac2(sespk, 0x1000, SM4) == H("C715602C")


def test_sm4_purse_tac_convention_a() -> None:
    dtk = diversify(H("00112233445566778899AABBCCDDEEFF"), CARD_SERIAL, SM4)
    data = purchase_tac_data(0x1000, 0x06, TERMINAL_ID, H("00000001"), H("20120229"), H("135100"))
    assert tac(dtk, data, SM4) == H("F615E3D3")


def test_sm4_line_protection_convention_a() -> None:
    mac = line_protection_mac(SM4_KEY, H("04D695000C" "0102030405060708"), H("1122334455667788"), SM4)
    assert mac == H("5CD4AC71")


# --- KCV


def test_kcv_is_first_three_bytes_over_a_zero_block() -> None:
    assert kcv(SM4_KEY, SM4) == encrypt_ecb(SM4_KEY, bytes(16), SM4)[:3]
    assert kcv(PURCH_KEY, DES3) == encrypt_ecb(PURCH_KEY, bytes(8), DES3)[:3]
    assert len(kcv(SM4_KEY, SM4)) == 3


def test_kcv_known_values() -> None:
    # 3DES with the all-zero-parity test key 0123456789ABCDEF FEDCBA9876543210: a widely published KCV (08D7B4)
    assert kcv(SM4_KEY, DES3).hex().upper() == "08D7B4"
    assert kcv(SM4_KEY, SM4).hex().upper() == encrypt_ecb(SM4_KEY, bytes(16)).hex().upper()[:6]
