"""Report signatures: SM3 digest + SM2 signature beside the file; verify exits 0 / 1 / 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clearing.signing import (
    DATA_DIR_KEY_FILE,
    ReportSigner,
    VerifyStatus,
    load_data_dir_key,
    sig_path,
    signer_for,
    trusted_public_key,
    verify_file,
)
from keys.sm2 import SM2KeyPair
from keys.sm2 import verify as sm2_verify
from keys.sm3 import sm3
from tests.ops.cli_helpers import invoke


@pytest.fixture
def signed(tmp_path: Path) -> tuple[Path, Path]:
    data = tmp_path / "data"
    report = tmp_path / "daily.csv"
    report.write_text("class,count\nmatched,10\n", encoding="utf-8")
    signer_for(data).sign_file(report)
    return data, report


def test_signature_file_contents(signed: tuple[Path, Path]) -> None:
    data, report = signed
    doc = json.loads(sig_path(report).read_text())
    assert doc["digest_sm3"] == sm3(report.read_bytes()).hex()
    pair = load_data_dir_key(data, create=False)
    assert pair is not None and doc["public_key"] == pair.public_key.hex()
    assert (data / DATA_DIR_KEY_FILE).stat().st_mode & 0o077 == 0  # private key file not readable by others
    assert pair.private_key.hex() not in sig_path(report).read_text()
    sig = bytes.fromhex(doc.pop("signature"))
    body = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert sm2_verify(pair.public_key, body, sig)


def test_verify_intact_tampered_missing(signed: tuple[Path, Path]) -> None:
    data, report = signed
    trusted = trusted_public_key(data)
    assert verify_file(report, trusted).status is VerifyStatus.INTACT
    report.write_text("class,count\nmatched,11\n", encoding="utf-8")
    assert verify_file(report, trusted).status is VerifyStatus.TAMPERED
    sig_path(report).unlink()
    assert verify_file(report, trusted).status is VerifyStatus.MISSING
    assert verify_file(report.with_name("nope.csv")).status is VerifyStatus.MISSING


def test_resigned_by_another_key_is_tampered(signed: tuple[Path, Path]) -> None:
    data, report = signed
    report.write_text("forged\n", encoding="utf-8")
    ReportSigner(SM2KeyPair.generate(), "mallory").sign_file(report)
    assert verify_file(report).ok  # self-consistent…
    assert verify_file(report, trusted_public_key(data)).status is VerifyStatus.TAMPERED  # …but not our key


def test_edited_signature_fields_are_tampered(signed: tuple[Path, Path]) -> None:
    _, report = signed
    doc = json.loads(sig_path(report).read_text())
    doc["signer"] = "someone else"
    sig_path(report).write_text(json.dumps(doc))
    assert verify_file(report).status is VerifyStatus.TAMPERED
    sig_path(report).write_text("{not json")
    assert verify_file(report).status is VerifyStatus.TAMPERED


def test_cli_report_verify_exit_codes(signed: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    data, report = signed
    monkeypatch.setenv("CAREPAY_DATA_DIR", str(data))
    assert invoke("report", "verify", str(report)).exit_code == 0
    with report.open("a") as fh:
        fh.write("x\n")
    res = invoke("report", "verify", str(report), "--json")
    assert res.exit_code == 1 and json.loads(res.stdout)["status"] == "tampered"
    assert invoke("report", "verify", str(report.with_name("missing.html"))).exit_code == 2
