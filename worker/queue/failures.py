"""What a Redis error means to a queue command: one kind of failure, one message each.

Every Redis error a queue worker, ``enqueue`` or ``dead-letter`` meets ends here, and is
told apart by its type (never shown as a traceback):

- unreachable, a dropped connection, a timeout, a server still loading: retried with
  backoff (see ``connect.connect``); once that gives up, :class:`QueueLost`;
- ``READONLY`` (the address now belongs to a replica: a failover): retried the same way;
  if it lasts, :class:`RedisReadOnly`, naming the primary;
- ``OOM``: :class:`RedisOutOfMemory`: nothing is lost, the messages stay pending;
- ``NOPERM``, ``NOAUTH``, ``WRONGPASS`` (and a script refused a command by the ACL):
  :class:`RedisRefused`, a usage error naming the user and the command;
- the stream or its group really missing: :class:`QueueLost`, the one failure after which
  messages must be enqueued again;
- anything else: :class:`RedisFailed`, with Redis's own words.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from redis.asyncio import Redis
from redis.exceptions import (
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    MasterDownError,
    NoPermissionError,
    OutOfMemoryError,
    ReadOnlyError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from worker.errors import FatalError, QueueLost, UsageError

#: Errors that are about who is asking: never retried, a usage error.
REFUSALS = (NoPermissionError, AuthenticationError, AuthenticationWrongNumberOfArgsError)
#: Errors of a server that is (for now) a replica: retried like a dropped connection.
FAILING_OVER = (ReadOnlyError, MasterDownError)


class RedisReadOnly(QueueLost):
    """The address answers as a read-only replica, and went on doing so."""

    code = "redis_read_only"


class RedisOutOfMemory(FatalError):
    """Redis is full (``maxmemory`` with ``noeviction``): it refuses to store more."""

    code = "redis_out_of_memory"

    def __init__(self, where: str, group: str, pending: int | None, *, worker: bool) -> None:
        self.where, self.group, self.worker = where, group, worker
        super().__init__(self._text(pending))

    def recount(self, pending: int | None) -> None:
        """Say how many messages are pending now (at the end of the run)."""
        self.args = (self._text(pending),)

    def _text(self, pending: int | None) -> str:
        # One sentence: a terminal's summary shows a halt's first sentence only.
        full = f"Redis at {self.where} is out of memory (OOM, maxmemory reached) and refuses"
        free = "free memory in Redis (delete or trim other keys, or raise maxmemory)"
        if not self.worker:
            return f"{full} to store more: {free}, then run this command again"
        held = "the messages stay in the stream"
        if pending is not None:
            held = (f"{pending:,} message(s) stay pending in group '{self.group}', what was "
                    "settled is in the report")  # fmt: skip
        return (f"{full} to store more, so nothing more is read or sent; nothing was lost "
                f"({held}): {free}, then run the worker again and it takes them up")  # fmt: skip


class RedisRefused(FatalError):
    """The URL's user may not do what the command needs (``NOPERM``, ``NOAUTH``,
    ``WRONGPASS``): a usage error, exit 2, at start or mid-run."""

    code = "redis_refused"

    def as_usage(self) -> UsageError:
        """The same message as a :class:`UsageError`, for a command that has not started."""
        return UsageError(str(self))


class RedisFailed(FatalError):
    """Any other error Redis answers with (``MISCONF``, ``WRONGTYPE``, a script error...)."""

    code = "redis_error"


class RedisFailures:
    """Turns the Redis errors of one command into its failures (see the module)."""

    def __init__(
        self,
        redis: Redis,
        where: str,
        stream: str,
        group: str = "",
        dead_letter: str = "",
        *,
        worker: bool = True,
    ) -> None:
        self.redis, self.where, self.stream = redis, where, stream
        self.group, self.dead_letter, self.worker = group, dead_letter, worker

    @property
    def user(self) -> str:
        """The Redis user of the URL (``default`` when it names none)."""
        kwargs: dict[str, Any] = self.redis.connection_pool.connection_kwargs
        return str(kwargs.get("username") or "default")

    async def __call__(self, exc: RedisError, command: str = "") -> FatalError:
        """The failure ``exc`` means; ``command`` names what was asked, where known."""
        if isinstance(exc, REFUSALS) or script_refused(exc):
            return RedisRefused(self._refused(exc, command))
        if isinstance(exc, FAILING_OVER):
            return RedisReadOnly(await self._read_only(exc))
        if isinstance(exc, OutOfMemoryError):
            pending = await self.pending() if self.worker else None
            return RedisOutOfMemory(self.where, self.group, pending, worker=self.worker)
        if isinstance(exc, RedisConnectionError | RedisTimeoutError):
            left = ("unsettled messages stay pending in the group for the next worker"
                    if self.worker else "run the command again once Redis is back")  # fmt: skip
            return QueueLost(f"lost Redis at {self.where}: {str(exc).rstrip('.')}. "
                             "Reconnecting did not help; "
                             f"{left}")  # fmt: skip
        if isinstance(exc, ResponseError) and self.worker and await self._gone():
            return QueueLost(
                f"Redis at {self.where} refused the stream: {exc}. The stream or its consumer "
                "group is gone (a Redis restart that lost its data?); what was settled is in "
                "the report, the rest must be enqueued again"
            )
        left = ("; nothing was lost (unsettled messages stay pending in the group)"
                if self.worker else "")  # fmt: skip
        return RedisFailed(f"Redis at {self.where} refused a command ({exc}){left}: fix what "
                           "Redis says, then run again")  # fmt: skip

    def _refused(self, exc: RedisError, command: str) -> str:
        said = str(exc).rstrip(".")
        user = self.user
        if isinstance(exc, NoPermissionError) or script_refused(exc):
            named = re.search(r"'([^']+)' command", said)  # only to name it; not a decision
            if named:
                what = named.group(1).upper()
            elif script_refused(exc):
                what = "a command its script runs" + (f" ({command})" if command else "")
            else:
                what = command or "a command on its keys"
            return (f"Redis at {self.where} refused user '{user}' {what} (NOPERM: {said}): "
                    f"grant it what the worker needs, ACL SETUSER {user} {self.grants()}, or "
                    "put a user that has it in the URL (to a user that has ~* or allkeys "
                    "already, give the rules without the ~ patterns: Redis refuses those "
                    "after it)")  # fmt: skip
        # NOAUTH (no password sent) or WRONGPASS; redis-py gives both the same class.
        if getattr(exc, "status_code", None) == "NOAUTH" or "authenticated" in said.lower() \
                or "required" in said.lower():  # fmt: skip
            return (f"Redis at {self.where} requires a password (NOAUTH) for "
                    f"{command or 'every command'}, and user '{user}' sent none: put them in "
                    "the URL, redis://USER:PASSWORD@HOST:PORT/DB")  # fmt: skip
        return (f"Redis at {self.where} refused user '{user}' on AUTH ({said}): check the "
                "user and password in the URL, redis://USER:PASSWORD@HOST:PORT/DB")  # fmt: skip

    def grants(self) -> str:
        """The ACL rules a queue worker needs, on this stream's keys."""
        return acl_rules(self.stream, self.dead_letter)

    async def _read_only(self, exc: RedisError) -> str:
        primary = await self._primary()
        url = urlsplit(self.where)._replace(netloc=primary or "", fragment="").geturl()
        follows = f", following the primary at {primary}," if primary else ""
        return (f"Redis at {self.where} answers as a read-only replica (READONLY){follows} and "
                "went on doing so while the worker reconnected, as after a failover; nothing "
                "was lost (unsettled messages stay pending in the group): point the worker at "
                f"the primary{f' ({url})' if primary else ''} and run again")  # fmt: skip

    async def _primary(self) -> str | None:
        """``host:port`` of the primary a replica follows (None if it cannot be asked)."""
        try:
            role: Any = await self.redis.role()
        except RedisError:
            return None
        if isinstance(role, list | tuple) and len(role) >= 3 and role[0] in ("slave", "replica"):
            return f"{role[1]}:{role[2]}"
        return None

    async def pending(self) -> int | None:
        """Messages of the group delivered and not acknowledged (None if unknown)."""
        if not self.group:
            return None
        try:
            summary: Any = await self.redis.xpending(self.stream, self.group)
        except RedisError:
            return None
        return int(summary["pending"])

    async def _gone(self) -> bool:
        """Whether the stream or the group is really missing (asked again, not guessed)."""
        try:
            if not await self.redis.exists(self.stream):
                return True
            groups: Any = await self.redis.xinfo_groups(self.stream)
        except RedisError:
            return False
        return self.group not in {_text(g["name"]) for g in groups}


def script_refused(exc: RedisError) -> bool:
    """Whether a script was refused a command by the user's ACL. Redis 7.0 says so as a
    plain error, with no NOPERM code (7.2 says NOPERM): only its words tell it apart."""
    return isinstance(exc, ResponseError) and "user executing the script can't run" in str(exc)


def acl_rules(stream: str, dead_letter: str = "") -> str:
    """The ``ACL SETUSER`` rules a queue worker (and ``enqueue``) needs for ``stream``."""
    keys = [stream, f"{stream}:*"]
    if dead_letter and not dead_letter.startswith(f"{stream}:"):
        keys.append(dead_letter)
    patterns = " ".join(f"~{key}" for key in [*keys, "invite-worker:ratelimit:*"])
    commands = "+@connection +@stream +@hash +@string +@scripting +expire +pexpireat"
    return f"{commands} +exists +type +scan {patterns}"


def _text(value: str | bytes) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
