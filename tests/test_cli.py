"""The `apix-trio` command line: keygen, token, serve's configuration errors,
and sub/pub against a scripted fake server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
import trio
import trio_websocket
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from apix_trio.cli import main

REPO = Path(__file__).resolve().parents[1]
TIMEOUT = 10


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No APIX_* variable of the caller leaks in; relative paths (the default
    `.apix` dev key dir) land in the test's own directory."""
    for name in list(os.environ):
        if name.startswith("APIX_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def keygen(tmp_path: Path, kind: str, name: str = "k1") -> tuple[Path, Path]:
    assert main(["keygen", "--type", kind, "--out", str(tmp_path / "keys"), "--name", name]) == 0
    return tmp_path / "keys" / f"{name}.key", tmp_path / "keys" / f"{name}.pem"


def decode(token: str, public_path: Path, algorithm: str, **options: Any) -> dict[str, Any]:
    key = serialization.load_pem_public_key(public_path.read_bytes())
    claims: dict[str, Any] = jwt.decode(token, key, algorithms=[algorithm], **options)  # type: ignore[arg-type]
    return claims


# -- keygen -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "private_type", "algorithm"),
    [
        ("rsa", rsa.RSAPrivateKey, "RS256"),
        ("ec", ec.EllipticCurvePrivateKey, "ES256"),
        ("ed25519", ed25519.Ed25519PrivateKey, "EdDSA"),
    ],
)
def test_keygen_writes_loadable_keys(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    kind: str,
    private_type: type,
    algorithm: str,
) -> None:
    private_path, public_path = keygen(tmp_path, kind)
    private_key = serialization.load_pem_private_key(private_path.read_bytes(), password=None)
    public_key = serialization.load_pem_public_key(public_path.read_bytes())
    assert isinstance(private_key, private_type)
    assert public_key == private_key.public_key()
    assert private_path.stat().st_mode & 0o777 == 0o600
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"private key: {private_path}",
        f"public key: {public_path}",
        "kid: k1",
        f"algorithm: {algorithm}",
    ]


def test_keygen_refuses_to_overwrite_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    private_path, _ = keygen(tmp_path, "ec")
    before = private_path.read_bytes()
    args = ["keygen", "--type", "ec", "--out", str(tmp_path / "keys"), "--name", "k1"]
    assert main(args) == 1
    assert "--force" in capsys.readouterr().err
    assert private_path.read_bytes() == before
    assert main([*args, "--force"]) == 0
    assert private_path.read_bytes() != before


# -- token ------------------------------------------------------------------


def test_token_with_a_key_file_has_claims_and_kid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    private_path, public_path = keygen(tmp_path, "rsa")
    capsys.readouterr()
    status = main(
        [
            "token",
            "--org", "acme",
            "--sub", "alice",
            "--pub", "chat.>",
            "--pub", "user.{sub}",
            "--sub-pattern", "chat.*",
            "--state", "doc.>",
            "--role", "admin",
            "--ttl", "120",
            "--key", str(private_path),
        ]
    )  # fmt: skip
    assert status == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    lines = captured.out.splitlines()
    assert len(lines) == 1  # only the token on stdout
    token = lines[0]
    assert jwt.get_unverified_header(token)["kid"] == "k1"
    claims = decode(token, public_path, "RS256")
    assert claims["org"] == "acme"
    assert claims["sub"] == "alice"
    assert claims["perms"] == {
        "pub": ["chat.>", "user.{sub}"],
        "sub": ["chat.*"],
        "state": ["doc.>"],
    }
    assert claims["roles"] == ["admin"]
    assert claims["exp"] - claims["iat"] == 120


