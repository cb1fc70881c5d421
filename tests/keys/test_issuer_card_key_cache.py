"""Card keys the host derives once per card are kept, and never outlive the master they came from."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

import keys.issuer as issuer
from keys.diversify import _not, diversify
from keys.issuer import IssuerKeySet
from keys.suite import DES3, SM4


@settings(max_examples=100, deadline=None)
@given(st.binary(min_size=8, max_size=8), st.sampled_from(["sm4", "3des"]))
def test_kept_card_keys_equal_fresh_derivation(serial: bytes, suite: str) -> None:
    ks = IssuerKeySet.demo(suite=suite)
    first = ks.card_key("tac", 1, serial)
    assert first == diversify(ks.master("tac", 1), serial, SM4 if suite == "sm4" else DES3)
    assert ks.card_key("tac", 1, serial) == first == ks.card_key("tac", None, serial)
    assert ks.card_key("sm_mac", 1, serial) != first


def test_a_new_master_or_current_version_never_serves_an_old_card_key() -> None:
    serial = bytes.fromhex("0001000000000001")
    ks = IssuerKeySet.demo(versions=(1, 2))
    v2 = ks.card_key("tac", None, serial)
    assert v2 == diversify(ks.master("tac", 2), serial)
    ks.current_version = 1  # 'current' now means version 1
    assert ks.card_key("tac", None, serial) == diversify(ks.master("tac", 1), serial) != v2
    ks.put("tac", 1, bytes(range(16)))  # master replaced: its card keys are derived anew
    assert ks.card_key("tac", 1, serial) == diversify(bytes(range(16)), serial)
    assert "card_keys" not in repr(ks) and serial.hex() not in repr(ks)


def test_the_kept_keys_are_bounded(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setattr(issuer, "CARD_KEY_CACHE", 4)
    ks = IssuerKeySet.demo()
    serials = [i.to_bytes(8, "big") for i in range(10)]
    for s in serials:
        ks.card_key("tac", 1, s)
    assert len(ks._card_keys) == 4
    assert all(ks.card_key("tac", 1, s) == diversify(ks.master("tac", 1), s) for s in serials)


@given(st.binary(max_size=32))
def test_not_inverts_every_bit(data: bytes) -> None:
    assert _not(data) == bytes(b ^ 0xFF for b in data)
