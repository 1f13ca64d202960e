"""Token verification, key loading, rotation and the development key pair."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import stat
from pathlib import Path
from typing import Any

import attrs
import jwt
import orjson
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from apix_trio.auth.devkeys import (
    ensure_dev_keys,
    generate_keypair,
    load_private_key,
    mint_token,
)
from apix_trio.auth.identity import Identity
from apix_trio.auth.keys import AuthError, KeyLoadError, KeyStore, Reason, Verifier, load_key_file
from apix_trio.protocol.codes import CloseCode
from apix_trio.settings import AuthSettings

NOW = 1_700_000_000.0
SECRET = "development-only-hmac-secret-of-32+-bytes"
ALGORITHMS = {"a": "RS256", "b": "RS256", "ec1": "ES256", "ed1": "EdDSA"}


@attrs.frozen
class Pair:
    private: Path
    public: Path


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pair]:
    """Key pairs shared by the module (RSA generation is slow)."""
    directory = tmp_path_factory.mktemp("keys")
    pairs = {}
    for name, kind in [("a", "rsa"), ("b", "rsa"), ("ec1", "ec"), ("ed1", "ed25519")]:
        pair = Pair(directory / f"{name}.key", directory / f"{name}.pem")
        generate_keypair(kind, pair.private, pair.public)  # type: ignore[arg-type]
        pairs[name] = pair
    return pairs


def make_verifier(*paths: Path, **options: Any) -> Verifier:
    auth = AuthSettings(public_keys=tuple(str(p) for p in paths), **options)
    return Verifier(auth, KeyStore(auth))


def token(pair: Pair, **kwargs: Any) -> str:
    kwargs.setdefault("org", "acme")
    kwargs.setdefault("sub", "alice")
    return mint_token(pair.private, now=NOW, **kwargs)


def sign(pair: Pair, claims: dict[str, Any], **headers: Any) -> str:
    """Sign arbitrary claims (mint_token always sets org, sub and exp)."""
    key = load_private_key(pair.private)
    return jwt.encode(claims, key, algorithm="RS256", headers=headers or None)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], claims: dict[str, Any], secret: bytes | None) -> str:
    """A token built by hand: HMAC-signed with `secret`, or unsigned."""
    signing_input = f"{b64(orjson.dumps(header))}.{b64(orjson.dumps(claims))}"
    if secret is None:
        return signing_input + "."
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"org": "acme", "sub": "alice", "iat": NOW, "exp": NOW + 3600}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not ...}


def refused(verifier: Verifier, bad: Any, now: float = NOW) -> AuthError:
    with pytest.raises(AuthError) as info:
        verifier.verify(bad, now=now)
    message = f"{info.value} {info.value!r} {info.value.reason}"
    if isinstance(bad, str):
        for part in [bad, *bad.split(".")]:
            assert len(part) < 8 or part not in message
    return info.value


# ---------------------------------------------------------------- the happy path


def test_valid_token_gives_identity(keys: dict[str, Pair]) -> None:
    verifier = make_verifier(keys["a"].public)
    identity = verifier.verify(
        token(keys["a"], roles=["editor"], sub_patterns=["chat.>"], pub=["user.{sub}"]),
        now=NOW,
    )
    assert identity == Identity(
        org="acme",
        sub="alice",
        exp=int(NOW) + 3600,
        roles=("editor",),
        perms={"sub": ("chat.>",), "pub": ("user.{sub}",), "state": ()},
        payload=identity.payload,
    )
    assert identity.claims["iat"] == int(NOW)


def test_defaults_when_roles_and_perms_absent(keys: dict[str, Pair]) -> None:
    identity = make_verifier(keys["a"].public).verify(token(keys["a"]), now=NOW)
    assert identity.roles == ()
    assert identity.perms == {"sub": (), "pub": (), "state": ()}


def test_null_roles_and_perms_count_as_absent(keys: dict[str, Pair]) -> None:
    good = sign(keys["a"], claims(roles=None, perms=None))
    identity = make_verifier(keys["a"].public).verify(good, now=NOW)
    assert (identity.roles, identity.perms) == ((), {"sub": (), "pub": (), "state": ()})


def test_wall_clock_is_the_default(keys: dict[str, Pair]) -> None:
    fresh = mint_token(keys["a"].private, org="acme", sub="alice")
    assert make_verifier(keys["a"].public).verify(fresh).sub == "alice"


def test_keys_are_parsed_once(keys: dict[str, Pair], tmp_path: Path) -> None:
    copy = tmp_path / "a.pem"
    copy.write_bytes(keys["a"].public.read_bytes())
    verifier = make_verifier(copy)
    copy.unlink()  # verifying must not touch the file again
    assert verifier.verify(token(keys["a"]), now=NOW).org == "acme"


# ---------------------------------------------------------------- time claims


def test_expiry_honours_leeway(keys: dict[str, Pair]) -> None:
    verifier = make_verifier(keys["a"].public, leeway=5.0)
    good = token(keys["a"], ttl=60)
    exp = NOW + 60
    assert verifier.verify(good, now=exp + 4.999).sub == "alice"
    assert refused(verifier, good, now=exp + 5).reason == Reason.EXPIRED


def test_not_before_in_the_future(keys: dict[str, Pair]) -> None:
    verifier = make_verifier(keys["a"].public, leeway=5.0)
    assert refused(verifier, sign(keys["a"], claims(nbf=NOW + 6))).reason == "not_yet_valid"
    assert verifier.verify(sign(keys["a"], claims(nbf=NOW + 5)), now=NOW).sub == "alice"


def test_issued_in_the_future(keys: dict[str, Pair]) -> None:
    verifier = make_verifier(keys["a"].public, leeway=5.0)
    assert refused(verifier, sign(keys["a"], claims(iat=NOW + 60))).reason == "not_yet_valid"


@pytest.mark.parametrize("name", ["exp", "nbf", "iat"])
@pytest.mark.parametrize("value", ["soon", True, [1]])
def test_time_claims_must_be_numbers(keys: dict[str, Pair], name: str, value: Any) -> None:
    verifier = make_verifier(keys["a"].public)
    assert refused(verifier, sign(keys["a"], claims(**{name: value}))).reason == "bad_time"


# ---------------------------------------------------------------- iss and aud


def test_issuer_enforced_when_configured(keys: dict[str, Pair]) -> None:
    verifier = make_verifier(keys["a"].public, issuer="https://idp.example")
    assert verifier.verify(token(keys["a"], issuer="https://idp.example"), now=NOW)
    assert refused(verifier, token(keys["a"], issuer="https://evil")).reason == "bad_issuer"
    assert refused(verifier, token(keys["a"])).reason == "missing_claim:iss"


def test_audience_enforced_when_configured(keys: dict[str, Pair]) -> None:
    verifier = make_verifier(keys["a"].public, audience="apix")
    assert verifier.verify(token(keys["a"], audience="apix"), now=NOW)
    listed = sign(keys["a"], claims(aud=["other", "apix"]))
    assert verifier.verify(listed, now=NOW)
    assert refused(verifier, token(keys["a"], audience="other")).reason == "bad_audience"
    assert refused(verifier, sign(keys["a"], claims(aud=[1]))).reason == "bad_audience"
    assert refused(verifier, token(keys["a"])).reason == "missing_claim:aud"


def test_iss_and_aud_ignored_when_not_configured(keys: dict[str, Pair]) -> None:
    verifier = make_verifier(keys["a"].public)
    assert verifier.verify(token(keys["a"], issuer="x", audience="y"), now=NOW)


# ---------------------------------------------------------------- identity claims


@pytest.mark.parametrize("name", ["org", "sub", "exp"])
def test_required_claims(keys: dict[str, Pair], name: str) -> None:
    bad = sign(keys["a"], claims(**{name: ...}))
    assert refused(make_verifier(keys["a"].public), bad).reason == f"missing_claim:{name}"


@pytest.mark.parametrize(
    "org", ["Acme", "-acme", "_acme", "", "a" * 64, "ac me", "acme\n", "acmé", "a.b", 7]
)
def test_bad_org(keys: dict[str, Pair], org: Any) -> None:
    bad = sign(keys["a"], claims(org=org))
    assert refused(make_verifier(keys["a"].public), bad).reason == "bad_org"


@pytest.mark.parametrize("org", ["a", "0", "acme-corp_2", "a" * 63])
def test_good_org(keys: dict[str, Pair], org: str) -> None:
    assert make_verifier(keys["a"].public).verify(token(keys["a"], org=org), now=NOW).org == org


@pytest.mark.parametrize("sub", ["", "x" * 129, 42, ["alice"]])
def test_bad_sub(keys: dict[str, Pair], sub: Any) -> None:
    bad = sign(keys["a"], claims(sub=sub))
    assert refused(make_verifier(keys["a"].public), bad).reason == "bad_sub"


def test_sub_of_128_characters(keys: dict[str, Pair]) -> None:
    identity = make_verifier(keys["a"].public).verify(token(keys["a"], sub="x" * 128), now=NOW)
    assert len(identity.sub) == 128


@pytest.mark.parametrize("roles", ["admin", [1], {"admin": True}])
def test_bad_roles(keys: dict[str, Pair], roles: Any) -> None:
    bad = sign(keys["a"], claims(roles=roles))
    assert refused(make_verifier(keys["a"].public), bad).reason == "bad_roles"


@pytest.mark.parametrize(
    "perms",
    [
        ["chat.>"],
        {"sub": "chat.>"},
        {"pub": [1]},
        {"state": ["a.>.b"]},
        {"sub": ["chat..x"]},
        {"sub": ["user.x{sub}"]},
        {"sub": ["a.b.c.d.e.f.g.h.i"]},
    ],
)
def test_bad_perms(keys: dict[str, Pair], perms: Any) -> None:
    bad = sign(keys["a"], claims(perms=perms))
    assert refused(make_verifier(keys["a"].public), bad).reason == "bad_perms"


def _info_of_size(size: int) -> dict[str, str]:
    """An `info` object whose compact JSON is exactly `size` bytes."""
    info = {"n": ""}
    info["n"] = "x" * (size - len(orjson.dumps(info)))
    assert len(orjson.dumps(info)) == size
    return info


def test_info_claim_up_to_1_kib_is_kept_as_compact_json(keys: dict[str, Pair]) -> None:
    verifier = make_verifier(keys["a"].public)
    largest = _info_of_size(1024)
    identity = verifier.verify(sign(keys["a"], claims(info=largest)), now=NOW)
    assert identity.info is not None and orjson.loads(identity.info) == largest
    small = verifier.verify(sign(keys["a"], claims(info={"name": "Alice", "n": 1})), now=NOW)
    assert small.info == '{"name":"Alice","n":1}'
    assert verifier.verify(token(keys["a"]), now=NOW).info is None
    assert verifier.verify(sign(keys["a"], claims(info=None)), now=NOW).info is None


@pytest.mark.parametrize("info", [_info_of_size(1025), "alice", ["a"], 7, True])
def test_info_claim_larger_than_1_kib_or_not_an_object_makes_the_token_invalid(
    keys: dict[str, Pair], info: Any
) -> None:
    bad = sign(keys["a"], claims(info=info))
    assert refused(make_verifier(keys["a"].public), bad).reason == "bad_info"


def test_unknown_perm_kinds_are_ignored(keys: dict[str, Pair]) -> None:
    good = sign(keys["a"], claims(perms={"sub": ["a.*"], "presence": 3}))
    identity = make_verifier(keys["a"].public).verify(good, now=NOW)
    assert identity.perms == {"sub": ("a.*",), "pub": (), "state": ()}


# ---------------------------------------------------------------- algorithms and keys


def test_unknown_kid(keys: dict[str, Pair]) -> None:
    bad = token(keys["a"], kid="nobody")
    assert refused(make_verifier(keys["a"].public), bad).reason == "unknown_kid"


def test_kid_of_a_key_of_another_algorithm(keys: dict[str, Pair]) -> None:
    verifier = make_verifier(keys["a"].public, keys["ec1"].public, algorithms=("RS256", "ES256"))
    bad = token(keys["a"], kid="ec1")
    assert refused(verifier, bad).reason == "alg_mismatch"


def test_wrong_key_for_the_kid(keys: dict[str, Pair]) -> None:
    bad = token(keys["b"], kid="a")
    assert refused(make_verifier(keys["a"].public), bad).reason == "bad_signature"


def test_tampered_payload(keys: dict[str, Pair]) -> None:
    header, _, signature = token(keys["a"]).split(".")
    bad = f"{header}.{b64(orjson.dumps(claims(org='other')))}.{signature}"
    assert refused(make_verifier(keys["a"].public), bad).reason == "bad_signature"


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
def test_alg_none_is_rejected(keys: dict[str, Pair], alg: str) -> None:
    verifier = make_verifier(keys["a"].public, hmac_secret=SECRET)
    assert refused(verifier, forge({"alg": alg}, claims(), None)).reason == "alg_not_allowed"
    signed = forge({"alg": alg, "kid": "a"}, claims(), SECRET.encode())
    assert refused(verifier, signed).reason == "alg_not_allowed"


def test_hs256_needs_a_configured_secret(keys: dict[str, Pair]) -> None:
    hs = forge({"alg": "HS256", "typ": "JWT"}, claims(), SECRET.encode())
    assert refused(make_verifier(keys["a"].public), hs).reason == "alg_not_allowed"
    verifier = make_verifier(keys["a"].public, hmac_secret=SECRET)
    assert verifier.hmac_enabled
    assert verifier.verify(hs, now=NOW).sub == "alice"
    other = forge({"alg": "HS256"}, claims(), b"another-secret-of-at-least-32-bytes!!")
    assert refused(verifier, other).reason == "bad_signature"


@pytest.mark.parametrize("alg", ["HS384", "HS512", "RS384", "PS256", "ES384"])
def test_other_algorithms_are_rejected(keys: dict[str, Pair], alg: str) -> None:
    verifier = make_verifier(keys["a"].public, hmac_secret=SECRET)
    bad = forge({"alg": alg, "kid": "a"}, claims(), SECRET.encode())
    assert refused(verifier, bad).reason == "alg_not_allowed"


@pytest.mark.parametrize("hmac_secret", ["", SECRET])
@pytest.mark.parametrize("kid", ["a", None])
def test_alg_confusion_public_key_as_hmac_secret(
    keys: dict[str, Pair], hmac_secret: str, kid: str | None
) -> None:
    """The classic attack: HS256 signed with the server's RSA public key."""
    verifier = make_verifier(keys["a"].public, hmac_secret=hmac_secret)
    header = {"alg": "HS256", "typ": "JWT"} | ({"kid": kid} if kid else {})
    pem = keys["a"].public.read_bytes()
    for secret in (pem, pem.strip()):
        error = refused(verifier, forge(header, claims(roles=["admin"]), secret))
        assert error.reason == ("bad_signature" if hmac_secret else "alg_not_allowed")


