"""Metrics: what a run reports to the Datadog Agent as it goes (off unless asked for).

The pipeline calls one :class:`Metrics` object at the few places where something worth
counting happens: a request answered, an outcome recorded, a row rejected, a retry, a
reconciliation. Without ``--statsd`` (or the Agent's environment) that object is this
base class, whose methods do nothing; with it, :class:`worker.metrics.statsd.StatsdMetrics`
hands each call to Datadog's DogStatsD client. Names and tags are documented in docs/operating.md.
"""

from __future__ import annotations

from worker.config import Config
from worker.metrics.target import StatsdTarget, statsd_target
from worker.outcome import Outcome
from worker.urls import site_of

__all__ = ["Metrics", "StatsdTarget", "metrics_for", "statsd_target"]


class Metrics:
    """The metrics of a run that sends none: every method is a no-op."""

    def request(self, kind: str, status: int | None, seconds: float) -> None:
        """One HTTP request of ``kind`` answered ``status`` (None: no answer)."""

    def budget(self, remaining: int) -> None:
        """The rate-limit budget the last answer reported as left."""

    def outcome(self, outcome: Outcome) -> None:
        """A batch outcome was recorded in the report."""

    def rejected(self, reason: str) -> None:
        """An input row was rejected for ``reason``."""

    def revoked(self, removed: list[str], count: int) -> None:
        """``--prune`` took ``count`` emails' access away, removing ``removed``."""

    def prune_refused(self, code: str) -> None:
        """``--prune`` left a dashboard (or the run) whole, for ``code``."""

    def retry(self, code: str) -> None:
        """A request is retried after an error with ``code``."""

    def reconciled(self, result: str) -> None:
        """An unknown outcome was looked up: ``created``, ``none`` or ``unreadable``."""

    def dead_lettered(self, code: str, count: int) -> None:
        """``count`` queue messages were moved to the dead-letter stream after ``code``."""

    def finished(self, exit_code: int, outcome: str) -> None:
        """The run ended with ``exit_code`` (0: all done, 1: some failed, 3: stopped before
        the end); ``outcome`` says how (see :attr:`worker.run.summary.Summary.outcome`)."""

    def close(self) -> None:
        """Send what is buffered; never blocks a run for long."""


def metrics_for(config: Config, *, mode: str, consumer: str | None = None) -> Metrics:
    """A run's metrics: DogStatsD ones when ``config.statsd`` says where, else none.

    ``mode`` is ``file`` or ``queue``; a queue worker adds its ``consumer`` name.
    """
    if config.statsd is None:
        return Metrics()
    # Datadog's client (and the requests library it brings) loads only when asked for.
    from worker.metrics.statsd import StatsdMetrics

    return StatsdMetrics(config.statsd, site=site_of(config.api_url), mode=mode,
                         consumer=consumer)  # fmt: skip
