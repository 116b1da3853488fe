"""The `isthmus` command: arguments and dispatch. Only the isthmus package (this module, demo,
drill, status) prints for people; the gateway and the federation log.

Exit codes: 0 ok, 1 failure, 2 bad usage or bad config (argparse's own convention for usage);
`drill plan` also exits 3 when an import would be left with no healthy target. `gateway run`
stops on a PermanentError (gateway/errors.py) with its reason on one line: 2 for a ConfigError
(also found at start: federation.ca_file missing or not PEM, no join token), 1 otherwise (the
federation refused the join token: JoinRefused); what may pass by itself is retried, not exited.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys
from pathlib import Path

from federation.errors import InputError, IsthmusError
from federation.units import parse_duration, parse_hostport
from gateway.errors import ConfigError

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _hostport(text: str) -> tuple[str, int]:
    try:
        return parse_hostport(text)
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _setup_logging(level: str, tag: str = "") -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s {tag}%(name)s: %(message)s")


def _install_uvloop() -> None:
    import uvloop

    uvloop.install()


def _fix_wait_for() -> None:
    """Python 3.11's asyncio.wait_for loses a cancellation that arrives just as what it awaits
    completes (CPython gh-86296, fixed in 3.12): the task goes on as if never cancelled, and the
    TaskGroup stopping it waits forever, so a gateway told to stop or to hand over could hang
    (seen here: a probe loop). This process uses 3.12's wait_for, built on asyncio.timeout."""
    if sys.version_info >= (3, 12):
        return

    async def wait_for(aw, timeout):  # the 3.12 implementation, minus its deprecation shims
        if timeout is not None and timeout <= 0:
            fut = asyncio.ensure_future(aw)
            if fut.done():
                return fut.result()
            fut.cancel()
            try:
                await asyncio.wait({fut})
                return fut.result()
            except asyncio.CancelledError as exc:
                if asyncio.current_task().cancelling():
                    raise
                raise TimeoutError from exc
        async with asyncio.timeout(timeout):
            return await aw

    asyncio.wait_for = asyncio.tasks.wait_for = wait_for


# -- federation ----------------------------------------------------------------------------------
def cmd_federation_serve(args: argparse.Namespace) -> int:
    from federation.server.app import FederationServer
    from federation.store.base import open_store

    _setup_logging(args.log_level)
    _install_uvloop()
    _fix_wait_for()
    args.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    store = open_store(args.store or f"sqlite:{args.state_dir / 'federation.db'}")
    server = FederationServer(store, args.state_dir, args.listen, args.admin,
                              lease_ttl=args.lease_ttl, trust_domain=args.trust_domain,
                              forget_silent_after=args.forget_silent_after,
                              overlay_cidr=args.overlay_cidr)
    asyncio.run(server.run_forever())
    return EXIT_OK


# -- gateway ---------------------------------------------------------------------------------------
def cmd_gateway_run(args: argparse.Namespace) -> int:
    from gateway.config.schema import load_config
    from gateway.control.workers import MAX_WORKERS
    from gateway.runtime import Gateway

    cfg = load_config(args.config)
    if not 1 <= args.workers <= MAX_WORKERS:
        raise InputError(f"--workers: must be 1..{MAX_WORKERS}, got {args.workers}")
    if not 0 <= args.worker_index < args.workers:
        raise InputError(f"--worker-index: must be 0..{args.workers - 1}, got {args.worker_index}")
    if args.worker_index and args.primary_pid <= 1:
        raise InputError(
            "--worker-index needs --primary-pid (workers are started by their primary)"
        )
    if args.takeover and args.worker_index:
        raise InputError("--takeover is for the gateway you start, not for its workers")
    listen_fds = _listen_fds(args.listen_fds)
    _setup_logging(args.log_level, f"[worker {args.worker_index}] " if args.worker_index else "")
    if not args.worker_index:  # the primary speaks for its workers
        for w in cfg.warnings:
            logging.getLogger("isthmus.gateway.config").warning("%s", w.warning())
    _install_uvloop()
    _fix_wait_for()

    async def run() -> None:
        stop, drain = asyncio.Event(), asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGQUIT, drain.set)
        gateway = Gateway(cfg, workers=args.workers, worker=args.worker_index,
                          primary_pid=args.primary_pid, log_level=args.log_level,
                          takeover=args.takeover, listen_fds=listen_fds, ready_fd=args.ready_fd,
                          wait_serve=args.wait_serve)
        loop.add_signal_handler(signal.SIGHUP, gateway.reload_soon, "SIGHUP")
        await gateway.run(stop, drain)

    asyncio.run(run())
    return EXIT_OK


