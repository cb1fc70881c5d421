"""The card channel (卡通道): how a terminal powers a reader slot and exchanges APDUs with what sits in it.

A reader exposes two channels: the card slot (the cardholder's 养老助残卡) and the
PSAM slot (the terminal's PSAM卡). Real serial readers, PC/SC readers and the
in-process simulator all implement :class:`CardChannel`, so the card session
never knows which one it talks to. The interface is synchronous: the terminal
agent runs a card session in a worker thread.

Errors: :class:`CardRemoved` (no card in the slot, or it was pulled mid-exchange —
the caller must treat the last command's effect as unknown), :class:`ChannelTimeout`
(no answer within the exchange timeout), :class:`ReaderUnavailable` (the reader
or its driver library is missing / the link is down). All derive from
:class:`ChannelError`. None of them carries APDU data (it may hold cardholder data).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

SLOT_CARD = 0
"""The cardholder-card slot (用户卡座)."""
SLOT_PSAM = 1
"""The PSAM slot (PSAM卡座)."""
SLOT_NAMES = {SLOT_CARD: "card", SLOT_PSAM: "psam"}

DEFAULT_APDU_TIMEOUT_MS = 3_000


class ChannelError(Exception):
    """The exchange with a slot failed; the message names the slot and the reason, never the APDU bytes.

    ``answers``: after :func:`transmit_many`, the responses of the commands that ran before the failure.
    """

    answers: tuple[bytes, ...] = ()


class CardRemoved(ChannelError):
    """No card in the slot, or the card was pulled mid-exchange (the last command's effect is unknown)."""


class ChannelTimeout(ChannelError):
    """No answer from the reader or the card within the exchange timeout."""


class ReaderUnavailable(ChannelError):
    """The reader cannot be used: port missing, driver library absent, link lost beyond reconnection."""


@runtime_checkable
class CardChannel(Protocol):
    """One reader slot. ``transmit`` takes a whole command APDU and returns ``data ‖ SW1 SW2``."""

    def power_on(self) -> bytes:
        """Power the slot (cold reset); returns the ATR. Raises CardRemoved when the slot is empty."""
        ...

    def transmit(self, apdu: bytes) -> bytes:
        """Send one command APDU; return the response APDU (data ‖ SW1SW2)."""
        ...

    def power_off(self) -> None:
        """Deactivate the slot. Never raises for an empty slot."""
        ...

    def card_present(self) -> bool:
        """True when a card sits in the slot."""
        ...


@runtime_checkable
class Reader(Protocol):
    """A reader with a card slot and a PSAM slot."""

    @property
    def card(self) -> CardChannel: ...

    @property
    def psam(self) -> CardChannel: ...

    def close(self) -> None: ...


POWER_ON = b""
"""In :func:`transmit_many`, an empty command is a cold reset (power on) of the slot; its answer is the ATR."""


def transmit_many(channel: CardChannel, apdus: Sequence[bytes]) -> list[bytes]:
    """Send ``apdus`` to one slot in order; their responses. One reader exchange when the channel can
    (``transmit_many`` on the channel, e.g. the serial reader's APDU batch), else one by one.
    :data:`POWER_ON` (an empty command) powers the slot and answers the ATR.

    Use it only for commands whose bytes do not depend on the previous answers. On failure the
    :class:`ChannelError` carries in ``answers`` the responses of the commands that did run; the
    command that failed and any after it have an unknown (failed) or no effect.
    """
    many = getattr(channel, "transmit_many", None)
    if many is not None:
        return list(many(list(apdus)))
    return transmit_each(channel, apdus)


def transmit_each(channel: CardChannel, apdus: Sequence[bytes]) -> list[bytes]:
    """:func:`transmit_many` one command per exchange (for channels, or readers, without a batch)."""
    out: list[bytes] = []
    for apdu in apdus:
        try:
            out.append(channel.transmit(apdu) if apdu else channel.power_on())
        except ChannelError as exc:
            exc.answers = tuple(out)
            raise
    return out
