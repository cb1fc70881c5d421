"""CLI verbs for operators: ``carepay config show`` and ``carepay db backup|restore``."""

from __future__ import annotations

import json
import os
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from ops.backup import (
    BackupResult,
    backup_postgres,
    backup_sqlite,
    is_postgres,
    pg_dump_command,
    pg_restore_command,
    restore_postgres,
    restore_sqlite,
)
from ops.config import load_settings, redact_url
from ops.errors import BadInput

config_app = typer.Typer(help="Effective configuration.", no_args_is_help=True)
db_app = typer.Typer(help="Database backup and restore.", no_args_is_help=True)


@config_app.command("show")
def config_show(
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
    config: Path | None = typer.Option(None, "--config", help="TOML file to read (default $CAREPAY_CONFIG or ./carepay.toml)."),
) -> None:
    """Print the effective configuration (environment CAREPAY_…, TOML file, defaults) with secrets hidden.

    Example:

      CAREPAY_CLEARING__CUTOFF_LOCAL_TIME=22:30 carepay config show --json
    """
    previous = os.environ.get("CAREPAY_CONFIG")
    if config is not None:
        if not config.is_file():
            raise BadInput(f"configuration file not found: {config}")
        os.environ["CAREPAY_CONFIG"] = str(config)
    try:
        source = os.environ.get("CAREPAY_CONFIG", "carepay.toml")
        data = load_settings().public_dict()
    except ValueError as exc:  # pydantic ValidationError: one line
        first = str(exc).splitlines()
        raise BadInput(f"invalid configuration: {' '.join(first[:3])}") from None
    finally:
        if config is not None:
            if previous is None:
                os.environ.pop("CAREPAY_CONFIG", None)
            else:
                os.environ["CAREPAY_CONFIG"] = previous
    data["config_file"] = source if Path(source).is_file() else None
    if as_json:
        typer.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))
        return
    console = Console()
    _print_tree(console, data)


def _print_tree(console: Console, data: dict[str, object], prefix: str = "") -> None:
    for name, value in data.items():
        if isinstance(value, dict):
            _print_tree(console, value, f"{prefix}{name}.")
        else:
            console.print(f"[bold]{prefix}{name}[/bold] = {value}", highlight=False)


def _progress(console: Console, label: str) -> tuple[Progress, object]:
    progress = Progress(
        TextColumn(label), BarColumn(), TextColumn("{task.completed}/{task.total} pages"), TimeElapsedColumn(),
        console=console, transient=True,
    )
    return progress, progress.add_task(label, total=None)


def _print_result(result: BackupResult, as_json: bool, verb: str) -> None:
    if as_json:
        doc = dict(result.__dict__)
        doc["source"] = redact_url(doc["source"])
        doc["out"] = redact_url(doc["out"])
        typer.echo(json.dumps(doc, indent=2))
        return
    rows = sum(result.tables.values())
    typer.echo(
        f"{verb} {redact_url(result.source)} -> {redact_url(result.out)}: {result.bytes:,} bytes, "
        f"{result.pages} pages, {len(result.tables)} tables, {rows:,} rows, integrity {result.integrity}"
    )


def _db_url(db: str | None) -> str:
    return db or load_settings().resolved_db_url()


@db_app.command("backup")
def db_backup(
    out: Path = typer.Option(..., "--out", help="Backup file to write."),
    db: str | None = typer.Option(None, "--db", help="Database URL (default: the configured one)."),
    force: bool = typer.Option(False, "--force", help="Overwrite --out if it exists."),
    print_only: bool = typer.Option(False, "--print-command", help="PostgreSQL: print the pg_dump command only."),
    schema: str | None = typer.Option(None, "--schema", help="PostgreSQL: only this schema."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Back up the ledger database while it runs.

    SQLite: the online backup API, page by page, then an integrity check of the
    copy. PostgreSQL: pg_dump in custom format (restore with pg_restore).

    Example:

      carepay db backup --db sqlite+aiosqlite:///carepay-demo/carepay.db --out backup/carepay-20260301.db
    """
    url = _db_url(db)
    if is_postgres(url):
        if print_only:
            typer.echo(" ".join(pg_dump_command(url, out, schema)))
            return
        if out.exists() and not force:
            raise BadInput(f"{out} exists; choose another --out or pass --force")
        _print_result(backup_postgres(url, out, schema), as_json, "backed up")
        return
    console = Console(stderr=True)
    progress, task = _progress(console, "backup")
    with progress:
        result = backup_sqlite(
            url, out, lambda done, total: progress.update(task, completed=done, total=total), overwrite=force,
        )
    _print_result(result, as_json, "backed up")


@db_app.command("restore")
def db_restore(
    backup: Path = typer.Option(..., "--from", help="Backup file written by `carepay db backup`."),
    db: str | None = typer.Option(None, "--db", help="Database URL to restore into (default: the configured one)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing database."),
    print_only: bool = typer.Option(False, "--print-command", help="PostgreSQL: print the pg_restore command only."),
    schema: str | None = typer.Option(None, "--schema", help="PostgreSQL: only this schema."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document."),
) -> None:
    """Restore a backup into a database (the restore drill). Stop the clearing service first.

    Example:

      carepay db restore --from backup/carepay-20260301.db --db sqlite+aiosqlite:///restored.db
    """
    url = _db_url(db)
    if is_postgres(url):
        if print_only:
            typer.echo(" ".join(pg_restore_command(backup, url, schema)))
            return
        _print_result(restore_postgres(backup, url, schema), as_json, "restored")
        return
    console = Console(stderr=True)
    progress, task = _progress(console, "restore")
    with progress:
        result = restore_sqlite(
            backup, url, lambda done, total: progress.update(task, completed=done, total=total), force=force,
        )
    _print_result(result, as_json, "restored")


def register(app: typer.Typer) -> None:
    """Add ``config`` and ``db`` groups to the top-level app."""
    app.add_typer(config_app, name="config")
    app.add_typer(db_app, name="db")
