"""One attempt loop: every wait in it (backoff, reconcile delay, pacer) ends on a stop.

Time is the injected clock: a stop that comes as a long wait begins must end the wait at
once, without virtual time moving through it.
"""

from __future__ import annotations

import asyncio
import inspect
import random
import time
from collections.abc import AsyncIterator, Callable, MutableMapping
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from structlog.testing import capture_logs

from tests.conftest import TOKEN_A
from worker.batching import Batch
from worker.clock import Clock, FakeClock, SystemClock
from worker.config import Config
from worker.emulator import Emulator, Faults
from worker.errors import ServerError, Stopped
from worker.outcome import Outcome
from worker.record.journal import Journal, read_journal
from worker.send import client_for, pacer_for, reconciler_for
from worker.send.paced import paced_call
from worker.send.pacing import Pacer
from worker.send.replies import Sent
from worker.send.retry import RetryPolicy
from worker.send.sender import Sender
from worker.state import RunState

#: A wait at least this long is the one the stop arrives during.
LONG = 10.0


class StopDuringLongWaits(FakeClock):
    """Virtual time whose first long wait is when the run is told to stop (a SIGTERM)."""

    def __init__(self, stop: asyncio.Event) -> None:
        super().__init__()
        self.stop = stop
        self.started = self.now

    async def sleep(self, seconds: float) -> None:
        if seconds >= LONG:
            self.stop.set()
        await super().sleep(seconds)


async def test_a_stop_ends_a_reads_backoff_without_waiting_it_out() -> None:
    """paced_call: a stop during the backoff after a 5xx ends the call (Stopped) at once."""
    stop = asyncio.Event()
    clock = StopDuringLongWaits(stop)
    calls = 0

    async def failing() -> Sent:
        nonlocal calls
        calls += 1
        raise ServerError("Service Unavailable", http_status=503)

    policy = RetryPolicy(attempts=5, base=100.0, cap=100.0)
    with pytest.raises(Stopped):
        await asyncio.wait_for(paced_call(failing, Pacer(clock), policy, clock, random.Random(1),
                                          lambda: None, stop=stop), 10)  # fmt: skip
    assert calls == 1
    assert clock.now - clock.started < LONG


@pytest.fixture
async def refusing_listings() -> AsyncIterator[tuple[str, list[str]]]:
    """A service on 127.0.0.1 whose invitation listings all answer 503; its request log."""
    seen: list[str] = []

    async def unavailable(request: web.Request) -> web.Response:
        seen.append(request.method)
        return web.json_response({"errors": ["Service Unavailable"]}, status=503)

    app = web.Application()
    app.router.add_route("*", "/api/v1/dashboard/public/{token}/invitation", unavailable)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        await runner.cleanup()


async def test_a_stop_during_a_listings_backoff_does_not_wait_it_out(
    refusing_listings: tuple[str, list[str]], make_config: Callable[..., Config]
) -> None:
    """A SIGTERM while a listing backs off after a 503 ends the listing at once."""
    url, seen = refusing_listings
    config = make_config(api_url=url, backoff_base=60.0, backoff_max=60.0, max_attempts=5)
    stop = asyncio.Event()
    clock = StopDuringLongWaits(stop)
    async with client_for(config) as client:
        reconciler = reconciler_for(config, client, pacer_for(config, clock), clock,
                                    random.Random(1), stop=stop)  # fmt: skip
        with pytest.raises(Stopped):
            await asyncio.wait_for(reconciler.created_since(TOKEN_A, ["a@example.com"],
                                                            clock.now, clock.now), 10)  # fmt: skip
    assert seen == ["GET"]
    assert clock.now - clock.started < LONG


async def test_a_stop_during_the_reconcile_delay_leaves_the_unknown_for_resume(
    emulator: Emulator, make_config: Callable[..., Config], tmp_path: Path
) -> None:
    """An unknown outcome's reconcile delay ends on a stop: no listing, no second POST, no
    outcome; the intent stays open in the journal for --resume to settle."""
    config = make_config(reconcile_delay=120.0, batch_size=3)
    state = RunState()
    clock = StopDuringLongWaits(state.stop)
    emulator.script("502-after")  # created, but the answer says 502
    journal = Journal(tmp_path / "j", durable=False, truncate=True)
    emails = ["a@example.com", "b@example.com"]
    async with client_for(config) as client:
        sender = Sender(client, pacer_for(config, clock), journal, config, clock,
                        random.Random(1), state)  # fmt: skip
        out = await asyncio.wait_for(sender.send(Batch(TOKEN_A, emails)), 10)
    journal.close()
    assert out == []
    posts = [r for r in emulator.requests if r.method == "POST"]
    assert len(posts) == 1
    assert clock.now - clock.started < LONG
    [intent] = read_journal(tmp_path / "j").values()
    assert intent.emails == emails
    assert sum(emulator.invited.values()) == 2


