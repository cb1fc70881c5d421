"""The production mosquitto configuration: per-terminal credentials and an ACL stop impersonation.

A second mosquitto starts on a free port with the security lines of
``ops/deploy/mosquitto/mosquitto.prod.conf`` verbatim, a password file made by
``mosquitto_passwd`` and the shipped ``acl`` file.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiomqtt
import pytest

from ops.mosquitto_proc import MosquittoProcess, MosquittoUnavailable, hardened_mosquitto
from protocol.messages import SHARED_UP_TOPIC, down_topic, up_topic
from protocol.transport import make_client

pytestmark = pytest.mark.mqtt

USERS = {"T0000001": "pw-t1", "T0000002": "pw-t2", "clearing": "pw-clearing"}


@pytest.fixture
def hardened_broker(tmp_path: Path):
    try:
        broker = hardened_mosquitto(tmp_path, USERS)
    except MosquittoUnavailable as exc:
        pytest.skip(str(exc))
    with broker as m:
        yield m


async def _drain(client: aiomqtt.Client, seconds: float) -> list[tuple[str, bytes]]:
    got: list[tuple[str, bytes]] = []

    async def collect() -> None:
        async for m in client.messages:
            got.append((str(m.topic), bytes(m.payload)))

    try:
        await asyncio.wait_for(collect(), seconds)
    except TimeoutError:
        pass
    return got


async def test_anonymous_and_wrong_password_refused(hardened_broker: MosquittoProcess) -> None:
    with pytest.raises(aiomqtt.MqttError):
        async with make_client(hardened_broker.url):
            pass
    with pytest.raises(aiomqtt.MqttError):
        async with make_client(hardened_broker.url, username="T0000001", password="wrong"):
            pass


async def test_terminal_cannot_publish_as_another(hardened_broker: MosquittoProcess) -> None:
    url = hardened_broker.url
    async with (
        make_client(url, username="clearing", password=USERS["clearing"]) as clearing,
        make_client(url, username="T0000002", password=USERS["T0000002"]) as t2,
    ):
        await clearing.subscribe(SHARED_UP_TOPIC, qos=1)
        await asyncio.sleep(0.1)
        await t2.publish(up_topic("T0000001"), b"impersonation", qos=1)  # T2 pretends to be T1
        await t2.publish(up_topic("T0000002"), b"legit", qos=1)
        got = await _drain(clearing, 0.7)
    assert (up_topic("T0000002"), b"legit") in got
    assert all(payload != b"impersonation" for _, payload in got)


async def test_terminal_cannot_read_another_down_topic(hardened_broker: MosquittoProcess) -> None:
    url = hardened_broker.url
    async with (
        make_client(url, username="clearing", password=USERS["clearing"]) as clearing,
        make_client(url, username="T0000001", password=USERS["T0000001"]) as t1,
        make_client(url, username="T0000002", password=USERS["T0000002"]) as t2,
    ):
        await t1.subscribe(down_topic("T0000001"), qos=1)
        try:  # a spy subscribes to T1's down topic and to everything; the broker delivers nothing
            await t2.subscribe(down_topic("T0000001"), qos=1)
            await t2.subscribe("carepay/#", qos=1)
        except aiomqtt.MqttError:
            pass
        await asyncio.sleep(0.1)
        await clearing.publish(down_topic("T0000001"), b"answer-for-t1", qos=1)
        got_t1, got_t2 = await asyncio.gather(_drain(t1, 0.7), _drain(t2, 0.7))
    assert got_t1 == [(down_topic("T0000001"), b"answer-for-t1")]
    assert got_t2 == []


async def test_terminal_cannot_subscribe_to_up_topics(hardened_broker: MosquittoProcess) -> None:
    url = hardened_broker.url
    async with (
        make_client(url, username="T0000001", password=USERS["T0000001"]) as t1,
        make_client(url, username="T0000002", password=USERS["T0000002"]) as t2,
    ):
        try:
            await t2.subscribe("carepay/v1/term/+/up", qos=1)
        except aiomqtt.MqttError:
            pass
        await asyncio.sleep(0.1)
        await t1.publish(up_topic("T0000001"), b"purchase-of-t1", qos=1)
        got = await _drain(t2, 0.5)
    assert got == []
