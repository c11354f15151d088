"""Verifying the clients' tokens (JWT), and finding them in an upgrade request.

:class:`TokenVerifier` checks a token's signature with the keys configured (``--jwt-secret-file``: an HMAC
shared secret; ``--jwt-key-file``: a PEM public key or a JWKS file), its ``exp`` (required), ``nbf``,
``aud`` and ``iss``, and gives a :class:`Token`: subject, expiry and :class:`~gateway.scopes.Scopes`.
The algorithm is pinned to the key: HS256/384/512 only with the secret, RS*/PS* only with an RSA key,
ES* only with an EC key of the matching curve, EdDSA only with an Ed25519/Ed448 key, and never ``none``; so
a token signed with HMAC over the text of the public key (the HS/RS confusion) is refused.

Keys are read once, when the gateway starts (:func:`load_policy`); verifying is CPU only, so the
session (which does no I/O) calls it directly. :class:`TokenPolicy` is what a session is given: the
verifier, the scopes of sessions without a token, the resource server id.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from gateway.scopes import Scopes, scopes_from_claim

__all__ = [
    "HMAC_ALGORITHMS",
    "Token",
    "TokenPolicy",
    "TokenRejected",
    "TokenVerifier",
    "algorithms_for",
    "load_policy",
    "token_from_request",
]

HMAC_ALGORITHMS = ("HS256", "HS384", "HS512")
_RSA_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
_EC_ALGORITHMS = {"secp256r1": ("ES256",), "secp384r1": ("ES384",), "secp521r1": ("ES512",), "secp256k1": ("ES256K",)}


class TokenRejected(Exception):
    """A token that does not verify; the message says why, in words a client may be shown."""


@dataclass(frozen=True, slots=True)
class Token:
    """A verified token: ``subject`` (the ``sub`` claim, if any), ``expires_at`` (``exp``, seconds since the
    epoch) and the ``scopes`` it grants."""

    subject: str | None
    expires_at: float
    scopes: Scopes


def algorithms_for(key: Any) -> tuple[str, ...]:
    """The JWS algorithms a public key may verify (none for a key of another type)."""
    if isinstance(key, rsa.RSAPublicKey):
        return _RSA_ALGORITHMS
    if isinstance(key, ec.EllipticCurvePublicKey):
        return _EC_ALGORITHMS.get(key.curve.name, ())
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return ("EdDSA",)
    return ()


@dataclass(frozen=True, slots=True)
class _PublicKey:
    kid: str | None
    key: Any
    algorithms: tuple[str, ...]


def _jwk(data: Mapping[str, Any]) -> _PublicKey:
    if data.get("kty") == "oct":
        raise ValueError("a JWKS entry is a shared secret (kty 'oct'): give shared secrets with --jwt-secret-file")
    try:
        key = jwt.PyJWK(dict(data)).key
    except jwt.PyJWTError as exc:
        raise ValueError(f"a JWKS entry is not a usable public key ({exc})") from None
    if hasattr(key, "public_key"):
        key = key.public_key()  # a private JWK: keep only its public half
    allowed = algorithms_for(key)
    alg = data.get("alg")
    if alg is not None:
        if alg not in allowed:
            raise ValueError(f"a JWKS entry names algorithm {alg!r}, which its key cannot verify")
        allowed = (alg,)
    kid = data.get("kid")
    return _PublicKey(str(kid) if kid is not None else None, key, allowed)


def _read_keys(path: str) -> list[_PublicKey]:
    with open(path, "rb") as file:
        data = file.read()
    text = data.strip()
    if text.startswith(b"{"):
        try:
            document = json.loads(text)
        except ValueError as exc:
            raise ValueError(f"not valid JSON ({exc})") from None
        entries = document.get("keys", [document]) if isinstance(document, dict) else None
        if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
            raise ValueError("a JWKS file must hold {\"keys\": [...]} with at least one key")
        keys = [_jwk(entry) for entry in entries]
        kids = [k.kid for k in keys]
        if len(keys) > 1 and (None in kids or len(set(kids)) != len(kids)):
            raise ValueError("every key of a JWKS file with several keys needs its own 'kid'")
        return keys
    try:
        key = load_pem_public_key(data)
    except ValueError:
        raise ValueError("neither a PEM public key nor a JWKS JSON file") from None
    allowed = algorithms_for(key)
    if not allowed:
        raise ValueError(f"a {type(key).__name__} cannot verify JWTs")
    return [_PublicKey(None, key, allowed)]


def _read_secret(path: str) -> bytes:
    with open(path, "rb") as file:
        secret = file.read().rstrip(b"\r\n")
    if not secret:
        raise ValueError("the secret file is empty")
    return secret


class TokenVerifier:
    """Verifies tokens with a shared ``secret`` (HS*) and/or public ``keys``; ``audience`` must be in the
    token's ``aud``; ``issuer`` (if set) must be its ``iss``; ``leeway`` seconds of clock skew are allowed."""

    def __init__(
        self,
        *,
        secret: bytes | None = None,
        keys: Sequence[_PublicKey] = (),
        audience: str,
        issuer: str | None = None,
        leeway: float = 0.0,
        resource_server_id: str = "rabbitmq",
    ) -> None:
        if secret is None and not keys:
            raise ValueError("a verifier needs a secret or a public key")
        self.secret = secret
        self.keys = list(keys)
        self.audience = audience
        self.issuer = issuer
        self.leeway = leeway
        self.resource_server_id = resource_server_id

    def _key_for(self, header: Mapping[str, Any]) -> Any:
        alg = header.get("alg")
        if not isinstance(alg, str) or alg.lower() == "none":
            raise TokenRejected("unsigned tokens (alg 'none') are not accepted")
        if alg in HMAC_ALGORITHMS:
            if self.secret is None:
                raise TokenRejected(f"algorithm {alg} is not accepted (no shared secret is configured)")
            return self.secret
        kid = header.get("kid")
        if kid is not None:
            candidates = [key for key in self.keys if key.kid == kid]
            if not candidates:
                raise TokenRejected(f"no key with kid '{kid}'")
        elif len(self.keys) == 1:
            candidates = self.keys
        else:
            raise TokenRejected("the token names no key ('kid') and several keys are configured")
        key = candidates[0]
        if alg not in key.algorithms:
            raise TokenRejected(f"algorithm {alg} is not accepted for this key")
        return key.key

    def verify(self, token: str) -> Token:
        """The verified token, or :class:`TokenRejected` saying why not."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenRejected("not a JWT") from None
        key = self._key_for(header)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[header["alg"]],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway,
                options={"require": ["exp"]},
            )
        except jwt.ExpiredSignatureError:
            raise TokenRejected("the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise TokenRejected("the token is not valid yet (nbf)") from None
        except jwt.InvalidAudienceError:
            raise TokenRejected(f"the token is not for this audience (aud must include '{self.audience}')") from None
        except jwt.InvalidIssuerError:
            raise TokenRejected("the token is from another issuer (iss)") from None
        except jwt.InvalidSignatureError:
            raise TokenRejected("the signature does not verify") from None
        except jwt.MissingRequiredClaimError as exc:
            raise TokenRejected(f"the token has no '{exc.claim}' claim") from None
        except jwt.PyJWTError as exc:
            raise TokenRejected(f"the token is not valid ({exc})") from None
        subject = claims.get("sub")
        expires = claims.get("exp")
        if subject is not None and not isinstance(subject, str):
            raise TokenRejected("the 'sub' claim is not a string")
        if not isinstance(expires, int | float) or not math.isfinite(expires):
            raise TokenRejected("the 'exp' claim is not a number")
        return Token(subject, float(expires), Scopes(scopes_from_claim(claims.get("scope")), self.resource_server_id))


@dataclass(frozen=True, slots=True)
class TokenPolicy:
    """What a session needs to know of tokens. ``verifier`` None: tokens are refused; ``anonymous`` None: a
    session without a token is refused, else it gets these scopes. Sessions of a policy log in to the
    broker with the gateway's own credentials."""

    verifier: TokenVerifier | None
    anonymous: Scopes | None
    resource_server_id: str = "rabbitmq"
    leeway: float = 0.0
    anonymous_scopes: tuple[str, ...] = field(default=())

    @classmethod
    def create(
        cls, verifier: TokenVerifier | None, anonymous_scopes: Iterable[str], resource_server_id: str
    ) -> TokenPolicy:
        scopes = tuple(anonymous_scopes)
        return cls(
            verifier,
            Scopes(scopes, resource_server_id) if scopes else None,
            resource_server_id,
            verifier.leeway if verifier is not None else 0.0,
            scopes,
        )