def test_a_public_key_cannot_be_the_hmac_secret(keys: dict[str, Pair]) -> None:
    with pytest.raises(ValueError, match="hmac_secret"):
        make_verifier(keys["a"].public, hmac_secret=keys["a"].public.read_text())


def test_unsupported_algorithm_in_settings(keys: dict[str, Pair]) -> None:
    for algorithms in [("RS256", "HS256"), ("none",), ("PS256",)]:
        with pytest.raises(ValueError, match=r"auth\.algorithms"):
            make_verifier(keys["a"].public, algorithms=algorithms)


def test_es256_when_configured(keys: dict[str, Pair]) -> None:
    es = token(keys["ec1"])
    assert jwt.get_unverified_header(es)["alg"] == "ES256"
    rs_only = make_verifier(keys["a"].public, keys["ec1"].public)
    assert refused(rs_only, es).reason == "alg_not_allowed"
    both = make_verifier(keys["a"].public, keys["ec1"].public, algorithms=("RS256", "ES256"))
    assert both.verify(es, now=NOW).sub == "alice"
    assert both.verify(token(keys["a"]), now=NOW).sub == "alice"


def test_eddsa_when_configured(keys: dict[str, Pair]) -> None:
    ed = token(keys["ed1"])
    assert jwt.get_unverified_header(ed)["alg"] == "EdDSA"
    verifier = make_verifier(keys["ed1"].public, algorithms=("EdDSA",))
    assert verifier.verify(ed, now=NOW).sub == "alice"
    assert refused(verifier, token(keys["a"])).reason == "alg_not_allowed"


