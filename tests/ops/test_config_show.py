"""``carepay config show``: environment CAREPAY_… and a TOML file, secrets hidden."""

from __future__ import annotations

import json

import pytest

from tests.ops.cli_helpers import invoke


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    for name in list(__import__("os").environ):
        if name.startswith("CAREPAY_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)  # no ./carepay.toml from elsewhere


def _show(*args: str) -> dict:
    result = invoke("config", "show", "--json", *args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_defaults() -> None:
    doc = _show()
    assert doc["clearing"]["cutoff_local_time"] == "23:00:00"
    assert doc["card"]["pin_threshold_fen"] == 20_000  # not a secret for being named after the PIN
    assert doc["mqtt_url"] == "mqtt://127.0.0.1:1883"
    assert doc["db_url_effective"].startswith("sqlite+aiosqlite:///")
    assert doc["config_file"] is None


def test_environment_and_toml(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    toml = tmp_path / "site.toml"
    toml.write_text('log_level = "DEBUG"\n[clearing]\nfee_rate_ppm = 5000\nbank_code = "TOMLBANK"\n')
    monkeypatch.setenv("CAREPAY_CONFIG", str(toml))
    monkeypatch.setenv("CAREPAY_CLEARING__BANK_CODE", "ENVBANK")
    monkeypatch.setenv("CAREPAY_CLEARING__CUTOFF_LOCAL_TIME", "22:30")
    doc = _show()
    assert doc["log_level"] == "DEBUG"  # from TOML
    assert doc["clearing"]["fee_rate_ppm"] == 5000  # from TOML
    assert doc["clearing"]["bank_code"] == "ENVBANK"  # environment beats the file
    assert doc["clearing"]["cutoff_local_time"] == "22:30:00"
    assert doc["config_file"] == str(toml)


def test_config_option(tmp_path) -> None:
    toml = tmp_path / "other.toml"
    toml.write_text("[terminal]\noffline_floor_limit_fen = 777\n")
    assert _show("--config", str(toml))["terminal"]["offline_floor_limit_fen"] == 777
    missing = invoke("config", "show", "--config", str(tmp_path / "nope.toml"))
    assert missing.exit_code == 2


def test_secrets_hidden(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("CAREPAY_MQTT_PASSWORD", "mqtt-Secret-1")
    monkeypatch.setenv("CAREPAY_KEYSTORE_PASSPHRASE", "pass-Secret-2")
    monkeypatch.setenv("CAREPAY_DB_URL", "postgresql+asyncpg://clearing:db-Secret-3@db.internal:5432/carepay")
    monkeypatch.setenv("CAREPAY_MQTT_URL", "mqtts://clearing:url-Secret-4@broker:8883")
    for args in (["config", "show", "--json"], ["config", "show"]):
        result = invoke(*args)
        assert result.exit_code == 0, result.output
        for secret in ("mqtt-Secret-1", "pass-Secret-2", "db-Secret-3", "url-Secret-4"):
            assert secret not in result.output
    doc = _show()
    assert doc["mqtt_password"] == "**********" and doc["keystore_passphrase"] == "**********"
    assert doc["db_url"] == "postgresql+asyncpg://clearing:***@db.internal:5432/carepay"
    assert doc["mqtt_url"] == "mqtts://clearing:***@broker:8883"


def test_invalid_value_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CAREPAY_CLEARING__FEE_RATE_PPM", "lots")
    result = invoke("config", "show")
    assert result.exit_code == 2
