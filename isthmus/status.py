"""`isthmus status`: read the federation's admin /status and show it as tables (or a gateway's
admin /status: its imports and tunnel peers).

Which federation: `--admin URL` (`http://host:port`, or just `host:port`), else the environment
variable ISTHMUS_FEDERATION_ADMIN, else http://127.0.0.1:17080 (`federation serve`'s default
`--admin`). On a terminal the tables fit its width; piped or redirected (no terminal to fit),
every value is printed in full, however wide the table gets.
"""

from __future__ import annotations

import json
import os
from typing import IO, Any

from federation.errors import FederationError

MAX_STATUS_BYTES = 16 << 20
DEFAULT_ADMIN = "http://127.0.0.1:17080"
ADMIN_ENV = "ISTHMUS_FEDERATION_ADMIN"
PIPE_WIDTH = 100_000  # the console width when stdout is not a terminal: never truncate


def default_admin() -> str:
    return os.environ.get(ADMIN_ENV, "").strip() or DEFAULT_ADMIN


def _admin(text: str) -> str:
    """`host:port` means http://host:port (the admin port is plain HTTP)."""
    text = text.strip().rstrip("/")
    return text if "://" in text else f"http://{text}"


async def fetch_status(admin_url: str, timeout: float = 5.0) -> dict[str, Any]:
    import aiohttp

    url = _admin(admin_url) + "/status"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
            async with s.get(url) as r:
                body = await r.content.read(MAX_STATUS_BYTES)
                if r.status != 200:
                    raise FederationError(f"{url} answered {r.status}: {body[:200]!r}", r.status)
    except (aiohttp.ClientError, TimeoutError) as e:
        raise FederationError(
            f"cannot reach the federation admin at {url}: {e or 'timeout'}"
        ) from None
    try:
        data = json.loads(body)
    except ValueError:
        raise FederationError(f"{url} did not answer JSON") from None
    if not isinstance(data, dict):
        raise FederationError(f"{url} did not answer a JSON object")
    return data


def render_status(data: dict[str, Any], file: IO[str] | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=file)
    if not console.is_terminal:  # rich would fit 80 columns (or $COLUMNS) and cut values with "…"
        console = Console(file=file, width=PIPE_WIDTH)
    if "catalog" in data and "cluster" in data:  # a gateway's admin /status
        _render_gateway(console, data)
        return
    clusters = data.get("clusters") or {}
    t = Table(title=f"clusters (catalog revision {data.get('revision')})")
    for col in ("cluster", "region", "zone", "gateway", "trust domain", "live", "lease age"):
        t.add_column(col)
    for name, c in sorted(clusters.items()):
        age = c.get("lease_age_seconds")
        t.add_row(
            name,
            str(c.get("region")),
            str(c.get("zone")),
            str(c.get("gateway_address")),
            str(c.get("trust_domain")),
            "[green]yes[/]" if c.get("live") else "[red]no[/]",
            "-" if age is None else f"{age:.1f}s",
        )
    console.print(t)
    store = data.get("store") or {}
    if store:
        where = store.get("path") or store.get("using")
        tls = ", TLS" if store.get("tls") else ""
        line = f"store: {store.get('kind')} ({where}{tls}), revision {data.get('revision')}"
        members = store.get("members") or []
        if members:
            line += "; etcd members: " + ", ".join(
                f"{m.get('name')}{' (leader)' if m.get('leader') else ''}" for m in members)
        if "replicas" in store:
            line += "; federation replicas: " + (", ".join(
                str(r.get("listen")) for r in store["replicas"]) or "none")
        console.print(line)
    tunneled = {n: c["tunnel"] for n, c in sorted(clusters.items()) if c.get("tunnel")}
    if tunneled:
        w = Table(title="tunnels (WireGuard), as published")
        for col in ("cluster", "public key", "endpoint", "overlay address", "rotating"):
            w.add_column(col)
        for name, tun in tunneled.items():
            w.add_row(name, str(tun.get("public_key")), str(tun.get("endpoint")),
                      str(tun.get("overlay_address") or "-"),
                      "yes" if tun.get("rotating") else "no")
        console.print(w)
    s = Table(title="services: healthy endpoints per locality")
    for col in ("service", "cluster", "locality", "healthy", "endpoints"):
        s.add_column(col)
    for svc, per in sorted((data.get("services") or {}).items()):
        for cluster, eps in sorted(per.items()):
            c = clusters.get(cluster, {})
            healthy = sum(1 for e in eps if e.get("healthy"))
            color = "green" if healthy == len(eps) and eps else ("yellow" if healthy else "red")
            s.add_row(
                svc,
                cluster,
                f"{c.get('region', '?')}/{c.get('zone', '?')}",
                f"[{color}]{healthy}/{len(eps)}[/]",
                " ".join(f"{e.get('address')}{'' if e.get('healthy') else '(down)'}" for e in eps),
            )
    console.print(s)


def _render_gateway(console: Any, data: dict[str, Any]) -> None:
    """A gateway's /status: its imports' active tiers and, with a tunnel, its peers."""
    from rich.table import Table

    cat = data.get("catalog") or {}
    console.print(f"gateway {data.get('cluster')} ({(data.get('locality') or {}).get('region')}/"
                  f"{(data.get('locality') or {}).get('zone')}): ready {data.get('ready')}, "
                  f"catalog revision {cat.get('revision')}, live {', '.join(cat.get('live', []))}")
    t = Table(title="imports")
    for col in ("service", "active tier", "would try"):
        t.add_column(col)
    for imp in data.get("imports") or []:
        t.add_row(str(imp.get("service")), str(imp.get("active")),
                  " ".join(imp.get("would_try") or []))
    console.print(t)
    _render_http(console, data.get("listeners") or {})
    tun = data.get("tunnel")
    if tun:
        w = Table(title=f"tunnel {tun.get('interface')} (public key {tun.get('public_key')}, "
                        f"port {tun.get('listen_port')}, overlay {tun.get('overlay_address')}, "
                        f"restarts {tun.get('restarts')}, key rotations "
                        f"{tun.get('key_rotations', 0)})")
        for col in ("peer", "public key", "endpoint", "overlay address", "latest handshake",
                    "rx bytes", "tx bytes"):
            w.add_column(col)
        for p in tun.get("peers") or []:
            age = p.get("handshake_age_seconds")
            w.add_row(str(p.get("cluster")), str(p.get("public_key")), str(p.get("endpoint")),
                      str(p.get("overlay_address")), "never" if age is None else f"{age:.0f}s ago",
                      str(p.get("rx_bytes")), str(p.get("tx_bytes")))
        console.print(w)


def _render_http(console: Any, listeners: dict[str, Any]) -> None:
    """HTTP listeners' requests per route and backend cluster (README, "HTTP routes")."""
    from rich.table import Table

    rows = [(name, r) for name, st in sorted(listeners.items())
            for r in ((st.get("http") or {}).get("routes") or [])]
    if not rows:
        return
    t = Table(title="HTTP requests")
    for col in ("listener", "route", "cluster", "2xx", "3xx", "4xx", "5xx", "mean ms"):
        t.add_column(col)
    for name, r in rows:
        c, n = r.get("classes") or [0] * 6, r.get("count") or 0
        mean = f"{1000 * r.get('total', 0.0) / n:.1f}" if n else "-"
        t.add_row(name, str(r.get("route")), str(r.get("cluster") or "-"),
                  *(str(c[i]) for i in (2, 3, 4, 5)), mean)
    console.print(t)
