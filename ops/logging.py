"""Structured logs (结构化日志) for every carepay process, with personal data masked and secrets removed.

One call, :func:`configure_logging`, sets up structlog and routes the standard
library's ``logging`` (SQLAlchemy, aiomqtt, amqtt, ...) through the same
processors, so masking is done once here and never by each caller:

- card numbers (19 digits) become ``622202*********1234`` (first 6, last 4);
- resident ID numbers (18 characters, MOD 11-2) become ``110105********1234``;
- any field named like a secret (``key``, ``secret``, ``tak``, ``tmk``, ``tek``,
  ``kek``, ``password``, ``passphrase``, ``pin``, ``component``) is replaced by
  ``**redacted**``; ``bytes`` values never print (only their length);
- the masking runs over every value, nested dicts and lists, the event text and
  formatted exception tracebacks.

Output is a console renderer (default) or one JSON object per line
(``log_json`` setting / ``CAREPAY_LOG_JSON=true``), to stderr and optionally a file.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any, TextIO

import structlog

REDACTED = "**redacted**"
MAX_MASK_DEPTH = 8
"""Nesting depth the masking walks into dicts/lists/tuples; deeper values are replaced whole."""
MAX_LOG_VALUE_CHARS = 4_000
"""A single logged string value is cut to this many characters (a runaway payload must not flood the log)."""

_CARD_RE = re.compile(r"(?<![0-9])([0-9]{6})[0-9]{9}([0-9]{4})(?![0-9])")
_ID_RE = re.compile(r"(?<![0-9A-Za-z])([0-9]{6})[0-9]{8}([0-9]{3}[0-9Xx])(?![0-9A-Za-z])")

SECRET_NAME_TOKENS = frozenset(
    {"key", "keys", "secret", "secrets", "tak", "tmk", "tek", "kek", "mk", "password", "passwd", "passphrase",
     "pin", "component", "components", "private", "privkey", "token", "credential", "credentials", "seed_key"}
)
"""A field whose name contains one of these ``_``/``-`` separated tokens holds a secret."""
SAFE_NAME_SUFFIXES = frozenset({
    "version", "kcv", "id", "ids", "count", "path", "file", "label", "name", "type", "purpose", "suite",
    "fingerprint", "officer", "officers", "holder", "holders", "fen", "ms", "s", "threshold", "tries", "left",
    "limit", "digits", "length", "bytes", "max", "min", "mode", "required", "verified", "status",
})
"""... unless the name ends with one of these (``key_version``, ``tak_kcv``, ``keystore_path``)."""
NOT_SECRET_NAMES = frozenset({"idempotency_key", "sort_key", "primary_key", "event"})


def mask_card_no(text: str) -> str:
    """Mask every 19-digit card number in ``text``: first 6 and last 4 digits stay.

    >>> mask_card_no("card 6222021234567890123 charged")
    'card 622202*********0123 charged'
    """
    return _CARD_RE.sub(lambda m: f"{m.group(1)}{'*' * 9}{m.group(2)}", text)


def mask_id_no(text: str) -> str:
    """Mask every 18-character resident ID number (公民身份号码) in ``text``.

    >>> mask_id_no("id 11010519491231002X")
    'id 110105********002X'
    """
    return _ID_RE.sub(lambda m: f"{m.group(1)}{'*' * 8}{m.group(2)}", text)


def mask_text(text: str) -> str:
    """Card numbers and resident ID numbers masked; very long text cut to :data:`MAX_LOG_VALUE_CHARS`."""
    if len(text) > MAX_LOG_VALUE_CHARS:
        text = text[:MAX_LOG_VALUE_CHARS] + "…[truncated]"
    return mask_id_no(mask_card_no(text))


def is_secret_name(name: str) -> bool:
    """True when a field called ``name`` holds secret material (``tak``, ``master_key``, ``password`` …).

    >>> is_secret_name("tak"), is_secret_name("tmk_hex"), is_secret_name("key_version"), is_secret_name("card_no")
    (True, True, False, False)
    """
    lowered = name.lower()
    if lowered in NOT_SECRET_NAMES:
        return False
    tokens = [t for t in re.split(r"[_\-.\s]+", lowered) if t]
    if not tokens:
        return False
    if tokens[-1] in SAFE_NAME_SUFFIXES:
        return False
    return any(t in SECRET_NAME_TOKENS or (t.endswith("key") and len(t) > 3) for t in tokens)


def mask_value(value: Any, depth: int = 0) -> Any:
    """``value`` with card/ID numbers masked, secret-named fields redacted and bytes hidden."""
    if depth > MAX_MASK_DEPTH:
        return "<nested too deep>"
    if isinstance(value, str):
        return mask_text(value)
    if isinstance(value, bool | int | float) or value is None:
        if isinstance(value, int) and not isinstance(value, bool) and 10**17 <= abs(value) < 10**19:
            return mask_text(str(value))  # a card number passed as an int
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<{len(value)} bytes>"
    if isinstance(value, Mapping):
        return {
            k: (REDACTED if isinstance(k, str) and is_secret_name(k) else mask_value(v, depth + 1))
            for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [mask_value(v, depth + 1) for v in value]
    return mask_text(str(value))


def mask_event(_logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: mask every value of the event (see :func:`mask_value`)."""
    for name in list(event_dict):
        if name.startswith("_"):  # structlog/stdlib internals (_record, _from_structlog)
            continue
        if is_secret_name(name):
            event_dict[name] = REDACTED
        else:
            event_dict[name] = mask_value(event_dict[name])
    return event_dict


