"""The rich printing of `isthmus drill`: the plan and report tables, the drill history, the HTML
page written to a file. Formatting only; `isthmus.drill` fetches and decides what to print."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from federation.model import Drill


def utc(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S")


def console(stderr: bool = False):
    """A rich Console; 140 columns when the output is not a terminal (pipes, logs, CI)."""
    from rich.console import Console

    con = Console(stderr=stderr, highlight=False)
    if not con.is_terminal:
        con = Console(stderr=stderr, highlight=False, width=max(con.width, 140))
    return con


def print_report(report: dict[str, Any], console) -> None:
    from rich.table import Table

    from isthmus.report_html import summary_rows

    t = Table(title="drill report", show_header=False)
    t.add_column("field", style="bold")
    t.add_column("value")
    for label, value in summary_rows(report):
        if label == "flapped" and value == "YES":
            value = "[red]YES[/]"
        elif label == "time to shift" and value == "never":
            value = "[red]never[/]"
        t.add_row(label, value)
    console.print(t)


def print_plan(plan: Any, console) -> None:
    from rich.table import Table

    kind, scope = plan.scope_kind, plan.scope
    t = Table(title=f"drill plan: {kind} {scope} lost (clusters "
                    f"{', '.join(plan.clusters_in_scope)}; "
                    f"affected services {', '.join(plan.services) or 'none'})")
    for col in ("cluster", "locality", "service", "today", f"with {scope} lost", ""):
        t.add_column(col)
    for r in plan.rows:
        note = ("[red]NO HEALTHY TARGET[/]" if r.no_target else
                "[yellow]shifts[/]" if r.changed else "unchanged")
        t.add_row(r.cluster, f"{r.region}/{r.zone}", r.service, str(r.today),
                  f"[red]{r.after}[/]" if r.no_target else str(r.after), note)
    console.print(t)
    if not plan.rows:
        console.print("no imports outside the scope: nothing to plan")


def print_drills(drills: list[Drill], console) -> None:
    """The drill history as a table, in the order given."""
    from rich.table import Table

    t = Table(title=f"drills ({len(drills)}, newest first)")
    for col in ("id", "scope", "mode", "state", "created (UTC)", "fault", "end reason"):
        t.add_column(col, no_wrap=col in ("id", "created (UTC)"))
    for d in drills:
        marked = {"running": "[yellow]running[/]", "aborted": "[red]aborted[/]"}
        state = marked.get(d.state, d.state)
        t.add_row(d.id, f"{d.scope_kind} {d.scope}", d.mode, state, utc(d.created_at),
                  f"{d.fault_stop - d.fault_start:g}s", d.end_reason or "-")
    console.print(t)


def write_html(report: dict[str, Any], path: Path) -> Path:
    from isthmus.report_html import render_report_html

    path = Path(path)
    path.write_text(render_report_html(report), encoding="utf-8")
    return path
