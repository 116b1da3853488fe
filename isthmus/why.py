"""`isthmus why SERVICE --from CLUSTER`: where would CLUSTER's gateway send the next connection
of SERVICE, and why not elsewhere. A thin client of the gateway's admin `/why`
(gateway/core/why.py decides; this prints).

Which gateway: `--admin URL` (that gateway's `listen.admin`), else the admin address the
gateway reports to the federation (the federation's `/status`, `clusters.<name>.admin`, at
`--federation`, default $ISTHMUS_FEDERATION_ADMIN or http://127.0.0.1:17080). The answer must
come from CLUSTER: a gateway of another cluster is an error (exit 1), not a quiet wrong answer.
Exit codes: 0 answered, 1 unreachable / wrong cluster / no such import, 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import IO, Any

from federation.errors import FederationError

MAX_BYTES = 4 << 20
EXIT_OK, EXIT_FAIL = 0, 1


async def _get(url: str, timeout: float = 5.0) -> tuple[int, Any]:
    import aiohttp

    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as s:
            async with s.get(url) as r:
                body = await r.content.read(MAX_BYTES)
                status = r.status
    except (aiohttp.ClientError, TimeoutError) as e:
        raise FederationError(f"cannot reach {url}: {e or 'timeout'}") from None
    try:
        return status, json.loads(body)
    except ValueError:
        raise FederationError(f"{url} answered {status}, not JSON: {body[:200]!r}") from None


async def gateway_admin(cluster: str, federation: str) -> str:
    """The admin address CLUSTER's gateway reported to the federation."""
    from isthmus.status import _admin

    url = _admin(federation) + "/status"
    status, data = await _get(url)
    rec = (data.get("clusters") or {}).get(cluster) if isinstance(data, dict) else None
    if status != 200 or not isinstance(rec, dict):
        raise FederationError(f"the federation ({url}) knows no cluster {cluster!r}")
    admin = rec.get("admin")
    if not isinstance(admin, str) or not admin:
        raise FederationError(f"cluster {cluster!r} has not reported its admin address to the "
                              f"federation yet; give --admin URL (its gateway's listen.admin)")
    return admin


async def fetch_why(service: str, cluster: str, admin: str | None, federation: str
                    ) -> dict[str, Any]:
    from urllib.parse import quote

    from isthmus.status import _admin

    base = _admin(admin if admin else await gateway_admin(cluster, federation))
    url = f"{base}/why?service={quote(service, safe='')}"
    status, data = await _get(url)
    if status != 200 or not isinstance(data, dict):
        err = data.get("error") if isinstance(data, dict) else data
        raise FederationError(f"{url} answered {status}: {err}")
    if data.get("cluster") != cluster:
        raise FederationError(f"{base} is the gateway of cluster {data.get('cluster')!r}, not "
                              f"{cluster!r} (check --admin)")
    return data


WHY_TEXT = {
    "lease-expired": "its cluster holds no lease at the federation",
    "not-allowed": "its export does not allow this cluster (allowed_consumers)",
    "no-gateway": "no usable record or bundle of its gateway",
    "no-tier": "its locality is in none of the import's failover.tiers",
    "check-unhealthy": "its health check says unhealthy",
    "peer-probe-failed": "the probe of its gateway fails",
    "ejected": "ejected by outlier detection",
    "no-healthy-endpoints": "its cluster publishes no healthy endpoint",
    "tier-not-active": "its tier is not the active one",
    "failback-wait": "its tier waits out failback_after",
    "beyond-max-attempts": "after max_attempts: never tried",
}


def _reason(r: str, c: dict[str, Any]) -> str:
    text = WHY_TEXT.get(r, r)
    if r == "ejected" and c.get("ejected_for") is not None:
        text += f" for {c['ejected_for']:g}s more"
    if r == "failback-wait" and c.get("takes_over_in") is not None:
        text += f" (takes over in {c['takes_over_in']:g}s)"
    return f"{r}: {text}"


def render_why(d: dict[str, Any], file: IO[str] | None = None) -> None:
    out = file or sys.stdout
    w = lambda s="": print(s, file=out)  # noqa: E731
    panic = " (PANIC: no healthy target anywhere; trying unhealthy ones)" if d["panic"] else ""
    w(f"{d['service']} from {d['cluster']} ({d['from']}): active tier "
      f"{d['active_tier'] or 'none'}{panic}; max_attempts {d['max_attempts']}, "
      f"failback_after {d['failback_after']:g}s")
    w("tiers: " + ("  ".join(f"{t['name']}{'*' if t['active'] else ''}"
                             f"{'' if t['eligible'] else '(no healthy target)'}"
                             for t in d["tiers"]) or "none"))
    w()
    w("next connection tries, in order (weighted random inside a group):")
    cands = {c["key"]: c for c in d["candidates"]}
    sizes: dict[int, int] = {}
    for c in d["candidates"]:
        if c["group"] is not None:
            sizes[c["group"]] = sizes.get(c["group"], 0) + 1
    for key in d["order"]:
        c = cands[key]
        size = sizes.get(c["group"], 1)
        at = f"{c['position']}" if size == 1 else f"{c['position']}-{c['position'] + size - 1}"
        extra = f"  share {c['share']:.0%} of group {c['group']}" if c["share"] < 1 else ""
        extra += "  (may be left out: the group straddles max_attempts)" if c["partial"] else ""
        last = "  LAST RESORT" if not c["healthy"] else ""
        w(f"  {at}. {key}  tier {c['tier']}  {c['locality']}  check {c['check']}"
          f"{extra}{last}")
        for r in c["reasons"]:
            w(f"       {_reason(r, c)}")
    skipped = [c for c in d["candidates"] if c["position"] is None]
    if skipped or d["excluded"]:
        w()
        w("skipped:")
    for c in skipped:
        w(f"  {c['key']}  {c['locality']}: " + "; ".join(_reason(r, c) for r in c["reasons"]))
    for e in d["excluded"]:
        w(f"  cluster {e['cluster']}: " + "; ".join(_reason(r, {}) for r in e["reasons"]))


def cmd_why(args: argparse.Namespace) -> int:
    try:
        data = asyncio.run(fetch_why(args.service, args.from_cluster, args.admin,
                                     args.federation))
    except FederationError as e:
        print(f"isthmus why: {e}", file=sys.stderr)
        return EXIT_FAIL
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        render_why(data)
    return EXIT_OK


def add_why_parser(sub: Any) -> None:
    from isthmus.status import ADMIN_ENV, default_admin

    p = sub.add_parser("why", help="where a cluster's gateway sends the next connection of a "
                       "service, and why not elsewhere", description=__doc__.split("\n\n")[0])
    p.add_argument("service", metavar="SERVICE", help="an import: NAMESPACE/NAME (or NAME in "
                   "namespace default)")
    p.add_argument("--from", dest="from_cluster", required=True, metavar="CLUSTER",
                   help="the cluster whose gateway routes it")
    p.add_argument("--admin", default=None, metavar="URL",
                   help="that gateway's admin address (listen.admin); default: what it reported "
                        "to the federation")
    p.add_argument("--federation", default=default_admin(), metavar="URL",
                   help=f"the federation's admin address (default ${ADMIN_ENV}, else "
                        "http://127.0.0.1:17080)")
    p.add_argument("--json", action="store_true", help="print the /why JSON")
    p.set_defaults(func=cmd_why)
