"""What the federation server keeps in memory, shared by its parts (one object, no copies).

* State lives in the store under the keys described in `model.py`; the server keeps in memory
  only what it can rebuild from the store at start (bundles, trust domain -> cluster, current
  lease per cluster) plus last-renewal times for `/status` and the counters of `/metrics`.
  The maps are replaced (not mutated) on change, so a reader never sees half an update.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import Callable
from typing import Any

from aiohttp import web

from federation.errors import ApiError
from federation.identity import TrustBundle
from federation.logs import LogLimiter
from federation.metrics import Histogram
from federation.model import ClusterRecord
from federation.store.base import Store
from federation.traffic import Report

log = logging.getLogger("isthmus.federation")


REPLICAS = "federation/replicas/"  # not under catalog/: gateways do not watch it


class State:
    """The server's shared state: its store, clock and settings, the maps rebuilt from the
    store at start, and the counters every part adds to."""

    def __init__(self, store: Store, trust_domain: str, lease_ttl: float,
                 clock: Callable[[], float], overlay: Any = None) -> None:
        self.store = store
        self.overlay = overlay  # ip network of --overlay-cidr, or None: no tunnels
        self.trust_domain = trust_domain
        self.lease_ttl = float(lease_ttl)
        self.clock = clock

        # Rebuilt from the store at start; replaced (not mutated) on change.
        self.bundles: dict[str, TrustBundle] = {}
        self.cluster_by_td: dict[str, str] = {}
        self.records: dict[str, ClusterRecord] = {}
        self.leases: dict[str, int] = {}
        self.renewed: dict[str, float] = {}

        self.stopping = asyncio.Event()  # set by stop(): long-polls answer with no events
        self.store_open = False
        self.bound = False
        self.limited = LogLimiter(log)  # 401/403s, handler errors: one line per class
        self.watchers = 0
        self.requests: Counter[tuple[str, int]] = Counter()
        self.denied = 0
        # cluster -> (previous, latest) traffic report (federation/traffic.py; memory only)
        self.reports: dict[str, tuple[Report | None, Report]] = {}
        self.request_seconds = Histogram()  # every API answer's handling time


async def read_json(request: web.Request) -> Any:
    """The request's body as JSON; ApiError 400 when it is empty or not JSON."""
    raw = await request.read()
    if not raw:
        raise ApiError(400, "request body: empty, expected JSON")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body: not valid JSON ({e})") from None
