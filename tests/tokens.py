"""Real signing keys made for the tests, and tokens signed with them (HS256, RS256, ES256, a JWKS of two)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

__all__ = ["Keys", "make_keys"]

SECRET = b"a shared secret of the tests, long enough for HS256!"


def _pem(key: Any) -> bytes:
    return key.public_key().public_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@dataclass
class Keys:
    """Key files in ``folder`` and the private halves to sign with."""

    folder: Path
    rsa: rsa.RSAPrivateKey
    ec: ec.EllipticCurvePrivateKey
    rsa_other: rsa.RSAPrivateKey  # the JWKS's second key

    @property
    def secret_file(self) -> str:
        return str(self.folder / "secret")

    @property
    def rsa_pem_file(self) -> str:
        return str(self.folder / "rsa.pem")

    @property
    def ec_pem_file(self) -> str:
        return str(self.folder / "ec.pem")

    @property
    def jwks_file(self) -> str:
        return str(self.folder / "jwks.json")

    @property
    def rsa_public_pem(self) -> bytes:
        return _pem(self.rsa)

    def sign(
        self,
        alg: str = "HS256",
        *,
        sub: str | None = "alice",
        scope: object = "rabbitmq.read:*/*/* rabbitmq.write:*/*/* rabbitmq.configure:*/*/*",
        ttl: float = 300,
        aud: object = "rabbitmq",
        kid: str | None = None,
        key: Any = None,
        **claims: Any,
    ) -> str:
        """A token signed with the key that matches ``alg`` (or ``key``); ``ttl`` seconds from now."""
        payload: dict[str, Any] = {"exp": int(time.time() + ttl) if ttl == int(ttl) else time.time() + ttl}
        if sub is not None:
            payload["sub"] = sub
        if scope is not None:
            payload["scope"] = scope
        if aud is not None:
            payload["aud"] = aud
        payload.update(claims)
        if key is None:
            key = {"HS256": SECRET, "RS256": self.rsa, "ES256": self.ec}[alg]
        headers = {"kid": kid} if kid is not None else None
        return jwt.encode(payload, key, algorithm=alg, headers=headers)


def make_keys(folder: Path) -> Keys:
    folder.mkdir(parents=True, exist_ok=True)
    keys = Keys(
        folder,
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ec.generate_private_key(ec.SECP256R1()),
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
    )
    (folder / "secret").write_bytes(SECRET + b"\n")
    (folder / "rsa.pem").write_bytes(_pem(keys.rsa))
    (folder / "ec.pem").write_bytes(_pem(keys.ec))
    entries = []
    for kid, private in (("one", keys.rsa), ("two", keys.ec)):
        entry = json.loads(jwt.algorithms.get_default_algorithms()["RS256" if kid == "one" else "ES256"].to_jwk(private.public_key()))
        entry["kid"] = kid
        entries.append(entry)
    (folder / "jwks.json").write_text(json.dumps({"keys": entries}))
    return keys
