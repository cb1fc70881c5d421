"""Key components (密钥分量) and the key-encryption key (KEK, 密钥加密密钥) they build.

The KEK that protects the key store is never held by one person: it is the XOR
of 2 or 3 random 16-byte components, each held by a different key officer
(密钥管理员) and each announced with its key check value (KCV, 密钥校验值). An
officer who enters a component is told the KCV to expect; a component whose KCV
does not match is refused before it touches the KEK.

A component file is a small JSON document (mode 0600)::

    {"format": "carepay-key-component", "format_version": 1, "index": 1, "of": 2,
     "value": "<32 hex>", "kcv": "<6 hex>", "kek_kcv": "<6 hex>"}

``kek_kcv`` (the KCV of the combined KEK, announced at the ceremony) lets any
holder check the combination without seeing the other components. Nothing here
puts a component value in a repr, a log line or an exception.
"""

from __future__ import annotations

import hmac
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from keys.diversify import kcv
from keys.suite import SM4, CryptoError

COMPONENT_BYTES = 16
KEK_BYTES = 16
MIN_COMPONENTS = 2
MAX_COMPONENTS = 3
MAX_COMPONENT_FILE_BYTES = 4096
COMPONENT_FORMAT = "carepay-key-component"
COMPONENT_FORMAT_VERSION = 1
_HEX32 = re.compile(r"[0-9A-Fa-f]{32}")
_HEX6 = re.compile(r"[0-9A-Fa-f]{6}")


class ComponentError(CryptoError):
    """A key component is malformed, has the wrong KCV, or does not combine to the announced KEK."""


def kcv_hex(key: bytes) -> str:
    """The SM4 KCV of a 16-byte key as 6 upper-case hex digits (safe to show)."""
    return kcv(key, SM4).hex().upper()


@dataclass(frozen=True)
class KeyComponent:
    """One officer's share of the KEK. ``value`` never shows in a repr."""

    index: int
    of: int
    value: bytes = field(repr=False)
    kek_kcv: str = ""

    def __post_init__(self) -> None:
        if not MIN_COMPONENTS <= self.of <= MAX_COMPONENTS:
            raise ComponentError(f"a KEK has {MIN_COMPONENTS} or {MAX_COMPONENTS} components, not {self.of}")
        if not 1 <= self.index <= self.of:
            raise ComponentError(f"component index {self.index} outside 1..{self.of}")
        if len(self.value) != COMPONENT_BYTES:
            raise ComponentError(f"a component is {COMPONENT_BYTES} bytes, got {len(self.value)}")

    def __repr__(self) -> str:
        return f"KeyComponent(index={self.index}, of={self.of}, kcv={self.kcv}, value=<hidden>)"

    __str__ = __repr__

    @property
    def kcv(self) -> str:
        return kcv_hex(self.value)

    def check(self, expected_kcv: str) -> None:
        """Refuse the component unless its KCV is the one the officer was told."""
        if not hmac.compare_digest(self.kcv, expected_kcv.strip().upper()):
            raise ComponentError(f"component {self.index}/{self.of}: KCV {self.kcv} does not match the expected "
                                 f"{expected_kcv.strip().upper()}")

    @classmethod
    def from_hex(cls, index: int, of: int, value_hex: str, expected_kcv: str | None = None) -> KeyComponent:
        """A component typed in by an officer (spaces allowed), checked against the KCV they were told."""
        compact = "".join(value_hex.split())
        if not _HEX32.fullmatch(compact):
            raise ComponentError(f"component {index}/{of} must be {COMPONENT_BYTES * 2} hex digits")
        comp = cls(index=index, of=of, value=bytes.fromhex(compact))
        if expected_kcv is not None:
            comp.check(expected_kcv)
        return comp


def generate_components(count: int) -> list[KeyComponent]:
    """``count`` fresh random components (os.urandom), each stamped with the KCV of their XOR."""
    if not MIN_COMPONENTS <= count <= MAX_COMPONENTS:
        raise ComponentError(f"a KEK has {MIN_COMPONENTS} or {MAX_COMPONENTS} components, not {count}")
    values = [os.urandom(COMPONENT_BYTES) for _ in range(count)]
    kek_kcv = kcv_hex(_xor_all(values))
    return [KeyComponent(index=i + 1, of=count, value=v, kek_kcv=kek_kcv) for i, v in enumerate(values)]


def _xor_all(values: Sequence[bytes]) -> bytes:
    acc = 0
    for v in values:
        acc ^= int.from_bytes(v, "big")
    return acc.to_bytes(KEK_BYTES, "big")


