"""Pacing from rate-limit headers, on virtual time (no test here sleeps for real)."""

from __future__ import annotations

import asyncio
import itertools
import math
import random

import pytest
from structlog.testing import capture_logs

from worker.clock import FakeClock, unless_set
from worker.emulator import Emulator
from worker.errors import RateLimitInfo
from worker.send.answers import parse_ratelimit
from worker.send.pacing import BOUNDARY_MARGIN, Pacer, window_end


def test_window_end_is_calendar_aligned_when_reset_agrees() -> None:
    """With a period, the window ends at the next multiple of it."""
    info = RateLimitInfo(limit=10, period=10, remaining=3, reset=6)
    assert window_end(1003.4, info) == 1010
    # Reset 0 means "less than a second left"; still aligned.
    assert window_end(1009.7, RateLimitInfo(limit=10, period=10, reset=0)) == 1010


def test_window_end_trusts_reset_when_clocks_disagree() -> None:
    """A reset far from the aligned boundary (skew) wins, rounded up to never resume early."""
    info = RateLimitInfo(limit=10, period=60, remaining=3, reset=5)
    assert window_end(1000.0, info) == 1006.0
    assert window_end(1000.0, RateLimitInfo()) is None


async def test_only_one_request_probes_until_the_first_answer() -> None:
    """Before any header is known, a second request waits for the first answer."""
    clock = FakeClock()
    pacer = Pacer(clock)
    first = await pacer.acquire()
    second = asyncio.create_task(pacer.acquire())
    for _ in range(5):
        await asyncio.sleep(0)
    assert not second.done()
    pacer.release(first, RateLimitInfo(limit=100, period=10, remaining=99, reset=5))
    await asyncio.wait_for(second, 1)
    assert pacer.in_flight == 1


async def test_after_refused_keys_the_next_request_probes_alone_again() -> None:
    """Once keys were refused somewhere, the next request goes alone until it is answered."""
    pacer = Pacer(FakeClock())
    pacer.release(await pacer.acquire(), RateLimitInfo())
    pacer.probe_again()
    first = await pacer.acquire()
    second = asyncio.create_task(pacer.acquire())
    for _ in range(5):
        await asyncio.sleep(0)
    assert not second.done()
    pacer.release(first, RateLimitInfo())
    await asyncio.wait_for(second, 1)
    assert pacer.try_acquire() is not None  # answered: no more probing


async def test_no_headers_means_no_pacing_after_the_first_answer() -> None:
    """A server that announces no limit is only bounded by concurrency."""
    clock = FakeClock()
    pacer = Pacer(clock)
    pacer.release(await pacer.acquire(), RateLimitInfo())
    for _ in range(50):
        await pacer.acquire()
    assert clock.slept == []


async def test_budget_is_spread_evenly_to_the_window_end() -> None:
    """Remaining requests are spaced (time left) / (budget) apart, not burst."""
    clock = FakeClock(start=1000.0)
    pacer = Pacer(clock)
    t0 = await pacer.acquire()
    pacer.release(t0, RateLimitInfo(limit=5, period=10, remaining=4, reset=10))
    times = []
    for _ in range(4):
        sent = await pacer.acquire()
        times.append(sent)
        pacer.release(sent, None)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(g == pytest.approx(gaps[0], rel=0.05) for g in gaps)
    assert 1.5 < gaps[0] < 2.6
    assert times[-1] < 1010


async def test_a_budget_spread_hours_apart_is_said_once_per_window() -> None:
    """Three requests a day: the next waits hours to spread the budget, and says so once
    (ratelimit.wait, reason paced), not silently; a short spread says nothing."""
    clock = FakeClock(start=86_400.0)
    pacer = Pacer(clock, max_wait=86_400.0)
    first = await pacer.acquire()
    with capture_logs() as logs:
        pacer.release(first, RateLimitInfo(limit=3, period=86_400, remaining=2, reset=86_400))
        second = await pacer.acquire()
        pacer.release(second, None)
        await pacer.acquire()
    waits = [e for e in logs if e["event"] == "ratelimit.wait"]
    assert [w["reason"] for w in waits] == ["paced"]
    assert waits[0]["seconds"] == pytest.approx(86_400 / 3, rel=0.01)
    assert (waits[0]["limit"], waits[0]["period"]) == (3, 86_400)
    short = Pacer(FakeClock(start=1000.0))
    sent = await short.acquire()
    with capture_logs() as logs:
        short.release(sent, RateLimitInfo(limit=5, period=10, remaining=4, reset=10))
        await short.acquire()
    assert [e for e in logs if e["event"] == "ratelimit.wait"] == []