def _listen_fds(text: str | None) -> dict[str, int] | None:
    """--listen-fds (set by the primary for its workers): {"host:port": fd, ...}."""
    if text is None:
        return None
    try:
        obj = json.loads(text)
    except ValueError:
        obj = None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, int) and v >= 0
                                            for k, v in obj.items()):
        raise InputError(f"--listen-fds: expected a JSON object of address -> fd, "
                         f"got {text[:200]!r}")
    return obj


def cmd_config_validate(args: argparse.Namespace) -> int:
    from gateway.config.schema import load_config
    from gateway.dataplane.http.enforce import policy_book

    bad = 0
    for path in args.files:
        try:
            cfg = load_config(path)
            policy_book(cfg)  # the policies' JWKS files and OpenAPI specs must be usable too
        except ConfigError as e:
            bad += 1
            print(str(e), file=sys.stderr)
            for w in e.warnings:
                print(w.warning(), file=sys.stderr)
            continue
        for w in cfg.warnings:
            print(w.warning(), file=sys.stderr)
        warned = f", {len(cfg.warnings)} warning(s)" if cfg.warnings else ""
        print(f"{path}: ok (cluster {cfg.cluster.name}, {len(cfg.exports)} export(s), "
              f"{len(cfg.imports)} import(s){warned}"
              f"{f', {len(cfg.service_files)} service file(s)' if cfg.services_dir else ''})")
        for f in cfg.service_files:  # each service file's own part
            mine = [s for s in cfg.service_sources if s.file == f]
            exports = sum(s.section == "exports" for s in mine)
            shown = Path(path).parent / f.relative_to(cfg.source.parent) \
                if f.is_relative_to(cfg.source.parent) else f
            print(f"  {shown}: ok ({exports} export(s), {len(mine) - exports} import(s))")
    return EXIT_USAGE if bad else EXIT_OK


# -- status ----------------------------------------------------------------------------------------
def cmd_status(args: argparse.Namespace) -> int:
    from isthmus.status import fetch_status, render_status

    try:
        data = asyncio.run(fetch_status(args.admin))
    except IsthmusError as e:
        print(f"isthmus status: {e}", file=sys.stderr)
        return EXIT_FAIL
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        render_status(data)
    return EXIT_OK


