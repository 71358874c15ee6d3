"""Sending: the HTTP client, pacing to the rate limit, and carrying a batch to its outcome."""

from __future__ import annotations

import random

from worker.clock import Clock
from worker.config import Config
from worker.send.client import InvitationClient
from worker.send.pacing import Pacer, SharedLimit


def client_for(config: Config) -> InvitationClient:
    """The HTTP client a run uses (enter it with ``async with``)."""
    return InvitationClient(
        config.api_url,
        config.api_key,
        config.app_key,
        timeout=config.timeout,
        pool_size=config.concurrency + 1,
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
