"""The upgrade request parser (gateway/upgrade.py, sans-IO) and the verify fast path.

Parser: every rule wsproto's h11 handshake applied still holds (and the
answer is a 400); the 101 answer is what RFC 6455 asks (and what a strict
client, `websockets`, accepts: see tests/test_tls.py and the e2e tests).
Verify: RS256 by one direct `cryptography` call refuses what pyjwt refused
(a flipped bit, another key, a key of another type); the `info` claim rule.
"""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import Any

import jwt
import pytest

from apix_trio.auth.devkeys import generate_keypair, load_private_key
from apix_trio.auth.keys import AuthError, KeyStore, Verifier, _rs256_verify
from apix_trio.gateway.upgrade import (
    MAX_HEAD,
    BadUpgrade,
    accept_response,
    error_response,
    head_end,
    parse_upgrade,
)
from apix_trio.settings import AuthSettings

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
GOOD = (
    b"GET /ws?x=1 HTTP/1.1\r\nHost: example.com:8080\r\nUpgrade: websocket\r\n"
    b"Connection: keep-alive, Upgrade\r\nSec-WebSocket-Key: " + KEY + b"\r\n"
    b"Sec-WebSocket-Version: 13\r\nOrigin: https://app.example.com\r\n"
    b"Sec-WebSocket-Protocol: chat, apix.v1\r\nAuthorization:  Bearer abc.def.ghi \r\n\r\n"
)


def test_a_valid_upgrade_request():
    assert head_end(GOOD) == len(GOOD)
    request = parse_upgrade(GOOD)
    assert request.target == "/ws?x=1"
    assert request.host == "example.com:8080"
    assert request.key == KEY
    assert request.subprotocols == ["chat", "apix.v1"]
    assert request.header(b"origin") == "https://app.example.com"
    assert request.header(b"authorization") == "Bearer abc.def.ghi"
    assert request.header(b"cookie") is None


def test_header_names_are_case_insensitive_and_frames_may_follow():
    head = GOOD.replace(b"Upgrade: websocket", b"UPGRADE: WebSocket").replace(
        b"Sec-WebSocket-Version", b"sec-websocket-version"
    )
    trailing = b"\x81\x85\x00\x00\x00\x00hello"
    end = head_end(head + trailing)
    assert end == len(head)
    assert parse_upgrade((head + trailing)[:end]).key == KEY


