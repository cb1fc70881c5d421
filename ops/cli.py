"""The ``carepay`` command: one entry point, verbs grouped by who uses them.

Each group lives in its own ``ops/cli_*.py`` module exposing ``register(app)``.
Errors surface as one line on stderr with a non-zero exit, never a traceback.
"""

from __future__ import annotations

import importlib
import sys

import typer

app = typer.Typer(
    name="carepay",
    help="Payment terminal and voucher clearing engine for the elderly and disability care card program.\n\n"
    "Examples:\n\n  carepay demo\n\n  carepay keys kcv --suite sm4 0123456789ABCDEFFEDCBA9876543210",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

class _Stderr:
    """Writes to whatever ``sys.stderr`` is at the moment of writing (test runners swap it per invocation)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def setup_logging() -> None:
    """Route every log line through ops.logging (masking processor) to stderr, from the effective settings.

    stdout stays for results (``--json`` output is never interleaved with log lines). A settings file or
    environment that does not validate falls back to the defaults here; the verb reports it when it loads them.
    """
    from ops.logging import configure_logging

    try:
        from ops.config import load_settings

        settings = load_settings()
        json_logs, level = settings.log_json, settings.log_level
    except Exception:
        json_logs, level = False, "INFO"
    configure_logging(json=json_logs, level=level, stream=_Stderr())  # type: ignore[arg-type]


@app.callback()
def _startup() -> None:
    """Runs once before any verb (not for ``--help``)."""
    setup_logging()


# One module per group of verbs; each registers its own commands.
COMMAND_MODULES = (
    "ops.cli_demo",
    "ops.cli_keys",
    "ops.cli_sim",
    "ops.cli_terminal",
    "ops.cli_clearing",
    "ops.cli_eod",
    "ops.cli_ops",
    "ops.cli_serve",
)

for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(app)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: run the app, turn known errors into one line and an exit code."""
    from ops.errors import CarepayError

    try:
        app(args=argv, standalone_mode=True)
    except SystemExit as exc:
        return int(exc.code or 0) if not isinstance(exc.code, str) else 1
    except CarepayError as exc:
        print(f"carepay: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("carepay: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the last line of defence: one line, never a traceback
        print(f"carepay: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
