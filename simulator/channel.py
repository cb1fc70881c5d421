"""In-process card channel (进程内通道): a ``protocol.channel.CardChannel`` straight into a simulated card/PSAM.

:class:`SimSlot` is one reader slot holding anything with ``power_on()/process()/power_off()``
(a :class:`simulator.card.VirtualCard` or :class:`simulator.psam.VirtualPsam`). It models what a
real slot does: an empty slot answers :class:`CardRemoved`, a slot must be powered before an
APDU, a torn card (``TearInjected``) leaves the slot empty. For fault tests,
:meth:`SimSlot.remove_after` pulls the card just before the n-th following APDU reaches it.

:class:`SimReader` is a reader with a card slot and a PSAM slot, the fast path for tests, load
and benchmarks; the pty reader (``simulator.reader_pty``) uses the same slots behind real frames.
"""

from __future__ import annotations

import threading
from typing import Protocol

from protocol.channel import CardRemoved, ChannelError
from simulator.card import TearInjected


class SlotDevice(Protocol):
    def power_on(self) -> bytes: ...

    def power_off(self) -> None: ...

    def process(self, apdu: bytes) -> bytes: ...


class SimSlot:
    """One slot of a simulated reader; thread-safe (the pty reader's control thread inserts/removes)."""

    def __init__(self, name: str, device: SlotDevice | None = None) -> None:
        self.name = name
        self._device = device
        self._powered = False
        self._remove_countdown: int | None = None
        self._lock = threading.RLock()
        self.apdus = 0
        self.bytes_in = 0
        self.bytes_out = 0

    @property
    def device(self) -> SlotDevice | None:
        return self._device

    def insert(self, device: SlotDevice) -> None:
        with self._lock:
            self._device = device
            self._powered = False
            self._remove_countdown = None

    def remove(self) -> SlotDevice | None:
        with self._lock:
            dev, self._device = self._device, None
            self._powered = False
            self._remove_countdown = None
            return dev

    def remove_after(self, apdus: int) -> None:
        """Pull the card just before the ``apdus``-th following APDU (1 = the next one) reaches it."""
        with self._lock:
            self._remove_countdown = apdus

    # --- CardChannel

    def card_present(self) -> bool:
        return self._device is not None

    @property
    def powered(self) -> bool:
        return self._powered

    def power_on(self) -> bytes:
        with self._lock:
            if self._device is None:
                raise CardRemoved(f"no card in the {self.name} slot")
            self._powered = True
            return self._device.power_on()

    def power_off(self) -> None:
        with self._lock:
            if self._device is not None:
                self._device.power_off()
            self._powered = False

    def transmit(self, apdu: bytes) -> bytes:
        with self._lock:
            if self._remove_countdown is not None:
                self._remove_countdown -= 1
                if self._remove_countdown <= 0:
                    self.remove()
            dev = self._device
            if dev is None:
                raise CardRemoved(f"no card in the {self.name} slot")
            if not self._powered:
                raise ChannelError(f"{self.name} slot not powered")
            self.apdus += 1
            self.bytes_in += len(apdu)
            try:
                out = dev.process(apdu)
            except TearInjected:
                self.remove()
                raise CardRemoved(f"card pulled from the {self.name} slot during the command") from None
            self.bytes_out += len(out)
            return out


class SimReader:
    """An in-process reader: ``card`` and ``psam`` slots (``protocol.channel.Reader``)."""

    def __init__(self, card: SlotDevice | None = None, psam: SlotDevice | None = None) -> None:
        self._card = SimSlot("card", card)
        self._psam = SimSlot("psam", psam)

    @property
    def card(self) -> SimSlot:
        return self._card

    @property
    def psam(self) -> SimSlot:
        return self._psam

    def close(self) -> None:
        self._card.power_off()
        self._psam.power_off()