def test_kidless_token_tries_every_key_of_its_algorithm(keys: dict[str, Pair]) -> None:
    verifier = make_verifier(
        keys["a"].public, keys["ec1"].public, keys["b"].public, algorithms=("RS256", "ES256")
    )
    assert verifier.verify(token(keys["b"], kid=""), now=NOW).sub == "alice"
    assert verifier.verify(token(keys["ec1"], kid=""), now=NOW).sub == "alice"
    only_a = make_verifier(keys["a"].public)
    assert refused(only_a, token(keys["b"], kid="")).reason == "bad_signature"
    ed_only = make_verifier(keys["ed1"].public, algorithms=("RS256", "EdDSA"))
    assert refused(ed_only, token(keys["a"], kid="")).reason == "no_key"


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "abc",
        "a.b",
        "a.b.c",
        "!!!.???.###",
        b64(b"[1]") + "." + b64(b"{}") + ".",
        b64(b'{"typ": "JWT"}') + "." + b64(b"{}") + ".",
        b64(b'{"alg": 5}') + "." + b64(b"{}") + ".",
        b64(b'{"alg": "RS256", "kid": 5}') + "." + b64(b"{}") + ".",
        "x" * 40000,
        None,
        42,
    ],
)
def test_malformed(keys: dict[str, Pair], bad: Any) -> None:
    assert refused(make_verifier(keys["a"].public), bad).reason == "malformed"


