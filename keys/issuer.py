"""Issuer master keys by purpose and version, and the card keys diversified from them.

PSAMs and the clearing host hold an :class:`IssuerKeySet`; a card holds only
``card_key(purpose, version, app_serial)`` for each purpose. Keys never show in
a repr. ``IssuerKeySet.demo`` derives a deterministic, public set for the
simulator, tests and the demo only — never for production.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from keys.diversify import diversify, kcv
from keys.sm3 import sm3
from keys.suite import SM4, CryptoError, Suite

PURPOSES = ("internal_auth", "external_auth", "sm_mac", "tac", "pin")
"""Key purposes of the civil-affairs partition: 内部认证, 外部认证, 线路保护MAC, 交易验证(TAC), PIN."""

APP_SERIAL_BYTES = 8
CARD_KEY_CACHE = 100_000
"""Card keys a key set keeps once derived (the host re-derives one per cryptogram checked; ~16 bytes each
plus the entry): the oldest goes first when full; any change of a master key empties it."""


@dataclass
class IssuerKeySet:
    """Master keys ``(purpose, version) -> key`` for one suite, plus the version new cards get."""

    suite: Suite = SM4
    current_version: int = 1
    _masters: dict[tuple[str, int], bytes] = field(default_factory=dict, repr=False)
    _card_keys: dict[tuple[str, int, bytes], bytes] = field(default_factory=dict, repr=False, compare=False)

    def __repr__(self) -> str:
        versions = sorted({v for _, v in self._masters})
        return f"IssuerKeySet(suite={self.suite.value}, current_version={self.current_version}, versions={versions})"

    def put(self, purpose: str, version: int, key: bytes) -> None:
        if purpose not in PURPOSES:
            raise CryptoError(f"unknown key purpose {purpose!r}")
        if len(key) != 16:
            raise CryptoError("issuer master keys are 16 bytes")
        self._masters[(purpose, version)] = bytes(key)
        self._card_keys.clear()

    def master(self, purpose: str, version: int | None = None) -> bytes:
        v = self.current_version if version is None else version
        try:
            return self._masters[(purpose, v)]
        except KeyError:
            raise CryptoError(f"no issuer master key for purpose {purpose!r} version {v}") from None

    def has(self, purpose: str, version: int) -> bool:
        return (purpose, version) in self._masters

    def versions(self) -> list[int]:
        return sorted({v for _, v in self._masters})

    def card_key(self, purpose: str, version: int | None, app_serial: bytes) -> bytes:
        """The card's own key for ``purpose``: the master diversified by the 8-byte application serial."""
        v = self.current_version if version is None else version
        cache = self._card_keys
        key = cache.get((purpose, v, app_serial))
        if key is not None:
            return key
        if len(app_serial) != APP_SERIAL_BYTES:
            raise CryptoError(f"application serial must be {APP_SERIAL_BYTES} bytes, got {len(app_serial)}")
        key = diversify(self.master(purpose, v), app_serial, self.suite)
        if len(cache) >= CARD_KEY_CACHE:
            del cache[next(iter(cache))]
        cache[(purpose, v, bytes(app_serial))] = key
        return key

    def kcvs(self) -> dict[tuple[str, int], str]:
        """Key check values (hex) per (purpose, version) — safe to show."""
        return {k: kcv(v, self.suite).hex().upper() for k, v in sorted(self._masters.items())}

    @classmethod
    def demo(cls, seed: str = "carepay-demo", suite: Suite | str = SM4, versions: tuple[int, ...] = (1,)) -> IssuerKeySet:
        """A deterministic public key set for the simulator, tests and the demo. Not for production."""
        s = Suite.parse(suite)
        ks = cls(suite=s, current_version=max(versions))
        for version in versions:
            for purpose in PURPOSES:
                ks.put(purpose, version, sm3(f"{seed}|{s.value}|{purpose}|{version}".encode())[:16])
        return ks
