"""BER-TLV (ISO/IEC 8825-1 as ISO 7816-4 and EMV use it): tags, lengths, nested templates, the FCI.

A tag is kept as an int of its encoded bytes (``0x6F``, ``0x9F08``, ``0xBF0C``). Bit 6 of its first
byte marks a constructed object, whose value is itself a sequence of TLVs and is decoded
recursively. Lengths are short form (0..127) or long form ``81``..``84`` followed by 1..4 bytes;
the indefinite form ``80`` is rejected (ISO 7816 does not use it).

>>> tlvs = decode(bytes.fromhex("6F0D8405D156000001A5049F080101"))
>>> find(tlvs, 0x9F08).value.hex()
'01'
>>> encode(tlvs).hex().upper()
'6F0D8405D156000001A5049F080101'
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

MAX_TAG_BYTES = 4
MAX_LENGTH_BYTES = 4  # 84 xx xx xx xx
MAX_TLV_DEPTH = 8  # nesting of constructed objects
MAX_TLV_INPUT_BYTES = 1 << 20  # a card never sends more; a bigger input is refused before parsing

CONSTRUCTED_BIT = 0x20
MULTIBYTE_TAG_MASK = 0x1F


class TlvError(ValueError):
    """Malformed BER-TLV: truncated tag/length/value, bad length form, too deep, or trailing garbage."""


def tag_bytes(tag: int) -> bytes:
    """The encoded bytes of a tag given as an int (``0x9F08`` -> ``9F 08``); TlvError if not a valid tag."""
    if not isinstance(tag, int) or tag < 0:
        raise TlvError(f"tag must be a non-negative int, got {tag!r}")
    raw = tag.to_bytes(max(1, (tag.bit_length() + 7) // 8), "big")
    if len(raw) > MAX_TAG_BYTES:
        raise TlvError(f"tag {tag:X} longer than {MAX_TAG_BYTES} bytes")
    _, used = _read_tag(raw, 0)
    if used != len(raw):
        raise TlvError(f"tag {tag:X} is not a well-formed BER tag")
    return raw


def is_constructed(tag: int) -> bool:
    """True when the tag's first byte has the constructed bit (b6) set."""
    return bool(tag_bytes(tag)[0] & CONSTRUCTED_BIT)


def length_bytes(n: int) -> bytes:
    """The BER length field for ``n`` in the shortest form."""
    if n < 0:
        raise TlvError(f"negative length {n}")
    if n < 0x80:
        return bytes([n])
    raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
    if len(raw) > MAX_LENGTH_BYTES:
        raise TlvError(f"length {n} needs more than {MAX_LENGTH_BYTES} bytes")
    return bytes([0x80 | len(raw)]) + raw


@dataclass(frozen=True)
class Tlv:
    """One data object (数据对象). Primitive: ``value`` holds the bytes. Constructed: ``children``."""

    tag: int
    value: bytes = b""
    children: tuple[Tlv, ...] = field(default=())

    def __post_init__(self) -> None:
        constructed = is_constructed(self.tag)
        object.__setattr__(self, "children", tuple(self.children))
        if not constructed and self.children:
            raise TlvError(f"primitive tag {self.tag:X} cannot have children")
        if constructed and self.value and not self.children:
            # given as raw bytes: decode so the object has one canonical form
            object.__setattr__(self, "children", tuple(decode(self.value)))
        if constructed:
            object.__setattr__(self, "value", b"".join(c.to_bytes() for c in self.children))
        elif not isinstance(self.value, bytes | bytearray):
            raise TlvError(f"value of {self.tag:X} must be bytes")
        else:
            object.__setattr__(self, "value", bytes(self.value))

    @property
    def constructed(self) -> bool:
        return is_constructed(self.tag)

    def to_bytes(self) -> bytes:
        return tag_bytes(self.tag) + length_bytes(len(self.value)) + self.value

    def find(self, tag: int) -> Tlv | None:
        """The first object with ``tag`` among the children (depth first), or None."""
        return find(self.children, tag)

    def walk(self) -> Iterator[Tlv]:
        """This object and every nested object, depth first."""
        yield self
        for child in self.children:
            yield from child.walk()

    def __repr__(self) -> str:
        if self.constructed:
            return f"Tlv(0x{self.tag:X}, children={list(self.children)!r})"
        return f"Tlv(0x{self.tag:X}, <{len(self.value)} bytes>)"


def _read_tag(data: bytes, pos: int) -> tuple[int, int]:
    if pos >= len(data):
        raise TlvError(f"truncated tag at offset {pos}")
    start = pos
    first = data[pos]
    pos += 1
    if first & MULTIBYTE_TAG_MASK == MULTIBYTE_TAG_MASK:
        while True:
            if pos >= len(data):
                raise TlvError(f"truncated multi-byte tag at offset {start}")
            b = data[pos]
            pos += 1
            if pos - start > MAX_TAG_BYTES:
                raise TlvError(f"tag at offset {start} longer than {MAX_TAG_BYTES} bytes")
            if not b & 0x80:
                break
    return int.from_bytes(data[start:pos], "big"), pos


def _read_length(data: bytes, pos: int) -> tuple[int, int]:
    if pos >= len(data):
        raise TlvError(f"truncated length at offset {pos}")
    first = data[pos]
    pos += 1
    if first < 0x80:
        return first, pos
    count = first & 0x7F
    if count == 0:
        raise TlvError(f"indefinite length (80) at offset {pos - 1} is not allowed")
    if count > MAX_LENGTH_BYTES:
        raise TlvError(f"length field of {count} bytes at offset {pos - 1} exceeds {MAX_LENGTH_BYTES}")
    if pos + count > len(data):
        raise TlvError(f"truncated long-form length at offset {pos - 1}")
    return int.from_bytes(data[pos : pos + count], "big"), pos + count


