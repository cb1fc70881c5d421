"""No key bytes — raw, hex upper or lower, base64 — in reprs, exceptions, logs or the store file."""

from __future__ import annotations

import base64
import json
import logging
import traceback
from pathlib import Path

import pytest

from keys.ceremony import run_ceremony
from keys.components import ComponentError, KeyComponent, read_component_file
from keys.store import KeyStore, KeyStoreError
from keys.suite import CryptoError


def _forms(secret: bytes) -> list[str]:
    return [secret.hex(), secret.hex().upper(), base64.b64encode(secret).decode()]


def _assert_clean(text: str | bytes, secrets: list[bytes], where: str) -> None:
    for s in secrets:
        if isinstance(text, bytes):
            assert s not in text, f"raw key bytes in {where}"
            needles = [f.encode() for f in _forms(s)]
        else:
            needles = _forms(s)
        for n in needles:
            assert n not in text, f"key material in {where}"


@pytest.fixture
def ceremony(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.DEBUG)
    path = tmp_path / "ks.json"
    result = run_ceremony(path, 3, generate=True)
    files = [c[2] for c in result.components]
    comps = [read_component_file(f) for f in files]
    store = KeyStore.from_components(path, files)
    store.generate_symmetric("tmk:T0000001", "3des")
    store.generate_sm2("T0000001")
    store.rotate("issuer")
    ks = store.issuer_key_set()
    secrets = [c.value for c in comps]
    kek = bytes(a ^ b ^ c for a, b, c in zip(*(c.value for c in comps), strict=True))
    secrets.append(kek)
    for info in store.list():
        if info.kind == "symmetric":
            secrets.append(store.get_symmetric(info.purpose, info.version))
        else:
            secrets.append(store.get_sm2(info.purpose, info.version).private_key)
    return path, files, comps, store, ks, result, secrets


def test_store_file_has_no_key_bytes(ceremony) -> None:
    path, *_, secrets = ceremony
    _assert_clean(path.read_bytes(), secrets, "the store file")
    assert len(secrets) == 3 + 1 + 2 * 5 + 1 + 2  # components, KEK, issuer v1 and v2, TMK, 2 SM2 private keys


def test_reprs_have_no_key_bytes(ceremony) -> None:
    _path, _files, comps, store, ks, result, secrets = ceremony
    objects = [store, ks, result, *comps, *store.list(), store.get_sm2("clearing"), store._sealer]
    for obj in objects:
        _assert_clean(repr(obj), secrets, f"repr({type(obj).__name__})")
        _assert_clean(str(obj), secrets, f"str({type(obj).__name__})")
    _assert_clean(json.dumps(result.to_dict()), secrets, "the ceremony result")


def _raised(fn) -> CryptoError:
    with pytest.raises(CryptoError) as info:
        fn()
    return info.value


def test_exceptions_have_no_key_bytes(ceremony, tmp_path: Path) -> None:
    path, files, comps, store, _ks, _result, secrets = ceremony
    wrong = bytes(16)
    tampered = tmp_path / "tampered.json"
    doc = json.loads(path.read_text())
    doc["entries"][0]["ciphertext"] = doc["entries"][1]["ciphertext"]
    tampered.write_text(json.dumps(doc))
    errors = [
        _raised(lambda: KeyStore.open(path, wrong)),
        _raised(lambda: KeyStore.open(path, secrets[0])),  # a single component is not the KEK
        _raised(lambda: KeyStore.open(tampered, secrets[3])),
        _raised(lambda: KeyStore.from_components(path, files[:2])),
        _raised(lambda: KeyComponent.from_hex(1, 3, comps[0].value.hex(), expected_kcv="000000")),
        _raised(lambda: store.get_symmetric("tmk:T0000009")),
        _raised(lambda: store.put_symmetric("bogus", secrets[5], "sm4")),
        _raised(lambda: store.put_symmetric("tac", secrets[5] + b"\x00", "sm4")),
    ]
    store.zeroize("tmk:T0000001")
    errors.append(_raised(lambda: store.get_symmetric("tmk:T0000001")))
    for exc in errors:
        text = "".join(traceback.format_exception(exc)) + repr(exc) + str(exc.args)
        _assert_clean(text, secrets, f"exception {type(exc).__name__}: {exc}")
    assert any(isinstance(e, KeyStoreError) for e in errors) and any(isinstance(e, ComponentError) for e in errors)


def test_logs_have_no_key_bytes(ceremony, caplog: pytest.LogCaptureFixture) -> None:
    *_, store, _ks, _result, secrets = ceremony
    store.zeroize()
    assert any("keystore" in r.getMessage() for r in caplog.records)
    for record in caplog.records:
        _assert_clean(record.getMessage() + repr(record.__dict__), secrets, "a log record")
