"""`isthmus drill plan | run | abort | list | show`: the operator's side of failover drills.

Everything here talks to the federation as the *operator* (the SVID `isthmus federation serve`
writes to `<state-dir>/operator/`); see docs/drills.md for the contract. The decisions are
elsewhere: `drill_plan.plan_drill` (pure) for plans, `federation.drill_report.compute_report`
(on the server) for reports, `report_html` for the HTML page. This module only fetches, waits,
prints (the tables through `drill_print`).

`drill run`, step by step:

1. `POST /v1/drills` with the scope, mode and options: the federation records the drill and
   the gateways in scope act the fault out from `fault_start` (after `--baseline`) until the
   deadline `fault_end`, restoring by themselves even if this process dies.
2. Live view: a progress bar to the deadline (then one through the settle window) and one line
   per finished second — probe attempts, success %, who served (by region), worst p99 — from
   `GET /v1/drills/{id}` polled every 0.5 s. A second's line is printed 2 s after it ends
   (the gateways PUT their sample for a second once it is over).
3. It waits until the observation window is over (`fault_stop + settle`, plus 1.5 s for the
   last samples), then prints the report (`GET /v1/drills/{id}/report`) as a table or JSON,
   and writes the HTML page with `--report FILE.html`.

Ctrl-C aborts the drill (reason "aborted: CLI interrupted"); the CLI then keeps observing the
settle window so the report measures failback — a second Ctrl-C stops waiting and prints the
report as it is. If the federation is unreachable mid-drill the CLI keeps polling (the gateways
do not need it to restore) and gives up 30 s after the window ended.

Exit codes: 0 ok (the drill ran and its report was printed), 1 failure (federation unreachable,
the drill's `--abort-on` SLO tripped, no report), 2 bad usage (including the federation's 400
answers, e.g. an unknown region), 3 `drill plan` found a service with no healthy target left.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from federation.drill_model import Drill, DrillMode
from federation.errors import FederationError, InputError, IsthmusError
from federation.units import parse_decimal, parse_duration
from isthmus.drill_print import console as _console
from isthmus.drill_print import print_drills, print_plan, print_report, write_html
from isthmus.drill_print import utc as _utc

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_PLAN_WARNING = 0, 1, 2, 3
DEFAULT_FEDERATION = "https://127.0.0.1:17443"
POLL_INTERVAL = 0.5
SAMPLE_LAG = 2.0  # print a second's line this long after it ended
TAIL_GRACE = 1.5  # after the observation window, wait this long for the last samples
UNREACHABLE_GIVE_UP = 30.0  # seconds after the window when an unreachable federation ends the wait


def default_credentials() -> Path:
    env = os.environ.get("ISTHMUS_CREDENTIALS")
    return Path(env) if env else Path("federation") / "operator"


# -- the client -------------------------------------------------------------------------------
def open_client(url: str, credentials: Path | None):
    """The operator's federation client (an async context manager)."""
    from federation.client import operator_client

    return operator_client(url, Path(credentials) if credentials is not None
                           else default_credentials())


def _as_drill(x: Any) -> Drill:
    if isinstance(x, Drill):
        return x
    if isinstance(x, dict) and "drill" in x and isinstance(x["drill"], dict):
        x = x["drill"]
    return Drill.from_json(x)


# -- pure helpers for the live view (tested without a federation) -----------------------------
@dataclass(frozen=True)
class SecondLine:
    second: int  # relative to fault_start
    attempts: int
    successes: int
    failures: int
    by_region: dict[str, int]
    p99_ms: float | None

    def text(self, in_scope_regions: set[str] | None = None) -> str:
        ok = f"{100.0 * self.successes / self.attempts:5.1f}%" if self.attempts else "    -"
        served = ", ".join(
            f"{r}{'*' if in_scope_regions and r in in_scope_regions else ''} {n}"
            for r, n in sorted(self.by_region.items(), key=lambda kv: -kv[1])
        ) or "-"
        p99 = "-" if self.p99_ms is None else f"{self.p99_ms:.1f} ms"
        return (f"t={self.second:+4d}s  attempts {self.attempts:4d}  ok {ok}  "
                f"failed {self.failures:3d}  p99 {p99:>9}  served: {served}")


