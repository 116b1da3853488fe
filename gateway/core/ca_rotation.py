"""Rotating a cluster's CA with overlap: which CA signs and which are trusted, from (plan, now).

Theory of operation
-------------------
A plan (`identity/rotation.json` in the state dir, written by `isthmus identity rotate-ca`)
names the CA that signs today (`old`) and its successor (`new`) by SHA-256 fingerprint, and the
timings. Peers learn our CAs only from the bundle we publish at the federation, and they refresh
it at least every `spiffe_refresh_hint`; so nothing may be signed by a CA before every peer can
have seen it, and no CA may leave the bundle while an SVID it issued is still in use:

    phase     signs  bundle (trusted)   until
    prepare   old    old + new  (seq+1)  switch_at = prepared_at + overlap
    switch    new    old + new           retire_at = max(switch_at + overlap,
                                                         switch_at + svid_ttl + clock_skew)
    retire    new    new        (seq+1)  (the plan is done: old CA archived, plan removed)

- `prepared_at` is when the federation accepted the prepare bundle (the primary records it in
  the plan once its PUT succeeded). Until then the plan stays in `prepare` with no switch time:
  a gateway that was stopped, or a federation that was down, when the plan was written never
  switches before its peers could see the new CA.
- At `switch` the SVID is reissued from the new CA at once; no SVID is issued by the old CA
  after `switch_at`, and each lives at most `svid_ttl`, so at `switch_at + svid_ttl` every SVID
  the old CA issued has expired; `clock_skew` more covers clocks that disagree.
- `overlap` must be at least `MIN_OVERLAP_FACTOR` (3) times the bundle's refresh hint
  (`check_overlap`, also a config rule, so it lives in gateway/config/schema.py): a peer that
  polls at the hint gets three chances to see each bundle.
- `decide` is the whole rule; `next_at` says when its answer changes next (None while waiting
  for the federation), so the shell knows when to look again.

Pure: no I/O, no clock (`now` is a parameter), no randomness.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any

from federation.errors import InputError
from gateway.config.schema import MIN_OVERLAP_FACTOR, check_overlap

__all__ = ["MIN_OVERLAP_FACTOR", "Phase", "RotationPlan", "RotationState", "check_overlap",
           "decide"]

MAX_SECONDS = 366 * 86400.0  # bound on every duration in a plan
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")


class Phase(StrEnum):
    PREPARE = "prepare"
    SWITCH = "switch"
    RETIRE = "retire"


@dataclass(frozen=True)
class RotationPlan:
    """One CA rotation: old -> new (SHA-256 fingerprints of their certificates)."""

    old: str
    new: str
    created_at: float
    overlap: float
    svid_ttl: float
    clock_skew: float
    prepared_at: float | None = None  # the federation accepted the prepare bundle

    def prepared(self, now: float) -> RotationPlan:
        return self if self.prepared_at is not None else replace(self, prepared_at=now)

    def to_json(self) -> dict[str, Any]:
        return {"old": self.old, "new": self.new, "created_at": self.created_at,
                "overlap": self.overlap, "svid_ttl": self.svid_ttl,
                "clock_skew": self.clock_skew, "prepared_at": self.prepared_at}

    @classmethod
    def from_json(cls, obj: Any, where: str = "rotation plan") -> RotationPlan:
        """Validate a plan read from disk; InputError names the field."""
        if not isinstance(obj, dict):
            raise InputError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        unknown = sorted(set(obj) - set(cls.__dataclass_fields__))
        if unknown:
            raise InputError(f"{where}: unknown field {unknown[0]!r}")
        out: dict[str, Any] = {}
        for name in ("old", "new"):
            v = obj.get(name)
            if not isinstance(v, str) or not _FINGERPRINT.fullmatch(v):
                raise InputError(f"{where}: {name}: expected a SHA-256 fingerprint (64 lowercase "
                                 f"hex digits), got {str(v)[:80]!r}")
            out[name] = v
        if out["old"] == out["new"]:
            raise InputError(f"{where}: new: the same CA as old")
        for name, lo in (("created_at", 0.0), ("overlap", 1e-3), ("svid_ttl", 1e-3),
                         ("clock_skew", 0.0), ("prepared_at", 0.0)):
            v = obj.get(name)
            if name == "prepared_at" and v is None:
                out[name] = None
                continue
            hi = 2.0**40 if name.endswith("_at") else MAX_SECONDS
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v) \
                    or not lo <= v <= hi:
                raise InputError(f"{where}: {name}: expected a number of seconds in "
                                 f"{lo:g}..{hi:g}, got {str(v)[:80]!r}")
            out[name] = float(v)
        return cls(**out)


@dataclass(frozen=True)
class RotationState:
    phase: Phase
    signer: str  # fingerprint of the CA that issues SVIDs now
    trusted: tuple[str, ...]  # fingerprints in the bundle, old first
    switch_at: float | None  # None until the federation accepted the prepare bundle
    retire_at: float | None
    next_at: float | None  # when `decide` answers differently next (None: waits, or done)


def decide(plan: RotationPlan, now: float) -> RotationState:
    """Where `plan` stands at `now` (the table in the module docstring)."""
    both = (plan.old, plan.new)
    if plan.prepared_at is None:
        return RotationState(Phase.PREPARE, plan.old, both, None, None, None)
    switch_at = plan.prepared_at + plan.overlap
    retire_at = max(switch_at + plan.overlap, switch_at + plan.svid_ttl + plan.clock_skew)
    if now < switch_at:
        return RotationState(Phase.PREPARE, plan.old, both, switch_at, retire_at, switch_at)
    if now < retire_at:
        return RotationState(Phase.SWITCH, plan.new, both, switch_at, retire_at, retire_at)
    return RotationState(Phase.RETIRE, plan.new, (plan.new,), switch_at, retire_at, None)

