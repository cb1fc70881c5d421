"""MQTT transport shared by the terminal agent and the clearing workers (传输层).

One place builds every MQTT client so that none forgets TCP_NODELAY: paho (under
aiomqtt) never sets it, and with Nagle on both the client and the broker each
request/response stalls about 88 ms. ``make_client`` always passes
``socket_options`` with ``TCP_NODELAY``; the shipped mosquitto configuration sets
``set_tcp_nodelay true`` for the broker's side.

URLs: ``mqtt://[user[:password]@]host[:port]`` (port 1883) and ``mqtts://…``
(TLS, port 8883, system trust store or ``ca_file``).
"""

from __future__ import annotations

import socket
import ssl
import uuid
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

import aiomqtt

DEFAULT_MQTT_PORT = 1883
DEFAULT_MQTTS_PORT = 8883
MQTT_KEEPALIVE_S = 30
MQTT_CONNECT_TIMEOUT_S = 10.0
MAX_INFLIGHT_MESSAGES = 1_000
"""QoS 1 messages a client may have unacknowledged at once (paho's default of 20 throttles a busy worker)."""
MAX_CLIENT_ID_CHARS = 23  # MQTT 3.1.1 guarantees only 23 characters

NODELAY_SOCKET_OPTIONS = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)


class TransportError(ValueError):
    """An MQTT URL or transport setting that cannot be used."""


@dataclass(frozen=True)
class MqttEndpoint:
    """Where a broker is and how to log in; the password never shows in a repr."""

    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """The URL without credentials (safe to print)."""
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_mqtt_url(url: str) -> MqttEndpoint:
    """Parse ``mqtt://[user[:pw]@]host[:port]`` / ``mqtts://…``; :class:`TransportError` when malformed.

    >>> parse_mqtt_url("mqtt://127.0.0.1:1884")
    MqttEndpoint(host='127.0.0.1', port=1884, tls=False, username=None)
    >>> parse_mqtt_url("mqtts://t1:secret@broker.example").port
    8883
    """
    if not isinstance(url, str) or not url or len(url) > 2048:
        raise TransportError("MQTT URL must be a non-empty string")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise TransportError(f"malformed MQTT URL {_safe(url)!r}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise TransportError(f"MQTT URL must start with mqtt:// or mqtts://, got {_safe(url)!r}")
    if not parts.hostname:
        raise TransportError(f"MQTT URL has no host: {_safe(url)!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise TransportError(f"MQTT URL must not carry a path or query: {_safe(url)!r}")
    tls = scheme in ("mqtts", "ssl")
    if port is None:
        port = DEFAULT_MQTTS_PORT if tls else DEFAULT_MQTT_PORT
    if not 0 < port < 65536:
        raise TransportError(f"MQTT port out of range in {_safe(url)!r}")
    return MqttEndpoint(
        host=parts.hostname,
        port=port,
        tls=tls,
        username=unquote(parts.username) if parts.username else None,
        password=unquote(parts.password) if parts.password else None,
    )


def _safe(url: str) -> str:
    """The URL with any password replaced, for error messages."""
    try:
        parts = urlsplit(url)
        if parts.password:
            return url.replace(f":{parts.password}@", ":***@")
    except ValueError:
        pass
    return url[:200]


def client_id(role: str, name: str = "") -> str:
    """A unique MQTT client id within the 23-character limit: ``cp-<role>-<name>-<rand>``."""
    rand = uuid.uuid4().hex[:6]
    base = f"cp-{role[:4]}-{name}"[: MAX_CLIENT_ID_CHARS - 7]
    return f"{base}-{rand}"


def make_client(
    url: str | MqttEndpoint,
    *,
    identifier: str | None = None,
    username: str | None = None,
    password: str | None = None,
    clean_session: bool = True,
    ca_file: str | None = None,
    keepalive_s: int = MQTT_KEEPALIVE_S,
    max_inflight: int = MAX_INFLIGHT_MESSAGES,
) -> aiomqtt.Client:
    """An aiomqtt client for ``url`` with TCP_NODELAY on its socket (MQTT 3.1.1).

    Use it as ``async with make_client(url) as client: ...``. ``username``/``password``
    override those in the URL (per-terminal credentials in production).
    """
    ep = url if isinstance(url, MqttEndpoint) else parse_mqtt_url(url)
    tls_context = None
    if ep.tls:
        tls_context = ssl.create_default_context(cafile=ca_file)
    return aiomqtt.Client(
        ep.host,
        ep.port,
        username=username if username is not None else ep.username,
        password=password if password is not None else ep.password,
        identifier=identifier or client_id("cli"),
        clean_session=clean_session,
        keepalive=keepalive_s,
        timeout=MQTT_CONNECT_TIMEOUT_S,
        tls_context=tls_context,
        max_inflight_messages=max_inflight,
        max_queued_outgoing_messages=0,
        socket_options=NODELAY_SOCKET_OPTIONS,
    )


def nodelay_enabled(client: aiomqtt.Client) -> bool:
    """True when the connected client's socket has TCP_NODELAY set (for tests and health checks)."""
    sock = client._client.socket()  # paho's socket; public API has no accessor
    if sock is None:
        return False
    return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


def publish_nowait(client: aiomqtt.Client, topic: str, payload: bytes, qos: int = 1) -> None:
    """Hand a message to the client without waiting for its PUBACK (paho tracks the QoS 1 flow).

    ``await client.publish(qos=1)`` waits for the PUBACK, and aiomqtt's bookkeeping for each
    waiting publish is O(pending) — a worker that answers thousands of requests must not pay it.
    Raises :class:`aiomqtt.MqttError` when the client cannot take the message (disconnected).
    """
    info = client._client.publish(topic, payload, qos)  # aiomqtt exposes no non-waiting publish
    if info.rc != 0:
        raise aiomqtt.MqttCodeError(info.rc, "Could not publish message")
