"""Priorities for proxyless clients (xDS): the router's tiers -> ordered groups of targets.

A proxyless gRPC client (or Envoy) in this cluster can skip the gateway for local traffic:

    priority 0   this cluster's own endpoints, straight from the router's `cluster` tier
                 (present only when the import's failover policy has that tier), each with
                 its health and weight;
    priority 1   (0 when there is no local tier) the gateway's own import listener for the
                 service, which carries the call across clusters with the gateway's failover
                 (zone, region, any tiers); healthy while any of those tiers has a healthy
                 target.

The tiers are the ones the router built (core/balance.build_tiers): no second copy of the tier
rules. A client moves to the next priority when the one before has no healthy endpoint, as the
router moves to the next tier. Pure.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from federation.model import Locality, TierKind
from gateway.core.balance import Target, Tier

__all__ = ["Priority", "priorities"]


@dataclass(frozen=True, slots=True)
class Priority:
    locality: Locality
    targets: tuple[Target, ...]


def priorities(tiers: Sequence[Tier], caller: Locality, listener: tuple[str, int]
               ) -> tuple[Priority, ...]:
    out: list[Priority] = []
    local = [t for tier in tiers if tier.name == TierKind.CLUSTER.value for t in tier.targets
             if not t.remote]
    if local:
        out.append(Priority(caller, tuple(local)))
    beyond = [t for tier in tiers if tier.name != TierKind.CLUSTER.value for t in tier.targets]
    if beyond:
        hop = Target(key=f"listener:{listener[0]}:{listener[1]}", locality=caller,
                     host=listener[0], port=listener[1], weight=1,
                     healthy=any(t.healthy for t in beyond), remote=False)
        out.append(Priority(Locality(caller.region, caller.zone, f"{caller.cluster}-gateway"),
                            (hop,)))
    return tuple(out)
