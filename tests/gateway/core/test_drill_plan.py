"""drill_plan: where each import's traffic goes today and with a region or cluster lost (tables)."""

from __future__ import annotations

from types import MappingProxyType

import pytest

from federation.errors import InputError
from federation.model import Catalog, ClusterRecord, Endpoint, Export, FailoverPolicy, ImportRecord
from gateway.core.drill_plan import Route, plan_drill, scope_clusters

ANY4 = ("cluster", "zone", "region", "any")


def cluster(name: str, region: str, zone: str, n: int) -> ClusterRecord:
    return ClusterRecord(name, region, zone, f"{name}.isthmus.local", f"127.0.0.1:{15000 + n}")


def export(
    name: str, healthy: tuple[bool, ...] = (True, True), allowed=None, svc: str = "echo"
) -> Export:
    base = 18000 + 100 * sum(map(ord, name)) % 5000
    eps = tuple(Endpoint("127.0.0.1", base + i, h, 1) for i, h in enumerate(healthy))
    return Export(name, "default", svc, 8080, "tcp", eps, allowed)


def imp(name: str, tiers=ANY4, prefs=(), svc: str = "echo") -> ImportRecord:
    return ImportRecord(name, "default", svc, FailoverPolicy(tuple(tiers), tuple(prefs), 2.0, 4))


CLUSTERS = {
    "east-1": cluster("east-1", "us-east", "a", 1),
    "east-2": cluster("east-2", "us-east", "b", 2),
    "west-1": cluster("west-1", "us-west", "a", 3),
    "edge-1": cluster("edge-1", "eu-west", "a", 4),
}


def catalog(exports=(), imports=(), live=None, clusters=None) -> Catalog:
    clusters = clusters or CLUSTERS
    return Catalog(
        revision=1,
        clusters=MappingProxyType(dict(clusters)),
        live=frozenset(clusters if live is None else live),
        exports=MappingProxyType({e.key: e for e in exports}),
        imports=MappingProxyType({i.key: i for i in imports}),
    )


# The demo topology: three clusters export and import echo; edge-1 only imports it.
DEMO = catalog(
    exports=[export("east-1"), export("east-2"), export("west-1")],
    imports=[
        imp("east-1"), imp("east-2"), imp("west-1"), imp("edge-1", prefs=("us-east", "us-west"))
    ],
)


def R(tier, clusters, eps) -> Route:
    return Route(tier, tuple(clusters), eps)


NONE = Route(None, (), 0)


# (name, catalog, scope kind, scope, {importer: (today, after)}, no_target)
CASES = [
    (
        "us-east lost: edge-1 shifts to us-west; west-1 stays local",
        DEMO, "region", "us-east",
        {
            "west-1": (R("cluster", ["west-1"], 2), R("cluster", ["west-1"], 2)),
            "edge-1": (R("any:us-east", ["east-1", "east-2"], 4), R("any:us-west", ["west-1"], 2)),
        },
        (),
    ),
    (
        "east-1 lost: edge-1 keeps us-east via east-2",
        DEMO, "cluster", "east-1",
        {
            "east-2": (R("cluster", ["east-2"], 2), R("cluster", ["east-2"], 2)),
            "west-1": (R("cluster", ["west-1"], 2), R("cluster", ["west-1"], 2)),
            "edge-1": (R("any:us-east", ["east-1", "east-2"], 4), R("any:us-east", ["east-2"], 2)),
        },
        (),
    ),
    (
        "us-west lost: nothing moves",
        DEMO, "region", "us-west",
        {
            "east-1": (R("cluster", ["east-1"], 2), R("cluster", ["east-1"], 2)),
            "east-2": (R("cluster", ["east-2"], 2), R("cluster", ["east-2"], 2)),
            "edge-1": (
                R("any:us-east", ["east-1", "east-2"], 4),
                R("any:us-east", ["east-1", "east-2"], 4),
            ),
        },
        (),
    ),
    (
        "east-1's own endpoints down: it goes to the zone-less region tier today, any after "
        "us-east lost",
        catalog(
            exports=[
                export("east-1", (False, False)), export("east-2", (True, False)), export("west-1")
            ],
            imports=[imp("east-1")],
        ),
        "cluster", "east-2",
        {"east-1": (R("region", ["east-2"], 1), R("any", ["west-1"], 2))},
        (),
    ),
    (
        "policy without 'any': edge-1 would have nothing once us-east is lost",
        catalog(
            exports=[export("east-1"), export("west-1")],
            imports=[imp("edge-1", tiers=("cluster", "zone", "region"))],
        ),
        "region", "us-east",
        {"edge-1": (NONE, NONE)},
        ("edge-1: default/echo",),
    ),
    (
        "only provider outside scope refuses edge-1 (allowed_consumers): no target after",
        catalog(
            exports=[export("east-1"), export("west-1", allowed=("east-1",))],
            imports=[imp("edge-1")],
        ),
        "region", "us-east",
        {"edge-1": (R("any", ["east-1"], 2), NONE)},
        ("edge-1: default/echo",),
    ),
    (
        "a cluster without lease contributes nothing; unhealthy exports are skipped",
        catalog(
            exports=[export("east-1"), export("east-2", (False, False)), export("west-1")],
            imports=[imp("edge-1", prefs=("us-west",))],
            live={"east-1", "east-2", "edge-1"},  # west-1's lease expired
        ),
        "cluster", "east-1",
        {"edge-1": (R("any", ["east-1"], 2), NONE)},
        ("edge-1: default/echo",),
    ),
    (
        "region preference decides the first tier",
        catalog(
            exports=[export("east-1"), export("west-1")],
            imports=[imp("edge-1", prefs=("us-west", "us-east"))],
        ),
        "region", "us-east",
        {"edge-1": (R("any:us-west", ["west-1"], 2), R("any:us-west", ["west-1"], 2))},
        (),
    ),
    (
        "partially healthy local endpoints count only the healthy ones",
        catalog(
            exports=[export("west-1", (True, False, True)), export("east-1")],
            imports=[imp("west-1")],
        ),
        "region", "us-east",
        {"west-1": (R("cluster", ["west-1"], 2), R("cluster", ["west-1"], 2))},
        (),
    ),
]