def _shared_processors() -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_logger_name,
        structlog.stdlib.add_log_level,
        structlog.stdlib.PositionalArgumentsFormatter(),
        structlog.stdlib.ExtraAdder(),  # stdlib ``extra={...}`` fields become event fields (and get masked)
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]


def configure_logging(
    *,
    json: bool | None = None,
    level: str | int | None = None,
    log_file: Path | str | None = None,
    stream: TextIO | None = None,
    console_level: str | int | None = None,
) -> None:
    """Configure structlog and stdlib logging once for this process.

    ``json``/``level`` default to the ``log_json``/``log_level`` settings. ``log_file``
    adds a JSON-lines file (always JSON: it is for machines) next to the console
    output on ``stream`` (stderr by default). ``console_level`` raises the console's
    threshold above ``level`` (the demo: warnings on screen, INFO in its file).
    Calling it again reconfigures.
    """
    if json is None or level is None:
        from ops.config import load_settings

        settings = load_settings()
        json = settings.log_json if json is None else json
        level = settings.log_level if level is None else level
    level_no = _level_no(level)

    final_tail = [
        structlog.stdlib.ProcessorFormatter.remove_processors_meta,
        structlog.processors.format_exc_info,
        mask_event,  # after the traceback is text, so it is masked too
    ]
    console_renderer: Any = (
        structlog.processors.JSONRenderer(ensure_ascii=False)
        if json
        else structlog.dev.ConsoleRenderer(colors=False, exception_formatter=structlog.dev.plain_traceback)
    )
    pre_chain = _shared_processors()

    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_carepay", False):
            root.removeHandler(handler)
            handler.close()

    console = logging.StreamHandler(stream or sys.stderr)
    console.setFormatter(
        structlog.stdlib.ProcessorFormatter(foreign_pre_chain=pre_chain, processors=[*final_tail, console_renderer])
    )
    console._carepay = True  # type: ignore[attr-defined]
    if console_level is not None:
        console.setLevel(_level_no(console_level))
    root.addHandler(console)
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file, encoding="utf-8")
        fh.setFormatter(
            structlog.stdlib.ProcessorFormatter(
                foreign_pre_chain=pre_chain,
                processors=[*final_tail, structlog.processors.JSONRenderer(ensure_ascii=False)],
            )
        )
        fh._carepay = True  # type: ignore[attr-defined]
        root.addHandler(fh)
    root.setLevel(level_no)
    for noisy in ("aiosqlite", "asyncio", "transitions", "amqtt", "hbmqtt", "passlib"):
        logging.getLogger(noisy).setLevel(max(level_no, logging.WARNING))

    structlog.configure(
        processors=[
            structlog.stdlib.filter_by_level,
            *pre_chain,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )


def _level_no(level: str | int) -> int:
    number = logging.getLevelName(level.upper()) if isinstance(level, str) else int(level)
    return number if isinstance(number, int) else logging.INFO


def get_logger(name: str | None = None, **initial: Any) -> Any:
    """A structlog logger (``log.info("purchase_approved", card_no=..., amount_fen=...)``)."""
    return structlog.get_logger(name, **initial)