@pytest.mark.parametrize("payload", [b"not json", b"[1, 2]", b'"acme"', b'{"exp": 1e999}'])
def test_signed_payload_that_is_not_a_claims_object(keys: dict[str, Pair], payload: bytes) -> None:
    key = load_private_key(keys["a"].private)
    bad = jwt.PyJWS().encode(payload, key, algorithm="RS256", headers={"kid": "a"})
    assert refused(make_verifier(keys["a"].public), bad).reason == "malformed"


def test_unsupported_critical_header(keys: dict[str, Pair]) -> None:
    bad = sign(keys["a"], claims(), kid="a", crit=["exp-ext"], **{"exp-ext": 1})
    assert refused(make_verifier(keys["a"].public), bad).reason == "malformed"


def test_auth_error_carries_the_close_code() -> None:
    assert AuthError(Reason.EXPIRED, "x").close_code == CloseCode.UNAUTHENTICATED


# ---------------------------------------------------------------- key files


def jwk(pair: Pair, kid: str, **extra: Any) -> dict[str, Any]:
    """The public key of `pair` as a JWK with `kid` (plus `extra` members)."""
    public = serialization.load_pem_public_key(pair.public.read_bytes())
    algorithm = jwt.algorithms.get_default_algorithms()[ALGORITHMS[pair.public.stem]]
    data: dict[str, Any] = algorithm.to_jwk(public, as_dict=True)
    return data | {"kid": kid} | extra


