"""The gateway file's `policy` block: the cluster admin's guard rails on service files.

Four rules, each optional (README.md, "Config files by role"):

* `namespaces`: the namespaces service files may export services in: a list (every service
  file), or a mapping of file glob (relative to the gateway file, like `services/team-a*.yaml`)
  to a list (a file may use the namespaces of every pattern it matches; none matching: none).
  Imports may name any namespace: calling a service is the exporter's to allow
  (`allowed_consumers`);
* `import_listen`: CIDR ranges every import's `listen` address must be in;
* `max_endpoints`: endpoints per export;
* `max_services_per_file`: exports plus imports in one service file.

Service files' `policies` (policy_objects.py) are bound too (`check_policy_targets`): only the
gateway file may attach a policy to `kind: Gateway`, and with `namespaces` set a service file's
policy may only target imports and routes in the namespaces it may use.

They bind service files only: the gateway file is the admin's own. A violation is a problem in
the service file naming its line, the field and the rule (`policy.namespaces` ...). Pure.
"""

from __future__ import annotations

import ipaddress

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from gateway.config.policy_values import GATEWAY, Policy
from gateway.config.reader import (
    Field,
    Reader,
    Table,
    _child,
    _quiet_hostport,
    _quiet_service,
    integer,
)
from gateway.config.services import MAX_ENDPOINTS, MAX_EXPORTS, MAX_IMPORTS
from gateway.config.values import NamespaceGrant, Network, PolicyConfig

MAX_RULES = 256  # namespace patterns, CIDR ranges
MAX_NAMESPACES = 1000


NO_POLICY = PolicyConfig()
POLICY: Table = (
    Field("namespaces", lambda r, n, p: namespaces(r, n, p), None,
          doc="list, or file glob -> list; default: any"),
    Field("import_listen", lambda r, n, p: networks(r, n, p), None,
          doc="CIDR ranges; default: any address"),
    Field("max_endpoints", integer(1, MAX_ENDPOINTS), None, doc="per export"),
    Field("max_services_per_file", integer(1, MAX_EXPORTS + MAX_IMPORTS), None),
)


def parse_policy(r: Reader, node: Node, path: str) -> PolicyConfig | None:
    sec = r.section(node, path, POLICY)
    return None if sec is None or not sec.ok else PolicyConfig(**sec.values)


def namespaces(r: Reader, node: Node, path: str) -> tuple[NamespaceGrant, ...] | None:
    if isinstance(node, SequenceNode):
        names = r.unique_names(node, path, "namespaces", MAX_NAMESPACES)
        return None if names is None else (NamespaceGrant("*", tuple(names)),)
    if not isinstance(node, MappingNode):
        r.problem(node, path, "expected a list of namespaces or a mapping of file glob to "
                  f"namespaces, got {r.describe(node)}")
        return None
    if len(node.value) > MAX_RULES:
        r.problem(node, path, f"{len(node.value)} patterns, at most {MAX_RULES} allowed")
        return None
    out: list[NamespaceGrant] = []
    ok = True
    for key, value in node.value:
        pattern = r.string(key, path)
        names = r.unique_names(value, f"{path}[{key.value!r}]", "namespaces", MAX_NAMESPACES)
        if pattern is None or names is None:
            ok = False
        else:
            out.append(NamespaceGrant(pattern, tuple(names)))
    return tuple(out) if ok else None


def networks(r: Reader, node: Node, path: str) -> tuple[Network, ...] | None:
    nodes = r.items(node, path, "CIDR ranges", MAX_RULES)
    if nodes is None:
        return None
    out: list[Network] = []
    for i, n in enumerate(nodes):
        value = r.string(n, f"{path}[{i}]")
        if value is None:
            return None
        try:
            out.append(ipaddress.ip_network(value.strip()))
        except ValueError as e:
            r.problem(n, f"{path}[{i}]", f"{value!r} is not a CIDR range like 127.0.0.0/8 ({e})")
            return None
    return tuple(out)


def check(r: Reader, policy: PolicyConfig, rel: str, root: dict[str, Node]) -> None:
    """Record every violation of `policy` in service file `rel` (path relative to the gateway
    file; `root`: its top-level fields) as a problem of reader `r` (the file's reader)."""
    entries = [
        (section, i, item)
        for section in ("exports", "imports")
        if isinstance(root.get(section), SequenceNode)
        for i, item in enumerate(root[section].value)
    ]
    limit = policy.max_services_per_file
    if limit is not None and len(entries) > limit:
        r.problem(entries[limit][2], "", f"{len(entries)} services (exports and imports); "
                  f"policy.max_services_per_file allows at most {limit} per service file")
    allowed = policy.allowed_namespaces(rel)
    for section, i, item in entries:
        where = f"{section}[{i}]"
        key = _quiet_service(item) if section == "exports" else None
        if allowed is not None and key is not None and key[0] not in allowed:
            ns = _child(item, "namespace")
            which = ", ".join(allowed) if allowed else f"none: no pattern matches {rel}"
            r.problem(ns if ns is not None else item, f"{where}.namespace",
                      f"namespace {key[0]!r} is not allowed by policy.namespaces for this "
                      f"file (allowed: {which})")
        if section == "exports":
            eps = _child(item, "endpoints")
            top = policy.max_endpoints
            if top is not None and isinstance(eps, SequenceNode) and len(eps.value) > top:
                r.problem(eps, f"{where}.endpoints", f"{len(eps.value)} endpoints; "
                          f"policy.max_endpoints allows at most {top} per export")
        elif policy.import_listen is not None:
            _check_listen(r, policy.import_listen, _child(item, "listen"), f"{where}.listen")


def _check_listen(r: Reader, ranges: tuple[Network, ...], node: Node | None, path: str) -> None:
    hp = _quiet_hostport(node)
    if node is None or hp is None or not isinstance(node, ScalarNode):
        return
    host = "127.0.0.1" if hp[0].lower() == "localhost" else hp[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        r.problem(node, path, f"{host!r} is not an IP address; policy.import_listen allows "
                  "only addresses in its ranges")
        return
    if not any(ip.version == n.version and ip in n for n in ranges):
        r.problem(node, path, f"{node.value!r} is outside policy.import_listen "
                  f"({', '.join(str(n) for n in ranges)})")


def check_policy_targets(r: Reader, policy: PolicyConfig, rel: str, node: Node | None,
                         policies: tuple[Policy, ...], first: int) -> None:
    """Record every `policies` entry of service file `rel` whose targetRef the file may not
    use (see the module docstring); `node` is the file's `policies` list, `first` the order of
    its first entry."""
    items = node.value if isinstance(node, SequenceNode) else []
    allowed = policy.allowed_namespaces(rel)
    for p in policies:
        i = p.order - first
        item = items[i] if i < len(items) else node
        ref = _child(item, "targetRef") if item is not None else None
        where = f"policies[{i}].targetRef"
        if p.target.kind == GATEWAY:
            r.problem(ref or item, f"{where}.kind", "only the gateway file may attach a policy to "
                      "the Gateway (use kind: Import or Route in a service file)")
        elif allowed is not None and p.target.namespace not in allowed:
            which = ", ".join(allowed) if allowed else f"none: no pattern matches {rel}"
            r.problem(ref or item, f"{where}.namespace",
                      f"namespace {p.target.namespace!r} is not allowed by policy.namespaces for "
                      f"this file (allowed: {which})")
