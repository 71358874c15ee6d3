"""structlog set-up: JSON lines for machines, readable lines for people, secrets scrubbed.

How much is shown: a person at a terminal watching a run's bar sees warnings and errors
(the bar and the end table say the rest); everything else -- JSON mode, a run off a
terminal, the other commands -- keeps every info event, so log shippers lose nothing.
``-v`` adds the info events, ``-q`` keeps errors only, ``--log-level`` says it outright.
A run's summary event is shown at every level.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any, TextIO, cast

import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from worker.clock import second_text

#: ``--log-level`` names.
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "error": logging.ERROR}  # fmt: skip
#: structlog's method names (the level an event was logged at) as numbers.
_METHOD_LEVELS = {**LEVELS, "warn": logging.WARNING, "exception": logging.ERROR,
                  "critical": logging.CRITICAL, "fatal": logging.CRITICAL}  # fmt: skip
#: The events that sum a command up: shown whatever the level, even with ``-q``.
SUMMARY_EVENTS = frozenset({"run.finished", "run.aborted", "enqueue.finished", "plan.ready"})


def choose_level(
    *, watched: bool, verbose: bool = False, quiet: bool = False, log_level: str | None = None
) -> int:
    """The level for a command's options; ``watched``: a person watches a run's bar.

    ``--log-level`` wins, then ``-q`` (errors), then ``-v`` (info); by default a watched
    run shows warnings, and anything else info.
    """
    if log_level is not None:
        return LEVELS[log_level]
    if quiet:
        return logging.ERROR
    if verbose or not watched:
        return logging.INFO
    return logging.WARNING


class LevelFilter:
    """Drops events below ``level``, except the summary events (:data:`SUMMARY_EVENTS`).

    Calls below info are dropped before any processor runs (structlog's filtering logger);
    this sees only info events when the level is above info, which costs a dict and a call
    per event -- and keeps ``run.finished`` for a quiet scheduled run.
    """

    def __init__(self, level: int) -> None:
        self.level = level

    def __call__(self, logger: WrappedLogger, method: str, event: EventDict) -> EventDict:
        below = _METHOD_LEVELS.get(method, logging.CRITICAL) < self.level
        if below and event.get("event") not in SUMMARY_EVENTS:
            raise structlog.DropEvent
        return event


def shown_level() -> int:
    """The level :func:`configure` set (info when it was not called)."""
    for processor in structlog.get_config()["processors"]:
        if isinstance(processor, LevelFilter):
            return processor.level
    return logging.INFO


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
    """Route structlog to ``stream`` (stderr) as JSON lines or console output.

    ``level``: the lowest level shown (see :func:`choose_level`); summary events always are.
    """
    stream = stream or STDERR
    fmt = resolve_format(log_format, stream)
    processors: list[Processor] = [
        LevelFilter(level),
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
        # Info calls reach LevelFilter, which keeps the summary events above info.
        wrapper_class=structlog.make_filtering_bound_logger(min(level, logging.INFO)),
        # One write() per line, its newline included (print() writes it apart): a line
        # never splits around another process's when several share one stderr. The proxy
        # has all WriteLogger uses of a file: write() and flush().
        logger_factory=structlog.WriteLoggerFactory(file=cast(TextIO, stream)),
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

    try:
        text: str = msgspec.json.encode(obj, enc_hook=str).decode()
    except UnicodeEncodeError:  # a name from Redis holding bytes that are not UTF-8
        from worker.queue.text import escaped_all

        text = msgspec.json.encode(escaped_all(obj), enc_hook=str).decode()  # as \xNN
    return text