def write_jwks(path: Path, *entries: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(orjson.dumps({"keys": list(entries)}))
    os.replace(tmp, path)


def test_jwks_with_two_kids(keys: dict[str, Pair], tmp_path: Path) -> None:
    jwks = tmp_path / "idp.json"
    write_jwks(jwks, jwk(keys["a"], "2024-a", alg="RS256", use="sig"), jwk(keys["ec1"], "ec-1"))
    verifier = make_verifier(jwks, algorithms=("RS256", "ES256"))
    assert verifier.verify(token(keys["a"], kid="2024-a"), now=NOW).sub == "alice"
    assert verifier.verify(token(keys["ec1"], kid="ec-1"), now=NOW).sub == "alice"
    assert refused(verifier, token(keys["a"], kid="a")).reason == "unknown_kid"
    assert refused(verifier, token(keys["b"], kid="2024-a")).reason == "bad_signature"


def test_jwks_skips_encryption_keys(keys: dict[str, Pair], tmp_path: Path) -> None:
    jwks = tmp_path / "idp.json"
    write_jwks(jwks, jwk(keys["a"], "sig"), jwk(keys["b"], "enc", use="enc"))
    store = KeyStore(AuthSettings(public_keys=(str(jwks),)))
    assert store.kids() == ("sig",)


def test_pem_kid_is_the_file_name(keys: dict[str, Pair], tmp_path: Path) -> None:
    named = tmp_path / "prod-2025.pem"
    named.write_bytes(keys["a"].public.read_bytes())
    store = KeyStore(AuthSettings(public_keys=(str(named),)))
    assert store.kids() == ("prod-2025",)
    assert not store.dev_mode


def test_load_errors_name_the_file(keys: dict[str, Pair], tmp_path: Path) -> None:
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()
    cases: dict[str, bytes | None] = {
        "missing.pem": None,
        "garbage.pem": b"hello",
        "private.pem": keys["a"].private.read_bytes(),
        "p384.pem": p384.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        ),
        "broken.json": b"{nope",
        "notjwks.json": b'{"hello": 1}',
        "empty.json": b'{"keys": []}',
        "nokid.json": orjson.dumps({"keys": [jwk(keys["a"], "x") | {"kid": None}]}),
        "private.json": orjson.dumps({"keys": [jwk(keys["a"], "x", d="c2VjcmV0")]}),
        "oct.json": orjson.dumps({"keys": [{"kty": "oct", "kid": "h", "k": "c2VjcmV0"}]}),
        "badalg.json": orjson.dumps({"keys": [jwk(keys["a"], "x", alg="RS512")]}),
        "badrsa.json": orjson.dumps({"keys": [{"kty": "RSA", "kid": "x", "n": "AA"}]}),
    }
    for name, content in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_bytes(content)
        with pytest.raises(KeyLoadError) as info:
            load_key_file(path)
        assert str(info.value).startswith(f"{path}: "), name
        assert "c2VjcmV0" not in str(info.value)


