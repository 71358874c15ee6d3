"""One frozen, validated configuration for a run."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from worker.errors import UsageError
from worker.urls import check_api_url

if TYPE_CHECKING:
    from worker.metrics.target import StatsdTarget
    from worker.send.proxy import Proxy

#: The longest --access-expires: a date past it would overflow a calendar year.
MAX_ACCESS = 36500 * 86400.0


@dataclass(frozen=True, slots=True)
class PruneMax:
    """``--prune-max``: the most one run may remove of a dashboard's people, as a count
    (``25``) or a share (``10%``, ``100%``)."""

    count: int | None = None
    percent: float | None = 10.0

    @classmethod
    def parse(cls, text: str) -> PruneMax:
        """``10%``, ``100%`` or ``25``; anything else is a :class:`UsageError`."""
        value = text.strip()
        try:
            if value.endswith("%"):
                percent = float(value[:-1])
                if 0 <= percent <= 100:
                    return cls(None, percent)
            elif int(value) >= 0:
                return cls(int(value), None)
        except ValueError:
            pass
        raise UsageError(f"--prune-max takes a share or a count, e.g. 10%, 100% or 25; "
                         f"got {text!r}")  # fmt: skip

    def allows(self, remove: int, people: int) -> bool:
        """Whether removing ``remove`` of a dashboard's ``people`` stays within the cap."""
        if self.count is not None:
            return remove <= self.count
        return remove * 100 <= (self.percent or 0.0) * people

    def __str__(self) -> str:
        return str(self.count) if self.count is not None else f"{self.percent:g}%"


