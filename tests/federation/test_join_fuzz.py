"""Join requests fuzzed (Hypothesis) against the real federation API over TLS on 127.0.0.1:
a valid join (a fresh cluster, a real single-use token) with one part replaced by any JSON
value or removed, or a body that is not JSON at all. The federation answers every one with a
status below 500 and a JSON error, a token never joins a cluster other than its own, and the
federation keeps serving (a valid join still works after the fuzz)."""

from __future__ import annotations

import itertools
import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers.federation import Fed, make_cluster, raw_session

FEW = settings(max_examples=80, deadline=None,
               suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
    max_leaves=8)
PARTS = st.sampled_from([
    ("token",), ("cluster",), ("bundle",), ("proof",), ("cluster", "name"), ("cluster", "region"),
    ("cluster", "zone"), ("cluster", "trust_domain"), ("cluster", "gateway"),
    ("bundle", "keys"), ("bundle", "spiffe_sequence"), ("bundle", "spiffe_refresh_hint"),
    ("bundle", "keys", 0, "x5c"), ("bundle", "keys", 0, "kty"), ("bundle", "keys", 0, "use"),
])
NAMES = (f"fz-{i}" for i in itertools.count())


def _mutate(body: dict, part: tuple, value, remove: bool) -> None:
    *parents, last = part
    node = body
    for p in parents:
        node = node[p]
    if remove:
        if isinstance(node, dict):
            node.pop(last, None)
    else:
        node[last] = value


@FEW
@given(part=PARTS, value=JSON, remove=st.booleans(),
       raw=st.none() | st.binary(max_size=200))
async def test_a_malformed_join_is_refused_cleanly(fed: Fed, part, value, remove, raw):
    name = next(NAMES)
    c = make_cluster(name)
    body = {"token": await fed.token(name), "cluster": c.record.to_json(),
            "bundle": c.bundle().to_jwks()}
    _mutate(body, part, value, remove)
    data = raw if raw is not None else json.dumps(body).encode()
    async with raw_session(fed, None) as s:
        async with s.post(f"{fed.url}/v1/join", data=data,
                          headers={"Content-Type": "application/json"}) as r:
            status, text = r.status, await r.text()
    assert status < 500, (status, text[:300])
    if status == 200:
        cat = await fed.operator().catalog()
        joined = body["cluster"]["name"] if isinstance(body.get("cluster"), dict) else None
        assert joined == name and name in cat.clusters, (joined, name)
    else:
        assert isinstance(json.loads(text).get("error"), str), text[:300]


async def test_after_malformed_joins_a_valid_one_works(fed: Fed):
    c = make_cluster("fz-valid")
    await fed.join(c)
    assert "fz-valid" in (await fed.client(c.svid).catalog()).clusters