def test_token_uses_the_dev_key_from_the_configured_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    dev_dir = tmp_path / "devkeys"
    monkeypatch.setenv("APIX_AUTH_DEV_KEY_DIR", str(dev_dir))
    monkeypatch.setenv("APIX_AUTH_ISSUER", "https://issuer.example")
    assert main(["token", "--org", "acme", "--sub", "bob", "--sub-pattern", "user.{sub}"]) == 0
    first = capsys.readouterr()
    assert "created a development key pair" in first.err
    token = first.out.strip()
    assert jwt.get_unverified_header(token)["kid"] == "dev"
    claims = decode(token, dev_dir / "dev.pem", "RS256", issuer="https://issuer.example")
    assert (claims["org"], claims["sub"]) == ("acme", "bob")
    assert claims["perms"]["sub"] == ["user.{sub}"]
    assert "roles" not in claims

    # The second run reuses the pair, quietly.
    assert main(["token", "--org", "acme", "--sub", "bob", "--kid", "other"]) == 0
    second = capsys.readouterr()
    assert second.err == ""
    assert jwt.get_unverified_header(second.out.strip())["kid"] == "other"
    decode(second.out.strip(), dev_dir / "dev.pem", "RS256")
    assert not (tmp_path / ".apix").exists()


def test_token_honours_dev_key_dir_from_the_config_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "apix.toml"
    config.write_text('[auth]\ndev_key_dir = "from-file"\n')
    assert main(["token", "--org", "acme", "--sub", "bob", "--config", str(config)]) == 0
    decode(capsys.readouterr().out.strip(), tmp_path / "from-file" / "dev.pem", "RS256")


