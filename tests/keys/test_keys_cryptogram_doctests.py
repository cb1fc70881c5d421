"""keys.cryptogram round trip and tamper; the doctests of every keys/*.py module."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import keys
from keys.cryptogram import compute_tac, cryptogram_data, verify_tac
from keys.issuer import IssuerKeySet
from keys.suite import DES3, SM4, CryptoError, Suite

APP_SERIAL = bytes.fromhex("0000000000000001")
FIELDS = dict(amount_fen=2_500, program="voucher", terminal_id="T0000001", ttn=42, txn_date="20260301",
              txn_time="101500", atc=7)


@pytest.mark.parametrize("suite", [SM4, DES3])
def test_cryptogram_round_trip(suite: Suite) -> None:
    ks = IssuerKeySet.demo(suite=suite)
    card_key = ks.card_key("tac", None, APP_SERIAL)
    data = cryptogram_data(**FIELDS)
    tac = compute_tac(card_key, data, suite)
    assert len(tac) == 4
    assert verify_tac(ks.card_key("tac", 1, APP_SERIAL), data, tac, suite)


@pytest.mark.parametrize(
    "change",
    [{"amount_fen": 2_501}, {"program": "nursing"}, {"terminal_id": "T0000002"}, {"ttn": 43},
     {"txn_date": "20260302"}, {"txn_time": "101501"}, {"atc": 8}],
    ids=lambda c: next(iter(c)),
)
def test_cryptogram_tampered_field_fails(change: dict) -> None:
    ks = IssuerKeySet.demo()
    card_key = ks.card_key("tac", None, APP_SERIAL)
    tac = compute_tac(card_key, cryptogram_data(**FIELDS))
    assert not verify_tac(card_key, cryptogram_data(**{**FIELDS, **change}), tac)


def test_cryptogram_wrong_card_or_tac_fails() -> None:
    ks = IssuerKeySet.demo()
    data = cryptogram_data(**FIELDS)
    tac = compute_tac(ks.card_key("tac", None, APP_SERIAL), data)
    other_card = ks.card_key("tac", None, bytes.fromhex("0000000000000002"))
    assert not verify_tac(other_card, data, tac)
    assert not verify_tac(ks.card_key("tac", None, APP_SERIAL), data, bytes([tac[0] ^ 1]) + tac[1:])
    assert not verify_tac(ks.card_key("tac", None, APP_SERIAL), data, tac[:3])


@pytest.mark.parametrize(
    "bad",
    [{"amount_fen": 0}, {"amount_fen": 1 << 32}, {"program": "cash"}, {"terminal_id": "T1"},
     {"txn_date": "2026-03-01"}, {"atc": 1 << 16}, {"ttn": -1}],
    ids=lambda c: next(iter(c)),
)
def test_cryptogram_rejects_bad_fields(bad: dict) -> None:
    with pytest.raises(CryptoError):
        cryptogram_data(**{**FIELDS, **bad})


KEYS_MODULES = sorted(m.name for m in pkgutil.iter_modules(keys.__path__))


@pytest.mark.parametrize("name", KEYS_MODULES)
def test_module_doctests(name: str) -> None:
    module = importlib.import_module(f"keys.{name}")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} doctest(s) failed in keys.{name}"