def _cookie(headers: Iterable[str], name: str) -> str | None:
    for header in headers:
        for part in header.split(";"):
            key, equals, value = part.strip().partition("=")
            if equals and key.strip() == name:
                value = value.strip()
                if len(value) >= 2 and value[0] == value[-1] == '"':
                    value = value[1:-1]
                return value or None
    return None


def token_from_request(
    query: str, authorization: Iterable[str], cookies: Iterable[str], cookie_name: str | None
) -> str | None:
    """The token an upgrade request carries, first found: the ``access_token`` query parameter, an
    ``Authorization: Bearer`` header, the cookie ``cookie_name``. (A CONNECT ``passcode`` comes before all
    three; the session looks there first.)"""
    values = parse_qs(query, keep_blank_values=False).get("access_token")
    if values and values[0].strip():
        return values[0].strip()
    for header in authorization:
        scheme, _, credentials = header.strip().partition(" ")
        if scheme.lower() == "bearer" and credentials.strip():
            return credentials.strip()
    if cookie_name:
        return _cookie(cookies, cookie_name)
    return None


def _scope_is_well_formed(scope: str, resource_server_id: str) -> bool:
    return bool(Scopes([scope], resource_server_id))


def load_policy(config: Any) -> TokenPolicy | None:
    """The token policy of a :class:`gateway.settings.Config`, or None when no token setting is given (the
    broker's own logins, as without tokens). Reads the key files; a bad file or scope raises ``ValueError``
    whose message starts with the flag."""
    tokens_on = config.jwt_secret_file or config.jwt_key_file or config.anonymous_scopes
    if not tokens_on:
        return None
    server_id = config.jwt_resource_server_id
    for scope in config.anonymous_scopes:
        if not _scope_is_well_formed(scope, server_id):
            raise ValueError(
                f"--anonymous-scope: {scope!r} is not valid: expected {server_id}.<read|write|configure>:"
                "<vhost pattern>/<name pattern>[/<routing key pattern>]"
            )
    verifier = None
    if config.jwt_secret_file or config.jwt_key_file:
        flag, path = "--jwt-secret-file", config.jwt_secret_file
        try:
            secret = _read_secret(path) if path else None
            flag, path = "--jwt-key-file", config.jwt_key_file
            keys = _read_keys(path) if path else []
        except (ValueError, OSError) as exc:
            raise ValueError(f"{flag} {path!r}: {exc}") from None
        verifier = TokenVerifier(
            secret=secret,
            keys=keys,
            audience=config.jwt_audience or server_id,
            issuer=config.jwt_issuer,
            leeway=config.jwt_leeway,
            resource_server_id=server_id,
        )
    return TokenPolicy.create(verifier, config.anonymous_scopes, server_id)
