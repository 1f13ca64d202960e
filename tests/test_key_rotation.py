"""Key rotation on a running server: a changed key file is picked up, live
connections stay up."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import trio
from jwt.algorithms import RSAAlgorithm

from apix_trio.auth.devkeys import generate_keypair, load_private_key, mint_token
from tests.procs import assert_clean_log, open_node
from tests.serverkit import running_server
from tests.wsclient import RawClient

pytestmark = pytest.mark.timeout(60)


def write_jwks(path: Path, keys: dict[str, Path]) -> None:
    entries = []
    for kid, private_path in keys.items():
        public = load_private_key(private_path).public_key()
        jwk = json.loads(RSAAlgorithm.to_jwk(public))
        entries.append({**jwk, "kid": kid, "alg": "RS256", "use": "sig"})
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"keys": entries}))
    tmp.replace(path)


async def test_new_key_in_jwks_file_is_accepted_without_dropping_connections(tmp_path):
    old_key, new_key = tmp_path / "old.key", tmp_path / "new.key"
    generate_keypair("rsa", old_key, tmp_path / "old.pem")
    generate_keypair("rsa", new_key, tmp_path / "new.pem")
    jwks = tmp_path / "keys.jwks"
    write_jwks(jwks, {"old": old_key})

    def token(key: Path, kid: str, sub: str) -> str:
        return mint_token(key, org="acme", sub=sub, kid=kid, sub_patterns=(">",), pub=(">",))

    async with running_server(tmp_path, auth={"public_keys": (str(jwks),)}) as kit:
        veteran = await RawClient.open(kit.url)
        assert (await veteran.call("auth", token=token(old_key, "old", "veteran")))["ok"]
        assert (await veteran.call("subscribe", channel="news.x"))["ok"]

        rejected = await RawClient.open(kit.url)
        reply = await rejected.call("auth", token=token(new_key, "new", "early"))
        assert reply["error"]["code"] == "unauthenticated"

        write_jwks(jwks, {"new": new_key})  # rotate: the old key is gone
        # The key watcher polls file stamps every 2 s: retry like a client would.
        with trio.fail_after(15):
            while True:
                newcomer = await RawClient.open(kit.url)
                reply = await newcomer.call("auth", token=token(new_key, "new", "newcomer"))
                if reply["ok"]:
                    break
                assert reply["error"]["code"] == "unauthenticated"
                await trio.sleep(0.2)
        assert kit.hub.verifier.keys.kids() == ("new",)
        late = await RawClient.open(kit.url)
        reply = await late.call("auth", token=token(old_key, "old", "late"))
        assert reply["error"]["code"] == "unauthenticated"

        # The connection authenticated with the removed key is still served.
        published = await newcomer.call("publish", channel="news.x", data="rotated")
        assert published["ok"]
        push = await veteran.next_push()
        assert push["event"]["data"] == "rotated"
        for client in (veteran, newcomer):
            await client.close()


async def test_sighup_reloads_keys_in_a_real_process(tmp_path):
    old_key, new_key = tmp_path / "old.key", tmp_path / "new.key"
    generate_keypair("rsa", old_key, tmp_path / "old.pem")
    generate_keypair("rsa", new_key, tmp_path / "new.pem")
    jwks = tmp_path / "keys.jwks"
    write_jwks(jwks, {"old": old_key})

    def token(key: Path, kid: str, sub: str) -> str:
        return mint_token(key, org="acme", sub=sub, kid=kid, sub_patterns=(">",), pub=(">",))

    with trio.fail_after(40):
        async with open_node(tmp_path / "dev", settings={"auth.public_keys": [str(jwks)]}) as node:
            veteran = await node.connect(token(old_key, "old", "veteran"))
            assert (await veteran.call("subscribe", channel="news.x"))["ok"]
            write_jwks(jwks, {"old": old_key, "new": new_key})
            node.signal(signal.SIGHUP)
            reloaded = await node.wait_log("keys_reloaded")
            assert reloaded["keys"] == ["new", "old"]
            # A SIGHUP with nothing changed reloads too, and says why.
            node.signal(signal.SIGHUP)
            again = await node.wait_log_count("keys_reloaded", 2)
            assert again["why"] == "sighup"
            newcomer = await node.connect(token(new_key, "new", "newcomer"))
            assert (await newcomer.call("publish", channel="news.x", data=1))["ok"]
            push = await veteran.recv()
            assert push is not None and push["event"]["data"] == 1
            assert_clean_log(node)
