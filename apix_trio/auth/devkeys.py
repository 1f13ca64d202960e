"""Key pairs and tokens for development and tests.

`ensure_dev_keys` gives a server started without `auth.public_keys` a key
pair to verify against, and `mint_token` signs tokens with it (the
`apix-trio token` command and the tests use it). Production deployments
configure their own public keys and never call these.

Files are written atomically (temporary file, then rename or link), so a
reader never sees half a key; private keys are created with mode 0600.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

KeyKind = Literal["rsa", "ec", "ed25519"]
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey

DEV_KID = "dev"
DEV_PRIVATE_NAME = "dev.key"
DEV_PUBLIC_NAME = "dev.pem"


def algorithm_for(key: object) -> str:
    """The JWT algorithm a public or private key signs with.

    RSA -> RS256, EC on P-256 -> ES256, Ed25519/Ed448 -> EdDSA. Raises
    ValueError for any other key (other curves, DSA, ...), which apix-trio
    does not accept.
    """
    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        if isinstance(key.curve, ec.SECP256R1):
            return "ES256"
        raise ValueError(f"EC curve {key.curve.name} is not supported (only P-256, for ES256)")
    if isinstance(
        key,
        ed25519.Ed25519PublicKey
        | ed25519.Ed25519PrivateKey
        | ed448.Ed448PublicKey
        | ed448.Ed448PrivateKey,
    ):
        return "EdDSA"
    raise ValueError(f"unsupported key type {type(key).__name__}")


def _new_private_key(kind: KeyKind) -> PrivateKey:
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unknown key kind {kind!r} (expected rsa, ec or ed25519)")


def _private_pem(key: Any) -> bytes:
    pem: bytes = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return pem


def _public_pem(private_key: Any) -> bytes:
    pem: bytes = private_key.public_key().public_bytes(
        serialization.Encoding.PEM,
        serialization.PublicFormat.SubjectPublicKeyInfo,
    )
    return pem


def _write_temp(directory: Path, data: bytes, mode: int) -> Path:
    """Write `data` to a new file in `directory` with `mode`; return its path."""
    fd, name = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    return Path(name)


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    tmp = _write_temp(path.parent, data, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def generate_keypair(kind: KeyKind, private_path: str | Path, public_path: str | Path) -> None:
    """Create a new key pair and write it as PEM files, replacing existing ones.

    The private key (PKCS#8, unencrypted) gets mode 0600, the public key
    (SubjectPublicKeyInfo) 0644. `kind` "rsa" is RSA 2048 (RS256), "ec" is
    P-256 (ES256), "ed25519" is Ed25519 (EdDSA). Raises ValueError for an
    unknown kind and OSError when a file cannot be written.
    """
    key = _new_private_key(kind)
    _write_atomic(Path(private_path), _private_pem(key), 0o600)
    _write_atomic(Path(public_path), _public_pem(key), 0o644)


_loaded: dict[tuple[str, int, int, int], Any] = {}


def load_private_key(path: str | Path) -> Any:
    """Load an unencrypted PEM private key. Raises OSError or ValueError.

    Parsed keys are cached by file identity (path, mtime, size, inode):
    loading an RSA key validates it, which costs tens of milliseconds.
    """
    st = os.stat(path)
    identity = (os.path.abspath(path), st.st_mtime_ns, st.st_size, st.st_ino)
    key = _loaded.get(identity)
    if key is None:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
        if len(_loaded) >= 32:
            _loaded.clear()
        _loaded[identity] = key
    return key


def ensure_dev_keys(dev_key_dir: str | Path) -> tuple[Path, Path, bool]:
    """Make sure `<dir>/dev.key` (RSA 2048 private) and `<dir>/dev.pem` exist.

    Returns `(private_path, public_path, created)`, `created` being True
    when this call generated the private key. The public key file is always
    derived from the private key, and rewritten when missing or not
    matching it, so the pair is consistent even if one file was deleted.
    Safe against concurrent callers (two servers starting at once): the
    private key is published with a hard link, which fails if another
    process won, and then that process's key is used. The key id of the
    pair is "dev" (`DEV_KID`).

    Raises OSError when the directory or files cannot be created or read,
    ValueError when `dev.key` is not a usable private key.
    """
    directory = Path(dev_key_dir)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    private_path = directory / DEV_PRIVATE_NAME
    public_path = directory / DEV_PUBLIC_NAME
    created = False
    if not private_path.exists():
        tmp = _write_temp(directory, _private_pem(_new_private_key("rsa")), 0o600)
        try:
            os.link(tmp, private_path)
            created = True
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    public_pem = _public_pem(load_private_key(private_path))
    try:
        current = public_path.read_bytes()
    except FileNotFoundError:
        current = b""
    if current != public_pem:
        _write_atomic(public_path, public_pem, 0o644)
    return private_path, public_path, created


def mint_token(
    private_key_path: str | Path,
    *,
    org: str,
    sub: str,
    ttl: float = 3600,
    pub: Iterable[str] = (),
    sub_patterns: Iterable[str] = (),
    state: Iterable[str] = (),
    roles: Iterable[str] = (),
    kid: str | None = None,
    issuer: str = "",
    audience: str = "",
    algorithm: str | None = None,
    extra_claims: Mapping[str, Any] | None = None,
    now: float | None = None,
) -> str:
    """Sign a token with the PEM private key at `private_key_path`.

    Claims: `org`, `sub`, `iat` = now (default: wall clock), `exp` =
    `iat + ttl`, both whole seconds; `perms` with the `sub`, `pub` and
    `state` pattern lists when any is non-empty; `roles` when non-empty;
    `iss`/`aud` when non-empty; then `extra_claims`, which override
    anything above. The header `kid` defaults to the key file's name
    without its extension (`dev.key` -> "dev"); pass `kid=""` to omit it.
    `algorithm` defaults to the key's own (RS256, ES256 or EdDSA).

    Raises OSError if the key file cannot be read, ValueError if it is not
    an unencrypted private key of a supported type.
    """
    key = load_private_key(private_key_path)
    alg = algorithm if algorithm is not None else algorithm_for(key)
    issued = int(time.time() if now is None else now)
    claims: dict[str, Any] = {"org": org, "sub": sub, "iat": issued, "exp": int(issued + ttl)}
    perms = {"sub": list(sub_patterns), "pub": list(pub), "state": list(state)}
    if any(perms.values()):
        claims["perms"] = perms
    role_list = list(roles)
    if role_list:
        claims["roles"] = role_list
    if issuer:
        claims["iss"] = issuer
    if audience:
        claims["aud"] = audience
    if extra_claims:
        claims.update(extra_claims)
    key_id = Path(private_key_path).stem if kid is None else kid
    headers = {"kid": key_id} if key_id else None
    return jwt.encode(claims, key, algorithm=alg, headers=headers)
