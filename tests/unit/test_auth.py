"""Token verification with real keys made here: HS256, RS256, ES256, a JWKS of two keys; the attacks."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path

import jwt
import pytest

from gateway.auth import TokenRejected, TokenVerifier, load_policy, token_from_request
from gateway.config import ConfigError, parse_args
from gateway.settings import Config
from tests.tokens import Keys, make_keys


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return make_keys(tmp_path_factory.mktemp("keys"))


def verifier(keys: Keys, **overrides: object) -> TokenVerifier:
    config = Config(jwt_secret_file=keys.secret_file, jwt_key_file=keys.rsa_pem_file)
    for name, value in overrides.items():
        setattr(config, name, value)
    policy = load_policy(config)
    assert policy is not None and policy.verifier is not None
    return policy.verifier


def rejected(v: TokenVerifier, token: str) -> str:
    with pytest.raises(TokenRejected) as caught:
        v.verify(token)
    return str(caught.value)


class TestAlgorithms:
    def test_hs256_with_the_secret(self, keys: Keys) -> None:
        token = verifier(keys).verify(keys.sign("HS256", scope="rabbitmq.read:*/q other.x"))
        assert token.subject == "alice"
        assert token.scopes.scopes == ("rabbitmq.read:*/q", "other.x")

    def test_rs256_with_the_pem_key(self, keys: Keys) -> None:
        assert verifier(keys).verify(keys.sign("RS256")).subject == "alice"

    def test_es256_with_the_pem_key(self, keys: Keys) -> None:
        v = verifier(keys, jwt_secret_file=None, jwt_key_file=keys.ec_pem_file)
        assert v.verify(keys.sign("ES256", sub="bob")).subject == "bob"
        assert rejected(verifier(keys), keys.sign("ES256")) == "algorithm ES256 is not accepted for this key"

    def test_jwks_picks_the_key_by_kid(self, keys: Keys) -> None:
        v = verifier(keys, jwt_secret_file=None, jwt_key_file=keys.jwks_file)
        assert v.verify(keys.sign("RS256", kid="one")).subject == "alice"
        assert v.verify(keys.sign("ES256", kid="two")).subject == "alice"
        assert rejected(v, keys.sign("RS256", kid="three")) == "no key with kid 'three'"
        assert rejected(v, keys.sign("ES256", kid="one")) == "algorithm ES256 is not accepted for this key"
        assert "names no key" in rejected(v, keys.sign("RS256"))
        # a key not in the set, under a kid that is
        assert rejected(v, keys.sign("RS256", kid="one", key=keys.rsa_other)) == "the signature does not verify"

    def test_alg_none_is_refused(self, keys: Keys) -> None:
        unsigned = jwt.encode({"sub": "eve", "exp": time.time() + 60, "aud": "rabbitmq"}, None, algorithm="none")
        assert "alg 'none'" in rejected(verifier(keys), unsigned)

    def test_hs_rs_confusion_is_refused(self, keys: Keys) -> None:
        """HMAC over the public key's PEM text: the classic confusion. Without a secret, HS256 is not taken;
        with one, the signature is checked against the secret, never against the public key."""
        header = base64.urlsafe_b64encode(json.dumps({"alg": "HS256", "typ": "JWT"}).encode()).rstrip(b"=")
        claims = {"sub": "eve", "exp": int(time.time()) + 60, "aud": "rabbitmq", "scope": "rabbitmq.write:*/*/*"}
        payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=")
        signature = hmac.new(keys.rsa_public_pem, header + b"." + payload, hashlib.sha256).digest()
        forged = (header + b"." + payload + b"." + base64.urlsafe_b64encode(signature).rstrip(b"=")).decode()
        key_only = verifier(keys, jwt_secret_file=None)
        assert rejected(key_only, forged) == "algorithm HS256 is not accepted (no shared secret is configured)"
        assert rejected(verifier(keys), forged) == "the signature does not verify"

    def test_tampered_payload(self, keys: Keys) -> None:
        token = keys.sign("RS256", scope="rabbitmq.read:*/q")
        head, payload, signature = token.split(".")
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        claims["scope"] = "rabbitmq.write:*/*/*"
        forged_payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
        assert rejected(verifier(keys), f"{head}.{forged_payload}.{signature}") == "the signature does not verify"


class TestClaims:
    def test_expired(self, keys: Keys) -> None:
        assert rejected(verifier(keys), keys.sign(ttl=-5)) == "the token has expired"

    def test_leeway(self, keys: Keys) -> None:
        assert verifier(keys, jwt_leeway=30.0).verify(keys.sign(ttl=-5)).subject == "alice"

    def test_exp_is_required(self, keys: Keys) -> None:
        token = jwt.encode({"sub": "a", "aud": "rabbitmq"}, keys.rsa, algorithm="RS256")
        assert rejected(verifier(keys), token) == "the token has no 'exp' claim"

    def test_audience(self, keys: Keys) -> None:
        assert "aud must include 'rabbitmq'" in rejected(verifier(keys), keys.sign(aud="other"))
        assert "'aud'" in rejected(verifier(keys), keys.sign(aud=None))
        assert verifier(keys).verify(keys.sign(aud=["other", "rabbitmq"])).subject == "alice"
        assert verifier(keys, jwt_audience="api").verify(keys.sign(aud="api")).subject == "alice"

    def test_issuer(self, keys: Keys) -> None:
        v = verifier(keys, jwt_issuer="https://idp.example")
        assert v.verify(keys.sign(iss="https://idp.example")).subject == "alice"
        assert rejected(v, keys.sign(iss="https://evil.example")) == "the token is from another issuer (iss)"

    def test_not_a_jwt(self, keys: Keys) -> None:
        assert rejected(verifier(keys), "guest") == "not a JWT"


class TestSettings:
    def test_no_token_setting_no_policy(self) -> None:
        assert load_policy(Config()) is None

    def test_bad_key_file_is_one_line_and_exit_2(self, tmp_path: Path) -> None:
        bad = tmp_path / "key.pem"
        bad.write_text("not a key")
        with pytest.raises(ConfigError) as caught:
            parse_args(["--jwt-key-file", str(bad)])
        assert caught.value.code == 2
        assert caught.value.message == f"--jwt-key-file {str(bad)!r}: neither a PEM public key nor a JWKS JSON file"

    def test_shared_secret_in_a_jwks_is_refused(self, tmp_path: Path) -> None:
        jwks = tmp_path / "jwks.json"
        jwks.write_text(json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}))
        with pytest.raises(ConfigError, match="--jwt-secret-file"):
            parse_args(["--jwt-key-file", str(jwks)])

    def test_malformed_anonymous_scope(self) -> None:
        with pytest.raises(ConfigError, match="--anonymous-scope: 'stocks' is not valid"):
            parse_args(["--anonymous-scope", "stocks"])


class TestTokenFromRequest:
    def test_first_found_wins(self) -> None:
        assert token_from_request("access_token=q", ["Bearer b"], ["jwt=c"], "jwt") == "q"
        assert token_from_request("x=1", ["Bearer b"], ["jwt=c"], "jwt") == "b"
        assert token_from_request("", ["Basic Zm9v"], ["a=1; jwt=c"], "jwt") == "c"
        assert token_from_request("", [], ["jwt=c"], None) is None
        assert token_from_request("", ["bearer  b2 "], [], None) == "b2"
