"""The terminal's link to the clearing host over MQTT (主机通讯).

:class:`HostLink` owns one MQTT connection (TCP_NODELAY, QoS 1), keeps it up
(reconnecting with back-off when the broker goes away), subscribes to the down
topic of each terminal it serves and hands every answer to the request waiting
for it (matched by ``orig_msg_id``). A real terminal has one link for itself; the
simulator multiplexes a whole fleet of terminals over one link.

:class:`HostClient` is one terminal's view: ``await host.request(msg, timeout_s)``
publishes on ``carepay/v1/term/<id>/up`` and returns the parsed answer, or raises
:class:`HostTimeout` (sent or maybe sent, no answer in time or an answer naming it that cannot be
parsed — the outcome is unknown, the caller reverses) or
:class:`HostUnavailable` (certainly not sent: no connection — the caller may go offline).
MAC checks on answers belong to the agent, which holds the keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Iterable
from types import TracebackType

import aiomqtt

from protocol.messages import Message, MessageError, down_topic, parse_message, up_topic
from protocol.transport import client_id, make_client, publish_nowait

log = logging.getLogger("carepay.terminal.host")

CONNECT_WAIT_S = 3.0
"""How long a request waits for the link to (re)connect before reporting the host unavailable."""
RECONNECT_MIN_S = 0.1
RECONNECT_MAX_S = 5.0
MAX_PENDING_REQUESTS = 100_000


class HostUnavailable(ConnectionError):
    """The request could not be handed to the broker (link down)."""


class HostTimeout(TimeoutError):
    """The request was sent but no answer arrived in time."""


class HostLink:
    """One MQTT connection carrying the traffic of one or more terminals."""

    def __init__(self, url: str, terminal_ids: Iterable[str] = (), *, username: str | None = None,
                 password: str | None = None, ca_file: str | None = None, name: str = "term",
                 connect_wait_s: float = CONNECT_WAIT_S, reconnect_max_s: float = RECONNECT_MAX_S) -> None:
        self._url = url
        self._terminal_ids = list(terminal_ids)
        self._username = username
        self._password = password
        self._ca_file = ca_file
        self._name = name
        self._connect_wait_s = connect_wait_s
        self._reconnect_max_s = reconnect_max_s
        self._client: aiomqtt.Client | None = None
        self._connected = asyncio.Event()
        self._pending: dict[str, asyncio.Future[Message]] = {}
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.connects = 0
        self.bad_answers = 0

    def __repr__(self) -> str:
        return f"HostLink(terminals={len(self._terminal_ids)}, connected={self.connected})"

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def add_terminal(self, terminal_id: str) -> None:
        if terminal_id not in self._terminal_ids:
            self._terminal_ids.append(terminal_id)
            if self._client is not None and self.connected:
                task = asyncio.ensure_future(self._client.subscribe(down_topic(terminal_id), qos=1))
                task.add_done_callback(lambda t: t.exception())

    async def start(self, wait_s: float = CONNECT_WAIT_S) -> None:
        self._stopping = False
        self._task = asyncio.create_task(self._run(), name=f"host-link-{self._name}")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._connected.wait(), wait_s)

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        self._task = None
        self._connected.clear()
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(HostUnavailable("link closed"))
        self._pending.clear()

    async def __aenter__(self) -> HostLink:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    async def _run(self) -> None:
        backoff = RECONNECT_MIN_S
        while not self._stopping:
            try:
                async with make_client(self._url, identifier=client_id(self._name, self._terminal_ids[0] if
                                                                       self._terminal_ids else ""),
                                       username=self._username, password=self._password,
                                       ca_file=self._ca_file) as client:
                    if self._terminal_ids:
                        await client.subscribe([(down_topic(t), 1) for t in self._terminal_ids])
                    self._client = client
                    self.connects += 1
                    self._connected.set()
                    backoff = RECONNECT_MIN_S
                    async for message in client.messages:
                        self._dispatch(message.payload)
            except aiomqtt.MqttError as exc:
                log.debug("host link down: %s", exc)
            finally:
                self._connected.clear()
                self._client = None
            if self._stopping:
                break
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self._reconnect_max_s)

    def _dispatch(self, payload: object) -> None:
        if not isinstance(payload, (bytes, bytearray)):
            self.bad_answers += 1
            return
        try:
            msg = parse_message(bytes(payload))
        except MessageError as exc:
            self.bad_answers += 1
            self._fail_unreadable(bytes(payload), exc)
            return
        orig = getattr(msg, "orig_msg_id", None) or msg.msg_id  # an echo (benchmark baseline) names itself
        fut = self._pending.get(orig) if orig else None
        if fut is not None and not fut.done():
            fut.set_result(msg)
        # an answer nobody waits for (a duplicate, or one that came after the timeout) is dropped:
        # the journal already moved on (the reversal covers it)

    def _fail_unreadable(self, payload: bytes, exc: MessageError) -> None:
        """An answer naming a waiting request that cannot be parsed: its outcome is unknown NOW (no need to wait
        out the timeout); the request fails with :class:`HostTimeout`, so a purchase is reversed at once."""
        try:
            doc = json.loads(payload)
        except ValueError:
            return
        orig = doc.get("orig_msg_id") if isinstance(doc, dict) else None
        fut = self._pending.get(orig) if isinstance(orig, str) else None
        if fut is not None and not fut.done():
            fut.set_exception(HostTimeout(f"the host's answer could not be read ({str(exc)[:80]}); outcome unknown"))

    async def request(self, msg: Message, timeout_s: float) -> Message:
        """Publish ``msg`` (already MAC'd) and wait for the answer naming it."""
        if len(self._pending) >= MAX_PENDING_REQUESTS:
            raise HostUnavailable("too many requests in flight")
        if not self.connected:
            try:
                await asyncio.wait_for(self._connected.wait(), min(self._connect_wait_s, timeout_s))
            except TimeoutError:
                raise HostUnavailable("no connection to the broker") from None
        client = self._client
        if client is None:
            raise HostUnavailable("no connection to the broker")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Message] = loop.create_future()
        self._pending[msg.msg_id] = fut
        try:
            try:
                publish_nowait(client, up_topic(msg.terminal_id), msg.wire_json())
            except aiomqtt.MqttError as exc:  # it may have reached the broker: the outcome is unknown
                raise HostTimeout(f"publish of {msg.type} failed ({exc}); outcome unknown") from None
            try:
                return await asyncio.wait_for(fut, timeout_s)
            except TimeoutError:
                raise HostTimeout(f"no answer to {msg.type} within {timeout_s:g} s") from None
        finally:
            self._pending.pop(msg.msg_id, None)

    async def send(self, msg: Message) -> None:
        """Publish without waiting for an answer (heartbeat)."""
        client = self._client
        if client is None or not self.connected:
            raise HostUnavailable("no connection to the broker")
        try:
            await client.publish(up_topic(msg.terminal_id), msg.wire_json(), qos=1)
        except aiomqtt.MqttError as exc:
            raise HostUnavailable(f"publish failed: {exc}") from None


class HostClient:
    """One terminal's requests over a :class:`HostLink` (its own, or a fleet's shared one)."""

    def __init__(self, link: HostLink, terminal_id: str) -> None:
        self.link = link
        self.terminal_id = terminal_id
        link.add_terminal(terminal_id)

    async def request(self, msg: Message, timeout_s: float) -> Message:
        if msg.terminal_id != self.terminal_id:
            raise ValueError("message for another terminal")
        return await self.link.request(msg, timeout_s)

    async def send(self, msg: Message) -> None:
        await self.link.send(msg)

    @property
    def connected(self) -> bool:
        return self.link.connected
