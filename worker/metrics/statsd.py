"""Metrics to the Datadog Agent's DogStatsD port, through Datadog's own client.

The client buffers and aggregates in memory and a background thread sends, so a call on
the run's path costs microseconds and never waits on a socket. A metric that cannot be
sent (no Agent listening, a name that does not resolve) is dropped: one
``metrics.unavailable`` warning says so and the run goes on.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Mapping

import structlog
from datadog.dogstatsd.base import DogStatsd

from worker.metrics import Metrics
from worker.metrics.target import StatsdTarget
from worker.outcome import REFUSED, Outcome, Status

log = structlog.get_logger("worker.metrics")

NAMESPACE = "invite_worker"
#: How often buffered and aggregated metrics are sent (the Agent rolls up per 10 s).
FLUSH_SECONDS = 2.0
#: Payloads waiting for the sender thread; past that they are dropped, never waited for.
SENDER_QUEUE = 256
#: The longest closing may take: the last flush must not hold up the end of a run.
CLOSE_SECONDS = 2.0
LIBRARY_LOGGER = "datadog.dogstatsd"
_NOT_A_TAG_CHARACTER = re.compile(r"[^\w\-:./]")


def tag(name: str, value: object) -> str:
    """``name:value`` with the characters the DogStatsD format reserves replaced."""
    return _NOT_A_TAG_CHARACTER.sub("_", f"{name}:{value}")[:200]


def dd_tags(env: Mapping[str, str]) -> list[str]:
    """``DD_TAGS`` as the Agent's other clients read it: comma- or space-separated."""
    raw = env.get("DD_TAGS", "")
    parts = raw.split(",") if "," in raw else raw.split()
    return [_NOT_A_TAG_CHARACTER.sub("_", p.strip())[:200] for p in parts if p.strip()]


class StatsdMetrics(Metrics):
    """A run's metrics, sent to DogStatsD with the run's constant tags.

    ``DD_ENV``, ``DD_SERVICE`` and ``DD_VERSION`` become ``env``, ``service`` and
    ``version`` tags (the client reads them); ``DD_TAGS`` is added here.
    """

    def __init__(
        self, target: StatsdTarget, *, site: str, mode: str, consumer: str | None = None
    ) -> None:
        # The client's own logging: its first complaint becomes one warning of ours.
        self._quiet = _OnceThenQuiet()
        logging.getLogger(LIBRARY_LOGGER).addFilter(self._quiet)
        tags = [tag("site", site), tag("mode", mode)]
        if consumer is not None:
            tags.append(tag("consumer", consumer))
        self.target = target
        self._client = DogStatsd(
            host=target.host,
            port=target.port,
            socket_path=target.socket_path,
            namespace=NAMESPACE,
            constant_tags=tags + dd_tags(os.environ),
            disable_telemetry=True,
            disable_buffering=False,
            disable_aggregation=False,
            flush_interval=FLUSH_SECONDS,
            disable_background_sender=False,
            sender_queue_size=SENDER_QUEUE,
            sender_queue_timeout=0,
            track_instance=False,
        )
        self._kind_tags: dict[str, list[str]] = {}
        log.info("metrics.enabled", target=str(target), tags=tags)

    def request(self, kind: str, status: int | None, seconds: float) -> None:
        kind_tags = self._kind_tags.get(kind) or self._kind_tags.setdefault(
            kind, [tag("kind", kind)]
        )
        status_class = "error" if status is None else f"{status // 100}xx"
        self._client.increment("requests", tags=[*kind_tags, f"status_class:{status_class}"])
        if status == 429:
            self._client.increment("requests.throttled", tags=kind_tags)
        self._client.distribution("request.latency", seconds, tags=kind_tags)

    def budget(self, remaining: int) -> None:
        self._client.gauge("ratelimit.remaining", remaining)

    def outcome(self, outcome: Outcome) -> None:
        count = len(outcome.emails)
        if not count:
            return
        if outcome.status is Status.SENT:
            self._client.increment("emails.sent", count)
        elif outcome.status is Status.SKIPPED:
            self._client.increment("emails.skipped", count,
                                   tags=[tag("reason", outcome.reason or "skipped")])  # fmt: skip
        elif outcome.error is not None:
            code = outcome.error.code
            refused = code in REFUSED and not outcome.attempts
            name = "emails.refused" if refused else "emails.failed"
            self._client.increment(name, count, tags=[tag("code", code)])

    def rejected(self, reason: str) -> None:
        self._client.increment("rows.rejected", tags=[tag("reason", reason)])

    def revoked(self, removed: list[str], count: int) -> None:
        self._client.increment("emails.revoked", count,
                               tags=[tag("removed", what) for what in sorted(removed)])  # fmt: skip

    def prune_refused(self, code: str) -> None:
        self._client.increment("prunes.refused", tags=[tag("code", code)])

    def retry(self, code: str) -> None:
        self._client.increment("retries", tags=[tag("code", code)])

    def reconciled(self, result: str) -> None:
        self._client.increment("reconciliations", tags=[tag("result", result)])

    def dead_lettered(self, code: str, count: int) -> None:
        self._client.increment("messages.dead_lettered", count, tags=[tag("code", code)])

    def finished(self, exit_code: int, outcome: str) -> None:
        # exit 3 is one code for every kind of stop: the outcome tells a SIGTERM (a
        # scale-down, nothing lost) from a fault or refused keys, for monitors.
        self._client.increment("runs.finished", tags=[tag("exit_code", exit_code),
                                                      tag("outcome", outcome)])  # fmt: skip

    def close(self) -> None:
        """Send the rest, waiting at most :data:`CLOSE_SECONDS` (a name may hang in DNS)."""
        closing = threading.Thread(
            target=self._client.stop, kwargs={"timeout": CLOSE_SECONDS / 2},
            name="statsd-close", daemon=True,
        )  # fmt: skip
        closing.start()
        closing.join(CLOSE_SECONDS)
        if not closing.is_alive():
            logging.getLogger(LIBRARY_LOGGER).removeFilter(self._quiet)


class _OnceThenQuiet(logging.Filter):
    """The client's first complaint becomes one ``metrics.unavailable``; the rest go."""

    def __init__(self) -> None:
        super().__init__()
        self.reported = False

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING and not self.reported:
            self.reported = True
            log.warning("metrics.unavailable", error=record.getMessage(),
                        action="metrics are dropped; the run goes on")  # fmt: skip
        return False
