"""`isthmus xds bootstrap --config GATEWAY.yaml [--envoy]`: the bootstrap a proxyless gRPC client
(or an Envoy) needs to take its config from the gateway's ADS (the gateway file's `xds:`).

gRPC: set `GRPC_XDS_BOOTSTRAP=<file>` (or `GRPC_XDS_BOOTSTRAP_CONFIG=<the JSON>`) and dial
`xds:///<svc>.<ns>.svc.clusterset.local`. Envoy: `envoy -c <file>`; it gets the clusters
(CDS, named the same) and their endpoints (EDS) by ADS; its own listeners and routes point at
them (the gateway's Listener resources are gRPC API listeners, which Envoy does not serve).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from federation.units import format_hostport

EXIT_OK, EXIT_USAGE = 0, 2


def grpc_bootstrap(cfg: Any, node_id: str) -> dict[str, Any]:
    host, port = cfg.xds.listen
    c = cfg.cluster
    return {
        "xds_servers": [{"server_uri": format_hostport(_dialable(host), port),
                         "channel_creds": [{"type": "insecure"}],
                         "server_features": ["xds_v3"]}],
        "node": {"id": node_id, "cluster": c.name,
                 "locality": {"region": c.region, "zone": c.zone, "sub_zone": c.name}},
    }


def envoy_bootstrap(cfg: Any, node_id: str) -> dict[str, Any]:
    host, port = cfg.xds.listen
    c = cfg.cluster
    ads = {"ads": {}, "resource_api_version": "V3"}
    return {
        "node": {"id": node_id, "cluster": c.name,
                 "locality": {"region": c.region, "zone": c.zone, "sub_zone": c.name}},
        "dynamic_resources": {
            "ads_config": {"api_type": "GRPC", "transport_api_version": "V3",
                           "grpc_services": [{"envoy_grpc": {"cluster_name": "isthmus_xds"}}]},
            "cds_config": ads,
        },
        "static_resources": {"clusters": [{
            "name": "isthmus_xds", "type": "STATIC", "connect_timeout": "1s",
            "typed_extension_protocol_options": {
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/"
                             "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}}}},
            "load_assignment": {"cluster_name": "isthmus_xds", "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": {"socket_address": {
                    "address": _dialable(host), "port_value": port}}}}]}]},
        }]},
    }


def _dialable(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else "::1" if host == "::" else host


def cmd_bootstrap(args: argparse.Namespace) -> int:
    from gateway.config.schema import load_config

    cfg = load_config(args.config)
    if cfg.xds is None:
        print(f"isthmus xds bootstrap: {args.config} has no `xds:` section (add `xds: {{listen: "
              "127.0.0.1:15001}}` and restart the gateway)", file=sys.stderr)
        return EXIT_USAGE
    node_id = args.node_id or f"{cfg.cluster.name}-app"
    doc = envoy_bootstrap(cfg, node_id) if args.envoy else grpc_bootstrap(cfg, node_id)
    print(json.dumps(doc, indent=2))
    return EXIT_OK


def add_xds_parser(sub: Any) -> None:
    x = sub.add_parser("xds", help="the gateway's xDS (ADS) for proxyless gRPC and Envoy")
    xsub = x.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    b = xsub.add_parser("bootstrap", help="print a gRPC (or Envoy) bootstrap for the gateway's "
                        "ADS", description=__doc__.split("\n\n")[1])
    b.add_argument("--config", required=True, help="the gateway file (with an `xds:` section)")
    b.add_argument("--envoy", action="store_true", help="an Envoy bootstrap instead of gRPC's")
    b.add_argument("--node-id", default=None, help="the node id (default <cluster>-app)")
    b.set_defaults(func=cmd_bootstrap)
