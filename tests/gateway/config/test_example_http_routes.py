"""examples/http-routes/ loads as README.md ("HTTP routes") describes it."""

from __future__ import annotations

from pathlib import Path

from federation.model import ServiceKey
from gateway.config.schema import load_config
from gateway.core.routes import compile_routes, decide

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "http-routes" / "gateway.yaml"


def test_the_http_routes_example_loads_and_routes_as_documented():
    cfg = load_config(EXAMPLE)
    (ex,) = cfg.exports
    assert (ex.name, ex.protocol, ex.health_check.kind) == ("payments", "http", "http")
    (im,) = cfg.imports
    assert (im.protocol, im.access_log) == ("http", True)
    assert [r.name for r in im.routes] == ["checkout", "payments", "legacy", "everything-else"]
    routes = compile_routes(im.routes)
    shop = ServiceKey("shop", "shop")
    default = decide(routes, None, "GET", "/", {}, "", lambda: 0.5)  # type: ignore[arg-type]
    assert default.backend == shop and default.response_headers is not None
    canary = decide(routes, None, "GET", "/checkout/cart", {"x-canary": "always"}, "",  # type: ignore[arg-type]
                    lambda: 0.0)
    assert canary.backend == ServiceKey("shop", "shop-v2")
    assert decide(routes, None, "GET", "/checkout", {}, "", lambda: 0.995  # type: ignore[arg-type]
                  ).backend == ServiceKey("shop", "shop-v2")  # the top 1% of the draw
    pay = decide(routes, None, "GET", "/pay/charge?id=1", {}, "", lambda: 0.5)  # type: ignore[arg-type]
    assert pay.backend == ServiceKey("payments", "payments") and pay.path == "/v1/charge?id=1"
    old = decide(routes, None, "GET", "/old-cart", {}, "shop.local", lambda: 0.5)  # type: ignore[arg-type]
    assert (old.status, old.location) == (301, "http://shop.local/checkout/cart")
