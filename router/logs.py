"""structlog set-up: JSON lines off a TTY, console on one; API keys always redacted."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any, Final

import structlog

REDACTED: Final = "[redacted]"
SECRET_FIELDS: Final = frozenset({"key", "api_key", "apikey", "token", "password"})


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


def configure(*, json_lines: bool | None = None, level: int = logging.INFO) -> None:
    """Configure structlog once for the process. `json_lines` defaults to "stderr is no TTY"."""
    if json_lines is None:
        json_lines = not sys.stderr.isatty()
    renderer: Any = (
        structlog.processors.JSONRenderer() if json_lines else structlog.dev.ConsoleRenderer()
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