def test_duplicate_kids_are_an_error(keys: dict[str, Pair], tmp_path: Path) -> None:
    jwks = tmp_path / "idp.json"
    write_jwks(jwks, jwk(keys["b"], "a"))
    with pytest.raises(KeyLoadError, match="'a' is also in"):
        KeyStore(AuthSettings(public_keys=(str(keys["a"].public), str(jwks))))


# ---------------------------------------------------------------- rotation


def test_rotation_through_a_jwks_file(keys: dict[str, Pair], tmp_path: Path) -> None:
    jwks = tmp_path / "idp.json"
    write_jwks(jwks, jwk(keys["a"], "old"))
    auth = AuthSettings(public_keys=(str(jwks),))
    store = KeyStore(auth)
    verifier = Verifier(auth, store)
    old, new = token(keys["a"], kid="old"), token(keys["b"], kid="new")
    assert verifier.verify(old, now=NOW)
    assert refused(verifier, new).reason == "unknown_kid"
    assert not store.changed()

    write_jwks(jwks, jwk(keys["a"], "old"), jwk(keys["b"], "new"))
    assert store.changed()
    assert store.reload() is True
    assert not store.changed()
    assert verifier.verify(old, now=NOW) and verifier.verify(new, now=NOW)

    write_jwks(jwks, jwk(keys["b"], "new"))
    assert store.reload() is True
    assert verifier.verify(new, now=NOW)
    assert refused(verifier, old).reason == "unknown_kid"
    assert store.reload() is False  # same keys again


def test_rotation_by_replacing_a_pem_file(keys: dict[str, Pair], tmp_path: Path) -> None:
    pem = tmp_path / "current.pem"
    pem.write_bytes(keys["a"].public.read_bytes())
    auth = AuthSettings(public_keys=(str(pem),))
    store = KeyStore(auth)
    verifier = Verifier(auth, store)
    old, new = token(keys["a"], kid="current"), token(keys["b"], kid="current")
    assert verifier.verify(old, now=NOW)
    tmp = tmp_path / "next"
    tmp.write_bytes(keys["b"].public.read_bytes())
    os.replace(tmp, pem)
    assert store.changed() and store.reload()
    assert verifier.verify(new, now=NOW)
    assert refused(verifier, old).reason == "bad_signature"


