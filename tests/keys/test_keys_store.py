"""The encrypted key store: round trips, versions and rotation, zeroisation, tamper detection, atomic writes."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from keys import sm2
from keys.ceremony import demo_sm2_pair, run_ceremony
from keys.components import ComponentError, generate_components, write_component_file
from keys.cryptogram import compute_tac, cryptogram_data, verify_tac
from keys.issuer import PURPOSES, IssuerKeySet
from keys.store import ENV_COMPONENTS, ENV_STORE_PATH, KeyStore, KeyStoreError
from keys.suite import DES3, SM4

KEK = bytes.fromhex("00112233445566778899AABBCCDDEEFF")
OTHER_KEK = bytes.fromhex("FFEEDDCCBBAA99887766554433221100")
APP_SERIAL = bytes.fromhex("0000000000000001")


@pytest.fixture
def store_path(tmp_path: Path) -> Path:
    return tmp_path / "keystore.json"


@pytest.fixture
def store(store_path: Path) -> KeyStore:
    return KeyStore.create(store_path, KEK)


def test_create_open_round_trip(store: KeyStore, store_path: Path) -> None:
    key = os.urandom(16)
    assert store.put_symmetric("tmk:T0000001", key, "sm4") == 1
    reopened = KeyStore.open(store_path, KEK)
    assert reopened.get_symmetric("tmk:T0000001") == key
    (info,) = reopened.list()
    assert (info.purpose, info.version, info.kind, info.suite, info.status) == ("tmk:T0000001", 1, "symmetric",
                                                                                  "sm4", "active")
    assert stat.S_IMODE(os.stat(store_path).st_mode) == 0o600
    assert not [p for p in store_path.parent.iterdir() if p.name.endswith(".tmp")]


def test_create_refuses_existing_file(store: KeyStore, store_path: Path) -> None:
    with pytest.raises(KeyStoreError, match="already exists"):
        KeyStore.create(store_path, KEK)


def test_sm2_pair_round_trip(store: KeyStore, store_path: Path) -> None:
    pair = sm2.SM2KeyPair.generate()
    store.put_sm2("clearing", pair)
    got = KeyStore.open(store_path, KEK).get_sm2("sm2:clearing")
    assert got.private_key == pair.private_key
    assert got.public_key == sm2.normalize_public_key(pair.public_key)
    assert sm2.verify(pair.public_key, b"report", got.sign(b"report"))
    info = store.info("sm2:clearing")
    assert info.public_key == got.public_key.hex().upper() and len(info.kcv) == 6


def test_unknown_purposes_and_kind_mismatch_refused(store: KeyStore) -> None:
    for bad in ("master", "tmk:short", "sm2:", "tmk:T0000001x", "../etc"):
        with pytest.raises(KeyStoreError, match="unknown key purpose"):
            store.put_symmetric(bad, os.urandom(16), "sm4")
    with pytest.raises(KeyStoreError):
        store.put_symmetric("sm2:clearing", os.urandom(16), "sm4")
    with pytest.raises(KeyStoreError, match="16 bytes"):
        store.put_symmetric("tac", os.urandom(15), "sm4")
    store.put_symmetric("tac", os.urandom(16), "sm4")
    store.put_sm2("T0000001", sm2.SM2KeyPair.generate())
    with pytest.raises(KeyStoreError, match="not a symmetric"):
        store.get_symmetric("sm2:T0000001")
    with pytest.raises(KeyStoreError, match="no key"):
        store.get_symmetric("tmk:T0000009")


def test_versions_never_overwritten_and_old_versions_stay_usable(store: KeyStore) -> None:
    k1, k2 = os.urandom(16), os.urandom(16)
    store.put_symmetric("tmk:T0000001", k1, "sm4")
    assert store.put_symmetric("tmk:T0000001", k2, "sm4") == 2
    with pytest.raises(KeyStoreError, match="never overwritten"):
        store.put_symmetric("tmk:T0000001", k1, "sm4", version=2)
    assert store.get_symmetric("tmk:T0000001") == k2
    assert store.get_symmetric("tmk:T0000001", version=1) == k1
    assert [i.status for i in store.list()] == ["retired", "active"]
    v3 = store.rotate("tmk:T0000001")
    assert v3 == 3 and store.get_symmetric("tmk:T0000001") not in (k1, k2)
    assert store.get_symmetric("tmk:T0000001", version=2) == k2


def test_issuer_key_set_and_rotation_keep_old_cards_working(tmp_path: Path) -> None:
    result = run_ceremony(tmp_path / "ks.json", 2, generate=True, demo=True)
    files = [c[2] for c in result.components]
    store = KeyStore.from_components(tmp_path / "ks.json", files)
    ks1 = store.issuer_key_set()
    assert ks1.current_version == 1 and ks1.kcvs() == IssuerKeySet.demo().kcvs()
    old_card_key = ks1.card_key("tac", 1, APP_SERIAL)
    data = cryptogram_data(1_000, "voucher", "T0000001", 1, "20260301", "120000", 1)
    old_tac = compute_tac(old_card_key, data)

    assert store.rotate("issuer") == 2
    ks2 = KeyStore.from_components(tmp_path / "ks.json", files).issuer_key_set()
    assert ks2.current_version == 2 and ks2.versions() == [1, 2]
    assert verify_tac(ks2.card_key("tac", 1, APP_SERIAL), data, old_tac)  # old-version card still verifies
    assert ks2.card_key("tac", None, APP_SERIAL) != old_card_key  # new cards get version 2
    assert all(ks2.master(p, 1) == ks1.master(p, 1) for p in PURPOSES)


def test_rotating_one_issuer_purpose_keeps_the_complete_version_current(store: KeyStore) -> None:
    for p in PURPOSES:
        store.generate_symmetric(p, "3des")
    store.rotate("tac")
    ks = store.issuer_key_set()
    assert ks.suite is DES3 and ks.current_version == 1 and ks.has("tac", 2)
    assert store.rotate("issuer") == 3
    assert store.issuer_key_set().current_version == 3


def test_issuer_key_set_needs_every_purpose(store: KeyStore) -> None:
    store.generate_symmetric("tac", SM4)
    with pytest.raises(KeyStoreError, match="every purpose"):
        store.issuer_key_set()


def test_sm2_rotation(store: KeyStore) -> None:
    store.put_sm2("clearing", demo_sm2_pair())
    old = store.get_sm2("clearing")
    assert store.rotate("sm2:clearing") == 2
    assert store.get_sm2("clearing").public_key != old.public_key
    assert store.get_sm2("clearing", version=1) == old


def test_zeroize_one_purpose(store: KeyStore, store_path: Path) -> None:
    store.generate_symmetric("tmk:T0000001", SM4)
    store.rotate("tmk:T0000001")
    keep = os.urandom(16)
    store.put_symmetric("tmk:T0000002", keep, SM4)
    old_copy = store_path.with_name("old-inode")
    os.link(store_path, old_copy)  # a second name for the file the zeroisation replaces
    done = store.zeroize("tmk:T0000001")
    assert [(i.purpose, i.version) for i in done] == [("tmk:T0000001", 1), ("tmk:T0000001", 2)]
    assert set(old_copy.read_bytes()) == {0}  # the replaced file's blocks were overwritten
    reopened = KeyStore.open(store_path, KEK)
    for v in (None, 1, 2):
        with pytest.raises(KeyStoreError):
            reopened.get_symmetric("tmk:T0000001", v)
    assert reopened.get_symmetric("tmk:T0000002") == keep
    doc = json.loads(store_path.read_text())
    zeroized = [e for e in doc["entries"] if e["purpose"] == "tmk:T0000001"]
    assert all(e["status"] == "zeroized" and e["ciphertext"] is None and e["nonce"] is None for e in zeroized)


def test_zeroize_everything(store: KeyStore, store_path: Path) -> None:
    store.generate_symmetric("tac", SM4)
    store.generate_sm2("clearing")
    store.zeroize()
    reopened = KeyStore.open(store_path, KEK)
    assert {i.status for i in reopened.list()} == {"zeroized"}
    with pytest.raises(KeyStoreError, match="zeroized"):
        reopened.get_sm2("clearing", version=1)
    with pytest.raises(KeyStoreError):
        reopened.zeroize("tmk:T0000001")  # nothing by that purpose


def test_wrong_kek_refused(store: KeyStore, store_path: Path) -> None:
    store.generate_symmetric("tac", SM4)
    with pytest.raises(KeyStoreError, match="wrong key-encryption key"):
        KeyStore.open(store_path, OTHER_KEK)
    with pytest.raises(KeyStoreError):
        KeyStore.open(store_path, KEK[:15])


def _flip_hex(text: str) -> str:
    return ("1" if text[0] == "0" else "0") + text[1:]


def _edit(path: Path, change) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize(
    "change",
    [
        lambda d: d["entries"][0].__setitem__("ciphertext", _flip_hex(d["entries"][0]["ciphertext"])),
        lambda d: d["entries"][0].__setitem__("status", "active"),
        lambda d: d["entries"][1].__setitem__("kcv", "000000"),
        lambda d: d["entries"].pop(),
        lambda d: d["entries"].reverse(),
        lambda d: d.__setitem__("mac", "00" * 32),
        lambda d: d.pop("mac"),
    ],
    ids=["ciphertext", "status", "kcv", "removed-entry", "reordered", "mac", "no-mac"],
)
def test_tampered_file_detected_on_open(store: KeyStore, store_path: Path, change) -> None:
    store.generate_symmetric("tmk:T0000001", SM4)
    store.rotate("tmk:T0000001")
    _edit(store_path, change)
    with pytest.raises(KeyStoreError, match="integrity"):
        KeyStore.open(store_path, KEK)


def test_entry_aead_binds_metadata_even_with_a_valid_file_mac(store: KeyStore, store_path: Path) -> None:
    """An insider with the KEK-derived MAC key but swapping sealed blobs between entries is still caught."""
    store.generate_symmetric("tmk:T0000001", SM4)
    store.generate_symmetric("tmk:T0000002", SM4)
    doc = json.loads(store_path.read_text())
    a, b = doc["entries"]
    a["nonce"], a["ciphertext"], b["nonce"], b["ciphertext"] = b["nonce"], b["ciphertext"], a["nonce"], a["ciphertext"]
    del doc["mac"]
    from keys.store import _canonical

    doc["mac"] = store._sealer.mac(_canonical(doc))
    store_path.write_text(json.dumps(doc))
    reopened = KeyStore.open(store_path, KEK)
    with pytest.raises(KeyStoreError, match="authentication"):
        reopened.get_symmetric("tmk:T0000001")


@pytest.mark.parametrize("content", [b"", b"not json", b"[]", b'{"format": "other"}',
                                     b'{"format": "carepay-keystore", "format_version": 9}'])
def test_malformed_store_files(store_path: Path, content: bytes) -> None:
    store_path.write_bytes(content)
    with pytest.raises(KeyStoreError):
        KeyStore.open(store_path, KEK)


def test_missing_store_file(tmp_path: Path) -> None:
    with pytest.raises(KeyStoreError, match="no key store"):
        KeyStore.open(tmp_path / "nope.json", KEK)


def test_two_handles_do_not_lose_each_others_writes(store: KeyStore, store_path: Path) -> None:
    other = KeyStore.open(store_path, KEK)
    store.generate_symmetric("tmk:T0000001", SM4)
    other.generate_symmetric("tmk:T0000002", SM4)
    store.generate_symmetric("tmk:T0000003", SM4)
    assert {i.purpose for i in KeyStore.open(store_path, KEK).list()} == {
        "tmk:T0000001", "tmk:T0000002", "tmk:T0000003"}


def test_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    comps = generate_components(3)
    files = [str(write_component_file(tmp_path / f"c{c.index}", c)) for c in comps]
    run_ceremony(tmp_path / "ks.json", 3, component_files=files, initial_keys=False)
    monkeypatch.setenv(ENV_STORE_PATH, str(tmp_path / "ks.json"))
    monkeypatch.setenv(ENV_COMPONENTS, ",".join(files))
    assert KeyStore.from_env().list() == []
    monkeypatch.setenv(ENV_COMPONENTS, ",".join(files[:2]))
    with pytest.raises(ComponentError, match="all 3"):
        KeyStore.from_env()


def test_batch_writes_once_and_rolls_back_on_error(store: KeyStore, store_path: Path) -> None:
    before = store_path.stat().st_mtime_ns
    with store.batch():
        for i in range(20):
            store.generate_symmetric(f"tmk:T{i:07d}", SM4)
            store.generate_sm2(f"T{i:07d}")
        assert store_path.stat().st_mtime_ns == before  # nothing written inside the batch
    reopened = KeyStore.open(store_path, KEK)
    assert len(reopened.list()) == 40
    with pytest.raises(RuntimeError), store.batch():
        store.generate_symmetric("tmk:T9999999", SM4)
        raise RuntimeError("installation aborted")
    assert "tmk:T9999999" not in {i.purpose for i in store.list()}
    assert len(KeyStore.open(store_path, KEK).list()) == 40


def test_failed_ceremony_leaves_nothing_behind(tmp_path: Path) -> None:
    files = [tmp_path / "c1", tmp_path / "c2"]
    with pytest.raises(ComponentError):
        run_ceremony(tmp_path / "ks.json", 2, component_files=files, generate=True, expected_kek_kcv="000000")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
