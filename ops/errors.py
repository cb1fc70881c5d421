"""Errors the CLI turns into one line on stderr and an exit code (2 = bad input, 1 = failure)."""

from __future__ import annotations


class CarepayError(Exception):
    """A failure a user can act on. ``exit_code`` 1; subclasses for bad input use 2."""

    exit_code = 1


class BadInput(CarepayError):
    """The user's input (an option, a file, a line) is wrong."""

    exit_code = 2
