"""Property tests: the key store file and entry parsers, and the CLI hex parser, never crash on any input."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keys.store import KeyStore, KeyStoreError, _Entry
from ops.cli_keys import parse_hex
from ops.errors import BadInput

KEK = bytes(range(16))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 300), st.text(max_size=20))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                            st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                           max_leaves=8)
ENTRY_KEYS = ["purpose", "version", "kind", "suite", "kcv", "status", "created_at", "public_key", "nonce",
              "ciphertext"]
entry_docs = st.dictionaries(st.sampled_from(ENTRY_KEYS), st.one_of(
    scalars, st.sampled_from(["tac", "tmk:T0000001", "sm2:clearing", "symmetric", "sm2", "active", "retired",
                              "zeroized", "sm4"])), max_size=10)


@settings(max_examples=200, deadline=None)
@given(doc=st.one_of(entry_docs, json_values))
def test_entry_parser_accepts_or_refuses_cleanly(doc: object) -> None:
    try:
        entry = _Entry.from_json(doc)
    except KeyStoreError:
        return
    assert 1 <= entry.version <= 255 and entry.status in ("active", "retired", "zeroized")


@settings(max_examples=100, deadline=None)
@given(content=st.one_of(
    st.binary(max_size=200),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.dictionaries(st.sampled_from(["format", "format_version", "store_id", "kek_kcv", "entries", "mac"]),
                    json_values, max_size=6).map(
        lambda d: json.dumps({"format": "carepay-keystore", "format_version": 1, **d}).encode()),
))
def test_store_open_refuses_garbage_cleanly(content: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "ks.json"
        path.write_bytes(content)
        try:
            KeyStore.open(path, KEK)
        except KeyStoreError:
            return
        raise AssertionError("a store without a valid MAC under this KEK was opened")


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=80), lengths=st.one_of(st.none(), st.just((16,)), st.just((8, 16))))
def test_parse_hex_returns_bytes_or_bad_input(text: str, lengths: tuple[int, ...] | None) -> None:
    try:
        raw = parse_hex(text, "--key", lengths)
    except BadInput as exc:
        assert "\n" not in str(exc)
        return
    assert raw.hex() == "".join(text.split()).lower()
    assert lengths is None or len(raw) in lengths


def test_store_with_a_non_ascii_kcv_is_refused_not_crashed(tmp_path: Path) -> None:
    # found by hypothesis: hmac.compare_digest raises TypeError on a non-ASCII str
    path = tmp_path / "ks.json"
    path.write_text(json.dumps({"format": "carepay-keystore", "format_version": 1, "store_id": "x",
                                "kek_kcv": "\u00e9" * 6}))
    with pytest.raises(KeyStoreError, match="malformed kek_kcv"):
        KeyStore.open(path, KEK)
