"""Per-request cost of route policies (issue 15): JWT verify, OpenAPI check, policy lookup.

    python -m bench.policy_cost              # 5 rounds
    python -m bench.policy_cost --rounds 3 --n 2000

Each case runs `n` calls in a tight loop per round, in this process (no network: the cost the
HTTP proxy adds per request on its one core); the table shows the median over rounds of the
microseconds per call, and the spread (min..max).

- JWT cached: the same token again (one SHA-256 and an LRU lookup);
- JWT uncached: a new token every call (signature + claims), RS256 (2048-bit), ES256, EdDSA;
  the cache holds 0 entries so every call verifies;
- OpenAPI: `POST /pets` of tests/data/petstore-openapi.yaml with a small JSON body (~150 B,
  nested owner, one array item), both unknown-field modes, and `GET /pets/{id}` with a path
  and a query parameter (no body);
- policy lookup: PolicyIndex.effective for a (gateway, import, route, rule) chain out of 200
  policies, cached (the hot path) and uncached (the merge itself, once per chain and config).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from joserfc import jwt
from joserfc.jwk import ECKey, KeySet, OKPKey, RSAKey

from gateway.core.policies import (
    GATEWAY,
    IMPORT,
    ROUTE,
    Attachment,
    JwtSettings,
    OpenApiSettings,
    Part,
    Policy,
    PolicyIndex,
    PolicySpec,
    TargetRef,
    Timeouts,
    effective_policy,
)
from gateway.dataplane.http.auth.jwt import JwtVerifier
from gateway.dataplane.http.auth.openapi import OpenApiValidator

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "tests" / "data" / "petstore-openapi.yaml"
NOW = 1_800_000_000.0
ISS, AUD = "https://idp.example", "shop"
BODY = json.dumps({"name": "rex", "tag": "good", "owner": {"email": "ann@example.org"},
                   "vaccinations": [{"kind": "rabies", "on": "2026-01-02"}]}).encode()
HEADERS = {"content-type": "application/json", "x-request-id": "abcdef12"}


def per_call_us(fn: Callable[[int], object], n: int) -> float:
    start = time.perf_counter()
    for i in range(n):
        fn(i)
    return (time.perf_counter() - start) / n * 1e6


def jwt_cases(tmp: Path, n: int) -> dict[str, Callable[[int], object]]:
    keys = {"RS256": RSAKey.generate_key(2048, parameters={"kid": "r"}, private=True),
            "ES256": ECKey.generate_key("P-256", parameters={"kid": "e"}, private=True),
            "EdDSA": OKPKey.generate_key("Ed25519", parameters={"kid": "d"}, private=True)}
    path = tmp / "jwks.json"
    path.write_text(json.dumps(KeySet(list(keys.values())).as_dict(private=False)))
    clock = lambda: NOW  # noqa: E731

    def settings(cache: int) -> JwtSettings:
        return JwtSettings(ISS, (AUD,), jwks_file=str(path), cache_size=cache,
                           claim_headers=(("sub", "x-user"),))

    def tok(alg: str, i: int) -> str:
        claims = {"iss": ISS, "aud": AUD, "sub": f"user-{i}", "exp": NOW + 600}
        return "Bearer " + jwt.encode({"alg": alg, "kid": keys[alg].kid}, claims, keys[alg],
                                      algorithms=[alg])

    cached = JwtVerifier(settings(1024), clock)
    same = tok("RS256", 0)
    assert cached.verify(same).ok
    cases: dict[str, Callable[[int], object]] = {"JWT verify, cached (RS256)":
                                                 lambda i: cached.verify(same)}
    uncached = JwtVerifier(settings(0), clock)
    for alg in keys:
        tokens = [tok(alg, i) for i in range(min(n, 500))]
        assert uncached.verify(tokens[0]).ok
        cases[f"JWT verify, uncached ({alg})"] = (
            lambda i, t=tokens: uncached.verify(t[i % len(t)]))
    return cases


def openapi_cases() -> dict[str, Callable[[int], object]]:
    reject = OpenApiValidator.from_file(SPEC, OpenApiSettings(str(SPEC)))
    drop = OpenApiValidator.from_file(SPEC, OpenApiSettings(str(SPEC), unknown_fields="drop"))
    extra = json.dumps({**json.loads(BODY), "color": "brown"}).encode()
    assert reject.check("POST", "/pets", "", HEADERS, BODY).ok
    assert drop.check("POST", "/pets", "", HEADERS, extra).new_body is not None
    assert reject.check("DELETE", "/pets/42", "force=true", HEADERS, b"").ok
    return {
        "OpenAPI POST /pets, small JSON body": lambda i: reject.check(
            "POST", "/pets", "", HEADERS, BODY),
        "OpenAPI POST /pets, drop 1 unknown field": lambda i: drop.check(
            "POST", "/pets", "", HEADERS, extra),
        "OpenAPI DELETE /pets/{id}?force (no body)": lambda i: reject.check(
            "DELETE", "/pets/42", "force=true", HEADERS, b""),
    }


def lookup_cases() -> dict[str, Callable[[int], object]]:
    policies = []
    for i in range(50):
        svc = f"svc-{i}"
        for target in (TargetRef(GATEWAY, "east-1"), TargetRef(IMPORT, svc),
                       TargetRef(ROUTE, f"route-{i}", import_=svc),
                       TargetRef(ROUTE, f"route-{i}", section="r", import_=svc)):
            part = Part.of(Timeouts(request=float(i + 1)), ["request"])
            policies.append(Policy(f"p{len(policies)}", target, PolicySpec(timeouts=part),
                                   order=len(policies)))
    index = PolicyIndex(policies)
    chains = [Attachment("east-1", ("default", f"svc-{i}"), f"route-{i}", "r") for i in range(50)]
    return {
        "policy lookup, PolicyIndex (cached)": lambda i: index.effective(chains[i % 50]),
        "policy merge, effective_policy (200 policies)": lambda i: effective_policy(
            chains[i % 50], policies),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.policy_cost",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--n", type=int, default=3000, help="calls per case per round")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cases = {**jwt_cases(Path(tmp), args.n), **openapi_cases(), **lookup_cases()}
        print(f"| case ({args.n} calls x {args.rounds} rounds) | µs per call, median | "
              "min..max |")
        print("|---|---:|---:|")
        for name, fn in cases.items():
            fn(0)  # warm
            runs = [per_call_us(fn, args.n) for _ in range(args.rounds)]
            print(f"| {name} | {statistics.median(runs):.1f} | "
                  f"{min(runs):.1f}..{max(runs):.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