async def test_the_sender_and_a_listing_share_the_attempt_count_and_backoff(
    emulator: Emulator, make_config: Callable[..., Config], tmp_path: Path
) -> None:
    """Two 503s then a 2xx: one outcome, sent, after three attempts and two backoffs, with
    a listing before each re-send (the loop's reconciliation hook), nobody invited twice."""
    config = make_config(max_attempts=3)
    clock = FakeClock()
    emulator.script("503", "503")
    journal = Journal(tmp_path / "j", durable=False, truncate=True)
    async with client_for(config) as client:
        sender = Sender(client, pacer_for(config, clock), journal, config, clock,
                        random.Random(1))  # fmt: skip
        [outcome] = await sender.send(Batch(TOKEN_A, ["a@example.com"]))
    journal.close()
    assert outcome.status.value == "sent"
    assert outcome.attempts == 3
    assert sender.stats.retries == 2
    methods = [r.method for r in emulator.requests if r.path.endswith("/invitation")]
    assert methods[-5:] == ["POST", "GET", "POST", "GET", "POST"]
    assert emulator.invited[(TOKEN_A, "a@example.com")] == 1


class StalledOnce(Journal):
    """A journal whose first intent takes ``stall`` s to become durable (the process was
    stopped meanwhile, as by SIGSTOP, or the machine was busy): ``clock`` moves on while
    it is written, or, without one, that much real time passes."""

    def __init__(self, path: Path, stall: float, clock: FakeClock | None = None) -> None:
        super().__init__(path, durable=False, truncate=True)
        self.clock, self.stall, self.times = clock, stall, list[float]()

    async def intent(
        self, token: str, emails: list[str], at: float, request_timeout: float | None = None
    ) -> str:
        self.times.append(at)
        ident = await super().intent(token, emails, at, request_timeout)
        if len(self.times) == 1:
            if self.clock is None:
                await asyncio.sleep(self.stall)
            else:
                self.clock.advance(self.stall)
        return ident


@pytest.mark.parametrize(("stall", "intents"), [(0.2, 1), (30.0, 2)])
async def test_a_request_held_up_past_its_intent_goes_only_with_a_fresh_one(
    emulator: Emulator, make_config: Callable[..., Config], tmp_path: Path,
    stall: float, intents: int,
) -> None:  # fmt: skip
    """Stalled for longer than --reconcile-delay while its intent was recorded, a POST
    does not leave under it (a worker settling that intent may have sent since): it goes
    as a retry with a new intent, sent once. A short hold-up sends under the first."""
    config = make_config(reconcile_delay=5.0)
    clock = FakeClock(start=1000.0)
    journal = StalledOnce(tmp_path / "j", stall, clock)
    async with client_for(config) as client:
        sender = Sender(client, pacer_for(config, clock), journal, config, clock,
                        random.Random(1), RunState())  # fmt: skip
        [outcome] = await asyncio.wait_for(sender.send(Batch(TOKEN_A, ["a@example.com"])), 10)
    journal.close()
    assert outcome.status == "sent"
    assert len(journal.times) == intents
    assert journal.times[-1] >= 1000.0 + (stall if intents == 2 else 0.0)
    assert [r.method for r in emulator.requests].count("POST") == 1
    assert sum(emulator.invited.values()) == 1


async def send_one(
    config: Config, clock: Clock, journal: Journal
) -> tuple[Outcome, list[MutableMapping[str, Any]], Sender]:
    """One address of TOKEN_A through a Sender on ``clock`` and ``journal`` (closed after):
    its outcome, the logs, the sender."""
    async with client_for(config) as client:
        sender = Sender(client, pacer_for(config, clock), journal, config, clock,
                        random.Random(1), RunState())  # fmt: skip
        with capture_logs() as logs:
            [outcome] = await asyncio.wait_for(sender.send(Batch(TOKEN_A, ["a@example.com"])), 20)
    journal.close()
    return outcome, logs, sender