def _decode(data: bytes, depth: int) -> list[Tlv]:
    if data and depth > MAX_TLV_DEPTH:
        raise TlvError(f"TLV nesting deeper than {MAX_TLV_DEPTH}")
    out: list[Tlv] = []
    pos = 0
    while pos < len(data):
        tag, pos = _read_tag(data, pos)
        length, pos = _read_length(data, pos)
        end = pos + length
        if end > len(data):
            raise TlvError(f"value of tag {tag:X} needs {length} bytes, only {len(data) - pos} left")
        value = data[pos:end]
        pos = end
        if tag_bytes(tag)[0] & CONSTRUCTED_BIT:
            out.append(Tlv(tag, children=tuple(_decode(value, depth + 1))))
        else:
            out.append(Tlv(tag, value))
    return out


def decode(data: bytes) -> list[Tlv]:
    """Decode a sequence of BER-TLV objects (constructed ones recursively); TlvError if malformed."""
    if not isinstance(data, bytes | bytearray):
        raise TlvError(f"TLV input must be bytes, got {type(data).__name__}")
    if len(data) > MAX_TLV_INPUT_BYTES:
        raise TlvError(f"TLV input of {len(data)} bytes exceeds {MAX_TLV_INPUT_BYTES}")
    return _decode(bytes(data), 1)


def decode_one(data: bytes) -> Tlv:
    """Exactly one top-level object; TlvError when there is none or something follows it."""
    tlvs = decode(data)
    if len(tlvs) != 1:
        raise TlvError(f"expected one TLV object, found {len(tlvs)}")
    return tlvs[0]


def encode(tlvs: Iterable[Tlv]) -> bytes:
    return b"".join(t.to_bytes() for t in tlvs)


def find(tlvs: Iterable[Tlv], tag: int) -> Tlv | None:
    """The first object with ``tag`` anywhere in ``tlvs`` (depth first), or None."""
    for top in tlvs:
        for t in top.walk():
            if t.tag == tag:
                return t
    return None


def find_all(tlvs: Iterable[Tlv], tag: int) -> list[Tlv]:
    return [t for top in tlvs for t in top.walk() if t.tag == tag]


# --- FCI (文件控制信息) returned by SELECT -------------------------------------------------------

TAG_FCI = 0x6F
TAG_DF_NAME = 0x84
TAG_FCI_PROPRIETARY = 0xA5
TAG_APP_LABEL = 0x50
TAG_ISSUER_DISCRETIONARY = 0xBF0C
# House convention for the civil-affairs partition (no public layout exists, reference §3.4):
TAG_APP_SERIAL = 0x9F0C  # 应用序列号, 8 bytes: the key diversification factor
TAG_KEY_VERSION = 0x9F08  # key version (密钥版本), 1 byte
TAG_ALGORITHM = 0x9F09  # algorithm id, 1 byte (see ALG_*)
ALG_3DES = 0x00
ALG_SM4 = 0x04


@dataclass(frozen=True)
class Fci:
    """The FCI template of a selected application: DF name (AID) and the proprietary template (A5)."""

    df_name: bytes
    proprietary: tuple[Tlv, ...] = ()

    def get(self, tag: int) -> bytes | None:
        t = find(self.proprietary, tag)
        return t.value if t is not None else None

    @property
    def app_serial(self) -> bytes | None:
        return self.get(TAG_APP_SERIAL)

    @property
    def key_version(self) -> int | None:
        v = self.get(TAG_KEY_VERSION)
        return v[0] if v and len(v) == 1 else None

    @property
    def algorithm(self) -> int | None:
        v = self.get(TAG_ALGORITHM)
        return v[0] if v and len(v) == 1 else None

    def to_bytes(self) -> bytes:
        inner = [Tlv(TAG_DF_NAME, self.df_name)]
        if self.proprietary:
            inner.append(Tlv(TAG_FCI_PROPRIETARY, children=self.proprietary))
        return Tlv(TAG_FCI, children=tuple(inner)).to_bytes()


def build_fci(
    df_name: bytes,
    *,
    app_serial: bytes | None = None,
    key_version: int | None = None,
    algorithm: int | None = None,
    label: str | None = None,
    extra: Iterable[Tlv] = (),
) -> bytes:
    """FCI bytes ``6F { 84 AID, A5 { 50 label, 9F0C serial, 9F08 key version, 9F09 alg, ... } }``."""
    prop: list[Tlv] = []
    if label is not None:
        prop.append(Tlv(TAG_APP_LABEL, label.encode("ascii")))
    if app_serial is not None:
        prop.append(Tlv(TAG_APP_SERIAL, app_serial))
    if key_version is not None:
        prop.append(Tlv(TAG_KEY_VERSION, bytes([key_version])))
    if algorithm is not None:
        prop.append(Tlv(TAG_ALGORITHM, bytes([algorithm])))
    prop.extend(extra)
    return Fci(df_name, tuple(prop)).to_bytes()


def parse_fci(data: bytes) -> Fci:
    """Parse SELECT response data into an Fci; TlvError when it is not a 6F template with an 84 DF name."""
    top = decode_one(data)
    if top.tag != TAG_FCI:
        raise TlvError(f"FCI must start with tag 6F, got {top.tag:X}")
    name = next((c for c in top.children if c.tag == TAG_DF_NAME), None)
    if name is None:
        raise TlvError("FCI has no DF name (tag 84)")
    prop = next((c for c in top.children if c.tag == TAG_FCI_PROPRIETARY), None)
    return Fci(name.value, prop.children if prop is not None else ())
