"""TLS on both listeners: `server.tls_cert` / `server.tls_key`.

A test CA and a server certificate for 127.0.0.1 are made here with
`cryptography`. A real `wss://` client (the `websockets` library, an `ssl`
context trusting only that CA) authenticates, subscribes and receives an
event; `https://` health answers; a client that does not trust the CA is
refused; unusable TLS settings stop the server with exit status 2.
"""

from __future__ import annotations

import datetime
import http.client
import ipaddress
import json
import ssl
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from websockets.sync.client import connect

from apix_trio.config import ConfigError, load_settings
from apix_trio.gateway.tls import TlsConfigError, server_ssl_context
from apix_trio.server import run
from apix_trio.settings import ServerSettings
from tests.serverkit import Kit, running_server

pytestmark = pytest.mark.timeout(60)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca_and_server_cert(directory: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate chain, server key) PEM files."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("apix test CA"))
        .issuer_name(_name("apix test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("127.0.0.1"))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([x509.OID_SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    ca_path = directory / "ca.pem"
    cert_path = directory / "server.pem"
    key_path = directory / "server.key"
    ca_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        server_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca_path, cert_path, key_path


def trusting(ca_path: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca_path))
    context.check_hostname = True
    return context


def wss_session(kit: Kit, context: ssl.SSLContext) -> dict[str, Any]:
    """In a thread: auth, subscribe, publish, receive the event, over wss://."""
    url = f"wss://127.0.0.1:{kit.running.ws_port}/ws"
    token = kit.token()
    with connect(url, ssl=context, subprotocols=["apix.v1"], open_timeout=10) as ws:  # type: ignore[list-item]
        ws.send(json.dumps({"op": "auth", "id": 1, "token": token}))
        auth = json.loads(ws.recv(timeout=10))
        ws.send(json.dumps({"op": "subscribe", "id": 2, "channel": "tls.room"}))
        subscribed = json.loads(ws.recv(timeout=10))
        ws.send(json.dumps({"op": "publish", "id": 3, "channel": "tls.room", "data": "hi"}))
        frames = [json.loads(ws.recv(timeout=10)) for _ in range(2)]
        return {
            "auth": auth,
            "subscribed": subscribed,
            "frames": frames,
            "subprotocol": ws.subprotocol,
            "tls": ws.socket.version(),  # type: ignore[attr-defined]
        }


def https_health(kit: Kit, context: ssl.SSLContext) -> tuple[int, Any]:
    conn = http.client.HTTPSConnection("127.0.0.1", kit.running.http_port, context=context)
    try:
        conn.request("GET", "/api/v1/health")
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


async def test_wss_client_authenticates_subscribes_and_receives(tmp_path):
    ca, cert, key = make_ca_and_server_cert(tmp_path / "tls")
    async with running_server(
        tmp_path, server={"tls_cert": str(cert), "tls_key": str(key)}
    ) as kit:
        with trio.fail_after(30):
            result = await trio.to_thread.run_sync(wss_session, kit, trusting(ca))
            status, body = await trio.to_thread.run_sync(https_health, kit, trusting(ca))
    assert result["auth"]["ok"] and result["auth"]["result"]["org"] == "acme"
    assert result["subscribed"]["ok"]
    assert result["subprotocol"] == "apix.v1"
    assert result["tls"] in ("TLSv1.2", "TLSv1.3")
    by_kind = {("reply" if "id" in f else f["push"]): f for f in result["frames"]}
    assert by_kind["reply"]["ok"]
    assert by_kind["event"]["channel"] == "tls.room"
    assert by_kind["event"]["event"]["data"] == "hi"
    assert status == 200 and body["status"] == "ok"


def refused(kit: Kit) -> str:
    url = f"wss://127.0.0.1:{kit.running.ws_port}/ws"
    try:
        with connect(url, ssl=ssl.create_default_context(), open_timeout=10):
            return "connected"
    except ssl.SSLCertVerificationError:
        return "untrusted"


async def test_a_client_not_trusting_the_ca_is_refused_and_the_server_goes_on(tmp_path):
    ca, cert, key = make_ca_and_server_cert(tmp_path / "tls")
    async with running_server(
        tmp_path, server={"tls_cert": str(cert), "tls_key": str(key)}
    ) as kit:
        with trio.fail_after(30):
            assert await trio.to_thread.run_sync(refused, kit) == "untrusted"
            result = await trio.to_thread.run_sync(wss_session, kit, trusting(ca))
    assert result["auth"]["ok"]


def test_unusable_tls_settings_are_configuration_errors(tmp_path):
    _, cert, key = make_ca_and_server_cert(tmp_path / "tls")
    with pytest.raises(ConfigError) as missing:
        load_settings(
            config_path=None,
            environ={
                "APIX_SERVER_TLS_CERT": str(tmp_path / "nope.pem"),
                "APIX_SERVER_TLS_KEY": str(key),
            },
            flags={},
        )
    problems = missing.value.problems
    assert any("server.tls_cert" in line and "cannot read" in line for line in problems)
    with pytest.raises(ConfigError) as alone:
        load_settings(config_path=None, environ={"APIX_SERVER_TLS_CERT": str(cert)}, flags={})
    assert any("set both" in line for line in alone.value.problems)
    settings = load_settings(
        config_path=None,
        environ={"APIX_SERVER_TLS_CERT": str(cert), "APIX_SERVER_TLS_KEY": str(key)},
        flags={},
    )
    assert server_ssl_context(settings.server) is not None
    # Readable but not a matching PEM pair: refused before anything listens.
    with pytest.raises(TlsConfigError):
        server_ssl_context(ServerSettings(tls_cert=str(cert), tls_key=str(cert)))


def test_run_exits_2_on_a_certificate_it_cannot_use(tmp_path, capsys):
    _, cert, _ = make_ca_and_server_cert(tmp_path / "tls")
    garbage = tmp_path / "garbage.key"
    garbage.write_text("not a key\n")
    settings = load_settings(
        config_path=None,
        environ={
            "APIX_SERVER_TLS_CERT": str(cert),
            "APIX_SERVER_TLS_KEY": str(garbage),
            "APIX_AUTH_DEV_KEY_DIR": str(tmp_path / "keys"),
        },
        flags={},
    )
    assert run(settings) == 2
    assert "server.tls_cert" in capsys.readouterr().err
