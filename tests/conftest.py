"""Shared fixtures: the real services this machine runs, with honest fallbacks.

- MQTT: mosquitto on 127.0.0.1:1883. Under CI (CI=true) a missing broker fails
  loudly; elsewhere the tests fall back to the embedded amqtt broker.
- PostgreSQL: 127.0.0.1:5432, database ``test``, trust auth. Under CI a missing
  server fails loudly; elsewhere PostgreSQL tests skip with the reason printed.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Two shared cores: wall-clock deadlines would make property tests flaky, not stricter.
settings.register_profile("carepay", deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("carepay")

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
MQTT_HOST, MQTT_PORT = "127.0.0.1", 1883
PG_HOST, PG_PORT = "127.0.0.1", 5432
PG_URL = os.environ.get("CAREPAY_TEST_PG_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test")


def port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    """True when something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def pg_url() -> str:
    """URL of the real PostgreSQL test database; fails in CI, skips elsewhere, when it is down."""
    if not port_open(PG_HOST, PG_PORT):
        msg = f"PostgreSQL not reachable on {PG_HOST}:{PG_PORT}"
        if IN_CI:
            pytest.fail(f"{msg} (CI=true: the service must run)")
        pytest.skip(f"{msg}; PostgreSQL tests skipped")
    try:
        import asyncpg  # noqa: F401
    except ImportError:
        if IN_CI:
            pytest.fail("asyncpg not installed (install the 'pg' or 'dev' extra)")
        pytest.skip("asyncpg not installed; PostgreSQL tests skipped")
    return PG_URL


@pytest.fixture(scope="session")
def mosquitto_url() -> str:
    """URL of the real mosquitto broker; fails in CI, skips elsewhere, when it is down."""
    if not port_open(MQTT_HOST, MQTT_PORT):
        msg = f"mosquitto not reachable on {MQTT_HOST}:{MQTT_PORT}"
        if IN_CI:
            pytest.fail(f"{msg} (CI=true: the service must run)")
        pytest.skip(f"{msg}; mosquitto-only tests skipped")
    return f"mqtt://{MQTT_HOST}:{MQTT_PORT}"


@pytest.fixture
async def mqtt_url() -> AsyncIterator[str]:
    """A broker URL: mosquitto when it runs; in CI its absence fails; elsewhere the embedded broker."""
    if port_open(MQTT_HOST, MQTT_PORT):
        yield f"mqtt://{MQTT_HOST}:{MQTT_PORT}"
        return
    if IN_CI:
        pytest.fail(f"mosquitto not reachable on {MQTT_HOST}:{MQTT_PORT} (CI=true: the service must run)")
    from ops.embedded_broker import EmbeddedBroker

    print(f"mosquitto not reachable on {MQTT_HOST}:{MQTT_PORT}; using the embedded broker", file=sys.stderr)
    async with EmbeddedBroker() as broker:
        yield broker.url


@pytest.fixture
def tmp_data(tmp_path: Path) -> Iterator[Path]:
    """A per-test data directory."""
    d = tmp_path / "data"
    d.mkdir()
    yield d


def pytest_report_header(config: pytest.Config) -> list[str]:
    return [
        f"carepay services: CI={IN_CI} mosquitto={'up' if port_open(MQTT_HOST, MQTT_PORT) else 'DOWN'} "
        f"postgresql={'up' if port_open(PG_HOST, PG_PORT) else 'DOWN'}",
    ]