# -- demo ------------------------------------------------------------------------------------------
def cmd_demo(args: argparse.Namespace) -> int:
    from isthmus.demo import run_demo

    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="isthmus", description="Isthmus: an east-west gateway between clusters."
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    fed = sub.add_parser("federation", help="the federation service, join tokens, clusters")
    fsub = fed.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    serve = fsub.add_parser(
        "serve",
        help="run the federation service",
        description="Run the federation service (HTTP/JSON over mutual TLS 1.3).",
    )
    serve.add_argument("--listen", type=_hostport, default=("127.0.0.1", 17443),
                       help="TLS API host:port (default 127.0.0.1:17443)")
    serve.add_argument("--admin", type=_hostport, default=("127.0.0.1", 17080),
                       help="plain-HTTP admin host:port for /healthz /readyz /metrics /status "
                            "and the dashboard /ui/ (token: STATE_DIR/operator/dashboard-token; "
                            "default 127.0.0.1:17080)")
    serve.add_argument(
        "--state-dir", type=Path, required=True, help="directory for the CA, keys and store"
    )
    serve.add_argument(
        "--store", default=None, help="sqlite:PATH (default sqlite:STATE_DIR/federation.db) or "
        "etcd://HOST:PORT[,HOST:PORT...][?cacert=CA.pem[&cert=CERT.pem&key=KEY.pem]] (TLS to "
        "etcd, with a client certificate when cert/key are given)"
    )
    serve.add_argument(
        "--lease-ttl",
        type=_duration,
        default=6.0,
        help="a cluster that stops renewing is withdrawn after this long (default 6s)",
    )
    serve.add_argument("--forget-silent-after", type=_duration, default=None, metavar="D",
                       help="remove a cluster (withdraw its trust from every peer) once it has "
                            "had no lease for this long, e.g. 168h (default: never; remove "
                            "clusters by hand with `federation cluster remove`)")
    serve.add_argument("--overlay-cidr", default=None, metavar="CIDR",
                       help="give each cluster that runs a WireGuard tunnel an address of this "
                            "network, e.g. 10.99.0.0/16, kept in its record (default: none; "
                            "such a cluster's join is refused)")
    serve.add_argument("--trust-domain", default="federation.isthmus.local")
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(func=cmd_federation_serve)

    fst = fsub.add_parser("status", help="the federation's store (SQLite, or etcd members), "
                          "replicas, revision, clusters and services (as `isthmus status`)")
    from isthmus.status import ADMIN_ENV, DEFAULT_ADMIN, default_admin

    fst.add_argument("--admin", default=default_admin(), metavar="URL",
                     help=f"the federation's admin address (default ${ADMIN_ENV}, else "
                          f"{DEFAULT_ADMIN})")
    fst.add_argument("--json", action="store_true", help="print JSON instead of tables")
    fst.set_defaults(func=cmd_status)

    from isthmus.federation_admin import add_cluster_parser, add_token_parser

    add_token_parser(fsub)
    add_cluster_parser(fsub)

    gw = sub.add_parser("gateway", help="run a gateway")
    gsub = gw.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    run = gsub.add_parser("run", help="run the gateway of one cluster",
                          description="Run one cluster's gateway from its YAML config. SIGTERM or "
                                      "SIGINT: stop now; SIGQUIT: stop accepting, drain open "
                                      "connections (limits.drain_timeout), exit 0; SIGHUP: "
                                      "reload the service files now (they also reload when "
                                      "they change: config field reload). Exit 2 if a "
                                      "listener's address cannot be bound or a gateway already "
                                      "runs on the state dir.")
    run.add_argument("--config", required=True, help="gateway config file (YAML)")
    run.add_argument("--workers", type=int, default=1, metavar="N",
                     help="processes sharing the listeners with SO_REUSEPORT, about one core "
                          "each (default 1); this one is the primary and starts, restarts and "
                          "stops the others")
    run.add_argument("--takeover", action="store_true",
                     help="replace the gateway already running on this state dir without "
                          "dropping a connection: take over its listening sockets, get ready, "
                          "then it drains (limits.drain_timeout) and exits; it keeps serving if "
                          "this process is not ready within limits.takeover_timeout (exit 1). "
                          "Starts normally if no gateway runs there")
    # set by the primary for its workers
    run.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    run.add_argument("--primary-pid", type=int, default=0, help=argparse.SUPPRESS)
    # set by the primary for its workers: their sockets, a pipe to say "ready", wait for SIGUSR1
    run.add_argument("--listen-fds", default=None, help=argparse.SUPPRESS)
    run.add_argument("--ready-fd", type=int, default=None, help=argparse.SUPPRESS)
    run.add_argument("--wait-serve", action="store_true", help=argparse.SUPPRESS)
    run.add_argument("--log-level", default="info")
    run.set_defaults(func=cmd_gateway_run)

    cfg = sub.add_parser("config", help="config files")
    csub = cfg.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)
    val = csub.add_parser("validate", help="check gateway config files; exit 2 if any is wrong")
    val.add_argument("files", nargs="+", metavar="FILE")
    val.set_defaults(func=cmd_config_validate)

    st = sub.add_parser("status", help="clusters, leases, services and endpoint health")
    from isthmus.status import ADMIN_ENV, DEFAULT_ADMIN, default_admin

    st.add_argument("--admin", default=default_admin(), metavar="URL",
                    help="the federation's admin address, http://host:port or host:port (its "
                         f"`serve --admin`; default ${ADMIN_ENV}, else {DEFAULT_ADMIN}); a "
                         "gateway's `listen.admin` shows that gateway: its imports and its "
                         "tunnel peers (handshakes, bytes)")
    st.add_argument("--json", action="store_true", help="print JSON instead of tables")
    st.set_defaults(func=cmd_status)

    from isthmus.drill import add_drill_parser
    from isthmus.identity_cli import add_identity_parser
    from isthmus.why import add_why_parser
    from isthmus.xds_cli import add_xds_parser

    add_why_parser(sub)
    add_drill_parser(sub)
    add_identity_parser(sub)
    add_xds_parser(sub)

    demo = sub.add_parser(
        "demo",
        help="clusters on this machine, traffic, failover, a drill, reports",
        description="Start a federation, four gateways (east-1, east-2 in us-east; "
        "west-1 in us-west; edge-1, consumer only, in eu-west) and echo "
        "backends on loopback; drive traffic from east-1; fail east-1's then "
        "east-2's backends; restore; report; then a blackhole drill of "
        "us-east with its report (and drill-report.html in the state dir).",
    )
    demo.add_argument("--state-dir", type=Path, default=None,
                      help="where configs, keys and logs go (default: a new temporary directory)")
    demo.add_argument("--keep-running", action="store_true",
                      help="leave everything up afterwards, with traffic into east-1 and edge-1 "
                           "(Ctrl-C to stop); try `isthmus status`, `isthmus why`, the dashboard")
    demo.add_argument(
        "--rate", type=int, default=40, help="new connections per second (default 40)"
    )
    demo.add_argument(
        "--phase", type=_duration, default=4.0, help="length of each phase (default 4s)"
    )
    demo.add_argument(
        "--port-offset",
        type=int,
        default=0,
        help="add this to every port (default 0: the ports of examples/three-clusters)",
    )
    demo.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as e:
        print(str(e), file=sys.stderr)
        return EXIT_USAGE
    except InputError as e:
        print(f"isthmus: {e}", file=sys.stderr)
        return EXIT_USAGE
    except IsthmusError as e:
        print(f"isthmus: {e}", file=sys.stderr)
        return EXIT_FAIL
    except OSError as e:
        print(f"isthmus: {e}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