def combine(components: Sequence[KeyComponent], expected_kek_kcv: str | None = None) -> bytes:
    """KEK = C1 ⊕ C2 [⊕ C3]. Checks the count, distinct indices and the announced KEK KCV.

    >>> a = KeyComponent.from_hex(1, 2, "00" * 16); b = KeyComponent.from_hex(2, 2, "0123456789ABCDEFFEDCBA9876543210")
    >>> combine([a, b]).hex().upper()
    '0123456789ABCDEFFEDCBA9876543210'
    """
    if not components:
        raise ComponentError("no key components given")
    of = components[0].of
    if len(components) != of or any(c.of != of for c in components):
        raise ComponentError(f"the KEK needs all {of} components, got {len(components)}")
    if sorted(c.index for c in components) != list(range(1, of + 1)):
        raise ComponentError("components must be numbered 1..N, each once")
    if len({c.value for c in components}) != of:
        raise ComponentError("two components are identical")
    kek = _xor_all([c.value for c in components])
    announced = {c.kek_kcv for c in components if c.kek_kcv}
    if len(announced) > 1:
        raise ComponentError("the components were announced with different KEK KCVs: they are from different "
                             "ceremonies")
    if announced and not hmac.compare_digest(kcv_hex(kek), next(iter(announced))):
        raise ComponentError(f"the components combine to KEK KCV {kcv_hex(kek)}, announced {next(iter(announced))}")
    if expected_kek_kcv and not hmac.compare_digest(kcv_hex(kek), expected_kek_kcv.strip().upper()):
        raise ComponentError(f"the components combine to KEK KCV {kcv_hex(kek)}, expected "
                             f"{expected_kek_kcv.strip().upper()}")
    return kek


# --- component files


def component_to_json(component: KeyComponent) -> str:
    return json.dumps({
        "format": COMPONENT_FORMAT,
        "format_version": COMPONENT_FORMAT_VERSION,
        "index": component.index,
        "of": component.of,
        "value": component.value.hex().upper(),
        "kcv": component.kcv,
        "kek_kcv": component.kek_kcv,
    }, indent=2) + "\n"


def parse_component(text: str | bytes) -> KeyComponent:
    """Parse a component file's content; any malformed input raises ComponentError (never echoes the value)."""
    if len(text) > MAX_COMPONENT_FILE_BYTES:
        raise ComponentError(f"component file larger than {MAX_COMPONENT_FILE_BYTES} bytes")
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError):
        raise ComponentError("component file is not JSON") from None
    if not isinstance(doc, dict) or doc.get("format") != COMPONENT_FORMAT:
        raise ComponentError(f"not a {COMPONENT_FORMAT} file")
    if doc.get("format_version") != COMPONENT_FORMAT_VERSION:
        raise ComponentError("unsupported component file version")
    index, of, value, kcv_, kek_kcv = (doc.get(k) for k in ("index", "of", "value", "kcv", "kek_kcv"))
    if type(index) is not int or type(of) is not int:
        raise ComponentError("component index/of must be integers")
    if not isinstance(value, str) or not isinstance(kcv_, str) or not _HEX6.fullmatch(kcv_):
        raise ComponentError("component value or KCV malformed")
    if not isinstance(kek_kcv, str) or (kek_kcv and not _HEX6.fullmatch(kek_kcv)):
        raise ComponentError("component KEK KCV malformed")
    comp = KeyComponent.from_hex(index, of, value, expected_kcv=kcv_)
    return KeyComponent(index=comp.index, of=comp.of, value=comp.value, kek_kcv=kek_kcv.upper())


def write_component_file(path: str | Path, component: KeyComponent) -> Path:
    """Write one officer's component file (0600, fsync'd). Refuses to overwrite an existing file."""
    p = Path(path)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise ComponentError(f"component file {p} already exists; refusing to overwrite") from None
    except OSError as exc:
        raise ComponentError(f"cannot create component file {p}: {exc.strerror}") from None
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(component_to_json(component))
        f.flush()
        os.fsync(f.fileno())
    return p


def read_component_file(path: str | Path, expected_kcv: str | None = None) -> KeyComponent:
    """Read and check a component file; ``expected_kcv`` is what the officer was told, when given."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            raw = f.read(MAX_COMPONENT_FILE_BYTES + 1)
    except OSError as exc:
        raise ComponentError(f"cannot read component file {p}: {exc.strerror}") from None
    try:
        comp = parse_component(raw)
    except ComponentError as exc:
        raise ComponentError(f"{p}: {exc}") from None
    if expected_kcv is not None:
        comp.check(expected_kcv)
    return comp


def kek_from_files(paths: Sequence[str | Path], expected_kek_kcv: str | None = None) -> bytes:
    """Read 2 or 3 component files and combine them into the KEK."""
    return combine([read_component_file(p) for p in paths], expected_kek_kcv)
