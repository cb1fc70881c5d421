"""Key components (密钥分量): XOR into the KEK, KCV checks, component files, parser robustness."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keys.components import (
    ComponentError,
    KeyComponent,
    combine,
    component_to_json,
    generate_components,
    kcv_hex,
    kek_from_files,
    parse_component,
    read_component_file,
    write_component_file,
)
from keys.suite import encrypt_ecb

SM4_KEY_HEX = "0123456789ABCDEFFEDCBA9876543210"


def test_kcv_hex_is_sm4_over_zero_block() -> None:
    key = bytes.fromhex(SM4_KEY_HEX)
    assert kcv_hex(key) == encrypt_ecb(key, bytes(16)).hex().upper()[:6]


@pytest.mark.parametrize("count", [2, 3])
def test_generated_components_xor_to_announced_kek(count: int) -> None:
    comps = generate_components(count)
    assert [c.index for c in comps] == list(range(1, count + 1))
    kek = combine(comps)
    expected = 0
    for c in comps:
        expected ^= int.from_bytes(c.value, "big")
    assert kek == expected.to_bytes(16, "big")
    assert all(c.kek_kcv == kcv_hex(kek) for c in comps)
    assert combine(list(reversed(comps))) == kek  # order of entry does not matter


@pytest.mark.parametrize("count", [1, 4])
def test_component_count_outside_two_or_three_refused(count: int) -> None:
    with pytest.raises(ComponentError):
        generate_components(count)


def test_component_with_wrong_kcv_is_refused() -> None:
    comp = generate_components(2)[0]
    with pytest.raises(ComponentError, match="does not match"):
        KeyComponent.from_hex(1, 2, comp.value.hex(), expected_kcv="000000")
    assert KeyComponent.from_hex(1, 2, comp.value.hex(" ", 2), expected_kcv=comp.kcv.lower()).value == comp.value


def test_combine_refuses_missing_duplicate_or_foreign_components() -> None:
    a, b, c = generate_components(3)
    with pytest.raises(ComponentError, match="all 3"):
        combine([a, b])
    with pytest.raises(ComponentError, match=r"1\.\.N"):
        combine([a, a, b])
    x, _y = generate_components(2)
    with pytest.raises(ComponentError):
        combine([x, KeyComponent(index=2, of=2, value=b.value, kek_kcv=b.kek_kcv)])  # another ceremony
    with pytest.raises(ComponentError, match="expected"):
        combine([a, b, c], expected_kek_kcv="ABCDEF" if a.kek_kcv != "ABCDEF" else "123456")


def test_component_file_round_trip_and_mode(tmp_path: Path) -> None:
    comps = generate_components(2)
    paths = [write_component_file(tmp_path / f"c{c.index}", c) for c in comps]
    assert stat.S_IMODE(os.stat(paths[0]).st_mode) == 0o600
    assert read_component_file(paths[0], expected_kcv=comps[0].kcv) == comps[0]
    assert kek_from_files(paths) == combine(comps)
    with pytest.raises(ComponentError, match="already exists"):
        write_component_file(paths[0], comps[0])


def test_component_file_with_edited_value_is_refused(tmp_path: Path) -> None:
    comp = generate_components(2)[0]
    doc = json.loads(component_to_json(comp))
    doc["value"] = ("0" if doc["value"][0] != "0" else "1") + doc["value"][1:]
    (tmp_path / "c").write_text(json.dumps(doc))
    with pytest.raises(ComponentError, match="KCV"):
        read_component_file(tmp_path / "c")


def test_component_repr_hides_value() -> None:
    comp = generate_components(2)[0]
    for text in (repr(comp), str(comp), f"{comp}"):
        assert comp.value.hex() not in text.lower()
        assert comp.kcv in text


@settings(max_examples=200, deadline=None)
@given(st.one_of(
    st.binary(max_size=300),
    st.text(max_size=300),
    st.dictionaries(st.sampled_from(["format", "format_version", "index", "of", "value", "kcv", "kek_kcv"]),
                    st.one_of(st.integers(), st.text(max_size=40), st.none(), st.lists(st.integers(), max_size=2)),
                    ).map(json.dumps),
))
def test_parse_component_never_crashes(data: str | bytes) -> None:
    try:
        comp = parse_component(data)
    except ComponentError:
        return
    assert len(comp.value) == 16
