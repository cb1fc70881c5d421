"""Helpers for the card tests: the test clock and card factory."""

from __future__ import annotations

from dataclasses import replace
from datetime import date, datetime

from keys.issuer import IssuerKeySet
from ops.config import DEFAULT_AID_HEX
from simulator.card import VirtualCard
from simulator.personalise import issue_cards, personalise, random_cardholder
from terminal_agent.card_session import LOCAL_TZ

AID = bytes.fromhex(DEFAULT_AID_HEX)
NOW = datetime(2026, 11, 28, 10, 30, 0, tzinfo=LOCAL_TZ)
TODAY = NOW.date()
TEST_TIMEOUT_MS = 3_000  # generous: CI machines are shared
SHORT_TIMEOUT_MS = 300  # where a test waits a timeout out on purpose


def make_card(suite: str = "sm4", *, key_set: IssuerKeySet | None = None, index: int = 1,
              valid_until: date | None = None, programs: tuple[str, ...] | None = None,
              aid: bytes = AID, key_version: int | None = None) -> VirtualCard:
    """One card, optionally with an eligibility date or programs of the test's choosing."""
    ks = key_set or IssuerKeySet.demo("carepay-demo", suite)
    if valid_until is None and programs is None and key_version is None:
        return issue_cards(1, aid=aid, suite=suite, key_set=ks, first_index=index, today=TODAY)[0]
    import random

    holder, progs = random_cardholder(random.Random(index), index, TODAY)
    if valid_until is not None:
        holder = replace(holder, valid_until=valid_until)
    serial = bytes.fromhex(f"00099{index:011d}")
    return personalise(holder, programs or progs, app_serial=serial, aid=aid, key_set=ks, key_version=key_version)