async def test_in_flight_requests_count_against_remaining() -> None:
    """With remaining=2 and two requests out, a third waits for the next window."""
    clock = FakeClock(start=1000.0)
    pacer = Pacer(clock)
    pacer.release(await pacer.acquire(), RateLimitInfo(limit=3, period=10, remaining=2, reset=9))
    await pacer.acquire()
    await pacer.acquire()
    third = await pacer.acquire()
    assert third >= 1010 + BOUNDARY_MARGIN
    assert pacer.waits == 1


async def test_budget_spent_waits_for_reset_then_resumes() -> None:
    """Remaining 0 holds everyone until the calendar-aligned boundary."""
    clock = FakeClock(start=1000.5)
    pacer = Pacer(clock)
    pacer.release(await pacer.acquire(), RateLimitInfo(limit=10, period=5, remaining=0, reset=4))
    sent = await pacer.acquire()
    assert 1005 <= sent <= 1005 + 0.1


async def test_a_429_pauses_every_sender_until_reset_plus_bounded_jitter() -> None:
    """After a 429 nobody sends until the reset; the jitter stays within its bound."""
    clock = FakeClock(start=1000.0)
    pacer = Pacer(clock, jitter=0.5, rng=random.Random(7))
    pacer.release(await pacer.acquire(), RateLimitInfo(limit=10, period=10, remaining=9))
    sent = await pacer.acquire()
    pacer.release(sent, RateLimitInfo(limit=10, period=10, remaining=0, reset=8), limited=True)
    others = sorted(await asyncio.gather(*(pacer.acquire() for _ in range(3))))
    assert all(t >= 1010 + BOUNDARY_MARGIN for t in others)
    assert others[0] <= 1010 + BOUNDARY_MARGIN + 0.5
    # ...and the ones after it are paced across the new window, not released as a burst.
    assert others[2] - others[0] > 1.0


@pytest.mark.parametrize(
    "info", [RateLimitInfo(), RateLimitInfo(limit=10, period=None, remaining=0, reset=None)]
)
async def test_a_429_without_a_usable_reset_still_waits_a_little(info: RateLimitInfo) -> None:
    """A 429 with no reset header waits the default wait plus jitter, never zero."""
    clock = FakeClock(start=1000.0)
    pacer = Pacer(clock, default_wait=1.0, jitter=0.25)
    pacer.release(await pacer.acquire(), info, limited=True)
    sent = await pacer.acquire()
    assert 1001.0 <= sent <= 1001.25


async def test_late_answer_from_an_older_window_does_not_shrink_the_new_budget() -> None:
    """A response sent in the previous window must not be read as this window's count."""
    clock = FakeClock(start=1000.0)
    pacer = Pacer(clock)
    pacer.release(await pacer.acquire(), RateLimitInfo(limit=10, period=10, remaining=9, reset=9))
    straddler = await pacer.acquire()
    clock.advance(10.5)  # answered after the boundary, by a count from before it
    pacer.release(straddler, RateLimitInfo(limit=10, period=10, remaining=0, reset=9))
    sent = await pacer.acquire()
    assert sent < 1012  # not held to the next boundary at 1020


async def test_rate_cap_has_no_start_burst() -> None:
    """--rate goes through aiolimiter with a capacity of one: no initial burst."""
    pacer = Pacer(FakeClock(), rate=1000.0)
    assert pacer._limiter is not None
    assert pacer._limiter.max_rate == 1
    assert pacer._limiter.time_period == pytest.approx(0.001)


async def simulate(
    requests: int,
    limit: int,
    period: float,
    concurrency: int,
    latency: float,
    start: float,
    *,
    headers: str = "standard",
    seed: int = 1,
) -> tuple[float, list[float]]:
    """Send ``requests`` through a pacer to the emulator's window counter on virtual time.

    ``headers`` is how the emulator reports its limit (see ``Emulator.ratelimit_headers``).
    Returns (elapsed virtual seconds, the virtual times at which 429s came back).
    """
    clock = FakeClock(start=start)
    server = Emulator(limit=limit, period=period, clock=clock.time, ratelimit_headers=headers)
    pacer = Pacer(clock, rng=random.Random(seed))
    queue = list(range(requests))
    limited: list[float] = []

    async def sender() -> None:
        while queue:
            queue.pop()
            while True:
                sent = await pacer.acquire()
                await clock.sleep(latency / 2)
                over, answer = server.window.count()
                await clock.sleep(latency / 2)
                pacer.release(sent, parse_ratelimit(answer), limited=over)
                if not over:
                    break
                limited.append(clock.time())

    await asyncio.gather(*(sender() for _ in range(concurrency)))
    return clock.time() - start, limited


