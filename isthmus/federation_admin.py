"""`isthmus federation token create | list | revoke` and `isthmus federation cluster list |
remove`: the operator's hands on membership.

Tokens are read and written in the federation's store directly (the state dir of `isthmus
federation serve`, or its `--store`), as the server does: a token is a row, nothing more. A state
dir that is not a federation's (a typo) is refused, never silently made into a new empty store
whose tokens could never join anything. Clusters are removed through the API, as the operator
(the credentials the federation writes to `<state-dir>/operator/`), because the running server
must forget the cluster's trust at once.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from federation.errors import FederationError, InputError
from federation.units import format_duration, parse_duration

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2
DB_FILE = "federation.db"


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def open_federation_store(state_dir: Path, store_url: str | None):
    """The federation's store; InputError if `state_dir` is not a federation's state dir."""
    from federation.ca import CertificateAuthority
    from federation.store.base import open_store

    if store_url is None:
        db = state_dir / DB_FILE
        missing = [p.name for p in (db, state_dir / CertificateAuthority.CERT_FILE)
                   if not p.is_file()]
        if missing:
            raise InputError(
                f"--state-dir {state_dir}: not a federation's state dir (no "
                f"{' and no '.join(missing)}); give the --state-dir of `isthmus federation "
                "serve` (it makes them at its first start), or --store")
        store_url = f"sqlite:{db}"
    return open_store(store_url)


def _with_store(args: argparse.Namespace, job):
    store = open_federation_store(args.state_dir, args.store)

    async def go():
        await store.open()
        try:
            return await job(store)
        finally:
            await store.close()

    return asyncio.run(go())


async def _joined(store, cluster: str) -> bool:
    from federation.model import CLUSTERS

    return await store.get(CLUSTERS + cluster) is not None


def cmd_token_create(args: argparse.Namespace) -> int:
    from federation.fields import check_name
    from federation.server.tokens import check_ttl, create_token

    check_name(args.cluster, "--cluster")
    check_ttl(args.ttl)

    async def job(store):
        exists = await _joined(store, args.cluster)
        token, revoked = await create_token(store, args.cluster, args.ttl, time.time(),
                                            replace=args.replace)
        return token, revoked, exists

    token, revoked, exists = _with_store(args, job)
    say = lambda msg: print(msg, file=sys.stderr)  # noqa: E731
    for t in revoked:
        say(f"revoked the earlier unused token {t.id} of {args.cluster} (one live token per "
            "cluster)")
    if args.replace:
        say(f"WARNING: this token lets whoever holds it take over cluster {args.cluster} with a "
            "new identity (CA, trust domain); its current gateway will no longer be trusted. "
            "Hand it only to the new gateway.")
    elif exists:
        say(f"note: cluster {args.cluster} is already joined: this token re-joins it only for a "
            f"gateway that proves it is {args.cluster} (its current SVID); to give the cluster "
            "a new identity use --replace, or `isthmus federation cluster remove` first")
    if args.output:
        from federation.files import write_atomic

        write_atomic(args.output, (token + "\n").encode())
        say(f"join token for {args.cluster} written to {args.output} (single use, expires in "
            f"{format_duration(args.ttl)})")
    else:
        print(token)
    return EXIT_OK


def cmd_token_list(args: argparse.Namespace) -> int:
    from federation.server.tokens import list_tokens

    tokens = _with_store(args, list_tokens)
    now = time.time()
    if args.json:
        print(json.dumps([t.to_json(now) for t in tokens], indent=2))
        return EXIT_OK
    if not tokens:
        print("no join tokens")
        return EXIT_OK
    rows = [("ID", "CLUSTER", "EXPIRES", "KIND")]
    for t in tokens:
        left = t.expires_at - now
        rows.append((t.id, t.cluster, "expired" if left <= 0 else f"in {_coarse(left)}",
                     "replace" if t.replace else "join"))
    _print_rows(rows)
    return EXIT_OK


def cmd_token_revoke(args: argparse.Namespace) -> int:
    from federation.server.tokens import revoke_tokens

    if (args.id is None) == (args.cluster is None):
        raise InputError("token revoke: give a token ID (from `token list`) or --cluster NAME")

    async def job(store):
        return await revoke_tokens(store, cluster=args.cluster, token_id=args.id)

    gone = _with_store(args, job)
    if not gone:
        print(f"no tokens for cluster {args.cluster}", file=sys.stderr)
        return EXIT_FAIL
    for t in gone:
        print(f"revoked token {t.id} of {t.cluster}")
    return EXIT_OK


def _client(args: argparse.Namespace):
    from isthmus.drill import open_client

    return open_client(args.federation, args.credentials)


def cmd_cluster_list(args: argparse.Namespace) -> int:
    async def go() -> Any:
        async with _client(args) as c:
            return await c.catalog()

    try:
        cat = asyncio.run(go())
    except FederationError as e:
        print(f"isthmus federation cluster list: {e}", file=sys.stderr)
        return EXIT_FAIL
    rows = [("CLUSTER", "REGION/ZONE", "TRUST DOMAIN", "BUNDLE", "GATEWAY", "LIVE")]
    for name, rec in sorted(cat.clusters.items()):
        bundle = cat.bundles.get(rec.trust_domain) or {}
        seq = bundle.get("spiffe_sequence", "-")
        keys = len(bundle.get("keys", ()))
        rows.append((name, f"{rec.region}/{rec.zone}", rec.trust_domain,
                     f"seq {seq}, {keys} CA(s)", rec.gateway_address,
                     "yes" if name in cat.live else "no"))
    if args.json:
        print(json.dumps([dict(zip(rows[0], r, strict=True)) for r in rows[1:]], indent=2))
    else:
        _print_rows(rows)
    return EXIT_OK


def cmd_cluster_remove(args: argparse.Namespace) -> int:
    from federation.fields import check_name

    check_name(args.name, "cluster")
    if not args.yes:
        raise InputError(f"cluster remove {args.name}: this withdraws the cluster's trust from "
                         "every peer at once; add --yes to do it")

    async def go() -> Any:
        async with _client(args) as c:
            return await c.remove_cluster(args.name)

    try:
        out = asyncio.run(go())
    except FederationError as e:
        print(f"isthmus federation cluster remove: {e}", file=sys.stderr)
        return EXIT_FAIL
    print(f"removed cluster {out['removed']} (trust domain {out['trust_domain']}): "
          f"{out['deleted_keys']} stored keys and {out['revoked_tokens']} token(s) deleted; "
          "peers drop its links and refuse it from now on")
    return EXIT_OK


def _coarse(seconds: float) -> str:
    """59m, 6h 59m, 45s: how long, for people."""
    s = int(seconds)
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m"
    return f"{s // 3600}h {s % 3600 // 60}m"


def _print_rows(rows: list[tuple]) -> None:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


def _store_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", type=Path, default=Path("."),
                   help="the federation's state dir (of `isthmus federation serve`; default .)")
    p.add_argument("--store", default=None,
                   help="sqlite:PATH (default sqlite:STATE_DIR/federation.db) or "
                        "etcd://HOST:PORT[,HOST:PORT...], as `federation serve --store`")


def add_token_parser(fsub: Any) -> None:
    from federation.server.tokens import MAX_TOKEN_TTL

    tok = fsub.add_parser("token", help="join tokens: create, list, revoke")
    tsub = tok.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = tsub.add_parser(
        "create", help="print a single-use, expiring join token for one cluster",
        description="A single-use join token for one cluster (it replaces the cluster's earlier "
        "unused tokens). It joins a new cluster; an existing cluster only re-joins with it if "
        "the gateway proves it is that cluster (its current SVID), unless --replace.")
    create.add_argument("--cluster", required=True, help="the cluster the token may join as")
    create.add_argument("--ttl", type=_duration, default=900.0,
                        help=f"token lifetime (default 15m, at most "
                             f"{format_duration(MAX_TOKEN_TTL)})")
    create.add_argument("--replace", action="store_true",
                        help="let the holder take over an EXISTING cluster with a new identity "
                             "(new CA or trust domain): an operator's explicit takeover, logged")
    _store_args(create)
    create.add_argument("--output", "-o",
                        help="write the token to this file (0600) instead of stdout")
    create.set_defaults(func=cmd_token_create)

    lst = tsub.add_parser("list", help="the tokens not used yet (ids, never the tokens)")
    _store_args(lst)
    lst.add_argument("--json", action="store_true", help="print JSON")
    lst.set_defaults(func=cmd_token_list)

    rev = tsub.add_parser("revoke", help="delete a token by id, or every token of a cluster")
    rev.add_argument("id", nargs="?", default=None, help="a token id (or unique prefix)")
    rev.add_argument("--cluster", default=None, help="revoke every token of this cluster")
    _store_args(rev)
    rev.set_defaults(func=cmd_token_revoke)


def add_cluster_parser(fsub: Any) -> None:
    from isthmus.drill import add_operator_args

    cl = fsub.add_parser("cluster", help="joined clusters: list, remove (operator)")
    csub = cl.add_subparsers(dest="action", metavar="ACTION", required=True)

    lst = csub.add_parser("list", help="every joined cluster, its bundle and liveness")
    add_operator_args(lst)
    lst.add_argument("--json", action="store_true", help="print JSON")
    lst.set_defaults(func=cmd_cluster_list)

    rm = csub.add_parser(
        "remove", help="remove a cluster: its trust is withdrawn from every peer at once",
        description="Remove a cluster from the federation: its record, bundle, liveness, "
        "exports, imports and tokens are deleted; peers drop its links and refuse it. A copy "
        "of its state dir can then open nothing. It can join again with a new token.")
    rm.add_argument("name", help="the cluster to remove")
    rm.add_argument("--yes", action="store_true", help="really remove it")
    add_operator_args(rm)
    rm.set_defaults(func=cmd_cluster_remove)
