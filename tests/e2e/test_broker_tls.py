"""The production TLS listener: terminals reach the broker over TLS with the CA they are given, and not otherwise.

A mosquitto starts on a free port with the production security lines (password file, ACL) and a TLS
listener using a throw-away CA and broker certificate made here; both MQTT clients of the project
(aiomqtt through ``make_client`` and the worker's lean client) connect with ``mqtts://`` and the CA file.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
from pathlib import Path

import aiomqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ops.mosquitto_proc import MosquittoUnavailable, hardened_mosquitto
from protocol.messages import SHARED_UP_TOPIC, up_topic
from protocol.transport import LeanMqttConnection, LeanMqttError, make_client

pytestmark = pytest.mark.mqtt

USERS = {"T0000001": "pw-t1", "clearing": "pw-clearing"}


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name | None = None,
          issuer_key: ec.EllipticCurvePrivateKey | None = None, ca: bool = False) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = dt.datetime.now(dt.UTC)
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
         .not_valid_after(now + dt.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
    else:
        b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                         x509.DNSName("localhost")]), critical=False)
    return b.sign(issuer_key or key, hashes.SHA256())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                             serialization.NoEncryption())


@pytest.fixture
def tls_broker(tmp_path: Path):
    ca_key, broker_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _cert("carepay test CA", ca_key, ca=True)
    broker = _cert("127.0.0.1", broker_key, issuer=ca.subject, issuer_key=ca_key)
    files = {"ca.crt": ca.public_bytes(serialization.Encoding.PEM),
             "broker.crt": broker.public_bytes(serialization.Encoding.PEM), "broker.key": _pem_key(broker_key)}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    try:
        broker = hardened_mosquitto(tmp_path, USERS, tls=(tmp_path / "broker.crt", tmp_path / "broker.key",
                                                          tmp_path / "ca.crt"))
    except MosquittoUnavailable as exc:
        pytest.skip(str(exc))
    with broker as m:
        yield m, f"mqtts://127.0.0.1:{m.port}", str(tmp_path / "ca.crt")


async def test_terminal_and_worker_talk_over_tls(tls_broker) -> None:
    _m, url, ca = tls_broker
    got: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
    worker = await LeanMqttConnection.open(url, lambda t, p: got.put_nowait((t, p)), identifier="cp-test-w",
                                           username="clearing", password=USERS["clearing"], ca_file=ca)
    try:
        await worker.subscribe(SHARED_UP_TOPIC, 1)
        async with make_client(url, username="T0000001", password=USERS["T0000001"], ca_file=ca) as term:
            await term.publish(up_topic("T0000001"), b"over tls", qos=1)
            topic, payload = await asyncio.wait_for(got.get(), 5)
        assert (topic, payload) == (up_topic("T0000001"), b"over tls")
    finally:
        worker.close()


async def test_tls_without_the_ca_or_in_plain_is_refused(tls_broker) -> None:
    _m, url, _ca = tls_broker
    with pytest.raises(aiomqtt.MqttError):  # the system trust store does not know the CA: verification fails
        async with make_client(url, username="T0000001", password=USERS["T0000001"]):
            pass
    with pytest.raises(LeanMqttError):
        await LeanMqttConnection.open(url, lambda t, p: None, identifier="cp-test-x", username="clearing",
                                      password=USERS["clearing"])
    # plain MQTT to the TLS listener: the broker never answers CONNECT (it hangs up on the non-TLS bytes)
    reader, writer = await asyncio.open_connection("127.0.0.1", _m.port)
    body = b"\x00\x04MQTT\x04\x02\x00\x3c\x00\x09cp-test-p"
    writer.write(b"\x10" + bytes([len(body)]) + body)
    await writer.drain()
    try:
        answer = await asyncio.wait_for(reader.read(4), 3)
    except (TimeoutError, ConnectionError):
        answer = b""
    writer.close()
    assert not answer.startswith(b"\x20"), "a CONNACK came back over plain TCP"
