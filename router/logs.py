"""structlog set-up: JSON lines off a TTY, console on one; API keys always redacted.

aiohttp logs through the standard library, and its records may quote a request line (the
access log's `%r`, a parser error): `configure` puts RedactKeys on each of its loggers, so that
a `key=...` in any of them is redacted before any handler sees it.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, Final

import structlog

REDACTED: Final = "[redacted]"
SECRET_FIELDS: Final = frozenset({"key", "api_key", "apikey", "token", "password"})
AIOHTTP_LOGGERS: Final = (
    "aiohttp.access",
    "aiohttp.client",
    "aiohttp.internal",
    "aiohttp.server",
    "aiohttp.web",
    "aiohttp.websocket",
)
# `key=...` as a query string or a form body writes it, up to the next separator or quote (a
# parser error quotes the line as a bytes repr: b'/api/v2?key=...&action=add').
_SECRET_IN_TEXT: Final = re.compile(
    r"(?i)\b(" + "|".join(sorted(SECRET_FIELDS)) + r")=[^&;\s'\"\\]*"
)
_TRACEBACKS: Final = logging.Formatter()


def _json_fallback(value: Any) -> Any:
    """What structlog's JSONRenderer writes for a value JSON has no type for."""
    try:
        return value.__structlog__()
    except AttributeError:
        return repr(value)


# Built once: `json.dumps(..., default=...)` builds a new encoder on every line it writes.
_ENCODE_LINE: Final = json.JSONEncoder(default=_json_fallback).encode


def _dumps_line(event_dict: Any, **_kw: Any) -> str:
    """The JSON line of `event_dict`, exactly as `json.dumps(event_dict, default=...)`."""
    return _ENCODE_LINE(event_dict)


def redact_secrets(
    _logger: Any, _method: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """Replace any field that may hold a key, at any depth of dicts, by REDACTED."""
    for name, value in event_dict.items():
        if name.lower() in SECRET_FIELDS:
            event_dict[name] = REDACTED
        elif isinstance(value, dict):
            event_dict[name] = redact_secrets(_logger, _method, dict(value))
    return event_dict


def redact_text(text: str) -> str:
    """`text` with the value of every `key=...` (and the other SECRET_FIELDS) redacted."""
    return _SECRET_IN_TEXT.sub(rf"\1={REDACTED}", text)


class RedactKeys(logging.Filter):
    """Redacts `key=...` everywhere in a standard-library record: its message (arguments
    merged in), its traceback, its stack and any text attribute (aiohttp's access log adds the
    request line as `first_request_line`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # arguments that do not fit: the handler would have said so
            message = str(record.msg)
        record.msg, record.args = redact_text(message), None
        if record.exc_info:
            # Formatted here, once: a handler formats `exc_text` as it is, never exc_info again.
            record.exc_text = redact_text(_TRACEBACKS.formatException(record.exc_info))
            record.exc_info = None
        elif record.exc_text:
            record.exc_text = redact_text(record.exc_text)
        for name, value in list(vars(record).items()):
            if isinstance(value, str) and name != "msg":
                setattr(record, name, redact_text(value))
        return True


def redact_aiohttp_logs() -> None:
    """Put RedactKeys on each of aiohttp's loggers (once, however often it is called)."""
    for name in AIOHTTP_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactKeys) for f in logger.filters):
            logger.addFilter(RedactKeys())


def configure(*, json_lines: bool | None = None, level: int = logging.INFO) -> None:
    """Configure structlog once for the process. `json_lines` defaults to "stderr is no TTY"."""
    redact_aiohttp_logs()
    if json_lines is None:
        json_lines = not sys.stderr.isatty()
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=_dumps_line)
        if json_lines
        else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            redact_secrets,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,  # capture_logs in tests needs it
    )
