"""gateway/dataplane/http/auth/jwt.py: JWT verification, with keys from a file and from a real
JWKS server on loopback (aiohttp), rotated while the verifier runs."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import warnings
from pathlib import Path

import pytest
from aiohttp import web
from joserfc import jwt
from joserfc.jwk import ECKey, KeySet, OKPKey, RSAKey

from gateway.core.policies import JwtSettings
from gateway.dataplane.http.auth.jwks import JwksError, parse_jwks
from gateway.dataplane.http.auth.jwt import JwtVerifier

# joserfc warns on every EdDSA use; jwt.py silences it for the process, pytest resets filters
# (and on a weak RSA key, which one test makes on purpose)
pytestmark = [pytest.mark.filterwarnings("ignore:EdDSA is deprecated"),
              pytest.mark.filterwarnings("ignore:Key size should be")]
NOW = 1_800_000_000.0
ISS, AUD = "https://idp.example", "shop"
RSA = RSAKey.generate_key(2048, parameters={"kid": "rsa-1"}, private=True)
EC = ECKey.generate_key("P-256", parameters={"kid": "ec-1"}, private=True)
ED = OKPKey.generate_key("Ed25519", parameters={"kid": "ed-1"}, private=True)
OTHER_RSA = RSAKey.generate_key(2048, parameters={"kid": "rsa-1"}, private=True)  # same kid
NEXT_RSA = RSAKey.generate_key(2048, parameters={"kid": "rsa-2"}, private=True)


class Clock:
    def __init__(self, now: float = NOW):
        self.now = now

    def __call__(self) -> float:
        return self.now


def jwks(*keys) -> dict:
    return KeySet(list(keys)).as_dict(private=False)


def token(key=RSA, alg="RS256", kid: str | None = "default", **claims) -> str:
    body = {"iss": ISS, "aud": AUD, "sub": "alice", "exp": NOW + 300, **claims}
    body = {k: v for k, v in body.items() if v is not None}
    header = {"alg": alg}
    if kid is not None:
        header["kid"] = key.kid if kid == "default" else kid
    return jwt.encode(header, body, key, algorithms=[alg])


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(alg: str, secret: bytes | None = None, kid: str = "rsa-1") -> str:
    head = b64(json.dumps({"alg": alg, "kid": kid}).encode())
    body = b64(json.dumps({"iss": ISS, "aud": AUD, "exp": NOW + 300}).encode())
    signing_input = f"{head}.{body}".encode()
    sig = b"" if secret is None else hmac.new(secret, signing_input, hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(jwks(RSA, EC, ED)))
    return path


def settings(source: Path | str, **kw) -> JwtSettings:
    where = {"jwks_url": source} if isinstance(source, str) else {"jwks_file": str(source)}
    return JwtSettings(ISS, (AUD, "admin"), algorithms=("RS256", "ES256", "EdDSA"),
                       clock_skew=30.0, **where, **kw)


def bearer(t: str) -> str:
    return f"Bearer {t}"


@pytest.mark.parametrize("key, alg", [(RSA, "RS256"), (EC, "ES256"), (ED, "EdDSA")])
def test_valid_tokens_of_each_algorithm(key_file, key, alg):
    v = JwtVerifier(settings(key_file, claim_headers=(("sub", "x-user"),)), Clock())
    got = v.verify(bearer(token(key, alg)))
    assert got.ok and got.status == 200 and got.claims["sub"] == "alice"
    assert got.headers_to_add == (("x-user", "alice"),)
    assert got.www_authenticate is None


@pytest.mark.parametrize(
    "tok, why",
    [
        (token(exp=NOW - 31), "expired"),
        (token(exp=NOW - 30), "expired"),  # exp + skew reached
        (token(exp=None), "no numeric exp"),
        (token(exp="soon"), "no numeric exp"),
        (token(nbf=NOW + 31), "not valid yet"),
        (token(iss="https://evil.example"), "issuer"),
        (token(aud="other"), "audience"),
        (token(aud=["other", 1]), "audience"),
        (token(OTHER_RSA), "bad signature"),
        (token(NEXT_RSA), "unknown key id 'rsa-2'"),
        (token(RSA, kid=None), "no kid and the key set has several"),
        (token(EC, "ES256", kid="rsa-1"), "does not fit algorithm ES256"),
        (unsigned("none"), "algorithm 'none' is not accepted"),
        (unsigned("HS256", secret=RSA.as_pem(private=False)), "algorithm 'HS256'"),
        (unsigned("HS256", secret=json.dumps(RSA.as_dict(private=False)).encode()), "HS256"),
        ("not.a.token", "malformed"),
        ("abc", "malformed"),
    ],
)
def test_refused_tokens_say_why(key_file, tok, why):
    got = JwtVerifier(settings(key_file), Clock()).verify(bearer(tok))
    assert not got.ok and got.status == 401 and why in got.error, got
    assert got.www_authenticate.startswith('Bearer error="invalid_token", error_description="')
    assert got.www_authenticate.count('"') == 4  # the description holds no quote of its own


@pytest.mark.parametrize("claims", [{"exp": NOW - 29}, {"nbf": NOW + 29}])
def test_clock_skew_is_allowed_both_ways(key_file, claims):
    assert JwtVerifier(settings(key_file), Clock()).verify(bearer(token(**claims))).ok


def test_audience_lists_and_required_claims(key_file):
    v = JwtVerifier(settings(key_file, required_claims=("tenant",)), Clock())
    assert v.verify(bearer(token(aud=["x", "admin"], tenant="t1"))).ok
    assert "claim 'tenant' is required" in v.verify(bearer(token(aud=["x", "admin"]))).error


@pytest.mark.parametrize("value, status, www", [
    (None, 401, 'Bearer realm="isthmus"'),
    ("", 401, 'Bearer realm="isthmus"'),
    ("Basic YWxhZGRpbjpvcGVuc2VzYW1l", 401, 'Bearer error="invalid_token"'),
    ("Bearer ", 401, 'Bearer error="invalid_token"'),
    ("Bearer " + "a" * 9000, 401, 'Bearer error="invalid_token"'),
])
def test_missing_and_malformed_headers(key_file, value, status, www):
    got = JwtVerifier(settings(key_file), Clock()).verify(value)
    assert (got.ok, got.status) == (False, status) and got.www_authenticate.startswith(www)


def test_claims_become_header_values_without_line_breaks(key_file):
    v = JwtVerifier(settings(key_file, claim_headers=(
        ("sub", "x-user"), ("roles", "x-roles"), ("n", "x-n"), ("absent", "x-absent"))), Clock())
    got = v.verify(bearer(token(sub="eve\r\nx-admin: 1", roles=["a", "b"], n=3)))
    assert dict(got.headers_to_add) == {"x-user": "evex-admin: 1", "x-roles": '["a","b"]',
                                        "x-n": "3"}
    assert v.claim_header_names == ("x-user", "x-roles", "x-n", "x-absent")


def test_verified_tokens_are_cached_until_exp(key_file):
    clock = Clock()
    v = JwtVerifier(settings(key_file), clock)
    tok = bearer(token(exp=NOW + 60))
    first = v.verify(tok)
    assert v.verify(tok) is first  # the cached result
    clock.now = NOW + 89  # exp + skew not reached
    assert v.verify(tok) is first
    clock.now = NOW + 90
    assert not v.verify(tok).ok and len(v._cache) == 0


def test_the_cache_is_bounded_lru(key_file):
    v = JwtVerifier(settings(key_file, cache_size=2), Clock())
    toks = [bearer(token(sub=f"u{i}")) for i in range(3)]
    first = [v.verify(t) for t in toks]
    assert all(r.ok for r in first) and len(v._cache) == 2
    assert v.verify(toks[2]) is first[2]  # still cached
    assert v.verify(toks[0]) is not first[0]  # the oldest was dropped: verified again
    assert len(v._cache) == 2


def test_a_bad_key_file_fails_at_start_naming_it(tmp_path):
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "s"}]}))
    with pytest.raises(JwksError, match=r"jwks.json: no usable signing key .*symmetric"):
        JwtVerifier(settings(path), Clock())
    with pytest.raises(JwksError, match="cannot read"):
        JwtVerifier(settings(tmp_path / "absent.json"), Clock())


@pytest.mark.parametrize("doc, message", [
    (b"{", "not a JSON key set"),
    (b"[]", "'keys' list"),
    (json.dumps({"keys": [RSA.as_dict(private=False)] * 2}).encode(), "repeats a kid"),
    (json.dumps({"keys": [{"kty": "RSA", "use": "enc", "kid": "e"}]}).encode(), "not sig"),
    ("weak", "1024 bits; at least 2048"),
])
def test_bad_key_sets(doc, message):
    if doc == "weak":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            weak = RSAKey.generate_key(1024, parameters={"kid": "w"}, private=True)
        doc = json.dumps(jwks(weak)).encode()
    with pytest.raises(JwksError, match=message):
        parse_jwks(doc, "test")


def test_a_rotated_key_file_is_read_again(key_file):
    async def run():
        clock = Clock()
        v = JwtVerifier(settings(key_file), clock)
        old = bearer(token(RSA))
        assert v.verify(old).ok
        key_file.write_text(json.dumps(jwks(NEXT_RSA)))
        assert await v.refresh()
        assert v.verify(bearer(token(NEXT_RSA))).ok
        assert "unknown key id 'rsa-1'" in v.verify(old).error  # cache emptied on rotation

    asyncio.run(run())


class JwksServer:
    """A real HTTP server on loopback serving `doc` at /jwks, counting its requests."""

    def __init__(self, doc: dict):
        self.doc = doc
        self.status = 200
        self.hits = 0
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/jwks", self.serve)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}/jwks"

    async def serve(self, request: web.Request) -> web.Response:
        self.hits += 1
        if self.status != 200:
            return web.Response(status=self.status, text="down")
        return web.json_response(self.doc)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


async def test_keys_rotate_on_a_jwks_server():
    server = JwksServer(jwks(RSA))
    await server.start()
    try:
        clock = Clock()
        v = JwtVerifier(settings(server.url, unknown_kid_refresh=10.0), clock)
        assert v.verify(bearer(token(RSA))).status == 503  # nothing fetched yet
        loop = asyncio.create_task(v.refresh_loop())
        try:
            for _ in range(200):
                if v.keys is not None:
                    break
                await asyncio.sleep(0.01)
            old = bearer(token(RSA))
            assert v.verify(old).ok and server.hits == 1

            server.doc = jwks(NEXT_RSA)  # the identity provider rotates
            new = bearer(token(NEXT_RSA))
            assert "unknown key id 'rsa-2'" in v.verify(new).error  # wakes the loop
            for _ in range(200):
                if server.hits == 2 and v.verify(new).ok:
                    break
                await asyncio.sleep(0.01)
            assert v.verify(new).ok and server.hits == 2
            assert not v.verify(old).ok  # the old key is gone, and so is its cached token

            # made-up kids: at most one fetch per unknown_kid_refresh
            for i in range(20):
                got = await v.verify_or_refresh(bearer(token(RSA, kid=f"fake-{i}")))
                assert not got.ok
            await asyncio.sleep(0.05)
            assert server.hits == 2
            clock.now += 11
            assert not (await v.verify_or_refresh(bearer(token(RSA, kid="fake-x")))).ok
            assert server.hits == 3

            server.status = 500  # a failing key server: the last good keys stay
            assert not await v.refresh()
            assert v.verify(new).ok
        finally:
            loop.cancel()
            with pytest.raises(asyncio.CancelledError):
                await loop
    finally:
        await server.stop()


async def test_a_key_server_down_at_start_is_tried_again_soon():
    server = JwksServer(jwks(RSA))
    await server.start()
    server.status = 503
    try:
        v = JwtVerifier(settings(server.url, refresh_interval=300.0), Clock())
        loop = asyncio.create_task(v.refresh_loop())
        try:
            await asyncio.sleep(0.2)
            assert server.hits == 1 and v.keys is None
            server.status = 200
            for _ in range(300):  # the second try comes after 1 s, not 300 s
                if v.keys is not None:
                    break
                await asyncio.sleep(0.01)
            assert v.keys is not None and server.hits == 2
            assert v.verify(bearer(token(RSA))).ok
        finally:
            loop.cancel()
            with pytest.raises(asyncio.CancelledError):
                await loop
    finally:
        await server.stop()


async def test_verify_or_refresh_picks_up_a_new_key_at_once():
    server = JwksServer(jwks(RSA))
    await server.start()
    try:
        v = JwtVerifier(settings(server.url), Clock())
        assert await v.refresh()
        server.doc = jwks(RSA, NEXT_RSA)
        got = await v.verify_or_refresh(bearer(token(NEXT_RSA)))
        assert got.ok and server.hits == 2
    finally:
        await server.stop()