def aggregate_seconds(drill: Drill, samples: list[dict[str, Any]]) -> dict[int, SecondLine]:
    """Per-second sums over observing clusters and services of the drill's samples (abs
    second ->)."""
    acc: dict[int, dict[str, Any]] = {}
    for s in samples:
        if not isinstance(s, dict) or not isinstance(s.get("second"), int):
            continue
        a = acc.setdefault(s["second"], {"attempts": 0, "successes": 0, "failures": 0,
                                         "regions": {}, "p99": None})
        for svc in (s.get("services") or {}).values():
            if not isinstance(svc, dict):
                continue
            a["attempts"] += int(svc.get("attempts") or 0)
            a["successes"] += int(svc.get("successes") or 0)
            a["failures"] += int(svc.get("failures") or 0)
            p99 = svc.get("latency_p99_ms")
            if isinstance(p99, int | float) and (a["p99"] is None or p99 > a["p99"]):
                a["p99"] = float(p99)
            for cluster, n in (svc.get("served") or {}).items():
                region = drill.regions.get(cluster, cluster)
                a["regions"][region] = a["regions"].get(region, 0) + int(n)
    start = int(drill.fault_start)
    return {
        sec: SecondLine(sec - start, a["attempts"], a["successes"], a["failures"], a["regions"],
                        a["p99"])
        for sec, a in sorted(acc.items())
    }


def in_scope_regions(drill: Drill) -> set[str]:
    return {drill.regions[c] for c in drill.clusters_in_scope if c in drill.regions}


