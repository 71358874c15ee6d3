"""Queue workers under refused keys: exit 3 within seconds, every message left pending.

Real processes throughout: a private redis-server, an ``invite-worker emulator`` that
refuses wrong keys with 403, and workers started as a user would.
"""

from __future__ import annotations

import asyncio
import random
import shlex
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

from tests.conftest import (
    API_KEY,
    APP_KEY,
    TOKEN_A,
    Proc,
    a_summary,
    by_kind,
    dead_letters,
    each_invited_once_nothing_left,
    emulator_invited,
    pending,
    read_report,
    redis_cli,
)
from worker.batching import Batch
from worker.clock import SystemClock
from worker.config import Config
from worker.errors import keeps_pending
from worker.record.journal import Journal
from worker.run.counts import QueueRead
from worker.send import client_for, pacer_for
from worker.send.sender import Sender
from worker.state import RunState

WRONG = {"DD_API_KEY": API_KEY, "DD_APP_KEY": "rotated-app-key-000000"}
GOOD = {"DD_API_KEY": API_KEY, "DD_APP_KEY": APP_KEY}


def enqueue(
    spawn: Callable[..., Proc], tmp_path: Path, url: str, stream: str, rows: int
) -> set[tuple[str, str]]:
    source = tmp_path / "in.csv"
    pairs = {(f"dash-{i % 3}", f"person{i}@example.com") for i in range(rows)}
    source.write_text("token,email\n" + "".join(f"{t},{e}\n" for t, e in sorted(pairs)))
    spawn("enqueue", str(source), url, "--stream", stream).expect(0, timeout=60)
    return pairs


def worker(spawn: Callable[..., Proc], tmp_path: Path, url: str, stream: str, api: str,
           name: str, *extra: str, env: dict[str, str], timeout: str = "3") -> Proc:  # fmt: skip
    return spawn("run", url, "--stream", stream, "--consumer", name, "--linger", "0.1",
                 "--api-url", api, "--report", str(tmp_path / f"{name}.jsonl"),
                 "--batch-size", "20", "--reconcile-delay", "0.2",
                 # A killed worker's requests are waited out for their --timeout.
                 "--timeout", timeout, *extra, env=env)  # fmt: skip


def expect_refused(proc: Proc, report: Path) -> float:
    """The worker exits 3 within 10 s, its summary aborted with the reason; the seconds."""
    started = time.monotonic()
    proc.expect(3, timeout=10)
    took = time.monotonic() - started
    summary = by_kind(read_report(report), "summary")[-1]
    assert summary["aborted"] is True
    assert "DD_APP_KEY" in summary["abort_reason"]
    assert summary["emails_sent"] == 0
    assert "run.aborting" in proc.stderr()
    assert "Traceback" not in proc.stderr()
    return took


@pytest.mark.parametrize("until_empty", [True, False])
def test_refused_keys_on_a_fresh_stream_end_the_worker_and_lose_nothing(
    until_empty: bool,
    tmp_path: Path,
    start_emulator: Callable[..., str],
    redis_server: str,
    stream_name: str,
    spawn: Callable[..., Proc],
) -> None:
    """Keys the service refuses (403): exit 3 in under 10 s, every message still pending,
    none dead-lettered; then a worker with good keys sends each exactly once."""
    api = start_emulator()
    pairs = enqueue(spawn, tmp_path, redis_server, stream_name, 200)
    extra = ["--until-empty"] if until_empty else []
    refused = worker(spawn, tmp_path, redis_server, stream_name, api, "refused", *extra,
                     env=WRONG)  # fmt: skip
    expect_refused(refused, tmp_path / "refused.jsonl")
    assert pending(redis_server, stream_name) == len(pairs)  # read, none acknowledged
    assert dead_letters(redis_server, stream_name) == 0
    assert emulator_invited(api) == {}
    good = worker(spawn, tmp_path, redis_server, stream_name, api, "good", "--until-empty",
                  "--claim-idle", "1", env=GOOD)  # fmt: skip
    good.expect(0, timeout=60)
    each_invited_once_nothing_left(api, pairs, redis_server, stream_name)


def test_a_refused_request_leaves_no_intent_for_the_next_worker_to_wait_out(
    tmp_path: Path,
    start_emulator: Callable[..., str],
    redis_server: str,
    stream_name: str,
    spawn: Callable[..., Proc],
) -> None:
    """A request the service refused created nothing: the refused worker drops its intents
    on the way out, so a good worker claiming the messages sends them without waiting out
    the refused requests' 30 s timeout; every pair invited exactly once."""
    api = start_emulator()
    pairs = enqueue(spawn, tmp_path, redis_server, stream_name, 100)
    refused = worker(spawn, tmp_path, redis_server, stream_name, api, "refused", env=WRONG,
                     timeout="30")  # fmt: skip
    expect_refused(refused, tmp_path / "refused.jsonl")
    assert pending(redis_server, stream_name) == len(pairs)
    assert redis_cli(redis_server, "HLEN", f"{stream_name}:invite-worker:intents") == "0"
    good = worker(spawn, tmp_path, redis_server, stream_name, api, "good", "--until-empty",
                  "--claim-idle", "1", env=GOOD, timeout="30")  # fmt: skip
    good.expect(0, timeout=60)
    assert "queue.waiting" not in good.stderr()
    each_invited_once_nothing_left(api, pairs, redis_server, stream_name)


