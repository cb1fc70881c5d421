"""Embedded MQTT broker (内置消息代理) for ``carepay demo`` and a new user's first run: nothing to install.

Built on amqtt 0.12 (a maintained asyncio broker). Its limits shape how it is used:

- MQTT 3.1.1 only and no ``$share`` shared subscriptions, so with the embedded
  broker exactly one clearing worker subscribes to the plain
  ``carepay/v1/term/+/up`` (``embedded=True`` in the worker);
- its ``Broker`` must be created inside a running event loop (hence an async
  context manager);
- a custom ``plugins`` section replaces the defaults, and without an
  authentication plugin every CONNECT is refused, so the anonymous-auth plugin
  is always listed (loopback only, demo use only).

It binds port 0 on 127.0.0.1 and reports the port the OS chose, so it never
collides with a system mosquitto on 1883. Tests and deployment use mosquitto.
"""

from __future__ import annotations

import asyncio
import logging
from types import TracebackType
from typing import Any

EMBEDDED_HOST = "127.0.0.1"
BROKER_START_TIMEOUT_S = 10.0


def embedded_broker_config(port: int = 0) -> dict[str, Any]:
    """The amqtt configuration: one loopback TCP listener, anonymous auth kept, no $SYS, no packet logging."""
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"{EMBEDDED_HOST}:{port}", "max_connections": -1}},
        "timeout_disconnect_delay": 0,
        "plugins": {
            # Without an authentication plugin amqtt refuses every CONNECT.
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
        },
    }


class EmbeddedBroker:
    """``async with EmbeddedBroker() as broker: broker.url`` → ``mqtt://127.0.0.1:PORT`` on a free port."""

    def __init__(self, port: int = 0, quiet: bool = True) -> None:
        self._requested_port = port
        self._quiet = quiet
        self._broker: Any = None
        self._port: int | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("embedded broker not started")
        return self._port

    @property
    def url(self) -> str:
        return f"mqtt://{EMBEDDED_HOST}:{self.port}"

    async def start(self) -> None:
        from amqtt.broker import Broker  # imported lazily: only the demo and first-run paths need it

        if self._quiet:
            for name in ("amqtt", "transitions"):
                logging.getLogger(name).setLevel(logging.WARNING)
        self._broker = Broker(embedded_broker_config(self._requested_port), loop=asyncio.get_running_loop())
        await asyncio.wait_for(self._broker.start(), BROKER_START_TIMEOUT_S)
        server = self._broker._servers["default"].instance  # amqtt has no public accessor for the bound port
        self._port = int(server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._broker is not None:
            try:
                await asyncio.wait_for(self._broker.shutdown(), BROKER_START_TIMEOUT_S)
            finally:
                self._broker = None

    async def __aenter__(self) -> EmbeddedBroker:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
