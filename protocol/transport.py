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

import asyncio
import contextlib
import socket
import ssl
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
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


class _Client(aiomqtt.Client):
    """aiomqtt's client, with the write-side socket registration made safe against a socket that closes first.

    paho asks for the socket to be watched for writing (a publish that did not go out at once) from any thread;
    aiomqtt 2.5 hands ``loop.add_writer(fd, …)`` to the loop with the descriptor as it was then. When the
    connection drops before the loop runs it (a broker restart under load), the descriptor is closed and the
    loop logs ``Exception in callback … add_writer … OSError: [Errno 9] Bad file descriptor`` with a traceback
    — harmless (the read side reports the disconnect) but alarming in a terminal's or worker's log. Here the
    loop looks at the socket when it gets there and leaves a closed one alone."""

    def _on_socket_register_write(self, client: Any, userdata: Any, sock: Any) -> None:
        def callback() -> None:  # as aiomqtt's: a failed write means the connection broke
            try:
                client.loop_write()
            except Exception as exc:
                if not self._disconnected.done():
                    self._disconnected.set_exception(exc)

        def register() -> None:
            fd = sock.fileno()
            if fd < 0:
                return
            with contextlib.suppress(OSError, ValueError):  # closed between the check and the call
                self._loop.add_writer(fd, callback)

        self._loop.call_soon_threadsafe(register)


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
    return _Client(
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


# --- a lean MQTT 3.1.1 connection for the clearing workers' hot path ---------------------------------

LEAN_MAX_PACKET_BYTES = 256 * 1024
"""Largest packet the lean connection accepts (terminal messages are a few KB; anything larger ends it)."""
LEAN_SUBACK_TIMEOUT_S = 10.0


class LeanMqttError(ConnectionError):
    """The lean connection could not connect, was refused, or broke."""


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str16(s: str) -> bytes:
    raw = s.encode("utf-8")
    return len(raw).to_bytes(2, "big") + raw


class LeanMqttConnection(asyncio.Protocol):
    """One MQTT 3.1.1 connection without paho: a worker that answers thousands of requests a second spends
    most of its time in paho's per-packet Python (one ``send`` per packet, a callback chain per message).

    Here every PUBACK and every publish of one event-loop turn leave in one ``write``; a received QoS 1
    PUBLISH is acknowledged at once (as paho does) and handed to ``on_message(topic, payload)``, a plain
    callback. Clean session only, QoS 0/1 only, no retransmission (a clean session has nothing to resend).
    ``closed`` completes when the connection ends. ``pause()``/``resume()`` stop and restart reading
    (back-pressure to the broker).
    """

    def __init__(self, on_message: Callable[[str, bytes], None]) -> None:
        self._on_message = on_message
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._next_pid = 0
        self._loop = asyncio.get_running_loop()
        self._connack: asyncio.Future[int] = self._loop.create_future()
        self._subacks: dict[int, asyncio.Future[bytes]] = {}
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self._ping: asyncio.TimerHandle | None = None
        self._keepalive_s = MQTT_KEEPALIVE_S

    @classmethod
    async def open(cls, url: str | MqttEndpoint, on_message: Callable[[str, bytes], None], *, identifier: str,
                   username: str | None = None, password: str | None = None, ca_file: str | None = None,
                   keepalive_s: int = MQTT_KEEPALIVE_S) -> LeanMqttConnection:
        ep = url if isinstance(url, MqttEndpoint) else parse_mqtt_url(url)
        loop = asyncio.get_running_loop()
        ssl_ctx = ssl.create_default_context(cafile=ca_file) if ep.tls else None
        conn = cls(on_message)
        conn._keepalive_s = keepalive_s
        try:
            await asyncio.wait_for(loop.create_connection(lambda: conn, ep.host, ep.port, ssl=ssl_ctx),
                                   MQTT_CONNECT_TIMEOUT_S)
        except (OSError, TimeoutError) as exc:
            raise LeanMqttError(f"cannot connect to {ep.url}: {exc}") from None
        user = username if username is not None else ep.username
        pw = password if password is not None else ep.password
        flags = 0x02 | (0x80 if user is not None else 0) | (0x40 if pw is not None else 0)
        body = _str16("MQTT") + bytes([4, flags]) + keepalive_s.to_bytes(2, "big") + _str16(identifier)
        if user is not None:
            body += _str16(user)
        if pw is not None:
            body += _str16(pw)
        conn._send(b"\x10" + _varint(len(body)) + body)
        try:
            rc = await asyncio.wait_for(asyncio.shield(conn._connack), MQTT_CONNECT_TIMEOUT_S)
        except (TimeoutError, LeanMqttError) as exc:
            conn.close()
            raise LeanMqttError(f"no CONNACK from {ep.url}: {exc}") from None
        if rc != 0:
            conn.close()
            raise LeanMqttError(f"broker {ep.url} refused the connection (CONNACK code {rc})")
        conn._arm_ping()
        return conn

    # --- asyncio.Protocol ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._ping is not None:
            self._ping.cancel()
        err = LeanMqttError(f"connection lost ({exc})" if exc else "connection closed")
        for fut in (self._connack, *self._subacks.values()):
            if not fut.done():
                fut.set_exception(err)
        if not self.closed.done():
            self.closed.set_result(None)

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        pos, n = 0, len(buf)
        while n - pos >= 2:
            header = buf[pos]
            length, mult, i, complete = 0, 1, pos + 1, False
            while i < n and i - pos <= 4:
                byte = buf[i]
                i += 1
                length += (byte & 0x7F) * mult
                mult *= 128
                if not byte & 0x80:
                    complete = True
                    break
            if not complete:
                if i - pos > 4:
                    self._abort("malformed remaining length")
                    return
                break  # the length itself is incomplete
            if length > LEAN_MAX_PACKET_BYTES:
                self._abort(f"packet of {length} bytes exceeds {LEAN_MAX_PACKET_BYTES}")
                return
            end = i + length
            if end > n:
                break
            self._packet(header, bytes(buf[i:end]))
            pos = end
        if pos:
            del buf[:pos]

    # --- packets ------------------------------------------------------------------------------------

    def _packet(self, header: int, body: bytes) -> None:
        kind = header >> 4
        if kind == 3:  # PUBLISH
            qos = (header >> 1) & 0x03
            tlen = int.from_bytes(body[:2], "big")
            topic = body[2 : 2 + tlen].decode("utf-8", "replace")
            at = 2 + tlen
            if qos:
                self._send(b"\x40\x02" + body[at : at + 2])  # PUBACK (QoS 2 is never subscribed to)
                at += 2
            self._on_message(topic, body[at:])
        elif kind == 4:  # PUBACK of one of our publishes: nothing to resend on a clean session
            pass
        elif kind == 2:  # CONNACK
            if not self._connack.done():
                self._connack.set_result(body[1] if len(body) >= 2 else 255)
        elif kind == 9:  # SUBACK
            fut = self._subacks.pop(int.from_bytes(body[:2], "big"), None)
            if fut is not None and not fut.done():
                fut.set_result(body[2:])
        elif kind == 13:  # PINGRESP
            pass

    def _abort(self, why: str) -> None:
        if self._transport is not None:
            self._transport.abort()
        if not self.closed.done():
            self.closed.set_result(None)
        _ = why

    def _pid(self) -> int:
        self._next_pid = self._next_pid % 65535 + 1
        return self._next_pid

    def _send(self, packet: bytes) -> None:
        self._out.append(packet)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        out, self._out = self._out, []
        if self._transport is not None and out:
            self._transport.write(b"".join(out))

    def _arm_ping(self) -> None:
        def ping() -> None:
            if self._transport is not None:
                self._send(b"\xc0\x00")
                self._arm_ping()

        self._ping = self._loop.call_later(max(1.0, self._keepalive_s * 0.75), ping)

    # --- API ----------------------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._transport is not None and not self.closed.done()

    async def subscribe(self, topic: str, qos: int = 1) -> None:
        """Subscribe and wait for the SUBACK; :class:`LeanMqttError` when refused."""
        pid = self._pid()
        fut: asyncio.Future[bytes] = self._loop.create_future()
        self._subacks[pid] = fut
        body = pid.to_bytes(2, "big") + _str16(topic) + bytes([qos])
        self._send(b"\x82" + _varint(len(body)) + body)
        codes = await asyncio.wait_for(fut, LEAN_SUBACK_TIMEOUT_S)
        if not codes or codes[0] == 0x80:
            raise LeanMqttError(f"subscription to {topic!r} refused")

    def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        """Queue one PUBLISH (written with the rest of this loop turn's packets); never waits for the PUBACK."""
        if not self.connected:
            raise LeanMqttError("not connected")
        t = _str16(topic)
        if qos:
            body = t + self._pid().to_bytes(2, "big") + payload
            self._send(b"\x32" + _varint(len(body)) + body)
        else:
            body = t + payload
            self._send(b"\x30" + _varint(len(body)) + body)

    def pause(self) -> None:
        if self._transport is not None:
            self._transport.pause_reading()

    def resume(self) -> None:
        if self._transport is not None and not self._transport.is_reading():
            self._transport.resume_reading()

    def close(self) -> None:
        """Send DISCONNECT and close."""
        if self._transport is not None:
            self._flush()
            with contextlib.suppress(Exception):
                self._transport.write(b"\xe0\x00")
            self._transport.close()
