"""`isthmus identity`: rotate a cluster's CA with overlap, and show where a rotation stands.

- `rotate-ca --config FILE [--overlap D] [--clock-skew D]` writes a new CA (`ca-next.pem`,
  key 0600) and then the plan (`rotation.json`) into the gateway's state dir
  (gateway/control/identity.py `plan_rotation`). The running gateway follows the plan within a
  second, a stopped one when it starts: prepare (both CAs trusted, the old one signs), switch
  (the new one signs), retire (the old one leaves the bundle and is archived); the timings are
  gateway/core/ca_rotation.py's. Refused (exit 2) when `identity.ca_cert_file` is set: that CA
  is the operator's, rotated by hand with two certificates in the file (the message says how).
- `status --config FILE [--json]`: the phase, every CA (fingerprint, expiry, role), the bundle
  sequence and the next step, read from the state dir.

Neither talks to the gateway or the federation; both run as the user owning the state dir.
Exit codes as everywhere: 0 ok, 1 failure (state dir not ready, a rotation already under way),
2 bad usage or config.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import UTC, datetime
from typing import Any

from federation.identity import CLOCK_SKEW

EXIT_OK = 0


def _duration(text: str) -> float:
    from federation.errors import InputError
    from federation.units import parse_duration

    try:
        return parse_duration(text)
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _span(seconds: float) -> str:
    """4s, 1m7s, 1h, 24h1m: whole seconds, the two largest units."""
    n = max(0, round(seconds))
    parts = [(n // 86400 * 24 + n % 86400 // 3600, "h"), (n % 3600 // 60, "m"), (n % 60, "s")]
    shown = [f"{v}{u}" for v, u in parts if v]
    return "".join(shown[:2]) or "0s"


def _when(t: float | None, now: float) -> str:
    if t is None:
        return "-"
    at = datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")
    left = t - now
    return f"{at} (in {_span(left)})" if left > 0 else f"{at} (due)"


def cmd_rotate_ca(args: argparse.Namespace) -> int:
    from gateway.config.schema import load_config
    from gateway.control.identity import PLAN_FILE, plan_rotation

    cfg = load_config(args.config)
    now = time.time()
    plan, old = plan_rotation(cfg, now, args.overlap, args.clock_skew)
    retire_after = max(plan.overlap, plan.svid_ttl + plan.clock_skew)
    path = cfg.state_dir / "identity" / PLAN_FILE
    print(f"CA rotation of {cfg.cluster.trust_domain} planned ({path}):\n"
          f"  old CA  {plan.old}\n"
          f"  new CA  {plan.new}\n"
          "  prepare  now: the gateway publishes a bundle with both CAs (within a second if it "
          "runs, else when it starts); the old CA signs\n"
          f"  switch   {_span(plan.overlap)} after the federation accepted that "
          "bundle: the new CA signs, the SVID is reissued\n"
          f"  retire   {_span(retire_after)} after the switch (every SVID of the old "
          "CA has expired): the bundle holds the new CA only; the old one is archived\n"
          f"Follow it with `isthmus identity status --config {args.config}`.")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from gateway.config.schema import load_config
    from gateway.control.identity import describe_state

    cfg = load_config(args.config)
    now = time.time()
    data = describe_state(cfg, now)
    if args.json:
        print(json.dumps(data, indent=2))
        return EXIT_OK
    print(render_status(data, now))
    return EXIT_OK


def render_status(d: dict[str, Any], now: float) -> str:
    src = "state dir" if d["ca_source"] == "state_dir" else d["ca_source"]
    seq = d["bundle_sequence"]
    lines = [f"trust domain  {d['trust_domain']} (CA from {src})",
             f"bundle        sequence {seq if seq is not None else '-'}, refresh hint "
             f"{_span(d['refresh_hint'])}"]
    phase = d["phase"]
    if phase is None:
        lines.append("rotation      none")
    else:
        plan = d["plan"]
        if d["switch_at"] is None:
            step = ("switch: waiting for the federation to accept the bundle with both CAs, "
                    f"then {_span(plan['overlap'])}")
        elif phase == "prepare":
            step = f"switch at {_when(d['switch_at'], now)}"
        elif phase == "switch":
            step = f"retire at {_when(d['retire_at'], now)}"
        else:
            step = "retire: due (the gateway finishes it within a second when it runs)"
        lines.append(f"rotation      {phase}; next: {step}")
    lines.append("authorities:")
    lines.append(f"  {'FINGERPRINT (SHA-256)':<66} {'ROLE':<5} {'SIGNS':<6} {'TRUSTED':<8} "
                 "NOT AFTER")
    for a in d["authorities"]:
        expiry = datetime.fromtimestamp(a["not_after"], UTC).isoformat(timespec="seconds")
        lines.append(f"  {a['fingerprint']:<66} {a['role'] or '-':<5} "
                     f"{'yes' if a['signs'] else 'no':<6} {'yes' if a['trusted'] else 'no':<8} "
                     f"{expiry}")
    return "\n".join(lines)


def add_identity_parser(sub: Any) -> None:
    """Add `identity` and its subcommands to the `isthmus` parser's subparsers."""
    ident = sub.add_parser("identity", help="the cluster CA: rotate it with overlap, status",
                           description="The cluster's CA in a gateway's state dir. Exit codes: "
                                       "0 ok, 1 failure, 2 bad usage or config.")
    isub = ident.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    rot = isub.add_parser(
        "rotate-ca", help="replace the state dir's CA with a new one, with overlap",
        description="Write a new CA and a rotation plan into the gateway's state dir. The "
                    "gateway (running, or when it starts) publishes a bundle trusting both CAs, "
                    "switches signing to the new one OVERLAP after the federation accepted it, "
                    "and drops the old one from its bundle once every SVID it issued expired "
                    "(at least OVERLAP later). Refused if identity.ca_cert_file is set.")
    rot.add_argument("--config", required=True, help="the gateway's config file (YAML)")
    rot.add_argument("--overlap", type=_duration, default=None, metavar="D",
                     help="how long each change is given to reach every peer (default "
                          "identity.rotation_overlap); at least 3 x "
                          "identity.bundle_refresh_hint")
    rot.add_argument("--clock-skew", type=_duration, default=CLOCK_SKEW, metavar="D",
                     help="the old CA stays trusted this long after its last SVID expired "
                          f"(clocks of clusters may disagree; default {CLOCK_SKEW:g}s)")
    rot.set_defaults(func=cmd_rotate_ca)
    st = isub.add_parser("status", help="the CAs, the bundle sequence and a rotation's phase",
                         description="Read the gateway's state dir: its CAs (fingerprint, "
                                     "expiry, which signs, which are trusted), the bundle "
                                     "sequence, a rotation's phase and its next step.")
    st.add_argument("--config", required=True, help="the gateway's config file (YAML)")
    st.add_argument("--json", action="store_true", help="print JSON instead of text")
    st.set_defaults(func=cmd_status)