def build_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The POST /v1/drills body from the command line (durations keep the user's spelling)."""
    scope = {"region": args.region} if args.region else {"cluster": args.cluster}
    spec: dict[str, Any] = {"scope": scope, "mode": args.mode, "duration": args.duration}
    if args.latency is not None:
        spec["latency"] = args.latency
    if args.error_rate is not None:
        spec["error_rate"] = args.error_rate
    if args.probe_rate is not None:
        spec["probe_rate"] = args.probe_rate
    if getattr(args, "baseline", None) is not None:
        spec["baseline"] = args.baseline
    if getattr(args, "settle", None) is not None:
        spec["settle"] = args.settle
    if args.abort_on is not None:
        spec["abort_on"] = args.abort_on
    return spec


# -- output ---------------------------------------------------------------------------------------
def _with_drill(report: dict[str, Any], drill: Drill) -> dict[str, Any]:
    if "drill" not in report:
        report = {**report, "drill": drill.to_json()}
    return report


# -- run ------------------------------------------------------------------------------------------
@dataclass
class RunResult:
    drill: Drill
    report: dict[str, Any] | None
    code: int
    message: str = ""


async def run_drill(
    client: Any,
    spec: dict[str, Any],
    console: Any,
    *,
    handle_sigint: bool = True,
    clock: Callable[[], float] = time.time,
) -> RunResult:
    """Create the drill, show the live view until its observation window is over, fetch the
    report. Raises FederationError when the federation refuses the drill (400/409) or cannot be
    reached to create it. `console` is a rich Console (the live view and notes go there)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    drill = _as_drill(await client.create_drill(spec))
    regions_hit = in_scope_regions(drill)
    console.print(
        f"drill [bold]{drill.id}[/]: {drill.mode} of {drill.scope_kind} {drill.scope} "
        f"(clusters {', '.join(drill.clusters_in_scope)}; "
        f"services {', '.join(drill.services) or '-'}); "
        f"fault {drill.fault_end - drill.fault_start:g}s from {_utc(drill.fault_start)} UTC, "
        f"deadline {_utc(drill.fault_end)} UTC",
        soft_wrap=True,
    )
    loop = asyncio.get_running_loop()
    interrupts = 0
    wake = asyncio.Event()

    def on_sigint() -> None:
        nonlocal interrupts
        interrupts += 1
        wake.set()

    installed = False
    if handle_sigint:
        try:
            loop.add_signal_handler(signal.SIGINT, on_sigint)
            installed = True
        except (NotImplementedError, RuntimeError, ValueError):
            pass

    printed_upto = int(drill.created_at) - 1
    samples: list[dict[str, Any]] = []
    aborted_sent = False
    unreachable_since: float | None = None
    message = ""
    progress = Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
        TimeRemainingColumn(), console=console, transient=True,
    )
    try:
        with progress:
            fault_task = progress.add_task(f"{drill.mode} {drill.scope}: to the deadline",
                                           total=drill.fault_end - drill.created_at)
            settle_task = progress.add_task("settle (failback)", total=max(drill.settle, 0.001))
            while True:
                now = clock()
                if interrupts and not aborted_sent:
                    aborted_sent = True
                    try:
                        drill = _as_drill(await client.abort_drill(drill.id,
                                                                   "aborted: CLI interrupted"))
                        progress.console.print(
                            f"[yellow]interrupted: drill aborted; the gateways restore now. "
                            f"Observing failback for {drill.settle:g}s (Ctrl-C again to stop "
                            f"waiting).[/]")
                    except FederationError as e:
                        progress.console.print(f"[red]interrupted, but the abort failed: {e}; the "
                                               f"gateways restore at the deadline "
                                               f"{_utc(drill.fault_end)} UTC[/]")
                if interrupts >= 2:
                    message = "stopped waiting (interrupted twice)"
                    break
                try:
                    fetched, samples = await client.get_drill(drill.id)
                    drill = _as_drill(fetched)
                    if unreachable_since is not None:
                        progress.console.print("[green]federation reachable again[/]")
                    unreachable_since = None
                except FederationError as e:
                    if e.status is not None:
                        raise
                    if unreachable_since is None:
                        unreachable_since = now
                        progress.console.print(f"[yellow]federation unreachable ({e}); the "
                                               "gateways do not need it to restore; retrying[/]")
                window_end = drill.fault_stop + drill.settle
                progress.update(fault_task, completed=min(now, drill.fault_stop) - drill.created_at)
                progress.update(settle_task,
                                completed=max(0.0, min(now, window_end) - drill.fault_stop))
                lines = aggregate_seconds(drill, samples)
                done = now >= window_end + TAIL_GRACE
                for sec in sorted(lines):
                    if sec > printed_upto and (done or sec + 1 + SAMPLE_LAG <= now):
                        progress.console.print(lines[sec].text(regions_hit), soft_wrap=True)
                        printed_upto = sec
                if done:
                    break
                if unreachable_since is not None and now > window_end + UNREACHABLE_GIVE_UP:
                    message = f"federation unreachable since {_utc(unreachable_since)} UTC"
                    break
                wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), POLL_INTERVAL)
    finally:
        if installed:
            loop.remove_signal_handler(signal.SIGINT)
    try:
        report = await client.drill_report(drill.id)
    except FederationError as e:
        return RunResult(drill, None, EXIT_FAIL,
                         f"{message + '; ' if message else ''}no report: {e}")
    report = _with_drill(report, drill)
    code = EXIT_OK
    reason = report.get("end_reason") or drill.end_reason or ""
    if "SLO" in reason or "slo" in reason:
        code = EXIT_FAIL
        message = f"the drill's SLO tripped: {reason}"
    return RunResult(drill, report, code, message)


# -- commands -------------------------------------------------------------------------------------
def _run(coro) -> Any:
    return asyncio.run(coro)


def _fail(prefix: str, e: Exception) -> int:
    status = getattr(e, "status", None)
    print(f"isthmus {prefix}: {e}", file=sys.stderr)
    if isinstance(e, FederationError) and status == 400:
        return EXIT_USAGE
    return EXIT_FAIL


def cmd_plan(args: argparse.Namespace) -> int:
    from gateway.core.drill_plan import plan_drill

    async def go():
        async with open_client(args.federation, args.credentials) as client:
            return await client.catalog()

    try:
        catalog = _run(go())
        kind, scope = ("region", args.region) if args.region else ("cluster", args.cluster)
        plan = plan_drill(catalog, kind, scope)
    except InputError as e:
        print(f"isthmus drill plan: {e}", file=sys.stderr)
        return EXIT_USAGE
    except IsthmusError as e:
        return _fail("drill plan", e)
    if args.json:
        print(json.dumps(plan.to_json(), indent=2))
    else:
        print_plan(plan, _console())
    if plan.no_target:
        print(f"isthmus drill plan: WARNING: with {kind} {scope} lost these imports have no "
              f"healthy target: {'; '.join(plan.no_target)}", file=sys.stderr)
        return EXIT_PLAN_WARNING
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    spec = build_spec(args)
    out = _console(stderr=args.json)

    async def go() -> RunResult:
        async with open_client(args.federation, args.credentials) as client:
            return await run_drill(client, spec, out)

    try:
        result = _run(go())
    except IsthmusError as e:
        return _fail("drill run", e)
    if result.report is None:
        print(f"isthmus drill run: drill {result.drill.id}: {result.message} "
              f"(try later: isthmus drill show {result.drill.id})", file=sys.stderr)
        return result.code
    if args.json:
        print(json.dumps(result.report, indent=2))
    else:
        print_report(result.report, out)
    if args.report:
        path = write_html(result.report, args.report)
        out.print(f"HTML report written to {path}")
    if result.message:
        print(f"isthmus drill run: {result.message}", file=sys.stderr)
    return result.code


def cmd_abort(args: argparse.Namespace) -> int:
    async def go():
        async with open_client(args.federation, args.credentials) as client:
            return _as_drill(await client.abort_drill(args.id, args.reason))

    try:
        drill = _run(go())
    except IsthmusError as e:
        return _fail("drill abort", e)
    print(f"drill {drill.id}: {drill.state} ({drill.end_reason or '-'}); "
          "the gateways in scope restore now")
    return EXIT_OK


def cmd_list(args: argparse.Namespace) -> int:
    async def go():
        async with open_client(args.federation, args.credentials) as client:
            return [_as_drill(d) for d in await client.list_drills()]

    try:
        drills = sorted(_run(go()), key=lambda d: d.created_at, reverse=True)
    except IsthmusError as e:
        return _fail("drill list", e)
    if args.json:
        print(json.dumps({"drills": [d.to_json() for d in drills]}, indent=2))
        return EXIT_OK
    print_drills(drills, _console())
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    async def go():
        async with open_client(args.federation, args.credentials) as client:
            fetched, _ = await client.get_drill(args.id)
            return _as_drill(fetched), await client.drill_report(args.id)

    try:
        drill, report = _run(go())
    except IsthmusError as e:
        return _fail("drill show", e)
    report = _with_drill(report, drill)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_report(report, _console())
    if args.report:
        path = write_html(report, args.report)
        print(f"HTML report written to {path}", file=sys.stderr if args.json else sys.stdout)
    return EXIT_OK


# -- argparse ------------------------------------------------------------------------------------
def _duration_text(text: str) -> str:
    """Validate a duration but keep the user's spelling (it goes to the federation as is)."""
    try:
        parse_duration(text)
    except InputError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _ratio(text: str) -> float:
    try:
        v = parse_decimal(text.removesuffix("%"), "ratio") / (100 if text.endswith("%") else 1)
    except InputError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number like 0.3 or 30%") from None
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not in 0..1")
    return v


def _rate(text: str) -> float:
    try:
        v = parse_decimal(text, "rate")
    except InputError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of probes per second") from None
    if not 0 < v <= 1000:
        raise argparse.ArgumentTypeError(f"{text!r} is not in (0, 1000] probes per second")
    return v


def add_operator_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--federation", default=DEFAULT_FEDERATION, metavar="URL",
                   help=f"the federation's API URL (default {DEFAULT_FEDERATION})")
    p.add_argument("--credentials", type=Path, default=None, metavar="DIR",
                   help="operator credentials: svid.pem, svid-key.pem, ca.pem "
                        "(default $ISTHMUS_CREDENTIALS, else ./federation/operator)")


