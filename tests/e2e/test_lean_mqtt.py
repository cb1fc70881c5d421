"""protocol.transport.LeanMqttConnection: the packet parser (property-tested) and a round trip through mosquitto."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.transport import LeanMqttConnection, _str16, _varint, make_client


def _publish_packet(topic: str, payload: bytes, pid: int) -> bytes:
    body = _str16(topic) + pid.to_bytes(2, "big") + payload
    return b"\x32" + _varint(len(body)) + body


async def _parser(got: list[tuple[str, bytes]]) -> LeanMqttConnection:
    return LeanMqttConnection(lambda t, p: got.append((t, p)))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.text(min_size=1, max_size=40), st.binary(max_size=300)), max_size=8),
       st.integers(min_value=1, max_value=50))
def test_publishes_split_anywhere_arrive_whole_and_are_acknowledged(msgs: list[tuple[str, bytes]], chunk: int) -> None:
    async def run() -> None:
        got: list[tuple[str, bytes]] = []
        conn = await _parser(got)
        stream = b"".join(_publish_packet(t, p, i + 1) for i, (t, p) in enumerate(msgs))
        for i in range(0, len(stream), chunk):
            conn.data_received(stream[i : i + chunk])
        assert got == msgs
        assert len(conn._out) == len(msgs)  # one PUBACK each, written together at the end of the loop turn
        assert all(ack[:2] == b"\x40\x02" for ack in conn._out)

    asyncio.run(run())


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_garbage_never_crashes_the_parser(data: bytes) -> None:
    async def run() -> None:
        conn = await _parser([])
        conn.data_received(data)  # any exception here fails the test

    asyncio.run(run())


def test_varint_round_trip() -> None:
    for n in (0, 1, 127, 128, 16_383, 16_384, 2_097_151, 268_435_455):
        enc = _varint(n)
        value, mult = 0, 1
        for b in enc:
            value += (b & 0x7F) * mult
            mult *= 128
        assert value == n


async def test_round_trip_through_mosquitto(mosquitto_url: str) -> None:
    got: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
    conn = await LeanMqttConnection.open(mosquitto_url, lambda t, p: got.put_nowait((t, p)), identifier="cp-test-lean")
    try:
        await conn.subscribe("carepay/v1/test/lean/+", 1)
        async with make_client(mosquitto_url) as other:
            await other.publish("carepay/v1/test/lean/a", b"hello", qos=1)
            assert await asyncio.wait_for(got.get(), 5) == ("carepay/v1/test/lean/a", b"hello")
            await other.subscribe("carepay/v1/test/back", qos=1)
            conn.publish("carepay/v1/test/back", b"answer")
            msg = await asyncio.wait_for(anext(aiter(other.messages)), 5)
            assert msg.payload == b"answer"
    finally:
        conn.close()
    await asyncio.wait_for(conn.closed, 5)
