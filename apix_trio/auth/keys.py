"""Token verification: the configured key set and the JWT rules of PROTOCOL.md.

Theory of operation
-------------------
`KeyStore` turns `auth.public_keys` (PEM public keys, X.509 certificates or
JWKS files) into parsed `cryptography` key objects once, indexed by `kid`
and by algorithm. With no keys configured it uses the development pair
from `devkeys.ensure_dev_keys` and says so (`dev_mode`). `reload()` builds
a complete new key set and swaps it in with one assignment, so a verify
running during a reload sees either the old or the new set, never a mix;
`changed()` is a cheap `stat` poll for the server's file watcher.

`Verifier.verify` is pure apart from the key set: the time is passed in
(default: the wall clock). The compact JWS is parsed here; an RS256
signature is checked by one direct `cryptography` call on the key parsed
at load time (padding and hash objects made once), the other algorithms by
pyjwt's algorithm objects. Every claim rule, `exp`/`nbf`/`iat` included, is
checked here too, so tests can inject time and the rules live in one place.
The payload is only decoded once its signature is good. Nothing is cached
per token: every connection's token is verified in full.

Alg confusion: the token header chooses the algorithm only among those
configured; asymmetric algorithms are only ever verified with keys of
their own family, and HS256 only ever with `auth.hmac_secret`. A public
key is never handed to HMAC.

Errors never contain the token.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import os
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs
import jwt
import orjson
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from jwt.algorithms import HMACAlgorithm, get_default_algorithms

from apix_trio.auth.devkeys import algorithm_for, ensure_dev_keys
from apix_trio.auth.identity import MAX_INFO_BYTES, PERM_KINDS, Identity, no_perms
from apix_trio.auth.permissions import BadPattern, parse_pattern
from apix_trio.protocol.codes import CloseCode
from apix_trio.settings import AuthSettings

SUPPORTED_ALGORITHMS = ("RS256", "ES256", "EdDSA")
HMAC_ALGORITHM = "HS256"
MAX_TOKEN_LENGTH = 32768
MAX_SUB_LENGTH = 128

_ORG_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
_SEGMENT_RE = re.compile(r"[A-Za-z0-9_-]*")
# pyjwt's algorithm objects do the cryptography. Its PyJWS layer is not
# used: it checks base64 character by character in Python (~4x the cost of
# an RS256 verify), and the compact serialization is simple to parse here.
_ALGORITHMS = {
    name: algorithm
    for name, algorithm in get_default_algorithms().items()
    if name in (*SUPPORTED_ALGORITHMS, HMAC_ALGORITHM)
}
_PKCS1V15 = padding.PKCS1v15()
_SHA256 = hashes.SHA256()


def _rs256_verify(signing_input: bytes, key: Any, signature: bytes) -> bool:
    """RS256 by one `cryptography` call (what pyjwt's RSAAlgorithm does, minus
    its per-call padding and hash objects)."""
    if not isinstance(key, rsa.RSAPublicKey):
        return False
    try:
        key.verify(signature, signing_input, _PKCS1V15, _SHA256)
    except InvalidSignature:
        return False
    return True


# ---------------------------------------------------------------- results


class Reason(enum.StrEnum):
    """`AuthError.reason` values (missing claims are "missing_claim:<name>")."""

    MALFORMED = "malformed"
    ALG_NOT_ALLOWED = "alg_not_allowed"
    UNKNOWN_KID = "unknown_kid"
    ALG_MISMATCH = "alg_mismatch"  # the kid names a key of another algorithm
    NO_KEY = "no_key"  # no kid, and no key of the token's algorithm
    BAD_SIGNATURE = "bad_signature"
    EXPIRED = "expired"
    NOT_YET_VALID = "not_yet_valid"
    BAD_TIME = "bad_time"  # exp, nbf or iat is not a number
    BAD_ISSUER = "bad_issuer"
    BAD_AUDIENCE = "bad_audience"
    BAD_SUB = "bad_sub"
    BAD_ORG = "bad_org"
    BAD_ROLES = "bad_roles"
    BAD_PERMS = "bad_perms"
    BAD_INFO = "bad_info"
    MISSING_CLAIM = "missing_claim"


class AuthError(Exception):
    """A token was refused.

    `reason` is short and machine-readable (a `Reason`, or
    "missing_claim:<name>"), for logs and metrics; `message` is a human
    sentence safe to send to the client. Neither contains the token.
    `close_code` is the hint for a first-frame `auth` failure.

    `org` and `sub` are set only when the token's signature verified and a
    later check refused it (expired, wrong `aud`, ...): then they are the
    token's own claims, trustworthy enough to file the failure in that org's
    audit trail. A token whose signature did not verify names nobody.
    """

    close_code = CloseCode.UNAUTHENTICATED

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.org: str | None = None
        self.sub: str | None = None

    def attribute(self, claims: Mapping[str, Any]) -> None:
        """Name the org and sub of signature-verified `claims` (when well-formed)."""
        org, sub = claims.get("org"), claims.get("sub")
        if isinstance(org, str) and _ORG_RE.fullmatch(org) is not None:
            self.org = org
            if isinstance(sub, str) and 1 <= len(sub) <= MAX_SUB_LENGTH:
                self.sub = sub

    def __repr__(self) -> str:
        return f"AuthError({self.reason!r}, {self.message!r})"


class KeyLoadError(Exception):
    """A key file cannot be used; `str()` names the file and the problem."""

    def __init__(self, path: str | os.PathLike[str], problem: str) -> None:
        super().__init__(f"{os.fspath(path)}: {problem}")
        self.path = os.fspath(path)
        self.problem = problem


# ---------------------------------------------------------------- key set


@attrs.frozen
class VerificationKey:
    kid: str
    algorithm: str  # one of SUPPORTED_ALGORITHMS
    key: Any = attrs.field(repr=False)  # a cryptography public key object
    source: str  # the file it came from
    fingerprint: bytes = attrs.field(repr=False)  # SHA-256 of the DER public key


def _verification_key(kid: str, key: Any, source: Path) -> VerificationKey:
    try:
        algorithm = algorithm_for(key)
    except ValueError as exc:
        raise KeyLoadError(source, f"key {kid!r}: {exc}") from None
    der = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return VerificationKey(kid, algorithm, key, os.fspath(source), hashlib.sha256(der).digest())


def _load_pem(path: Path, data: bytes) -> VerificationKey:
    if b"PRIVATE KEY-----" in data:
        raise KeyLoadError(path, "holds a private key; configure the public key instead")
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            key: Any = x509.load_pem_x509_certificate(data).public_key()
        else:
            key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise KeyLoadError(
            path, "not a PEM public key, X.509 certificate or JWKS JSON file"
        ) from None
    return _verification_key(path.stem, key, path)


def _jwk_algorithm(jwk: Mapping[str, Any]) -> str | None:
    kty, crv = jwk.get("kty"), jwk.get("crv")
    if kty == "RSA":
        return "RS256"
    if kty == "EC" and crv == "P-256":
        return "ES256"
    if kty == "OKP" and crv in ("Ed25519", "Ed448"):
        return "EdDSA"
    return None


def _load_jwk(path: Path, index: int, jwk: Any) -> VerificationKey | None:
    if not isinstance(jwk, dict):
        raise KeyLoadError(path, f"key #{index} is not a JSON object")
    if jwk.get("use") == "enc":
        return None  # an encryption key: not for verifying signatures
    kid = jwk.get("kid")
    if not isinstance(kid, str) or not kid:
        raise KeyLoadError(path, f"key #{index} has no kid")
    if any(member in jwk for member in ("d", "p", "q", "dp", "dq", "qi", "k")):
        raise KeyLoadError(path, f"key {kid!r} holds private or symmetric key material")
    algorithm = _jwk_algorithm(jwk)
    if algorithm is None:
        raise KeyLoadError(
            path,
            f"key {kid!r}: unsupported key type (RSA, EC P-256, OKP Ed25519/Ed448 only)",
        )
    if "alg" in jwk and jwk["alg"] != algorithm:
        raise KeyLoadError(path, f"key {kid!r}: alg {jwk['alg']!r} is not supported")
    try:
        key = jwt.PyJWK(jwk, algorithm=algorithm).key
    except (jwt.PyJWTError, ValueError, TypeError, KeyError):
        raise KeyLoadError(path, f"key {kid!r} is not a valid {jwk['kty']} key") from None
    return _verification_key(kid, key, path)


def _load_jwks(path: Path, data: bytes) -> list[VerificationKey]:
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError:
        raise KeyLoadError(path, "not valid JSON") from None
    if isinstance(document, dict) and isinstance(document.get("keys"), list):
        entries = document["keys"]
    elif isinstance(document, dict) and "kty" in document:
        entries = [document]
    else:
        raise KeyLoadError(path, 'neither a JWKS ({"keys": [...]}) nor a JWK')
    keys = [key for i, jwk in enumerate(entries) if (key := _load_jwk(path, i, jwk))]
    if not keys:
        raise KeyLoadError(path, "holds no signing keys")
    return keys


def load_key_file(path: str | os.PathLike[str]) -> list[VerificationKey]:
    """Parse one key file: PEM public key or certificate (kid = file name
    without extension) or JWKS/JWK JSON (kid = each key's `kid`).

    Raises KeyLoadError naming the file and the problem.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise KeyLoadError(path, f"cannot read: {exc.strerror or exc}") from None
    if data.lstrip().startswith(b"{"):
        return _load_jwks(path, data)
    return [_load_pem(path, data)]


@attrs.frozen
class KeySet:
    """An immutable snapshot of the verification keys."""

    by_kid: Mapping[str, VerificationKey]
    by_algorithm: Mapping[str, tuple[VerificationKey, ...]]

    @classmethod
    def build(cls, keys: Iterable[VerificationKey]) -> KeySet:
        by_kid: dict[str, VerificationKey] = {}
        by_algorithm: dict[str, list[VerificationKey]] = {}
        for key in keys:
            other = by_kid.get(key.kid)
            if other is not None:
                raise KeyLoadError(key.source, f"key id {key.kid!r} is also in {other.source}")
            by_kid[key.kid] = key
            by_algorithm.setdefault(key.algorithm, []).append(key)
        return cls(by_kid, {alg: tuple(found) for alg, found in by_algorithm.items()})

    def get(self, kid: str) -> VerificationKey | None:
        return self.by_kid.get(kid)

    def for_algorithm(self, algorithm: str) -> tuple[VerificationKey, ...]:
        return self.by_algorithm.get(algorithm, ())

    def identity(self) -> frozenset[tuple[str, str, bytes]]:
        return frozenset((k.kid, k.algorithm, k.fingerprint) for k in self.by_kid.values())


_Stamp = tuple[int, int, int, int] | None


def _stamp(path: Path) -> _Stamp:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev


class KeyStore:
    """The verification keys of `auth.public_keys`, parsed once and cached.

    With `auth.public_keys` empty, the development pair in
    `auth.dev_key_dir` is created if needed and its public half used:
    `dev_mode` is then True (the server must log it) and `dev_key_created`
    tells whether this call generated it.

    Error handling: construction raises KeyLoadError when any file is
    unreadable or holds no usable key, or two keys share a kid (config
    validation turns it into exit status 2).

    File I/O is synchronous; from trio, call `reload` in a worker thread.
    """

    def __init__(self, settings: AuthSettings) -> None:
        self.dev_mode = not settings.public_keys
        self.dev_key_created = False
        if self.dev_mode:
            try:
                _, public_path, created = ensure_dev_keys(settings.dev_key_dir)
            except (OSError, ValueError) as exc:
                raise KeyLoadError(
                    settings.dev_key_dir, f"cannot set up the development key pair: {exc}"
                ) from None
            self.dev_key_created = created
            self.paths: tuple[Path, ...] = (public_path,)
        else:
            self.paths = tuple(Path(p) for p in settings.public_keys)
        self._seen = self._stamps()
        self._current = self._load()

    def _stamps(self) -> tuple[_Stamp, ...]:
        return tuple(_stamp(path) for path in self.paths)

    def _load(self) -> KeySet:
        return KeySet.build(key for path in self.paths for key in load_key_file(path))

    @property
    def current(self) -> KeySet:
        """The key set in force; hold on to it for one consistent lookup."""
        return self._current

    def get(self, kid: str) -> VerificationKey | None:
        return self._current.get(kid)

    def kids(self) -> tuple[str, ...]:
        return tuple(sorted(self._current.by_kid))

    def __len__(self) -> int:
        return len(self._current.by_kid)

    def changed(self) -> bool:
        """True when a key file's mtime, size or inode (or existence) differs
        from what the last load or reload attempt saw. Only `stat` calls."""
        return self._stamps() != self._seen

    def reload(self) -> bool:
        """Re-read every key file and swap in the new set atomically.

        Returns True when the keys differ from the previous set, False when
        they are the same. Error handling: on KeyLoadError the old set stays
        in force and the error propagates; `changed()` then stays False
        until the files change again, so a poller does not retry a broken
        file in a loop.
        """
        self._seen = self._stamps()
        new = self._load()
        differs = new.identity() != self._current.identity()
        self._current = new
        return differs


# ---------------------------------------------------------------- verifier


def _missing(name: str) -> AuthError:
    return AuthError(f"{Reason.MISSING_CLAIM}:{name}", f"the token has no {name!r} claim")


def _time_claim(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise AuthError(Reason.BAD_TIME, f"the {name!r} claim is not a number")
    return float(value)


def _string_list(value: Any) -> tuple[str, ...] | None:
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return tuple(value)
    return None


def _perms(value: Any) -> dict[str, tuple[str, ...]]:
    perms = no_perms()
    if value is None:
        return perms
    if not isinstance(value, dict):
        raise AuthError(Reason.BAD_PERMS, "the 'perms' claim is not an object")
    for kind in PERM_KINDS:
        if kind not in value:
            continue
        patterns = _string_list(value[kind])
        if patterns is None:
            raise AuthError(Reason.BAD_PERMS, f"perms.{kind} is not a list of strings")
        for pattern in patterns:
            try:
                parse_pattern(pattern, allow_sub=True)
            except BadPattern as exc:
                raise AuthError(Reason.BAD_PERMS, f"perms.{kind}: {exc}") from None
        perms[kind] = patterns
    return perms


def _info(value: Any) -> str | None:
    """The `info` claim as compact JSON text: an object of at most
    MAX_INFO_BYTES serialized; null counts as absent (like `roles`)."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise AuthError(Reason.BAD_INFO, "the 'info' claim is not a JSON object")
    try:
        text = orjson.dumps(value)
    except orjson.JSONEncodeError:
        raise AuthError(Reason.BAD_INFO, "the 'info' claim is nested too deeply") from None
    if len(text) > MAX_INFO_BYTES:
        raise AuthError(Reason.BAD_INFO, f"the 'info' claim is larger than {MAX_INFO_BYTES} bytes")
    return text.decode()


def _malformed() -> AuthError:
    return AuthError(Reason.MALFORMED, "the token is not a well-formed JWT")


def _b64decode(segment: str) -> bytes:
    if len(segment) % 4 == 1 or _SEGMENT_RE.fullmatch(segment) is None:
        raise _malformed()
    try:
        return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except binascii.Error:
        raise _malformed() from None


def _split(token: str) -> tuple[dict[str, Any], bytes, str, bytes]:
    """JWS compact serialization -> (header, signing input, payload segment,
    signature). Only the header is decoded: the payload waits until the
    signature is known to be good."""
    if not isinstance(token, str) or len(token) > MAX_TOKEN_LENGTH:
        raise _malformed()
    segments = token.split(".")
    if len(segments) != 3:
        raise _malformed()
    header_segment, payload_segment, signature_segment = segments
    try:
        header = orjson.loads(_b64decode(header_segment))
    except orjson.JSONDecodeError:
        raise _malformed() from None
    if not isinstance(header, dict):
        raise _malformed()
    # No JWS extension is supported; RFC 7515 says to refuse critical ones.
    if "crit" in header or header.get("b64", True) is not True:
        raise AuthError(Reason.MALFORMED, "the token uses an unsupported JWS extension")
    if not isinstance(header.get("kid", ""), str):
        raise AuthError(Reason.MALFORMED, "the token's kid is not a string")
    signing_input = f"{header_segment}.{payload_segment}".encode("ascii")
    return header, signing_input, payload_segment, _b64decode(signature_segment)


class Verifier:
    """Checks tokens against the configuration and the key set (PROTOCOL.md).

    Construction raises ValueError when `settings.algorithms` names an
    algorithm other than RS256, ES256 and EdDSA, or when `hmac_secret` looks
    like a public key (HMAC with a public key is the alg-confusion attack).
    """

    def __init__(self, settings: AuthSettings, keys: KeyStore) -> None:
        unknown = [alg for alg in settings.algorithms if alg not in SUPPORTED_ALGORITHMS]
        if unknown:
            raise ValueError(
                f"unsupported auth.algorithms {unknown}; choose from {list(SUPPORTED_ALGORITHMS)}"
            )
        self._algorithms = frozenset(settings.algorithms)
        self._keys = keys
        self._hmac_key: bytes | None = None
        if settings.hmac_secret:
            try:
                self._hmac_key = HMACAlgorithm(HMACAlgorithm.SHA256).prepare_key(
                    settings.hmac_secret
                )
            except jwt.InvalidKeyError:
                raise ValueError("auth.hmac_secret must not be a key file's contents") from None
        self._issuer = settings.issuer
        self._audience = settings.audience
        self._leeway = settings.leeway

    @property
    def keys(self) -> KeyStore:
        """The key store this verifier reads (rotated in place by reloads)."""
        return self._keys

    @property
    def hmac_enabled(self) -> bool:
        """True when HS256 tokens are accepted (development only: log it)."""
        return self._hmac_key is not None

    def verify(self, token: str, *, now: float | None = None) -> Identity:
        """Verify `token` at time `now` (Unix seconds, default the wall clock).

        Returns the Identity it grants. Error handling: raises AuthError for
        every refusal, never another exception for bad input.
        """
        payload = self._verified_payload(token)
        try:
            claims = orjson.loads(payload)
        except orjson.JSONDecodeError:
            raise AuthError(Reason.MALFORMED, "the token payload is not JSON") from None
        if not isinstance(claims, dict):
            raise AuthError(Reason.MALFORMED, "the token payload is not a JSON object")
        try:
            return self._identity(claims, payload, time.time() if now is None else now)
        except AuthError as exc:
            exc.attribute(claims)  # the signature is good: the org is the token's own
            raise

    def _candidates(self, header: Mapping[str, Any], alg: str) -> list[Any]:
        if alg == HMAC_ALGORITHM:
            if self._hmac_key is None:
                raise AuthError(Reason.ALG_NOT_ALLOWED, "HS256 tokens are not accepted")
            return [self._hmac_key]
        if alg not in self._algorithms:
            raise AuthError(Reason.ALG_NOT_ALLOWED, f"algorithm {alg[:16]!r} is not accepted")
        keyset = self._keys.current
        kid = header.get("kid")
        if kid is None:
            keys = keyset.for_algorithm(alg)
            if not keys:
                raise AuthError(Reason.NO_KEY, f"no {alg} key is configured")
            return [key.key for key in keys]
        found = keyset.get(kid)
        if found is None:
            raise AuthError(Reason.UNKNOWN_KID, f"unknown key id {kid[:64]!r}")
        if found.algorithm != alg:
            raise AuthError(Reason.ALG_MISMATCH, f"key {kid[:64]!r} is not an {alg} key")
        return [found.key]

    def _verified_payload(self, token: str) -> bytes:
        header, signing_input, payload_segment, signature = _split(token)
        alg = header.get("alg")
        if not isinstance(alg, str):
            raise AuthError(Reason.MALFORMED, "the token header has no algorithm")
        candidates = self._candidates(header, alg)  # refuses algorithms not allowed
        verify = _rs256_verify if alg == "RS256" else _ALGORITHMS[alg].verify
        for key in candidates:
            if verify(signing_input, key, signature):
                return _b64decode(payload_segment)
        raise AuthError(Reason.BAD_SIGNATURE, "the token signature is not valid")

    def _identity(self, claims: dict[str, Any], payload: bytes, now: float) -> Identity:
        leeway = self._leeway
        exp = _time_claim(claims, "exp")
        if exp is None:
            raise _missing("exp")
        if now >= exp + leeway:
            raise AuthError(Reason.EXPIRED, "the token has expired")
        nbf = _time_claim(claims, "nbf")
        if nbf is not None and nbf > now + leeway:
            raise AuthError(Reason.NOT_YET_VALID, "the token is not valid yet")
        iat = _time_claim(claims, "iat")
        if iat is not None and iat > now + leeway:
            raise AuthError(Reason.NOT_YET_VALID, "the token was issued in the future")
        self._check_issuer_audience(claims)

        sub = claims.get("sub")
        if sub is None:
            raise _missing("sub")
        if not isinstance(sub, str) or not 1 <= len(sub) <= MAX_SUB_LENGTH:
            raise AuthError(Reason.BAD_SUB, "'sub' must be a string of 1-128 characters")
        org = claims.get("org")
        if org is None:
            raise _missing("org")
        if not isinstance(org, str) or _ORG_RE.fullmatch(org) is None:
            raise AuthError(Reason.BAD_ORG, "'org' must match [a-z0-9][a-z0-9_-]{0,62}")
        raw_roles = claims.get("roles")  # null counts as absent, like perms
        roles = () if raw_roles is None else _string_list(raw_roles)
        if roles is None:
            raise AuthError(Reason.BAD_ROLES, "'roles' must be a list of strings")
        perms = _perms(claims.get("perms"))
        info = _info(claims.get("info"))
        return Identity(
            org=org, sub=sub, exp=int(exp), roles=roles, perms=perms, payload=payload, info=info
        )

    def _check_issuer_audience(self, claims: Mapping[str, Any]) -> None:
        if self._issuer:
            if "iss" not in claims:
                raise _missing("iss")
            if claims["iss"] != self._issuer:
                raise AuthError(Reason.BAD_ISSUER, "the token is from another issuer")
        if self._audience:
            if "aud" not in claims:
                raise _missing("aud")
            aud = claims["aud"]
            audiences = [aud] if isinstance(aud, str) else _string_list(aud) or []
            if self._audience not in audiences:
                raise AuthError(Reason.BAD_AUDIENCE, "the token is for another audience")