@pytest.mark.parametrize("name,cat,kind,scope,want,no_target", CASES, ids=[c[0] for c in CASES])
def test_plan_table(name, cat, kind, scope, want, no_target):
    plan = plan_drill(cat, kind, scope)
    got = {r.cluster: (r.today, r.after) for r in plan.rows}
    assert got == want
    assert plan.no_target == no_target
    assert not set(got) & set(plan.clusters_in_scope), "importers in scope are not planned"


def test_plan_services_and_flags():
    plan = plan_drill(DEMO, "region", "us-east")
    assert plan.clusters_in_scope == ("east-1", "east-2")
    assert plan.services == ("default/echo",)
    edge = next(r for r in plan.rows if r.cluster == "edge-1")
    west = next(r for r in plan.rows if r.cluster == "west-1")
    assert edge.affected and edge.changed and not edge.no_target
    assert west.affected and not west.changed
    j = plan.to_json()
    assert j["scope"] == {"region": "us-east"}
    assert [r["cluster"] for r in j["imports"]] == ["edge-1", "west-1"]
    assert j["imports"][1]["today"]["tier"] == "cluster"
    assert j["no_target"] == []


def test_unaffected_service_is_listed_but_not_affected():
    cat = catalog(
        exports=[export("east-1"), export("west-1", svc="cart")],
        imports=[imp("edge-1"), imp("edge-1", svc="cart")],
    )
    plan = plan_drill(cat, "region", "us-east")
    rows = {r.service: r for r in plan.rows}
    assert not rows["default/cart"].affected and not rows["default/cart"].changed
    assert rows["default/echo"].affected and rows["default/echo"].no_target
    assert plan.services == ("default/echo",)


@pytest.mark.parametrize(
    "kind,scope,needle",
    [
        ("region", "mars", "unknown region 'mars'; known regions: eu-west, us-east, us-west"),
        ("cluster", "east-9",
         "unknown cluster 'east-9'; known clusters: east-1, east-2, edge-1, west-1"),
        ("zone", "a", "expected 'region' or 'cluster'"),
    ],
)
def test_unknown_scope_lists_known(kind, scope, needle):
    with pytest.raises(InputError) as e:
        plan_drill(DEMO, kind, scope)
    assert needle in str(e.value)


def test_scope_clusters():
    assert scope_clusters(DEMO, "region", "us-east") == ("east-1", "east-2")
    assert scope_clusters(DEMO, "cluster", "west-1") == ("west-1",)


def test_route_text():
    assert str(R("any:us-west", ["west-1"], 2)) == "any:us-west: west-1 (2 ep)"
    assert str(NONE) == "NO HEALTHY TARGET"
