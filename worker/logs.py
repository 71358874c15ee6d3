"""structlog set-up: JSON lines for machines, readable lines for people, secrets scrubbed."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any, TextIO, cast

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from worker.clock import second_text


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


def timestamp(logger: WrappedLogger, method: str, event: EventDict) -> EventDict:
    """``timestamp``: ISO 8601 UTC with microseconds and ``Z`` (as structlog's TimeStamper).

    A run logs a line per batch, so the date part comes from :func:`second_text`'s cache.
    """
    now = time.time()
    second = int(now)
    event["timestamp"] = f"{second_text(second)}.{int((now - second) * 1e6):06d}Z"
    return event


class StderrProxy:
    """Where log lines go: stderr, or, while a progress bar is shown, above the bar.

    structlog holds on to its output file, so it is given this stand-in, which looks
    ``sys.stderr`` up on every write and hands complete lines to ``sink`` when one is set.
    """

    def __init__(self) -> None:
        self.sink: Callable[[str], None] | None = None
        self._partial = ""

    def write(self, text: str) -> int:
        if self.sink is None:
            return sys.stderr.write(text)
        self._partial += text
        *lines, self._partial = self._partial.split("\n")
        for line in lines:
            self.sink(line)
        return len(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


STDERR = StderrProxy()


def resolve_format(log_format: str, stream: TextIO | StderrProxy) -> str:
    """``auto`` means console on a terminal, JSON otherwise."""
    if log_format == "auto":
        return "console" if stream.isatty() else "json"
    return log_format


def configure(
    log_format: str = "auto",
    *,
    secrets: Iterable[str] = (),
    level: int = logging.INFO,
    stream: TextIO | StderrProxy | None = None,
) -> None:
    """Route structlog to ``stream`` (stderr) as JSON lines or console output."""
    stream = stream or STDERR
    fmt = resolve_format(log_format, stream)
    processors: list[Processor] = [
        structlog.processors.add_log_level,
        timestamp,
        structlog.processors.format_exc_info,
        Redact(secrets),
    ]
    renderer: Any
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer(serializer=_dumps)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=stream.isatty())
    # Warnings and stdlib logging would otherwise print plain text between JSON lines.
    logging.captureWarnings(True)
    root = logging.getLogger()
    root.handlers[:] = [_ToStructlog()]
    root.setLevel(logging.WARNING)
    structlog.configure(
        processors=[*processors, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        # The proxy has all PrintLogger uses of a file: write() and flush().
        logger_factory=structlog.PrintLoggerFactory(file=cast(TextIO, stream)),
        cache_logger_on_first_use=True,
    )


class _ToStructlog(logging.Handler):
    """Library logging (aiohttp, asyncio, warnings) as structlog events, one format for all."""

    def emit(self, record: logging.LogRecord) -> None:
        structlog.get_logger(record.name).log(
            record.levelno, "library.log", logger=record.name, message=record.getMessage()
        )


def _dumps(obj: Any, **_: Any) -> str:
    import msgspec

    text: str = msgspec.json.encode(obj, enc_hook=str).decode()
    return text