def test_the_accept_answer_is_rfc_6455():
    answer = accept_response(KEY, "apix.v1")
    # The RFC's own example: this key gives this accept token.
    assert b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n" in answer
    expected = base64.b64encode(
        hashlib.sha1(KEY + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
    )
    assert expected == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert answer.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert b"Sec-WebSocket-Protocol: apix.v1\r\n" in answer
    assert answer.endswith(b"\r\n\r\n")
    assert b"Sec-WebSocket-Protocol" not in accept_response(KEY, None)


def test_error_answer():
    answer = error_response(404, "not found\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404 Not Found\r\n")
    assert b"content-length: 10" in head and b"connection: close" in head
    assert body == b"not found\n"


BAD = {
    "not_get": GOOD.replace(b"GET ", b"POST "),
    "http_1_0": GOOD.replace(b"HTTP/1.1", b"HTTP/1.0"),
    "garbage_line": b"\x16\x03\x01 hello\r\n\r\n",
    "no_connection_upgrade": GOOD.replace(b"keep-alive, Upgrade", b"keep-alive"),
    "no_upgrade": GOOD.replace(b"Upgrade: websocket\r\n", b""),
    "upgrade_h2c": GOOD.replace(b"Upgrade: websocket", b"Upgrade: h2c"),
    "wrong_version": GOOD.replace(b"Version: 13", b"Version: 8"),
    "no_version": GOOD.replace(b"Sec-WebSocket-Version: 13\r\n", b""),
    "no_key": GOOD.replace(b"Sec-WebSocket-Key: " + KEY + b"\r\n", b""),
    "no_host": GOOD.replace(b"Host: example.com:8080\r\n", b""),
    "two_hosts": GOOD.replace(b"Host: example.com:8080\r\n", b"Host: a\r\nHost: b\r\n"),
    "bad_header_name": GOOD.replace(b"Origin:", b"Ori gin:"),
    "no_colon": GOOD.replace(b"Origin: https://app.example.com", b"Origin https://app"),
    "control_in_value": GOOD.replace(b"https://app.example.com", b"https://a\x00pp"),
    "obsolete_fold": GOOD.replace(b"\r\nOrigin:", b"\r\n continued\r\nOrigin:"),
    "a_body": GOOD.replace(b"\r\n\r\n", b"\r\nContent-Length: 3\r\n\r\n"),
    "chunked": GOOD.replace(b"\r\n\r\n", b"\r\nTransfer-Encoding: chunked\r\n\r\n"),
    "space_in_target": GOOD.replace(b"/ws?x=1", b"/w s"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_a_bad_request_is_a_400(name: str):
    with pytest.raises(BadUpgrade) as info:
        parse_upgrade(BAD[name])
    assert info.value.status == 400


def test_the_head_is_limited_to_16_kib():
    assert head_end(b"GET / HTTP/1.1\r\nX: " + b"a" * 100) == -1  # not complete yet
    with pytest.raises(BadUpgrade):
        head_end(b"GET / HTTP/1.1\r\nX: " + b"a" * MAX_HEAD)  # never ends
    big = GOOD.replace(b"\r\n\r\n", b"\r\nX-Pad: " + b"a" * MAX_HEAD + b"\r\n\r\n")
    with pytest.raises(BadUpgrade):
        head_end(big)


# -- the verify fast path -----------------------------------------------------------


@pytest.fixture(scope="module")
def pairs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    directory = tmp_path_factory.mktemp("keys")
    out = {}
    for name, kind in (("a", "rsa"), ("b", "rsa"), ("ec", "ec")):
        private, public = directory / f"{name}.key", directory / f"{name}.pem"
        generate_keypair(kind, private, public)  # type: ignore[arg-type]
        out[name] = (private, public)
    return out


NOW = 1_800_000_000


def signed(private: Path, **claims: Any) -> str:
    body = {"org": "acme", "sub": "alice", "iat": NOW, "exp": NOW + 600, **claims}
    return jwt.encode(body, load_private_key(private), algorithm="RS256", headers={"kid": "a"})  # type: ignore[arg-type]


def verifier_for(public: Path) -> Verifier:
    auth = AuthSettings(public_keys=(str(public),))
    return Verifier(auth, KeyStore(auth))


def test_rs256_direct_verify_agrees_with_pyjwt(pairs):
    token = signed(pairs["a"][0])
    head, payload, signature = token.split(".")
    message = f"{head}.{payload}".encode()
    raw = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
    keyset = KeyStore(AuthSettings(public_keys=(str(pairs["a"][1]),))).current
    key = keyset.get("a").key  # type: ignore[union-attr]
    other = KeyStore(AuthSettings(public_keys=(str(pairs["b"][1]),))).current.get("b").key  # type: ignore[union-attr]
    ec_key = KeyStore(AuthSettings(public_keys=(str(pairs["ec"][1]),))).current.get("ec").key  # type: ignore[union-attr]
    pyjwt = jwt.algorithms.RSAAlgorithm(jwt.algorithms.RSAAlgorithm.SHA256)
    flipped = bytes([raw[0] ^ 1]) + raw[1:]
    for candidate, sig, expected in (
        (key, raw, True),
        (key, flipped, False),
        (other, raw, False),
        (key, raw[:-1], False),
    ):
        assert _rs256_verify(message, candidate, sig) is expected
        assert pyjwt.verify(message, candidate, sig) is expected
    assert _rs256_verify(message, ec_key, raw) is False  # never another key type


def test_info_claim_rule(pairs):
    verifier = verifier_for(pairs["a"][1])
    ok = verifier.verify(signed(pairs["a"][0], info={"name": "Alice", "n": 1}), now=NOW)
    assert ok.claims["info"] == {"name": "Alice", "n": 1}
    assert verifier.verify(signed(pairs["a"][0], info=None), now=NOW).sub == "alice"
    almost = {"pad": "x" * (1024 - len('{"pad":""}'))}
    assert verifier.verify(signed(pairs["a"][0], info=almost), now=NOW).sub == "alice"
    for bad in ({"pad": "x" * 1024}, "a string", ["a", "list"], 42):
        with pytest.raises(AuthError) as info:
            verifier.verify(signed(pairs["a"][0], info=bad), now=NOW)
        assert info.value.reason == "bad_info"