def test_refused_keys_while_settling_a_killed_workers_messages_end_the_worker(
    tmp_path: Path,
    start_emulator: Callable[..., str],
    redis_server: str,
    stream_name: str,
    spawn: Callable[..., Proc],
) -> None:
    """A stream holding a SIGKILLed worker's pending messages (intents included): workers
    with refused keys, with and without --until-empty, exit 3 in under 10 s without
    acknowledging or dead-lettering any; a worker with good keys then finishes: every pair
    invited exactly once."""
    api = start_emulator("--limit", "20", "--period", "1")
    pairs = enqueue(spawn, tmp_path, redis_server, stream_name, 600)
    # A short --timeout: a claimer waits out the killed worker's requests before listing.
    killed = worker(spawn, tmp_path, redis_server, stream_name, api, "killed", "--timeout", "3",
                    env=GOOD)  # fmt: skip
    deadline = time.monotonic() + 30
    while sum(emulator_invited(api).values()) < 100 and time.monotonic() < deadline:
        time.sleep(0.05)
    killed.popen.send_signal(signal.SIGKILL)
    killed.expect(-signal.SIGKILL, timeout=10)
    left = pending(redis_server, stream_name)
    assert left > 0
    before = emulator_invited(api)
    for name, extra in (("refused-1", ["--until-empty"]), ("refused-2", [])):
        proc = worker(spawn, tmp_path, redis_server, stream_name, api, name, "--claim-idle",
                      "1", *extra, env=WRONG)  # fmt: skip
        expect_refused(proc, tmp_path / f"{name}.jsonl")
        assert pending(redis_server, stream_name) == left
        assert dead_letters(redis_server, stream_name) == 0
        assert emulator_invited(api) == before
    good = worker(spawn, tmp_path, redis_server, stream_name, api, "good", "--until-empty",
                  "--claim-idle", "1", env=GOOD)  # fmt: skip
    good.expect(0, timeout=90)
    each_invited_once_nothing_left(api, pairs, redis_server, stream_name)


def test_the_terminal_summary_of_a_refused_queue_worker_names_the_fix() -> None:
    """The next step of a refused queue worker names the keys to check and the command to
    run again as it was (a queue worker has no --resume)."""
    from worker.run.human import next_step

    command = ["invite-worker", "run", "redis://127.0.0.1:6379/0", "--stream", "s"]
    queue = QueueRead(claimed=0, dead_lettered=0, group="invite-worker", consumer="c")
    step = next_step(a_summary(queue, aborted=True), "r.jsonl", command)
    assert "DD_API_KEY / DD_APP_KEY" in step
    assert "stay pending" in step
    assert "--resume" not in step
    assert step.endswith(shlex.join(command))


def test_the_terminal_summary_of_a_halted_queue_worker_gives_the_command_with_its_name() -> None:
    """A queue worker halted by a fault (the service unreachable) says what to fix, then
    the command to run again under its own --consumer: its pending messages are taken up
    at once, not after --claim-idle under another name."""
    from worker.run.human import next_step
    from worker.run.summary import Halt

    command = ["invite-worker", "run", "redis://127.0.0.1:6379/0", "--stream", "s",
               "--consumer", "vm-9030"]  # fmt: skip
    queue = QueueRead(claimed=0, dead_lettered=0, group="invite-worker", consumer="vm-9030")
    halt = Halt("service_unreachable", "cannot reach the API: check --api-url.")
    step = next_step(a_summary(queue, halted=halt, exit_code=3), "r.jsonl", command)
    assert step.startswith("cannot reach the API: check --api-url; then")
    assert step.endswith(shlex.join(command))


def test_the_terminal_summary_of_a_worker_whose_name_was_taken_over_says_nothing_to_run() -> None:
    """A queue worker halted because another process took over its --consumer name is
    not told to run again under that name: that process settles its messages."""
    from worker.run.human import next_step
    from worker.run.summary import Halt

    command = ["invite-worker", "run", "redis://127.0.0.1:6379/0", "--consumer", "vm-9030"]
    queue = QueueRead(claimed=0, dead_lettered=0, group="invite-worker", consumer="vm-9030")
    halt = Halt("consumer_taken_over", "another process took over --consumer 'vm-9030'.")
    step = next_step(a_summary(queue, halted=halt, exit_code=3), "r.jsonl", command)
    assert step.startswith("nothing: the process now running as --consumer 'vm-9030'")
    assert shlex.join(command) not in step


async def test_a_listing_refused_while_settling_an_unknown_outcome_stops_a_queue_worker(
    make_config: Callable[..., Config], tmp_path: Path, answering: Callable[..., Awaitable[str]]
) -> None:
    """A POST's answer is lost (503), and the listing that would settle it is refused
    (403): a queue worker's run stops, no second POST, and the emails stay unsettled
    (``outcome_unknown``, kept pending) instead of being re-sent or dead-lettered."""
    seen: list[str] = []

    async def answer(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.path.rsplit('/', 1)[-1]}")
        if request.method == "POST":
            return web.json_response({"errors": ["Service Unavailable"]}, status=503)
        if seen.count("GET invitation") == 1:  # the check's listing: nobody invited yet
            return web.json_response({"data": [], "meta": {"page": {"total_count": 0}}})
        return web.json_response({"errors": ["Forbidden"]}, status=403)

    config = make_config(api_url=await answering(answer))
    state = RunState(stop_on_abort=True)
    journal = Journal(tmp_path / "j", durable=False, truncate=True)
    try:
        async with client_for(config) as client:
            clock = SystemClock()
            sender = Sender(client, pacer_for(config, clock), journal, config, clock,
                            random.Random(1), state)  # fmt: skip
            [outcome] = await asyncio.wait_for(sender.send(Batch(TOKEN_A, ["a@example.com"])), 10)
    finally:
        journal.close()
    assert state.aborted
    assert state.stop.is_set()
    assert seen.count("POST invitation") == 1
    assert outcome.error is not None
    assert outcome.error.code == "outcome_unknown"
    assert keeps_pending(outcome.error.code)
