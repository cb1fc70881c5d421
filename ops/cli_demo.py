"""CLI verb: ``carepay demo`` — the whole business day on embedded defaults, nothing to install."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from ops.demo import (
    DEFAULT_CARDS,
    DEFAULT_DEMO_DIR,
    DEFAULT_SEED,
    DEFAULT_TERMINALS,
    DEFAULT_TXNS,
    DemoOptions,
    DemoResult,
    Stage,
    StageOutcome,
    run_demo,
    stages,
)

STATUS_STYLE = {"ok": "[green]✔ ok[/green]", "failed": "[red]✘ failed[/red]",
                "unavailable": "[yellow]… not available[/yellow]", "skipped": "[dim]– skipped[/dim]",
                "running": "[cyan]⠿ running[/cyan]", "pending": "[dim]pending[/dim]"}


class _Board:
    """The live progress board: one row per stage, the current one's latest message."""

    def __init__(self) -> None:
        self.rows: dict[str, list[str]] = {s.name: [s.title, "pending", "", ""] for s in stages()}
        self.current = ""

    def start(self, stage: Stage) -> None:
        self.current = stage.name
        self.rows[stage.name][1] = "running"

    def end(self, outcome: StageOutcome) -> None:
        row = self.rows[outcome.name]
        row[1] = outcome.status
        row[2] = f"{outcome.seconds:.1f}s" if outcome.status in ("ok", "failed") else ""
        row[3] = outcome.detail

    def message(self, text: str) -> None:
        if self.current:
            self.rows[self.current][3] = text

    def render(self) -> Table:
        table = Table(title="carepay demo", title_justify="left", show_edge=False, expand=True)
        table.add_column("stage", no_wrap=True)
        table.add_column("status", no_wrap=True)
        table.add_column("time", justify="right", no_wrap=True)
        table.add_column("what happened", overflow="ellipsis", no_wrap=True, ratio=1)
        for title, status, secs, detail in self.rows.values():
            table.add_row(title, STATUS_STYLE.get(status, status), secs, detail)
        return table


def _summary_table(result: DemoResult) -> Table:
    s = result.summary
    table = Table(title="summary", title_justify="left", show_header=False, show_edge=False)
    table.add_column("what", style="bold")
    table.add_column("value", overflow="fold")
    table.add_row("database", result.db)
    table.add_row("business date(s)", ", ".join(result.business_dates) or "-")
    for key, label in (("transactions", "transactions"), ("amounts", "amounts"), ("breaks", "breaks by class"),
                       ("error_cases", "error cases"), ("settlement", "provider settlement"),
                       ("faults", "faults injected")):
        if key in s:
            value = s[key]
            table.add_row(label, ", ".join(f"{k} {v}" for k, v in value.items()) if isinstance(value, dict)
                          else str(value))
    for name, path in result.reports.items():
        table.add_row(f"report {name}", path)
    checks = "all hold" if not result.invariant_violations else "; ".join(result.invariant_violations)
    table.add_row("invariants", checks)
    table.add_row("result", "[green]OK[/green]" if result.ok else "[red]FAILED[/red]")
    table.add_row("took", f"{result.seconds:.1f} s")
    return table


def demo(
    dir: Path = typer.Option(DEFAULT_DEMO_DIR, "--dir", help="Directory for the database, files, reports and logs."),
    cards: int = typer.Option(DEFAULT_CARDS, "--cards", help="Cards to issue."),
    terminals: int = typer.Option(DEFAULT_TERMINALS, "--terminals", help="Simulated terminals (one on a serial pty)."),
    txns: int = typer.Option(DEFAULT_TXNS, "--txns", help="Purchases in the day (voids, refunds and faults scale with it)."),
    seed: int = typer.Option(DEFAULT_SEED, "--seed", help="Seed: the same seed gives the same day."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document (db, business_dates, reports, summary)."),
) -> None:
    """Run the whole business day on embedded defaults (SQLite, embedded MQTT broker), nothing to install.

    Key ceremony, card issuance, a monthly recharge, a day of purchases with voids,
    refunds, a lost card, an offline period and a lost answer with its reversal, end
    of day, reconciliation against a bank file with injected breaks, error cases
    (maker and checker) and signed reports. Exit code 0 only when every stage ran
    and every invariant holds.

    Example:

      carepay demo --dir /tmp/carepay-demo --txns 500 --seed 7
    """
    options = DemoOptions(dir=dir, cards=cards, terminals=terminals, txns=txns, seed=seed)
    options.check()
    console = Console(stderr=True)
    board = _Board()
    if as_json or not console.is_terminal:
        # No live board when piped: one line per finished stage on stderr.
        def _end(o: StageOutcome) -> None:
            console.print(f"{o.title}: {o.status} ({o.seconds:.1f}s) {o.detail}", highlight=False, soft_wrap=True)

        result = asyncio.run(run_demo(options, on_stage_end=_end))
    else:
        with Live(board.render(), console=console, refresh_per_second=8, transient=False) as live:
            def _start(s: Stage) -> None:
                board.start(s)
                live.update(board.render())

            def _end(o: StageOutcome) -> None:
                board.end(o)
                live.update(board.render())

            def _msg(m: str) -> None:
                board.message(m)
                live.update(board.render())

            result = asyncio.run(run_demo(options, on_stage_start=_start, on_stage_end=_end, on_progress=_msg))
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2, ensure_ascii=False, default=str))
    else:
        out = Console()
        if not out.is_terminal:
            out = Console(width=140)
        out.print(_summary_table(result))
    raise typer.Exit(result.exit_code)


def register(app: typer.Typer) -> None:
    """Add ``demo`` to the top-level app."""
    app.command("demo")(demo)
