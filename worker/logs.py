"""structlog set-up: JSON lines for machines, readable lines for people, secrets scrubbed."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger


class Redact:
    """A processor that replaces any occurrence of the given secrets in string values.

    Nothing logs keys on purpose; this makes sure nothing does by accident either (an
    exception message echoing a header, say).
    """

    def __init__(self, secrets: Iterable[str]) -> None:
        # Shorter strings are not key material and would mangle ordinary words.
        self.secrets = tuple(s for s in secrets if len(s) >= 8)

    def __call__(self, logger: WrappedLogger, method: str, event: EventDict) -> EventDict:
        if self.secrets:
            for key, value in event.items():
                if isinstance(value, str):
                    for secret in self.secrets:
                        if secret in value:
                            value = value.replace(secret, "[redacted]")
                    event[key] = value
        return event


def resolve_format(log_format: str, stream: TextIO) -> str:
    """``auto`` means console on a terminal, JSON otherwise."""
    if log_format == "auto":
        return "console" if stream.isatty() else "json"
    return log_format


def configure(
    log_format: str = "auto",
    *,
    secrets: Iterable[str] = (),
    level: int = logging.INFO,
    stream: TextIO | None = None,
) -> None:
    """Route structlog to ``stream`` (stderr) as JSON lines or console output."""
    stream = stream or sys.stderr
    fmt = resolve_format(log_format, stream)
    processors: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        Redact(secrets),
    ]
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer(serializer=_dumps)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=True,
    )


def _dumps(obj: Any, **_: Any) -> str:
    import orjson

    return orjson.dumps(obj, default=str).decode()
