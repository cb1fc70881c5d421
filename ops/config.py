"""Configuration (pydantic-settings): environment ``CAREPAY_…``, a TOML file, then defaults.

The TOML file is ``$CAREPAY_CONFIG`` or ``./carepay.toml`` when present. Nested
sections use ``__`` in environment names (``CAREPAY_CLEARING__CUTOFF_LOCAL_TIME``).
Secrets are ``SecretStr`` and never print.
"""

from __future__ import annotations

import os
import re
from datetime import time
from pathlib import Path

from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

DEFAULT_AID_HEX = "D15600000599434152455041590001"  # proprietary D156… civil-affairs partition AID (house value)


class CardSettings(BaseModel):
    """The civil-affairs partition and the terminal's card rules."""

    suite: str = "sm4"
    aid_hex: str = DEFAULT_AID_HEX
    pin_threshold_fen: int = 20_000
    apdu_timeout_ms: int = 3_000


class TerminalSettings(BaseModel):
    """The terminal agent."""

    answer_timeout_ms: int = 10_000
    reversal_retry_ms: int = 2_000
    offline_floor_limit_fen: int = 5_000
    offline_max_per_card: int = 3
    heartbeat_s: int = 60
    journal_path: str = ""
    metrics_port: int = 0  # 0 = no /metrics endpoint


class ClearingSettings(BaseModel):
    """The clearing service and end of day."""

    cutoff_local_time: time = time(23, 0)
    timezone: str = "Asia/Shanghai"
    group_commit_window_ms: int = 5  # bound on gathering a ledger batch (never a wait: see clearing.ledger)
    group_commit_max_batch: int = 1000
    message_max_age_s: int = 300
    fee_rate_ppm: int = 6_000  # 0.6 % processing fee, borne by the issuing bank
    bank_code: str = "BJBANK"
    workers: int = 1
    metrics_port: int = 0


class Settings(BaseSettings):
    """Effective configuration of one carepay process."""

    model_config = SettingsConfigDict(env_prefix="CAREPAY_", env_nested_delimiter="__", extra="ignore")

    data_dir: Path = Path("carepay-data")
    db_url: str = ""
    mqtt_url: str = "mqtt://127.0.0.1:1883"
    mqtt_password: SecretStr | None = None
    keystore_path: str = ""
    keystore_passphrase: SecretStr | None = None
    log_json: bool = False
    log_level: str = "INFO"
    card: CardSettings = Field(default_factory=CardSettings)
    terminal: TerminalSettings = Field(default_factory=TerminalSettings)
    clearing: ClearingSettings = Field(default_factory=ClearingSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_path = os.environ.get("CAREPAY_CONFIG", "carepay.toml")
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if Path(toml_path).is_file():
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_path))
        return tuple(sources)

    def public_dict(self) -> dict[str, object]:
        """The effective configuration as plain data with every secret hidden (``config show``).

        ``SecretStr`` fields print as ``**********``; a password inside a URL
        (``mqtt://t1:pw@host``, ``postgresql://u:pw@host/db``) is replaced by ``***``.
        """
        data = self.model_dump(mode="json")
        data["db_url_effective"] = self.resolved_db_url()
        for name in ("db_url", "db_url_effective", "mqtt_url"):
            data[name] = redact_url(str(data[name]))
        return _hide_secret_fields(data)

    def resolved_db_url(self) -> str:
        """The database URL: explicit, else an SQLite file under the data directory."""
        if self.db_url:
            return self.db_url
        return f"sqlite+aiosqlite:///{(self.data_dir / 'carepay.db').resolve()}"


SECRET_MASK = "**********"


def redact_url(url: str) -> str:
    """``url`` with the password of its userinfo replaced by ``***``.

    >>> redact_url("postgresql+asyncpg://clearing:s3cret@db.internal:5432/carepay")
    'postgresql+asyncpg://clearing:***@db.internal:5432/carepay'
    >>> redact_url("sqlite+aiosqlite:///data/carepay.db")
    'sqlite+aiosqlite:///data/carepay.db'
    """
    return _URL_PASSWORD_RE.sub(r"\1***@", url)


_URL_PASSWORD_RE = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.\-]*://[^:/@]*:)[^/]*@")


def _hide_secret_fields(data: dict[str, object]) -> dict[str, object]:
    """Any field named like a secret (see ``ops.logging.is_secret_name``) and set shows as the mask."""
    from ops.logging import is_secret_name

    out: dict[str, object] = {}
    for name, value in data.items():
        if isinstance(value, dict):
            out[name] = _hide_secret_fields(value)
        elif is_secret_name(name) and value not in (None, ""):
            out[name] = SECRET_MASK
        else:
            out[name] = value
    return out


def load_settings(**overrides: object) -> Settings:
    """Build the settings from the environment and the TOML file, with explicit overrides on top."""
    return Settings(**overrides)  # type: ignore[arg-type]