@dataclass(frozen=True, slots=True)
class Config:
    """Everything a run needs, checked when built. Durations are float seconds."""

    api_url: str
    api_key: str = field(repr=False)
    app_key: str = field(repr=False)
    report_path: Path = Path("invite-report.jsonl")
    #: Replace an existing, non-empty report instead of refusing to start.
    overwrite: bool = False
    batch_size: int = 100
    concurrency: int = 4
    #: Extra cap in requests per second; ``None`` means only the server's limits apply.
    rate: float | None = None
    max_attempts: int = 5
    timeout: float = 30.0
    #: Rows held in per-token buffers across all tokens before the fullest are sent early.
    max_buffered_rows: int = 200_000
    #: ``--linger``: a partial batch is sent once its first row has waited this long and
    #: the input is quiet: a stream caught up, or a pipe, FIFO or terminal gone silent.
    linger: float = 2.0
    #: First retry waits about this long; each further one doubles it, up to ``backoff_max``.
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    #: Upper bound of the random extra wait added after a 429, so workers do not stampede.
    ratelimit_jitter: float = 1.0
    #: First wait after a 429 that carried no usable headers; it doubles while 429s go on.
    ratelimit_default_wait: float = 1.0
    #: The longest any single wait for the rate limit may be, whatever the headers say.
    max_wait: float = 60.0
    #: After an unknown outcome, wait this long before listing what the service created, so
    #: a request still being processed has landed.
    reconcile_delay: float = 5.0
    #: An invitation counts as ours if created up to this long before our send time
    #: (our clock and the service's may disagree).
    reconcile_skew: float = 30.0
    #: fdatasync each journal intent before its request goes out. Without it the journal
    #: still survives the process dying (SIGKILL, OOM, eviction: the kernel has the
    #: bytes); with it, also a power loss or kernel crash, at one sync per request.
    durable_journal: bool = False
    #: Send to everyone, even those the service lists as invited or in a session.
    resend: bool = False
    #: Send again to those whose last invitation is older than this (and no session);
    #: None: skip anyone the service still lists as invited.
    resend_after: float | None = None
    #: Add addresses the dashboard does not allow to its invitees first (never the default).
    add_invitees: bool = False
    #: Invitations asked for per page of a listing; the service may honor fewer.
    list_page_size: int = 100
    #: Invitees ``--add-invitees`` adds get access until now + this (seconds); None: always.
    access_expires: float | None = None
    #: After sending, remove from each dashboard the list names whom it no longer names.
    prune: bool = False
    #: The most one run may remove of a dashboard's people (``--prune-max``).
    prune_max: PruneMax = field(default_factory=PruneMax)
    #: How long a token's dashboard check stays good (queue mode); None: the whole run.
    preflight_ttl: float | None = None
    #: Continue the run recorded in ``report_path``: skip what is settled, check unknowns.
    resume: bool = False
    #: On SIGTERM/SIGINT, how long in-flight requests may take to finish.
    grace: float = 20.0
    #: Live progress: ``bar`` (a terminal), ``events`` (``progress`` log events) or ``off``.
    progress: str = "off"
    progress_every: float = 10.0
    #: Where DogStatsD metrics go (``--statsd`` or the Agent's environment); None: nowhere.
    statsd: StatsdTarget | None = None
    #: The HTTP proxy every API request goes through (``HTTPS_PROXY``...); None: direct.
    proxy: Proxy | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "api_url", check_api_url(self.api_url))
        if not self.api_key or not self.app_key:
            raise UsageError(
                "missing keys: set DD_API_KEY and DD_APP_KEY, or point DD_API_KEY_FILE and "
                "DD_APP_KEY_FILE (or --api-key-file/--app-key-file) at files holding them; "
                "--sandbox rehearses without keys"
            )
        _check_range("--batch-size", self.batch_size, 1, 10_000)
        _check_range("--concurrency", self.concurrency, 1, 256)
        check_seconds("--linger", self.linger, zero=True)
        _check_range("--max-attempts", self.max_attempts, 1, 100)
        _check_range("--list-page-size", self.list_page_size, 1, 10_000)
        if self.rate is not None and not self.rate > 0:
            raise UsageError(f"--rate must be a positive number of requests/s, got {self.rate}")
        for name, value in (
            ("--timeout", self.timeout),
            ("--max-wait", self.max_wait),
            ("backoff_base", self.backoff_base),
            ("backoff_max", self.backoff_max),
        ):
            check_seconds(name, value)
        for name, value in (
            ("ratelimit_jitter", self.ratelimit_jitter),
            ("ratelimit_default_wait", self.ratelimit_default_wait),
            ("--reconcile-delay", self.reconcile_delay),
            ("reconcile_skew", self.reconcile_skew),
            ("--grace", self.grace),
        ):
            check_seconds(name, value, zero=True)
        if self.progress not in ("bar", "events", "off"):
            raise UsageError(f"progress must be bar, events or off, got {self.progress!r}")
        check_seconds("--progress-every", self.progress_every)
        if self.resend and self.resend_after is not None:
            raise UsageError("--resend sends to everyone; it cannot go with --resend-after")
        if self.resend_after is not None and not self.resend_after > 0:
            raise UsageError("--resend-after must be a positive duration, e.g. 12h or 7d")
        if self.resume and self.overwrite:
            raise UsageError("--resume continues the report; it cannot go with --overwrite")
        if self.access_expires is not None and not self.add_invitees:
            raise UsageError("--access-expires sets the access of the invitees --add-invitees "
                             "adds; add --add-invitees, or drop it")  # fmt: skip
        if self.access_expires is not None and not 0 < self.access_expires <= MAX_ACCESS:
            raise UsageError("--access-expires must be a positive duration of at most "
                             "36500d (100 years), e.g. 7d or 12h")  # fmt: skip
        if self.max_buffered_rows < self.batch_size:
            raise UsageError("max_buffered_rows must be at least --batch-size")


def check_seconds(name: str, value: float, *, zero: bool = False) -> None:
    """A duration option: a finite number of seconds, positive (or 0 too, with ``zero``).

    Infinity and NaN are refused like a negative number: an endless wait (for a request
    that may have created invitations, for in-flight requests on a stop) is a hang, and
    NaN compares false with everything, so it would pass any check but this one."""
    if not (math.isfinite(value) and (value >= 0 if zero else value > 0)):
        kind = "a number of seconds, 0 or more" if zero else "a positive number of seconds"
        example = f"; e.g. {name} 10" if name.startswith("--") else ""
        raise UsageError(f"{name} must be {kind}, got {value}{example}")


def _check_range(name: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise UsageError(f"{name} must be between {low} and {high}, got {value}")
