"""Options of stream mode, checked when built."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

from worker.config import check_seconds
from worker.errors import UsageError
from worker.queue.text import escaped, is_text
from worker.urls import bracketed, port_ok


def default_consumer() -> str:
    """A consumer name unique to this process: host name and pid."""
    return f"{socket.gethostname()}-{os.getpid()}"


def is_redis_url(source: str) -> bool:
    """True for ``redis://`` and ``rediss://`` sources."""
    return urlsplit(source).scheme in ("redis", "rediss")


#: The query options a Redis URL may carry, with their values: the RESP version only.
URL_OPTIONS = {"protocol": ("2", "3")}


def check_redis_url(url: str) -> None:
    """Refuse a Redis URL redis-py would read otherwise than written.

    redis-py takes a URL without a host (``redis:/127.0.0.1:6379``, one slash) as
    ``localhost:6379``: a mistyped URL would quietly use another server.
    """
    parts = urlsplit(url)
    secret = parts.password
    shown = url.replace(f":{secret}@", ":***@") if secret else url  # never the password
    if not parts.hostname:
        raise UsageError(
            f"the Redis URL {shown!r} names no host (redis would connect to localhost "
            "instead); write redis://HOST:PORT/DB, with two slashes, e.g. "
            "redis://127.0.0.1:6379/0"
        )
    if not port_ok(parts):  # (redis would take 0, or no number, for 6379)
        raise UsageError(
            f"the Redis URL {shown!r} has a port that is not a number from 1 to 65535; "
            "write redis://HOST:PORT/DB, e.g. redis://127.0.0.1:6379/0"
        )
    query = parse_qsl(parts.query, keep_blank_values=True)
    if (
        "#" in url
        or ("?" in url and not query)
        or any(value not in URL_OPTIONS.get(name, ()) for name, value in query)
        or len({name for name, _ in query}) < len(query)
    ):
        # redis-py reads options from the query (?db=3 beats the path's /0) while the logs
        # show the path: take only what the worker knows, so the URL means what it says.
        where = f"{parts.scheme}://{parts.hostname}{':' if parts.port else ''}{parts.port or ''}"
        raise UsageError(
            f"the Redis URL {shown.split('?')[0].split('#')[0]!r} has a query or fragment "
            "the worker does not take (redis would read options such as ?db= from it); "
            f"write redis://HOST:PORT/DB, e.g. {where}/0, with at most ?protocol=2 or "
            "?protocol=3"
        )
    database = parts.path.strip("/")
    if database and not database.isdigit():
        raise UsageError(
            f"the Redis URL {shown!r} ends in {parts.path!r}, but that place holds the "
            "database number; write redis://HOST:PORT/DB (e.g. /0) and name the stream "
            "with --stream"
        )


@dataclass(frozen=True, slots=True)
class StreamOptions:
    """Where to read and how to behave as one consumer of a group. Durations in seconds;
    ``--linger`` is the run's (:class:`~worker.config.Config`), as for a pipe."""

    url: str
    stream: str
    group: str = "invite-worker"
    consumer: str = ""
    #: Where messages that failed for good go; default ``<stream>:dead``.
    dead_letter: str = ""
    #: Other consumers' messages idle this long are claimed.
    claim_idle: float = 60.0
    #: A message delivered more often than this goes to the dead-letter stream.
    max_deliveries: int = 5
    #: Exit once the group has no new and no pending messages.
    until_empty: bool = False
    #: Messages asked for per read: enough to fill a few batches at once (see ``_take``).
    read_count: int = 2000

    def __post_init__(self) -> None:
        if not is_redis_url(self.url):
            raise UsageError(f"not a Redis URL: {self.url!r} (use redis://HOST:PORT/DB)")
        check_redis_url(self.url)
        if not self.stream:
            raise UsageError("--stream NAME is required with a redis:// source")
        if not self.group:
            raise UsageError("--group must not be empty")
        if not self.consumer:
            object.__setattr__(self, "consumer", default_consumer())
        if not self.dead_letter:
            object.__setattr__(self, "dead_letter", f"{self.stream}:dead")
        if self.dead_letter == self.stream:
            raise UsageError("--dead-letter must differ from --stream")
        for option, value in (("--stream", self.stream), ("--group", self.group),
                              ("--consumer", self.consumer), ("--dead-letter", self.dead_letter),
                              ("the Redis URL", self.url)):  # fmt: skip
            if not is_text(value):  # Redis would take it, the report's summary could not
                raise UsageError(f"{option} {escaped(value)!r} holds bytes that are not "
                                 "UTF-8 (a shell's $'\\xNN'?); give it in plain text")  # fmt: skip
        check_seconds("--claim-idle", self.claim_idle)
        if self.max_deliveries < 1 or self.read_count < 1:
            raise UsageError("--max-deliveries must be at least 1")

    @property
    def where(self) -> str:
        """The URL without credentials, for logs."""
        parts = urlsplit(self.url)
        port = f":{parts.port}" if parts.port else ""
        host = bracketed(parts.hostname or "")  # an IPv6 address, as the URL wrote it
        return f"{parts.scheme}://{host}{port}{parts.path}#{self.stream}"