def test_failed_reload_keeps_the_old_keys(keys: dict[str, Pair], tmp_path: Path) -> None:
    pem = tmp_path / "k.pem"
    pem.write_bytes(keys["a"].public.read_bytes())
    auth = AuthSettings(public_keys=(str(pem),))
    store = KeyStore(auth)
    verifier = Verifier(auth, store)
    pem.write_bytes(b"half-written garbage that is longer")
    assert store.changed()
    with pytest.raises(KeyLoadError, match=r"k\.pem"):
        store.reload()
    assert not store.changed()  # no retry loop until the file changes again
    assert verifier.verify(token(keys["a"], kid="k"), now=NOW)
    pem.unlink()
    assert store.changed()
    with pytest.raises(KeyLoadError, match="cannot read"):
        store.reload()
    assert store.kids() == ("k",)


# ---------------------------------------------------------------- development keys


def test_dev_mode_creates_and_reuses_a_key_pair(tmp_path: Path) -> None:
    directory = tmp_path / "dev"
    auth = AuthSettings(dev_key_dir=str(directory))
    store = KeyStore(auth)
    assert store.dev_mode and store.dev_key_created
    assert store.kids() == ("dev",)
    private = directory / "dev.key"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert b"BEGIN PUBLIC KEY" in (directory / "dev.pem").read_bytes()

    minted = mint_token(private, org="acme", sub="bob", roles=["admin"], now=NOW)
    assert jwt.get_unverified_header(minted)["kid"] == "dev"
    identity = Verifier(auth, store).verify(minted, now=NOW)
    assert (identity.sub, identity.roles) == ("bob", ("admin",))

    again = KeyStore(auth)
    assert again.dev_mode and not again.dev_key_created
    assert Verifier(auth, again).verify(minted, now=NOW).sub == "bob"


def test_dev_public_key_is_rederived_when_missing_or_stale(tmp_path: Path) -> None:
    private, public, created = ensure_dev_keys(tmp_path)
    assert created
    original = public.read_bytes()
    public.unlink()
    assert ensure_dev_keys(tmp_path) == (private, public, False)
    assert public.read_bytes() == original
    public.write_bytes(b"stale")
    ensure_dev_keys(tmp_path)
    assert public.read_bytes() == original


def test_mint_token_claims(keys: dict[str, Pair]) -> None:
    minted = mint_token(
        keys["a"].private,
        org="acme",
        sub="svc",
        ttl=60,
        state=["cfg.*"],
        issuer="i",
        audience="a",
        extra_claims={"jti": "1"},
        now=NOW,
    )
    payload = jwt.decode(minted, options={"verify_signature": False})
    assert payload == {
        "org": "acme",
        "sub": "svc",
        "iat": int(NOW),
        "exp": int(NOW) + 60,
        "perms": {"sub": [], "pub": [], "state": ["cfg.*"]},
        "iss": "i",
        "aud": "a",
        "jti": "1",
    }
    assert "kid" not in jwt.get_unverified_header(token(keys["a"], kid=""))


# ---------------------------------------------------------------- fuzzing


@pytest.fixture(scope="module")
def fuzz_verifier(keys: dict[str, Pair]) -> Verifier:
    return make_verifier(
        keys["a"].public,
        keys["ec1"].public,
        keys["ed1"].public,
        algorithms=("RS256", "ES256", "EdDSA"),
        hmac_secret=SECRET,
    )


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=300))
def test_any_text_is_refused_with_auth_error(fuzz_verifier: Verifier, text: str) -> None:
    with pytest.raises(AuthError):
        fuzz_verifier.verify(text, now=NOW)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=8,
)


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    alg=st.sampled_from(["RS256", "ES256", "EdDSA", "HS256", "none", "PS256"]),
    kid=st.sampled_from([None, "a", "ec1", "ed1", "zz", 5]),
    payload=st.dictionaries(
        st.sampled_from(["org", "sub", "exp", "nbf", "iat", "roles", "perms", "aud"]), JSON
    ),
    signature=st.binary(max_size=300),
)
def test_forged_tokens_are_refused_with_auth_error(
    fuzz_verifier: Verifier, alg: str, kid: Any, payload: dict[str, Any], signature: bytes
) -> None:
    header = {"alg": alg} | ({} if kid is None else {"kid": kid})
    forged = f"{b64(orjson.dumps(header))}.{b64(orjson.dumps(payload))}.{b64(signature)}"
    with pytest.raises(AuthError):
        fuzz_verifier.verify(forged, now=NOW)
