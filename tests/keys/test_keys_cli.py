"""``carepay keys …``: the helper verbs reproduce the vectors; the officers' verbs drive the key store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from keys.diversify import kcv
from keys.issuer import IssuerKeySet
from keys.store import KeyStore
from ops.cli import main

ROOT = Path(__file__).resolve().parents[2]
SM4_KEY = "0123456789ABCDEFFEDCBA9876543210"


def _kek_args(files: list[str]) -> list[str]:
    return [arg for f in files for arg in ("--component-file", f)]


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["keys", "kcv", "--suite", "sm4", SM4_KEY], kcv(bytes.fromhex(SM4_KEY)).hex().upper()),
        (["keys", "kcv", "--suite", "3des", SM4_KEY], "08D7B4"),
        (["keys", "kcv", SM4_KEY.lower()], kcv(bytes.fromhex(SM4_KEY)).hex().upper()),
        (["keys", "mac", "--suite", "3des", "--key", "003238ABC57659DD", "--data",
          "000010000600112233445520120229135100"], "F15CAB75"),
        (["keys", "mac", "--suite", "3des", "--key", "003238ABC57659DD", "--data", "00001000"], "56988A13"),
        (["keys", "mac", "--suite", "3des", "--key", "FF" * 16, "--data",
          "04D600001411223344556677889900AABBCCDDEEFF", "--iv", "44A47DEB"], "F2F62231"),
        (["keys", "mac", "--suite", "sm4", "--key", SM4_KEY, "--data", "04D695000C0102030405060708", "--iv",
          "1122334455667788"], "5CD4AC71"),
        (["keys", "mac", "--suite", "sm4", "--key", "62B69D297358E7AD53F57EFA01C407E0", "--data", "00001000"],
         "C715602C"),
        (["keys", "diversify", "--suite", "sm4", "--key", SM4_KEY, "--factor", "1234567890ABCDEF"],
         "E86BCB4726B27D2760B62C4731E4F570"),
        (["keys", "diversify", "--suite", "sm4", "--key", SM4_KEY, "--factor", "1234567890ABCDEF", "--factor",
          "0000000000000001"], "BDF0CFED4835A30EB418EC6F8DE56A89"),
        (["keys", "diversify", "--suite", "3des", "--key", SM4_KEY, "--factor", "1234567890ABCDEF"],
         "479EF7C1ECFE64AC9BB75999A2E5CD53"),
        (["keys", "diversify", "--key", "11223344556677888877665544332211", "--factor", "0000000000000001"],
         "94AA6036A0259B3D5B6CE208675ADF13"),
    ],
    ids=["kcv-sm4", "kcv-3des", "kcv-lower-in", "mac1", "mac2", "line-protect", "sm4-line-protect", "sm4-mac2",
         "div-sm4", "div-sm4-2", "div-3des", "dpk"],
)
def test_helper_verbs_reproduce_vectors(capsys: pytest.CaptureFixture[str], argv: list[str], expected: str) -> None:
    code, out, err = run(capsys, *argv)
    assert (code, out, err) == (0, expected + "\n", "")


def test_helper_json_output(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "keys", "mac", "--suite", "3des", "--key", "003238ABC57659DD", "--data", "00001000",
                       "--json")
    assert code == 0 and json.loads(out) == {"suite": "3des", "mac": "56988A13"}


@pytest.mark.parametrize(
    "argv",
    [
        ["keys", "kcv", "--suite", "sm4", "0123"],
        ["keys", "kcv", "--suite", "sm4", "XYZ"],
        ["keys", "kcv", "--suite", "sm4", "ABC"],
        ["keys", "kcv", "--suite", "aes", SM4_KEY],
        ["keys", "mac", "--suite", "sm4", "--key", "00" * 8, "--data", "00"],
        ["keys", "mac", "--suite", "3des", "--key", "00" * 8, "--data", "0G"],
        ["keys", "mac", "--suite", "3des", "--key", "00" * 8, "--data", "00", "--iv", "00" * 9],
        ["keys", "diversify", "--key", SM4_KEY, "--factor", "1234"],
        ["keys", "diversify", "--key", SM4_KEY[:-2], "--factor", "1234567890ABCDEF"],
    ],
    ids=["short-key", "not-hex", "odd", "suite", "sm4-8-byte-key", "bad-data", "long-iv", "short-factor",
         "short-mk"],
)
def test_bad_input_is_one_line_exit_2(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("carepay: error:")
    assert SM4_KEY not in err  # a rejected key is never echoed back


def test_officer_workflow(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                          monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "ks.json"
    files = [str(tmp_path / f"officer{i}.json") for i in (1, 2, 3)]
    code, out, _ = run(capsys, "keys", "ceremony", "--store", str(store), "--components", "3", "--generate",
                       *_kek_args(files), "--json")
    assert code == 0
    doc = json.loads(out)
    assert [c["file"] for c in doc["components"]] == files and all(len(c["kcv"]) == 6 for c in doc["components"])
    assert {k["purpose"] for k in doc["keys"]} == {"internal_auth", "external_auth", "sm_mac", "tac", "pin",
                                                   "sm2:clearing"}
    kek_args = _kek_args(files)

    code, out, _ = run(capsys, "keys", "list", "--store", str(store), *kek_args, "--json")
    assert code == 0 and json.loads(out)["kek_kcv"] == doc["kek_kcv"] and len(json.loads(out)["keys"]) == 6

    monkeypatch.setenv("CAREPAY_KEY_COMPONENTS", ",".join(files))  # the env var instead of --component-file
    code, out, _ = run(capsys, "keys", "rotate", "--store", str(store), "--purpose", "issuer", "--json")
    assert code == 0 and json.loads(out)["version"] == 2 and len(json.loads(out)["keys"]) == 5
    code, out, _ = run(capsys, "keys", "add", "--store", str(store), "--purpose", "tmk:T0000001")
    assert code == 0 and out.startswith("tmk:T0000001 version 1 KCV ")
    code, out, _ = run(capsys, "keys", "rotate", "--store", str(store), "--purpose", "tmk:T0000001")
    assert code == 0 and out.startswith("tmk:T0000001 version 2 KCV ")

    code, _, err = run(capsys, "keys", "zeroize", "--store", str(store), "--purpose", "tmk:T0000001")
    assert code == 2 and "--yes" in err
    code, out, _ = run(capsys, "keys", "zeroize", "--store", str(store), "--purpose", "tmk:T0000001", "--yes",
                       "--json")
    assert code == 0 and len(json.loads(out)["zeroized"]) == 2

    opened = KeyStore.from_components(store, files)
    assert opened.issuer_key_set().current_version == 2
    assert {i.status for i in opened.list() if i.purpose == "tmk:T0000001"} == {"zeroized"}
    for f in files:  # no key bytes in anything printed during the whole session
        assert json.loads(Path(f).read_text())["value"] not in out


def test_officer_verbs_refuse_wrong_or_missing_components(capsys: pytest.CaptureFixture[str],
                                                           tmp_path: Path) -> None:
    store = tmp_path / "ks.json"
    assert run(capsys, "keys", "ceremony", "--store", str(store), "--generate")[0] == 0
    c1, c2 = (str(store) + ".component1", str(store) + ".component2")
    code, _, err = run(capsys, "keys", "list", "--store", str(store), "--component-file", c1)
    assert code == 2 and "components" in err
    other = tmp_path / "other.json"
    assert run(capsys, "keys", "ceremony", "--store", str(other), "--generate")[0] == 0
    code, _, err = run(capsys, "keys", "list", "--store", str(store), "--component-file", c1,
                       "--component-file", str(other) + ".component2")
    assert code == 2 and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "keys", "list", "--store", str(store), "--component-file", str(other) + ".component1",
                       "--component-file", str(other) + ".component2")
    assert code == 1 and "wrong key-encryption key" in err
    code, _, err = run(capsys, "keys", "ceremony", "--store", str(store), "--generate")
    assert code == 1 and "already exists" in err
    assert run(capsys, "keys", "list", "--store", str(store), "--component-file", c1, "--component-file", c2)[0] == 0


def test_ceremony_from_existing_component_files(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    first = tmp_path / "first.json"
    code, out, _ = run(capsys, "keys", "ceremony", "--store", str(first), "--generate", "--empty", "--json")
    kek_kcv = json.loads(out)["kek_kcv"]
    files = [str(first) + ".component1", str(first) + ".component2"]
    second = tmp_path / "second.json"
    code, out, err = run(capsys, "keys", "ceremony", "--store", str(second), "--kek-kcv", "000000",
                         *_kek_args(files))
    assert code == 2 and "expected 000000" in err and not second.exists()
    code, out, _ = run(capsys, "keys", "ceremony", "--store", str(second), "--kek-kcv", kek_kcv, "--suite", "3des",
                       *_kek_args(files), "--json")
    assert code == 0 and json.loads(out)["kek_kcv"] == kek_kcv
    assert KeyStore.from_components(second, files).issuer_key_set().suite.value == "3des"


def test_demo_ceremony_loads_the_demo_issuer_keys(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    store = tmp_path / "demo.json"
    code, out, _ = run(capsys, "keys", "ceremony", "--store", str(store), "--demo", "--json")
    assert code == 0 and json.loads(out)["demo"] is True
    files = [str(store) + ".component1", str(store) + ".component2"]
    ks = KeyStore.from_components(store, files).issuer_key_set()
    assert ks.kcvs() == IssuerKeySet.demo().kcvs()


def test_every_keys_verb_has_help_with_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    for verb in ("kcv", "mac", "diversify", "ceremony", "list", "rotate", "add", "zeroize"):
        code, out, _ = run(capsys, "keys", verb, "--help")
        assert code == 0 and "carepay keys" in out, verb


def test_installed_entry_point_subprocess() -> None:
    exe = Path(sys.executable).parent / "carepay"
    if not exe.exists():
        pytest.skip("carepay console script not installed in this interpreter's bin")
    env = {**os.environ, "NO_COLOR": "1"}
    ok = subprocess.run([str(exe), "keys", "mac", "--suite", "3des", "--key", "003238ABC57659DD", "--data",
                         "000010000600112233445520120229135100"], capture_output=True, text=True, env=env, cwd=ROOT,
                        timeout=60)
    assert (ok.returncode, ok.stdout) == (0, "F15CAB75\n")
    bad = subprocess.run([str(exe), "keys", "kcv", "--suite", "sm4", "00"], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=60)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
