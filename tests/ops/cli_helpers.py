"""Run ``carepay`` verbs in-process the way the console script does (CarepayError → its exit code)."""

from __future__ import annotations

from dataclasses import dataclass

from typer.testing import CliRunner

from ops.cli import app
from ops.errors import CarepayError

_runner = CliRunner()


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    output: str


def invoke(*args: str) -> CliResult:
    result = _runner.invoke(app, list(args))
    code = result.exit_code
    output = result.output
    if isinstance(result.exception, CarepayError):
        code = result.exception.exit_code
        output += f"carepay: error: {result.exception}\n"
    elif result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return CliResult(code, result.stdout, output)