def _scope(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--region", help="fail every cluster of this region")
    g.add_argument("--cluster", help="fail this one cluster")


def add_drill_parser(sub: Any) -> None:
    """Add `drill` and its subcommands to the `isthmus` parser's subparsers."""
    drill = sub.add_parser("drill", help="failover drills: plan, run, abort, list, show",
                           description="Planned, bounded, reversible faults of a region or "
                                       "cluster, with a measured report. Exit codes: 0 ok, 1 "
                                       "failure, 2 bad usage, 3 plan warning (a service would "
                                       "have no healthy target).")
    dsub = drill.add_subparsers(dest="subcommand", metavar="SUBCOMMAND", required=True)

    plan = dsub.add_parser("plan",
                           help="dry run: where each import's traffic would go with the scope lost",
                           description="Compute from the live catalog and import policies where "
                                       "every import outside the scope sends traffic today and "
                                       "would with the scope lost. No traffic is touched. Exit 3 "
                                       "when some import would have no healthy target.")
    _scope(plan)
    plan.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_operator_args(plan)
    plan.set_defaults(func=cmd_plan)

    run = dsub.add_parser("run", help="run a drill, watch it live, print its report",
                          description="Create a drill, show a live view until its observation "
                                      "window ends, then print the report. Ctrl-C aborts the "
                                      "drill (the report is still printed). The gateways restore "
                                      "at the deadline by themselves even if this command dies.")
    _scope(run)
    run.add_argument("--mode", required=True, choices=[m.value for m in DrillMode],
                     help="drain: withdraw exports, refuse new streams politely; blackhole: "
                          "stop answering at all; degrade: add latency and/or refuse a fraction "
                          "of streams")
    run.add_argument("--duration", required=True, type=_duration_text,
                     help="how long the fault lasts, 1s..1h (e.g. 30s): the deadline")
    run.add_argument("--latency", type=_duration_text, default=None,
                     help="degrade: added latency (e.g. 200ms)")
    run.add_argument("--error-rate", type=_ratio, default=None,
                     help="degrade: fraction of streams refused (0.3 or 30%%)")
    run.add_argument("--probe-rate", type=_rate, default=None,
                     help="synthetic probes per second per affected service per observing cluster "
                          "(default 20)")
    run.add_argument("--abort-on", default=None, metavar="SLO",
                     help="abort when the SLO trips, e.g. 'success<99%%:5s' or 'p99>500:3s'")
    run.add_argument("--baseline", type=_duration_text, default=None,
                     help="probes before the fault starts (default 2s)")
    run.add_argument("--settle", type=_duration_text, default=None,
                     help="probes after the fault stops, to measure failback (default 5s)")
    run.add_argument("--json", action="store_true",
                     help="print the report as JSON (live view on stderr)")
    run.add_argument("--report", type=Path, default=None, metavar="FILE.html",
                     help="also write the report as a self-contained HTML page")
    add_operator_args(run)
    run.set_defaults(func=cmd_run)

    abort = dsub.add_parser("abort", help="abort a running drill (the gateways restore now)")
    abort.add_argument("id", help="drill id, d-YYYYMMDD-HHMMSS-xxxx")
    abort.add_argument("--reason", default="aborted by operator", help="recorded as the end reason")
    add_operator_args(abort)
    abort.set_defaults(func=cmd_abort)

    ls = dsub.add_parser("list", help="drill history, newest first")
    ls.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_operator_args(ls)
    ls.set_defaults(func=cmd_list)

    show = dsub.add_parser("show", help="one drill's report")
    show.add_argument("id", help="drill id, d-YYYYMMDD-HHMMSS-xxxx")
    show.add_argument("--json", action="store_true", help="print the report as JSON")
    show.add_argument("--report", type=Path, default=None, metavar="FILE.html",
                      help="also write the report as a self-contained HTML page")
    add_operator_args(show)
    show.set_defaults(func=cmd_show)