@pytest.mark.parametrize(
    ("requests", "limit", "period", "concurrency", "latency", "start"),
    [
        (500, 25, 1.0, 4, 0.02, 1_700_000_000.37),
        (300, 10, 10.0, 8, 0.15, 1_700_000_003.9),
        (200, 60, 60.0, 4, 0.05, 1_700_000_059.5),
        (120, 7, 2.0, 2, 0.3, 1_700_000_000.0),
    ],
)
async def test_simulated_run_uses_the_limit_without_429s(
    requests: int, limit: int, period: float, concurrency: int, latency: float, start: float
) -> None:
    """Never told the limit, the pacer finishes within one window of the floor, zero 429s."""
    elapsed, limited = await simulate(requests, limit, period, concurrency, latency, start)
    floor = math.ceil(requests / limit) * period
    assert limited == []
    assert elapsed <= floor + period


@pytest.mark.parametrize(("concurrency", "latency", "seed"), [(4, 0.02, 1), (8, 0.05, 2)])
async def test_a_service_that_sends_no_headers_gets_about_one_429_per_few_windows(
    concurrency: int, latency: float, seed: int
) -> None:
    """5 requests/s, 429s as a proxy's page with no headers: after the first window, AIMD
    keeps it to at most one 429 per three windows, and the run is not starved."""
    start = 1_700_000_000.37
    elapsed, limited = await simulate(
        200, 5, 1.0, concurrency, latency, start, headers="none", seed=seed
    )
    later = [t for t in limited if t > start + 1.0]
    assert len(later) <= elapsed / 3
    assert elapsed <= 2 * 200 / 5  # at least half the service's rate, on average


async def test_nonsense_headers_are_unknown_and_the_run_is_never_stuck() -> None:
    """Limit 0, Period abc, Remaining -3, Reset -5 on every answer: the pacer does not wait
    forever on them; a limited service is met by backing off instead."""
    elapsed, _ = await simulate(100, 20, 1.0, 4, 0.02, 1_700_000_000.0, headers="nonsense")
    assert elapsed < 60


async def test_no_single_wait_exceeds_max_wait() -> None:
    """A reset of nearly an hour (or a 429 pause past it) waits at most --max-wait at once."""
    clock = FakeClock(start=1000.0)
    pacer = Pacer(clock, max_wait=5.0)
    sent = await pacer.acquire()
    pacer.release(sent, RateLimitInfo(limit=10, period=3600, remaining=0, reset=3599))
    first = await pacer.acquire()
    assert clock.slept
    assert sum(clock.slept) <= 5.0 + 1e-6
    assert first - 1000.0 <= 5.0 + 1e-6
    sent = clock.time()
    pacer.release(sent, RateLimitInfo(limit=10, period=3600, remaining=0, reset=3500), limited=True)
    await pacer.acquire()
    assert max(clock.slept) <= 5.0
    assert clock.time() - sent <= 5.0 + 1e-6


async def test_a_caller_cancelled_in_unless_set_takes_its_step_down_with_it() -> None:
    """A task cancelled while in ``unless_set`` cancels its step (no orphaned sleep or
    acquire left running); a step that finished in that same instant goes to on_discard."""
    clock = FakeClock()
    ended: list[str] = []

    async def step() -> str:
        try:
            await clock.sleep(60)
        except asyncio.CancelledError:
            ended.append("cancelled")
            raise
        return "slept"

    caller = asyncio.ensure_future(unless_set(asyncio.Event(), step()))
    for _ in range(5):
        await asyncio.sleep(0)
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    for _ in range(5):
        await asyncio.sleep(0)
    assert ended == ["cancelled"]

    slot: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    discarded: list[str] = []
    acquiring = unless_set(asyncio.Event(), slot, discarded.append)
    acquirer = asyncio.ensure_future(acquiring)
    for _ in range(5):
        await asyncio.sleep(0)
    slot.set_result("slot")
    acquirer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await acquirer
    assert discarded == ["slot"]  # given back, as when the event wins