@pytest.mark.parametrize("where", ["intent", "request"])
async def test_a_request_held_up_briefly_ends_when_its_intent_says(
    emulator: Emulator, make_config: Callable[..., Config], tmp_path: Path, where: str
) -> None:
    """Held up 0.4 s while its intent was recorded, or after it was let go and before the
    request is made (a first request making its client, a busy loop), under the 0.5 s a
    busy machine may take, a POST still goes, but its time limit counts from the intent,
    as whoever settles the intent counts: answered 1.8 s after it left, it times out at
    1.6 s and a listing settles it, where the full 2 s let it end 0.2 s past what a
    settler waits for. Sent once, under one intent."""
    config = make_config(reconcile_delay=0.45, timeout=2.0)
    emulator.faults = Faults(slow_seconds=1.8)
    emulator.script("slow")
    journal = StalledOnce(tmp_path / "j", 0.4 if where == "intent" else 0.0)
    clock: Clock = SystemClock()
    if where == "request":  # stopped for real: nothing of the process runs meanwhile
        clock = StallsAsItLeaves(clock, 2, lambda: time.sleep(0.4))
    outcome, logs, _ = await send_one(config, clock, journal)
    assert outcome.status == "sent"
    assert len(journal.times) == 1
    unknown = [e for e in logs if e["event"] == "batch.outcome_unknown"]
    assert [e["code"] for e in unknown] == ["timeout"], logs
    limit = float(unknown[0]["error"].removeprefix("no answer within ").partition("s ")[0])
    assert 1.2 < limit <= 1.6, unknown[0]["error"]
    assert [r.method for r in emulator.requests].count("POST") == 1
    assert sum(emulator.invited.values()) == 1


class Ticking(FakeClock):
    """Virtual time that moves 2 µs at every reading (a busy machine between two lines)."""

    def time(self) -> float:
        now = self.now
        self.now += 2e-6
        return now


async def test_the_time_limit_is_never_zero_or_less_when_a_request_goes(
    make_config: Callable[..., Config], tmp_path: Path
) -> None:
    """A request let go 1 µs inside its --timeout gets the 1 µs left, never a limit of
    zero or less (which aiohttp takes for no limit at all): the limit comes from the
    same reading of the clock as the decision to let it go."""
    from worker.send.journaled import Journaled
    from worker.send.trip import Trip

    config = make_config(timeout=0.5, reconcile_delay=0.5)
    clock = Ticking(start=1000.0)
    journal = Journal(tmp_path / "j", durable=False, truncate=True)
    async with client_for(config) as client:
        sender = Sender(client, pacer_for(config, clock), journal, config, clock,
                        random.Random(1), RunState())  # fmt: skip
        hooks = Journaled(sender, Trip(TOKEN_A, ["a@example.com"], clock, []))
        await hooks.sending(1000.0)
        assert hooks.held_up(1000.0) is None
        clock.now = 1000.0 + 0.5 - 1e-6  # the next reading: 1 µs inside the limit
        limit = hooks.leaving()
    journal.close()
    assert limit is not None
    assert 0 < limit <= 1e-6 + 1e-9


class StallsAsItLeaves:
    """``clock``, in a process that stalls (``stall``) the ``at``-th time a request asks
    whether it may leave (``Journaled.leaving``: as it is let go, before it is made, and
    once its connection is in hand), as one stopped just then (SIGSTOP, a paused VM)."""

    def __init__(self, clock: Clock, at: int, stall: Callable[[], object]) -> None:
        self.clock, self.at, self.stall, self.asked = clock, at, stall, 0

    def time(self) -> float:
        caller = inspect.currentframe()
        asker = caller.f_back if caller is not None else None
        if asker is not None and asker.f_code.co_name == "leaving":
            self.asked += 1
            if self.asked == self.at:
                self.stall()
        return self.clock.time()

    async def sleep(self, seconds: float) -> None:
        await self.clock.sleep(seconds)


@pytest.mark.parametrize("at", [1, 2, 3, 4])
async def test_a_request_stalled_after_it_was_let_go_does_not_leave_late(
    emulator: Emulator, make_config: Callable[..., Config], tmp_path: Path, at: int
) -> None:
    """Stalled past --reconcile-delay wherever the stall falls between the decision to let a
    POST go and its bytes leaving (as it is let go, before the request is made, once its
    connection is in hand, as its body is written a turn of the loop later), it does not
    leave under that intent: a worker settling the intent may have invited those people
    since. It goes again under a new one, once."""
    config = make_config(reconcile_delay=5.0, timeout=30.0)
    virtual = FakeClock(start=1000.0)
    clock = StallsAsItLeaves(virtual, at, lambda: virtual.advance(30.0))
    journal = StalledOnce(tmp_path / "j", 0.0, virtual)
    outcome, logs, sender = await send_one(config, clock, journal)
    assert clock.asked >= at
    # Known unsent (a retry, held up), not an unknown outcome to settle by listing.
    retries = [e for e in logs if e["event"] == "batch.retry_scheduled"]
    assert [(e["code"], "held up" in e["error"]) for e in retries] == [("connection_error", True)]
    assert [e for e in logs if e["event"] == "batch.outcome_unknown"] == []
    assert sender.stats.requests == 1  # the one that was kept from leaving is no request
    assert outcome.status == "sent"
    assert len(journal.times) == 2  # the first intent was given up, unsent
    assert journal.times[1] >= 1030.0
    assert [r.method for r in emulator.requests].count("POST") == 1
    assert sum(emulator.invited.values()) == 1
