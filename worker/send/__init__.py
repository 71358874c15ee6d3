"""Sending: the HTTP client, pacing to the rate limit, and carrying a batch to its outcome."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

from worker.clock import Clock
from worker.config import Config
from worker.metrics import Metrics
from worker.send.client import InvitationClient
from worker.send.pacing import Pacer, SharedLimit
from worker.send.preflight import Preflight
from worker.send.prune import Pruner
from worker.send.reconcile import Reconciler
from worker.send.retry import RetryPolicy


def client_for(config: Config, metrics: Metrics | None = None) -> InvitationClient:
    """The HTTP client a run uses (enter it with ``async with``); it counts requests."""
    return InvitationClient(
        config.api_url,
        config.api_key,
        config.app_key,
        timeout=config.timeout,
        pool_size=config.concurrency + 1,
        metrics=metrics,
        proxy=config.proxy,
    )


def pacer_for(
    config: Config,
    clock: Clock,
    rng: random.Random | None = None,
    shared: SharedLimit | None = None,
) -> Pacer:
    """The pacer a run uses; ``shared`` joins a budget kept with other workers."""
    return Pacer(
        clock,
        rate=config.rate,
        jitter=config.ratelimit_jitter,
        default_wait=config.ratelimit_default_wait,
        max_wait=config.max_wait,
        rng=rng,
        shared=shared,
    )


def reconciler_for(
    config: Config,
    client: InvitationClient,
    pacer: Pacer,
    clock: Clock,
    rng: random.Random,
    *,
    stop: asyncio.Event | None = None,
) -> Reconciler:
    """What lists a run's invitations: with the run's retry policy and clock-skew allowance;
    ``stop`` (the run's) cuts its waits short."""
    retry = RetryPolicy(config.max_attempts, config.backoff_base, config.backoff_max)
    return Reconciler(client, pacer, clock, retry=retry, skew=config.reconcile_skew, rng=rng,
                      stop=stop, page_size=config.list_page_size)  # fmt: skip


def preflight_for(
    config: Config,
    client: InvitationClient,
    pacer: Pacer,
    reconciler: Reconciler,
    clock: Clock,
    *,
    writes: bool = True,
) -> Preflight:
    """The dashboard check of a run; ``writes=False`` (a plan) never adds invitees, it
    says whom ``--add-invitees`` would add."""
    return Preflight(
        client, pacer, reconciler, clock, resend=config.resend,
        resend_after=config.resend_after, ttl=config.preflight_ttl,
        add_invitees=config.add_invitees, access_expires=config.access_expires, writes=writes,
    )  # fmt: skip


def pruner_for(
    config: Config,
    client: InvitationClient,
    pacer: Pacer,
    retry: RetryPolicy,
    clock: Clock,
    rng: random.Random | None,
    cap: Callable[[], int] | None = None,
    stop: asyncio.Event | None = None,
) -> Pruner:
    """What ``--prune`` reads and removes with: the run's pacer, retry policy and batch
    size (``cap``: the longest list the service took, learned from the POSTs)."""
    return Pruner(client, pacer, retry, clock, rng or random.Random(),  # jitter
                  batch_size=config.batch_size, page_size=config.list_page_size, cap=cap,
                  stop=stop, durable=config.durable_journal)  # fmt: skip