def test_token_with_ec_key_signs_es256(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    private_path, public_path = keygen(tmp_path, "ec", name="ec1")
    capsys.readouterr()
    assert main(["token", "--org", "acme", "--sub", "bob", "--key", str(private_path)]) == 0
    token = capsys.readouterr().out.strip()
    assert jwt.get_unverified_header(token) == {"alg": "ES256", "kid": "ec1", "typ": "JWT"}
    decode(token, public_path, "ES256")


def test_token_reports_a_bad_configuration(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("APIX_AUTH_LEEWAY", "soon")
    assert main(["token", "--org", "acme", "--sub", "bob"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("apix-trio: config: auth.leeway")


def test_token_reports_an_unreadable_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "missing.key"
    assert main(["token", "--org", "acme", "--sub", "bob", "--key", str(missing)]) == 1
    assert capsys.readouterr().err.startswith("apix-trio: token: ")


# -- serve ------------------------------------------------------------------


def run_serve(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {name: value for name, value in os.environ.items() if not name.startswith("APIX_")}
    environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), environ.get("PYTHONPATH")]))
    environ.update(env)
    return subprocess.run(
        [sys.executable, "-m", "apix_trio", "serve", *args],
        cwd=tmp_path,
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_serve_with_a_bad_env_value_exits_2_naming_the_setting(tmp_path: Path) -> None:
    done = run_serve(tmp_path, APIX_SERVER_WS_PORT="abc", APIX_LOG_LEVEL="loud")
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert len(lines) == 2
    assert all(line.startswith("apix-trio: config: ") for line in lines)
    assert any("server.ws_port" in line and "APIX_SERVER_WS_PORT" in line for line in lines)
    assert any("log.level" in line and "APIX_LOG_LEVEL" in line for line in lines)
    assert done.stdout == ""


def test_serve_with_a_bad_flag_names_the_flag(tmp_path: Path) -> None:
    done = run_serve(tmp_path, "--ws-port", "70000")
    assert done.returncode == 2
    assert done.stderr.startswith("apix-trio: config: server.ws_port")
    assert "--ws-port" in done.stderr


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage:" in capsys.readouterr().err


# -- sub / pub against a fake server -------------------------------------------


class FakeServer:
    """First-frame auth, then: `subscribe` answered and followed by one event
    on that channel (and after the `close_after`-th subscribe, a presence
    push and a close with 1001); `publish` answered with a fixed result."""

    def __init__(self, close_after: int = 0) -> None:
        self.url = ""
        self.close_after = close_after
        self.frames: list[dict[str, Any]] = []

    async def handle(self, request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept(subprotocol="apix.v1")
        subscribes = 0
        try:
            while True:
                frame = orjson.loads(await ws.get_message())
                self.frames.append(frame)
                result: dict[str, Any] = {}
                if frame["op"] == "auth":
                    result = {"conn": "c", "org": "acme", "sub": "bob", "session": "s"}
                elif frame["op"] == "publish":
                    result = {"id": "7-0", "ts": 7, "duplicate": False}
                elif frame["op"] == "subscribe":
                    result = {"channel": frame["channel"], "position": "0-0", "recovered": True}
                    result["replayed"] = 0
                await send(ws, {"id": frame["id"], "ok": True, "result": result})
                if frame["op"] == "subscribe":
                    subscribes += 1
                    await send(ws, event(frame["channel"], subscribes))
                    if subscribes == self.close_after:
                        await send(ws, {"push": "presence", "channel": "x", "join": {}})
                        await ws.aclose(1001, "server shutting down")
        except trio_websocket.ConnectionClosed:
            pass


async def send(ws: trio_websocket.WebSocketConnection, frame: dict[str, Any]) -> None:
    await ws.send_message(orjson.dumps(frame).decode())


def event(channel: str, n: int) -> dict[str, Any]:
    body = {"id": f"{n}-0", "ts": n, "data": {"n": n}, "from": "alice"}
    return {"push": "event", "channel": channel, "event": body}


async def start_fake(nursery: trio.Nursery, server: FakeServer) -> FakeServer:
    listener = await nursery.start(
        trio_websocket.serve_websocket, server.handle, "127.0.0.1", 0, None
    )
    server.url = f"ws://127.0.0.1:{listener.port}/ws"
    return server


async def run_main(*argv: str) -> int:
    # main() runs its own trio loop, so it gets a thread of its own.
    with trio.fail_after(TIMEOUT):
        status: int = await trio.to_thread.run_sync(main, list(argv))
    return status


async def test_pub_prints_the_publish_result(
    nursery: trio.Nursery, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = await start_fake(nursery, FakeServer())
    status = await run_main(
        "pub", "--url", fake.url, "--token", "T1", "--key", "k-1", "chat.room", '{"text": "hi"}'
    )
    assert status == 0
    assert orjson.loads(capsys.readouterr().out) == {"id": "7-0", "ts": 7, "duplicate": False}
    assert fake.frames[0] == {"op": "auth", "id": 1, "token": "T1"}
    assert fake.frames[1] == {
        "op": "publish",
        "id": 2,
        "channel": "chat.room",
        "data": {"text": "hi"},
        "key": "k-1",
    }


async def test_sub_prints_event_lines_until_the_server_closes(
    nursery: trio.Nursery, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = await start_fake(nursery, FakeServer(close_after=2))
    monkeypatch.setenv("APIX_TOKEN", "T2")
    status = await run_main("sub", "--url", fake.url, "--since", "0", "a.one", "a.two")
    assert status == 1  # the server ended it, not Ctrl-C
    captured = capsys.readouterr()
    assert [orjson.loads(line) for line in captured.out.splitlines()] == [
        event("a.one", 1),
        event("a.two", 2),
    ]
    assert "connection closed (1001)" in captured.err
    assert '"presence"' in captured.err
    assert fake.frames[0]["token"] == "T2"
    assert fake.frames[1] == {"op": "subscribe", "id": 2, "channel": "a.one", "since": "0"}


def test_pub_and_sub_need_a_token(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pub", "chat.room", "{}"]) == 2
    assert "APIX_TOKEN" in capsys.readouterr().err
    assert main(["sub", "chat.room"]) == 2


def test_pub_rejects_bad_json_before_connecting(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pub", "--token", "T", "chat.room", "{nope"]) == 2
    assert "DATA_JSON" in capsys.readouterr().err


def test_pub_reports_an_unreachable_server(capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, never listening: refused
        url = f"ws://127.0.0.1:{sock.getsockname()[1]}/ws"
        assert main(["pub", "--url", url, "--token", "T", "chat.room", "1"]) == 1
    assert "cannot connect" in capsys.readouterr().err
